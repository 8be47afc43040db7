"""Why value clipping exists: the policy's ratio clip and the critic's value clip, side by side (notebook 00).

PPO's policy objective clips the probability ratio ``r = pi / pi_old`` to ``[1 - eps, 1 + eps]`` and takes
the minimum of the clipped and unclipped surrogates (Schulman et al. 2017, eq. 7); ppo2's critic clips the
prediction to ``v_old +- eps`` and takes the maximum of the clipped and unclipped squared errors. Both go
flat once a sample has moved past the band in the direction that improves it, so that sample stops
pulling. :func:`policy_clip_data` and :func:`value_clip_data` compute the two curves and where their
gradient is exactly zero (by autograd); :func:`plot_policy_and_value_clipping` draws them with one visual
language.
"""

from __future__ import annotations

import numpy as np
import torch

from valueloss import functional as F
from valueloss.viz.plotting import COLORS, _get_ax

__all__ = ["plot_policy_and_value_clipping", "policy_clip_data", "value_clip_data"]


def _checked_eps(clip_eps) -> float:
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)):
        raise TypeError(f"clip_eps must be a number; got {type(clip_eps).__name__}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1) for this picture; got {clip_eps!r}")
    return float(clip_eps)


def _zero_gradient(y: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    (grad,) = torch.autograd.grad(y.sum(), x)
    return (grad == 0).numpy()


def policy_clip_data(clip_eps: float = 0.2, advantage: float = 1.0, num: int = 401) -> dict[str, np.ndarray]:
    """PPO's clipped surrogate ``min(r A, clip(r, 1 - eps, 1 + eps) A)`` against the ratio ``r`` in [0, 2].

    Returns ``ratio``, ``objective`` (to be maximised), ``unclipped`` (``r A``) and ``zero_grad`` (True where
    autograd's gradient of the objective with respect to ``r`` is exactly 0).
    """
    eps = _checked_eps(clip_eps)
    ratio = torch.linspace(0.0, 2.0, num, dtype=torch.float64, requires_grad=True)
    objective = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    zero = _zero_gradient(objective, ratio)
    return {"ratio": ratio.detach().numpy(), "objective": objective.detach().numpy(),
            "unclipped": (ratio * advantage).detach().numpy(), "zero_grad": zero}


def value_clip_data(clip_eps: float = 0.2, old_value: float = 0.0, return_: float = 1.0,
                    num: int = 401) -> dict[str, np.ndarray]:
    """ppo2's clipped value loss ``max((v_clip - R)^2, (v - R)^2)`` against the new value ``v``.

    ``v`` spans ``[v_old - 1, v_old + 2.5]``. Returns ``value``, ``loss`` (to be minimised, computed by
    :func:`valueloss.functional.elementwise_value_loss`), ``unclipped`` (``(v - R)^2``) and ``zero_grad``.
    """
    eps = _checked_eps(clip_eps)
    value = torch.linspace(old_value - 1.0, old_value + 2.5, num, dtype=torch.float64, requires_grad=True)
    old = torch.full_like(value, float(old_value))
    ret = torch.full_like(value, float(return_))
    loss = F.elementwise_value_loss(value, old, ret, clip_eps=eps)
    zero = _zero_gradient(loss, value)
    return {"value": value.detach().numpy(), "loss": loss.detach().numpy(),
            "unclipped": ((value - ret) ** 2).detach().numpy(), "zero_grad": zero}


def _flat_stretch(ax, x: np.ndarray, y: np.ndarray, zero: np.ndarray, label: str) -> None:
    ax.plot(np.where(zero, x, np.nan), np.where(zero, y, np.nan), color=COLORS["zeroed"], lw=5,
            solid_capstyle="butt", label=label, zorder=3)


def plot_policy_and_value_clipping(clip_eps: float = 0.2, axes=None):
    """Left: the policy's clipped objective against the ratio (advantage +1). Right: the critic's clipped
    loss against the new value (``v_old = 0``, ``R = 1``). Band shaded, the stretch with zero gradient thick.

    ``axes``: two matplotlib Axes, or None for a new 11 x 3.8 inch figure. Returns the two Axes.
    """
    eps = _checked_eps(clip_eps)
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    left, right = (_get_ax(ax) for ax in axes)

    p = policy_clip_data(eps)
    left.axvspan(1 - eps, 1 + eps, color=COLORS["band"], alpha=0.25, lw=0, label=r"band $1\pm\epsilon$")
    left.plot(p["ratio"], p["unclipped"], color=COLORS["unclipped"], ls="--", lw=1.6, label=r"unclipped $rA$")
    left.plot(p["ratio"], p["objective"], color=COLORS["loss"], lw=2.2, label="clipped objective (maximised)")
    _flat_stretch(left, p["ratio"], p["objective"], p["zero_grad"], "no gradient")
    left.axvline(1.0, color=COLORS["old_value"], lw=1.2, label=r"$r = 1$ (old policy)")
    left.set(xlabel=r"probability ratio $r = \pi/\pi_{old}$", ylabel="objective",
             title=rf"Policy: ratio clipping, advantage $A=+1$, $\epsilon={eps:g}$")
    left.legend(loc="upper left", fontsize=8)

    v = value_clip_data(eps)
    right.axvspan(-eps, eps, color=COLORS["band"], alpha=0.25, lw=0, label=r"band $v_{old}\pm\epsilon$")
    right.plot(v["value"], v["unclipped"], color=COLORS["unclipped"], ls="--", lw=1.6, label=r"unclipped $(v-R)^2$")
    right.plot(v["value"], v["loss"], color=COLORS["loss"], lw=2.2, label="clipped loss (minimised)")
    _flat_stretch(right, v["value"], v["loss"], v["zero_grad"], "no gradient")
    right.axvline(0.0, color=COLORS["old_value"], lw=1.2, label=r"$v_{old} = 0$")
    right.axvline(1.0, color=COLORS["return"], lw=1.2, ls="-.", label=r"return $R = 1$")
    right.set(xlabel=r"new value $v$", ylabel="loss", ylim=(-0.1, 2.5),
              title=rf"Critic: value clipping, $v_{{old}}=0$, $R=1$, $\epsilon={eps:g}$")
    right.legend(loc="upper center", fontsize=8)
    return left, right
