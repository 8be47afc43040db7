"""Figures of notebook 07: where the peers' clipped value losses differ, over the (v - old, R - old) plane.

matplotlib only (imported when this module is imported, never by ``import valueloss``); every
function takes ``ax=None`` and returns the Axes. The numbers come from :mod:`valueloss.peers`.

The gradient maps of different peers share one colour scale by default (the largest gradient of any peer at
those settings), so that two panels side by side compare colour for colour; a token whose gradient is exactly
zero is drawn in its own colour (:data:`ZERO_COLOR`), apart from the near-white of small gradients.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Patch

from ..peers import PEERS, PeerResult, peer_gradient_map

__all__ = [
    "ZERO_COLOR", "gradient_limit", "plot_gradient_difference", "plot_gradient_map", "plot_gradient_maps",
    "plot_peer_losses",
]

BLUE, ORANGE, GREEN, PINK = "#0072B2", "#D55E00", "#009E73", "#CC79A7"  # Okabe-Ito
CMAP = "PuOr_r"  # diverging, colour-blind safe (ColorBrewer)
ZERO_COLOR = "0.55"  # mid grey: exactly zero, apart from PuOr's near-white centre (small but non-zero values)


def gradient_limit(*, clip_eps: float = 0.2, num: int = 121) -> float:
    """The largest ``|d loss / d v|`` of any peer over the plane: the default colour scale of every gradient map."""
    return max(float(peer_gradient_map(name, clip_eps=clip_eps, num=num)[2].abs().max()) for name in PEERS)


def _plane(ax, delta, residual, data, clip_eps, title, label, limit=None, colorbar=True):
    limit = (float(np.abs(data).max()) or 1.0) if limit is None else limit
    cmap = colormaps[CMAP].with_extremes(bad=ZERO_COLOR)
    image = ax.pcolormesh(delta, residual, np.ma.masked_equal(data, 0.0), cmap=cmap, vmin=-limit, vmax=limit,
                          shading="auto")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label)
    ax.axvline(-clip_eps, color=GREEN, linestyle="--", label=r"band $|v - v_{old}| = \epsilon$")
    ax.axvline(clip_eps, color=GREEN, linestyle="--")
    ax.plot(delta[0], delta[0], color="black", linewidth=0.8, label="$R = v$")
    ax.set_xlabel(r"$v - v_{old}$")
    ax.set_ylabel(r"$R - v_{old}$")
    ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color=ZERO_COLOR, label="exactly 0"))
    ax.legend(handles=handles, loc="lower right", fontsize="small")
    return ax


def plot_gradient_map(
    name: str, *, clip_eps: float = 0.2, num: int = 121, vmax: float | None = None, colorbar: bool = True, ax=None
):
    """Per-token gradient ``d loss / d v`` of one peer over the plane; grey (:data:`ZERO_COLOR`) = exactly zero.

    The colour scale runs from ``-vmax`` to ``vmax``; by default ``vmax`` is :func:`gradient_limit`, the same for
    every peer, so maps drawn side by side share one scale.
    """
    ax = ax if ax is not None else plt.figure().add_subplot()
    delta, residual, grad = (t.numpy() for t in peer_gradient_map(name, clip_eps=clip_eps, num=num))
    limit = gradient_limit(clip_eps=clip_eps, num=num) if vmax is None else float(vmax)
    return _plane(ax, delta, residual, grad, clip_eps, f"{name}: gradient per token ($\\epsilon$ = {clip_eps:g})",
                  r"$\partial \ell / \partial v$", limit, colorbar)


def plot_gradient_maps(names, *, clip_eps: float = 0.2, num: int = 121, axes=None):
    """The gradient maps of several peers side by side, on one colour scale with one colour bar.

    Makes a figure at most 11 inches wide unless ``axes`` (one Axes per name) is given; returns the Axes.
    """
    names = list(names)
    if axes is None:
        _, axes = plt.subplots(1, len(names), figsize=(min(11.0, 4.6 * len(names)), 4.3), layout="constrained",
                               squeeze=False)
    axes = list(np.asarray(axes).ravel())
    if len(axes) != len(names):
        raise ValueError(f"axes must hold one Axes per name; got {len(axes)} Axes for {len(names)} names")
    limit = gradient_limit(clip_eps=clip_eps, num=num)
    for ax, name in zip(axes, names):
        plot_gradient_map(name, clip_eps=clip_eps, num=num, vmax=limit, colorbar=False, ax=ax)
    axes[0].figure.colorbar(axes[0].collections[0], ax=axes, label=r"$\partial \ell / \partial v$ (one scale)")
    return axes


def plot_gradient_difference(name_a: str, name_b: str, *, clip_eps: float = 0.2, num: int = 121, ax=None):
    """Difference of two peers' per-token gradients over the plane (``a - b``)."""
    ax = ax if ax is not None else plt.figure().add_subplot()
    delta, residual, grad_a = (t.numpy() for t in peer_gradient_map(name_a, clip_eps=clip_eps, num=num))
    _, _, grad_b = (t.numpy() for t in peer_gradient_map(name_b, clip_eps=clip_eps, num=num))
    return _plane(ax, delta, residual, grad_a - grad_b, clip_eps,
                  f"{name_a} minus {name_b} ($\\epsilon$ = {clip_eps:g})", "gradient difference")


def plot_peer_losses(results: list[PeerResult], *, clip_eps: float | None = None, ax=None):
    """Horizontal bars: each peer's loss, with ValueLoss's reproduction as a marker."""
    ax = ax if ax is not None else plt.figure().add_subplot()
    names = [r.name for r in results]
    y = np.arange(len(results))
    ax.barh(y, [r.loss for r in results], color=BLUE, label="peer")
    ax.plot([r.valueloss_loss for r in results], y, "o", color=ORANGE, label="ValueLoss with the peer's settings")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("value loss on the batch")
    suffix = f" (clip_eps = {clip_eps:g})" if clip_eps is not None else ""
    ax.set_title("Each peer and its ValueLoss reproduction" + suffix)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2)  # below the axes: no bar hidden
    return ax
