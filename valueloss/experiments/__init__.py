"""Small training runs behind notebooks 05 and 06: a toy critic, a compact PPO, statistics and a CLI.

Not imported by ``import valueloss``; import it explicitly (``from valueloss import experiments``).
``python -m valueloss.experiments --help`` runs grids of PPO configurations from the command line.
Figures live in :mod:`valueloss.experiments.figures` and the widget in :mod:`valueloss.experiments.explorer`
(imported on demand: this package itself does not import matplotlib or ipywidgets).
"""

from .ppo import PPOConfig, compute_gae, run_ppo
from .results import final_scores, load_results, runs_by_condition
from .stats import curve_iqm_ci, iqm, iqm_difference_ci, stratified_bootstrap_ci
from .toy_critic import ToyCriticConfig, iterations_to_reach, run_toy_critic

__all__ = [
    "PPOConfig",
    "ToyCriticConfig",
    "compute_gae",
    "curve_iqm_ci",
    "final_scores",
    "iqm",
    "iqm_difference_ci",
    "iterations_to_reach",
    "load_results",
    "run_ppo",
    "run_toy_critic",
    "runs_by_condition",
    "stratified_bootstrap_ci",
]
