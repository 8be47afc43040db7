"""Small training runs behind notebooks 05 and 06: a toy critic, a compact PPO, statistics and a CLI.

Not imported by ``import valueloss``; import it explicitly (``from valueloss import experiments``).
``python -m valueloss.experiments --help`` runs grids of PPO configurations from the command line.
Figures live in :mod:`valueloss.experiments.figures` and the widget in :mod:`valueloss.experiments.explorer`
(imported on demand: this package itself does not import matplotlib or ipywidgets).
"""

import importlib

from .ppo import PPOConfig, compute_gae, run_ppo
from .results import final_scores, load_results, runs_by_condition
from .toy_critic import ToyCriticConfig, iterations_to_reach, run_toy_critic

# The statistics need scipy.stats (~0.7 s to import): loaded at their first use, so that the toy critic, a
# PPO run and the CLI's worker processes start without it.
_STATS = ("curve_iqm_ci", "iqm", "iqm_difference_ci", "stratified_bootstrap_ci")


def __getattr__(name: str):
    if name in _STATS:
        return getattr(importlib.import_module(".stats", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STATS))


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
