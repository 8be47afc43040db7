"""Static pictures of the loss over the plane ``(v - v_old, R - v_old)``, with contour lines (notebook 02).

As heat maps the clipped and the unclipped loss look almost alike: they differ only in two wedges beyond the
band. Contour lines (lines of equal loss) tell them apart at a glance: those of the unclipped loss
``(v - R)**2`` run parallel to the diagonal ``v = R`` everywhere; those of the clipped loss turn flat
(parallel to the ``v - v_old`` axis) inside the wedges, where the loss no longer changes with ``v``.

Every function draws on the Axes it is given (or makes a figure when given none) and returns it; the
numbers come from :func:`valueloss.viz.plotting.surface_data`, so from :mod:`valueloss.functional`.
Figures stay at most 11 inches wide: at 100 dpi they fit a 1280-pixel-wide window.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from .plotting import _check_extent, _get_ax, loss_surface, surface_data

__all__ = ["CONTOUR_LEVELS", "loss_contours", "surface_panels", "wide_difference"]

#: Loss values of the contour lines drawn on the unclipped and clipped surfaces (extent 1).
CONTOUR_LEVELS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0)
#: Contour levels of the difference surface (clipped minus unclipped).
DIFFERENCE_LEVELS = (0.05, 0.2, 0.4)
_GID = "valueloss.surfaces."


def loss_contours(
    ax: Axes | None = None,
    *,
    kind: str = "clipped",
    clip_eps: float | None = 0.2,
    extent: float = 1.0,
    num: int = 256,
    levels: tuple[float, ...] | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
) -> Axes:
    """The heat map of :func:`~valueloss.viz.plotting.loss_surface` with labelled contour lines on top.

    Args:
        kind: ``"unclipped"``, ``"clipped"`` or ``"difference"``.
        levels: loss values of the contour lines (default :data:`CONTOUR_LEVELS`, or
            :data:`DIFFERENCE_LEVELS` for the difference); levels beyond the data are skipped.
        vmax: top of the colour scale (default: the data's maximum), to give panels one scale.

    Gids: those of ``loss_surface`` plus ``valueloss.surfaces.contours`` (the contour set).
    """
    ax = loss_surface(ax, kind=kind, clip_eps=clip_eps, extent=extent, num=num, vmax=vmax, colorbar=colorbar)
    data = surface_data(clip_eps=clip_eps, extent=extent, num=num, parts=(kind,))
    z = data[kind]
    wanted = levels if levels is not None else DIFFERENCE_LEVELS if kind == "difference" else CONTOUR_LEVELS
    drawn = [level for level in sorted(wanted) if z.min() < level < z.max()]
    if drawn:
        contours = ax.contour(data["value_offsets"], data["return_offsets"], z, levels=drawn, colors="white",
                              linewidths=0.9)
        contours.set_gid(_GID + "contours")
        ax.clabel(contours, fmt="%g", fontsize="x-small", inline_spacing=2)
    return ax


def surface_panels(
    *, clip_eps: float | None = 0.2, extent: float = 1.0, num: int = 256, vmax: float = 4.0, axes=None
) -> np.ndarray:
    """Unclipped loss, clipped loss and their difference side by side, each with contour lines.

    The two loss panels share one colour scale (``0..vmax``). Makes an 11 x 3.9 inch figure unless
    ``axes`` (three Axes) is given; returns the three Axes.
    """
    if axes is None:
        import matplotlib.pyplot as plt  # only when the caller asks us to make a figure

        _, axes = plt.subplots(1, 3, figsize=(11.0, 3.9), layout="constrained")
    axes = np.asarray(axes).ravel()
    if axes.size != 3:
        raise ValueError(f"axes must hold three Axes (unclipped, clipped, difference); got {axes.size}")
    titles = {"unclipped": r"unclipped $(v-R)^2$", "clipped": "clipped (the loss used)",
              "difference": "clipped minus unclipped"}
    for ax, kind in zip(axes, ("unclipped", "clipped", "difference")):
        loss_contours(ax, kind=kind, clip_eps=clip_eps, extent=extent, num=num,
                      vmax=None if kind == "difference" else vmax)
        ax.set_title(f"{titles[kind]}, $\\epsilon$={'none' if clip_eps is None else f'{clip_eps:g}'}",
                     fontsize="medium")
    for ax in axes[1:]:
        ax.set_ylabel("")
    return axes


def wide_difference(
    ax: Axes | None = None, *, clip_eps: float = 2.0, extent: float = 4.0, window: float = 1.0
) -> Axes:
    """The difference surface on a plane wider than the band, with the square ``[-window, window]^2`` framed.

    With ``clip_eps >= window`` the framed square (the plane of the other panels) lies inside the band, where
    clipping changes nothing; the wedges where it does start only at moves larger than ``clip_eps``.

    Gids: those of ``loss_surface`` plus ``valueloss.surfaces.window`` (the frame).
    """
    window = _check_extent(window)
    ax = _get_ax(ax, figsize=(5.0, 4.2)) if ax is None else ax
    loss_contours(ax, kind="difference", clip_eps=clip_eps, extent=extent, levels=(1.0, 4.0, 8.0))
    frame = Rectangle((-window, -window), 2 * window, 2 * window, fill=False, edgecolor="white", linewidth=2.0,
                      gid=_GID + "window", label=f"moves and returns within $\\pm${window:g}")
    ax.add_patch(frame)
    ax.legend(handles=[frame], loc="lower right", fontsize="small", facecolor="0.3", labelcolor="white")
    ax.set_title(f"clipped minus unclipped, $\\epsilon$={clip_eps:g}, wider plane")
    return ax
