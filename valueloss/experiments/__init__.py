"""Small training runs behind notebooks 05 and 06: a toy critic, a compact PPO, statistics and a CLI.

Not imported by ``import valueloss``; import it explicitly (``from valueloss import experiments``).
``python -m valueloss.experiments --help`` runs grids of PPO configurations from the command line.
"""

from .ppo import PPOConfig, compute_gae, run_ppo



__all__ = [
    "PPOConfig",
    "ToyCriticConfig",
    "compute_gae",
    "iqm",
    "iqm_difference_ci",
    "iterations_to_reach",
    "run_ppo",
    "run_toy_critic",
    "stratified_bootstrap_ci",
]
