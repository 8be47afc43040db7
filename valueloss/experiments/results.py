"""Read the results files of ``python -m valueloss.experiments ppo`` and arrange them for statistics.

A results file (JSON) holds ``command`` (the exact command line), ``curve_keys`` and ``runs``: one entry per
(configuration, seed) with the full ``config`` dict, the ``seed`` and the per-iteration ``curves``.
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["load_results", "condition_label", "runs_by_condition", "curve_matrix", "final_scores", "window_scores"]


def load_results(path: os.PathLike | str) -> dict:
    """Read a results file; curves keep ``None`` where a value was missing (e.g. before the first episode).

    Raises ValueError naming the file when it is not JSON or not of the expected structure (``command``;
    ``runs``, each with a ``config`` object, a ``seed`` and ``curves`` of lists of numbers or null).
    """
    try:
        with open(path) as f:
            results = json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a valueloss results file: not text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valueloss results file: not JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not a valueloss results file: a JSON {type(results).__name__}, "
                         "expected an object")
    for key in ("command", "runs"):
        if key not in results:
            raise ValueError(f"{path} is not a valueloss results file: no {key!r} entry")
    if not isinstance(results["runs"], list):
        raise ValueError(f"{path} is not a valueloss results file: 'runs' is not a list")
    for index, run in enumerate(results["runs"]):
        problem = _run_problem(run)
        if problem:
            raise ValueError(f"{path} is not a valueloss results file: run {index} {problem}")
    return results


def _run_problem(run: object) -> str:
    """What is wrong with one entry of ``runs`` ("" if nothing)."""
    if not isinstance(run, dict):
        return f"is a JSON {type(run).__name__}, expected an object"
    if not isinstance(run.get("config"), dict) or "seed" not in run:
        return "lacks its 'config' object or its 'seed'"
    curves = run.get("curves")
    if not isinstance(curves, dict):
        return "has no 'curves' object"
    for key, curve in curves.items():
        if not isinstance(curve, list) or not all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in curve
        ):
            return f"curve {key!r} is not a list of numbers (or null)"
    return ""


def condition_label(config: dict) -> str:
    """A short name of the two switches, e.g. ``"clip 0.2, scaled rewards"`` or ``"no clip, raw rewards"``."""
    clip = config["value_clip_eps"]
    clip_text = "no clip" if clip is None else f"clip {clip:g}"
    return f"{clip_text}, {'scaled' if config['reward_scaling'] else 'raw'} rewards"


def runs_by_condition(results: dict) -> dict[str, list[dict]]:
    """The runs grouped by :func:`condition_label`, in the order the conditions first appear."""
    groups: dict[str, list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault(condition_label(run["config"]), []).append(run)
    return groups


def curve_matrix(runs: list[dict], key: str) -> np.ndarray:
    """``(num_runs, num_iterations)`` float array of one curve; missing values become NaN."""
    rows = [[np.nan if x is None else x for x in run["curves"][key]] for run in runs]
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"the runs have curves of different lengths: {sorted({len(row) for row in rows})}")
    return np.asarray(rows, dtype=np.float64)


def final_scores(runs: list[dict], key: str = "episodic_return", last_fraction: float = 0.1,
                 minimum: int | None = 1) -> np.ndarray:
    """One score per run: the mean of ``key`` over the last ``last_fraction`` of the iterations.

    With ``episodic_return`` (itself a mean over the last 10 finished episodes) this is the training
    performance at the end of the budget, as in the PPO papers' "final return".
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1]; got {last_fraction!r}")
    matrix = curve_matrix(runs, key)
    count = max(int(round(matrix.shape[1] * last_fraction)), minimum or 1)
    return np.nanmean(matrix[:, -count:], axis=1)


def window_scores(runs: list[dict], first_step: float, last_step: float, key: str = "episodic_return") -> np.ndarray:
    """One score per run: the mean of ``key`` over the iterations with ``first_step <= global_step <= last_step``."""
    steps = curve_matrix(runs, "global_step")[0]
    inside = (steps >= first_step) & (steps <= last_step)
    if not inside.any():
        raise ValueError(f"no iteration between steps {first_step} and {last_step}; the runs cover "
                         f"{steps[0]:g}..{steps[-1]:g}")
    return np.nanmean(curve_matrix(runs, key)[:, inside], axis=1)
