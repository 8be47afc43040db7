"""Pictures of PPO's clipped value loss, with matplotlib only.

Every ``plot``-style function takes ``ax=None`` (a new figure via pyplot is made only then) and
returns the Axes it drew on. Each one has an ``update_*`` twin that moves the same artists to new
settings in place (``set_data``/``set_array``/...), which is what :mod:`valueloss.viz.widgets` calls on a
slider change. Artists carry a ``gid`` (``"valueloss.<plot>.<part>"``) so that they can be found
again with :func:`find_artist`.

=========================  ====================================================================
function                   what it draws
=========================  ====================================================================
:func:`loss_curve`         loss against the predicted value ``v`` for one old value and return:
                           the clip band shaded, the unclipped and the clipped branch, and the
                           loss actually used (their max for ``variant="max"``)
:func:`gradient_curve`     ``d loss / d v`` against ``v``, with the stretch where clipping zeroes it
:func:`loss_surface`       heat map over the plane ``(v - v_old, R - v_old)`` of the unclipped or
                           clipped loss, or of their difference
:func:`region_map`         the same plane coloured by :class:`~valueloss.Region`
:func:`gradient_field`     arrows ``-d loss / d v`` over that plane (the way descent pushes ``v``)
:func:`descent_trajectories`  gradient descent on one value with and without clipping
=========================  ====================================================================

On the plane the loss depends only on the offsets ``v - v_old`` and ``R - v_old`` (and
``clip_eps``), so one picture holds every old value. All numbers come from
:mod:`valueloss.functional` (and :mod:`valueloss.viz.dynamics` for the descent); colours are the
Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), safe for colour-blind readers.
Importing this module does not import pyplot or touch rcParams.
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .. import functional as F
from .._threads import single_thread
from ..functional import Region
from .dynamics import simulate_descent

__all__ = [
    "OKABE_ITO",
    "REGION_COLORS",
    "descent_trajectories",
    "find_artist",
    "gradient_curve",
    "gradient_curve_data",
    "gradient_field",
    "loss_curve",
    "loss_curve_data",
    "loss_surface",
    "plane_grid",
    "region_map",
    "SURFACE_PARTS",
    "SURFACE_TITLES",
    "surface_data",
    "update_gradient_curve",
    "update_gradient_field",
    "update_loss_curve",
    "update_loss_surface",
    "update_region_map",
]

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
"""The eight Okabe-Ito colours."""

COLORS = {
    "unclipped": OKABE_ITO["blue"],
    "clipped": OKABE_ITO["orange"],
    "loss": OKABE_ITO["black"],
    "band": OKABE_ITO["sky_blue"],
    "old_value": OKABE_ITO["reddish_purple"],
    "return": OKABE_ITO["bluish_green"],
    "zeroed": OKABE_ITO["vermillion"],
}
"""Which Okabe-Ito colour each element of the pictures uses."""

REGION_COLORS = {
    Region.INSIDE: "#BFE3F7",  # a light tint of sky blue, so that arrows drawn on top stay visible
    Region.CLIPPED: OKABE_ITO["vermillion"],
    Region.UNCLIPPED: OKABE_ITO["bluish_green"],
}
"""Colour of each :class:`~valueloss.Region` in :func:`region_map`."""

REGION_LABELS = {
    Region.INSIDE: f"inside band: |v - v_old| {'<=' if F.BAND_CLOSED else '<'} eps",
    Region.CLIPPED: "clipped branch wins: gradient zeroed",
    Region.UNCLIPPED: "unclipped branch wins: gradient live",
}
"""Legend text of each :class:`~valueloss.Region`."""

BAND_LABEL = r"trust band $|v-v_{old}|\leq\epsilon$"
_SURFACE_KINDS = ("unclipped", "clipped", "difference")
_DTYPE = torch.float64


# --------------------------------------------------------------------------- helpers


def _get_ax(ax: Axes | None, figsize=(6.0, 4.0)) -> Axes:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"ax must be a matplotlib Axes or None; got {type(ax).__name__}")
        return ax
    import matplotlib.pyplot as plt  # only when the caller asks us to make a figure

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def find_artist(ax: Axes, gid: str):
    """The artist on ``ax`` with this ``gid`` (see the module docstring); KeyError if absent."""
    for artist in ax.get_children():
        if artist.get_gid() == gid:
            return artist
    raise KeyError(f"no artist with gid {gid!r} on this Axes; draw it first with the matching plot function")


def _eps_text(clip_eps: float | None) -> str:
    return "none" if clip_eps is None else f"{clip_eps:.2f}"


def _common(variant, loss_type, huber_delta) -> dict:
    return dict(variant=variant, loss_type=loss_type, huber_delta=huber_delta)


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=_DTYPE)


def _check_number(x, name: str) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}") from None
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {x!r}")
    return value


def _check_extent(extent) -> float:
    extent = _check_number(extent, "extent")
    if extent <= 0:
        raise ValueError(f"extent must be positive; got {extent!r}")
    return extent


def _check_num(num, name: str = "num", minimum: int = 2) -> int:
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {num!r}")
    return int(num)


def _set_span(patch, lo: float, hi: float) -> None:
    """Move an ``axvspan`` patch (a Rectangle since matplotlib 3.9, a Polygon before)."""
    if hasattr(patch, "set_width"):
        patch.set_x(lo)
        patch.set_width(hi - lo)
    else:  # pragma: no cover - matplotlib < 3.9
        xy = patch.get_xy()
        xy[:, 0] = [lo, lo, hi, hi, lo][: len(xy)]
        patch.set_xy(xy)


def _band(old_value: float, clip_eps: float | None) -> tuple[float, float]:
    if clip_eps is None:
        return old_value, old_value
    return old_value - clip_eps, old_value + clip_eps


def _default_range(old_value, return_, clip_eps) -> tuple[float, float]:
    lo = min(old_value - (clip_eps or 0.0), return_)
    hi = max(old_value + (clip_eps or 0.0), return_)
    margin = max(0.5, 0.6 * (hi - lo))
    return lo - margin, hi + margin


def _check_range(value_range, old_value, return_, clip_eps) -> tuple[float, float]:
    if value_range is None:
        return _default_range(old_value, return_, clip_eps)
    lo, hi = (_check_number(x, "value_range") for x in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with low < high; got {tuple(value_range)!r}")
    return lo, hi


def _pad_limits(*arrays: np.ndarray, pad: float = 0.06) -> tuple[float, float]:
    lo = min(float(np.nanmin(a)) for a in arrays)
    hi = max(float(np.nanmax(a)) for a in arrays)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    return lo - pad * span, hi + pad * span


# --------------------------------------------------------------------------- 1D: loss and gradient vs value


def loss_curve_data(
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int = 401,
) -> dict[str, np.ndarray]:
    """The numbers behind :func:`loss_curve`, as float64 numpy arrays.

    Keys: ``values`` (the x grid), ``loss_unclipped`` ``(v - R)**2``, ``loss_clipped``
    ``(v_clip - R)**2``, ``loss`` (the loss used: ``variant``'s), ``regions`` (uint8 codes).
    Without clipping (``clip_eps=None``) the clipped branch equals the unclipped one.
    """
    with single_thread():
        old_value = _check_number(old_value, "old_value")
        return_ = _check_number(return_, "return_")
        clip_eps = F.check_clip_eps(clip_eps)
        lo, hi = _check_range(value_range, old_value, return_, clip_eps)
        num = _check_num(num)
        values = torch.linspace(lo, hi, num, dtype=_DTYPE)
        old = torch.full_like(values, old_value)
        ret = torch.full_like(values, return_)
        common = _common(variant, loss_type, huber_delta)
        loss_unclipped = F.elementwise_value_loss(values, old, ret, clip_eps=None, **common)
        loss_clipped = F.elementwise_value_loss(values, old, ret, clip_eps=clip_eps, **{**common, "variant": "clipped"})
        loss = F.elementwise_value_loss(values, old, ret, clip_eps=clip_eps, **common)
        regions = F.clip_regions(values, old, ret, clip_eps=clip_eps, **common)
        return {
            "values": values.numpy(),
            "loss_unclipped": loss_unclipped.numpy(),
            "loss_clipped": loss_clipped.numpy(),
            "loss": loss.numpy(),
            "regions": regions.numpy(),
        }


def gradient_curve_data(
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int = 401,
) -> dict[str, np.ndarray]:
    """The numbers behind :func:`gradient_curve`, as float64 numpy arrays.

    Keys: ``values``, ``grad_unclipped`` (gradient without clipping), ``grad`` (with clipping,
    closed form, autograd's conventions), ``regions``, ``zeroed`` (``0.0`` where the region is
    :attr:`Region.CLIPPED`, NaN elsewhere: the stretch drawn as "gradient zeroed").
    """
    with single_thread():
        old_value = _check_number(old_value, "old_value")
        return_ = _check_number(return_, "return_")
        clip_eps = F.check_clip_eps(clip_eps)
        lo, hi = _check_range(value_range, old_value, return_, clip_eps)
        num = _check_num(num)
        values = torch.linspace(lo, hi, num, dtype=_DTYPE)
        old = torch.full_like(values, old_value)
        ret = torch.full_like(values, return_)
        common = _common(variant, loss_type, huber_delta)
        grad_unclipped = F.elementwise_value_loss_grad(values, old, ret, clip_eps=None, **common)
        grad = F.elementwise_value_loss_grad(values, old, ret, clip_eps=clip_eps, **common)
        regions = F.clip_regions(values, old, ret, clip_eps=clip_eps, **common).numpy()
        zeroed = np.where(regions == int(Region.CLIPPED), 0.0, np.nan)
        return {
            "values": values.numpy(),
            "grad_unclipped": grad_unclipped.numpy(),
            "grad": grad.numpy(),
            "regions": regions,
            "zeroed": zeroed,
        }


def loss_curve(
    ax: Axes | None = None,
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int = 401,
    legend: bool = True,
) -> Axes:
    """Per-token loss against the predicted value ``v``, for one old value and one return.

    Draws the trust band ``|v - v_old| <= clip_eps`` (shaded), the unclipped branch ``(v - R)**2``
    (dashed), the clipped branch ``(v_clip - R)**2`` (dotted), the loss actually used (solid black:
    their max for ``variant="max"``, the clipped branch for ``"clipped"``), and vertical lines at
    ``v_old`` and ``R``. ``value_range`` fixes the x-axis (default: around the band and the return).

    Gids: ``valueloss.loss_curve.{band,unclipped,clipped,loss,old_value,return}``.
    """
    data = loss_curve_data(
        old_value=old_value, return_=return_, clip_eps=clip_eps, variant=variant, loss_type=loss_type,
        huber_delta=huber_delta, value_range=value_range, num=num,
    )
    ax = _get_ax(ax)
    g = "valueloss.loss_curve."
    lo, hi = _band(float(old_value), F.check_clip_eps(clip_eps))
    ax.axvspan(lo, hi, color=COLORS["band"], alpha=0.25, lw=0, gid=g + "band", label=BAND_LABEL)
    x = data["values"]
    ax.plot(x, data["loss_unclipped"], color=COLORS["unclipped"], ls="--", lw=1.6, gid=g + "unclipped",
            label=r"unclipped $(v-R)^2$")
    ax.plot(x, data["loss_clipped"], color=COLORS["clipped"], ls=":", lw=2.0, gid=g + "clipped",
            label=r"clipped $(v^{clip}-R)^2$")
    used = "max of both: the loss used" if variant == "max" else "loss used (clipped variant)"
    ax.plot(x, data["loss"], color=COLORS["loss"], lw=2.4, alpha=0.85, gid=g + "loss", label=used, zorder=1.5)
    ax.axvline(float(old_value), color=COLORS["old_value"], lw=1.2, gid=g + "old_value", label=r"old value $v_{old}$")
    ax.axvline(float(return_), color=COLORS["return"], lw=1.2, ls="-.", gid=g + "return", label=r"return $R$")
    ax.set_xlabel(r"predicted value $v$")
    ax.set_ylabel(r"per-token loss $\ell(v)$")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(*_pad_limits(data["loss_unclipped"], data["loss_clipped"]))
    ax.set_title(_curve_title("Value loss", old_value, return_, clip_eps, variant))
    if legend:
        ax.legend(loc="upper center", fontsize="small", framealpha=0.9)
    return ax


def _curve_title(what, old_value, return_, clip_eps, variant) -> str:
    return (
        f"{what}: $v_{{old}}$={float(old_value):.2f}, $R$={float(return_):.2f}, "
        f"$\\epsilon$={_eps_text(F.check_clip_eps(clip_eps))}, {variant}"
    )


def update_loss_curve(
    ax: Axes,
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int | None = None,
    rescale: bool = True,
    title: bool = True,
) -> Axes:
    """Move the artists of a :func:`loss_curve` to new settings in place; returns ``ax``.

    ``value_range``/``num`` default to the x grid already drawn. ``rescale=False`` keeps the axis
    limits (the explorers fix them, so that only the curves need redrawing); ``title=False`` keeps the title.
    """
    g = "valueloss.loss_curve."
    line = find_artist(ax, g + "loss")
    x_old = line.get_xdata()
    if value_range is None:
        value_range = (float(x_old[0]), float(x_old[-1]))
    data = loss_curve_data(
        old_value=old_value, return_=return_, clip_eps=clip_eps, variant=variant, loss_type=loss_type,
        huber_delta=huber_delta, value_range=value_range, num=len(x_old) if num is None else num,
    )
    x = data["values"]
    for part in ("unclipped", "clipped", "loss"):
        find_artist(ax, g + part).set_data(x, data[part if part == "loss" else "loss_" + part])
    _set_span(find_artist(ax, g + "band"), *_band(float(old_value), F.check_clip_eps(clip_eps)))
    find_artist(ax, g + "old_value").set_xdata([float(old_value)] * 2)
    find_artist(ax, g + "return").set_xdata([float(return_)] * 2)
    if rescale:
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(*_pad_limits(data["loss_unclipped"], data["loss_clipped"]))
    if title:
        ax.set_title(_curve_title("Value loss", old_value, return_, clip_eps, variant))
    return ax


def gradient_curve(
    ax: Axes | None = None,
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int = 401,
    legend: bool = True,
) -> Axes:
    """``d loss / d v`` against the predicted value, with and without clipping.

    The clipped gradient (solid black) follows :func:`valueloss.functional.elementwise_value_loss_grad`
    (band edges as the installed torch's ``clamp``, :data:`valueloss.functional.BAND_CLOSED`; ties split
    50/50); the stretch where clipping makes it exactly zero
    (:attr:`Region.CLIPPED`) is drawn as a thick vermillion segment on the zero line.

    Gids: ``valueloss.gradient_curve.{band,unclipped,grad,zeroed,old_value,return}``.
    """
    data = gradient_curve_data(
        old_value=old_value, return_=return_, clip_eps=clip_eps, variant=variant, loss_type=loss_type,
        huber_delta=huber_delta, value_range=value_range, num=num,
    )
    ax = _get_ax(ax)
    g = "valueloss.gradient_curve."
    lo, hi = _band(float(old_value), F.check_clip_eps(clip_eps))
    ax.axvspan(lo, hi, color=COLORS["band"], alpha=0.25, lw=0, gid=g + "band", label=BAND_LABEL)
    ax.axhline(0.0, color="0.6", lw=0.8)
    x = data["values"]
    ax.plot(x, data["grad_unclipped"], color=COLORS["unclipped"], ls="--", lw=1.6, gid=g + "unclipped",
            label=r"without clipping $2(v-R)$")
    ax.plot(x, data["grad"], color=COLORS["loss"], lw=2.2, alpha=0.85, gid=g + "grad", label="with clipping")
    ax.plot(x, data["zeroed"], color=COLORS["zeroed"], lw=5, solid_capstyle="butt", gid=g + "zeroed",
            label="gradient zeroed by clipping")
    ax.axvline(float(old_value), color=COLORS["old_value"], lw=1.2, gid=g + "old_value", label=r"old value $v_{old}$")
    ax.axvline(float(return_), color=COLORS["return"], lw=1.2, ls="-.", gid=g + "return", label=r"return $R$")
    ax.set_xlabel(r"predicted value $v$")
    ax.set_ylabel(r"gradient $\partial\ell/\partial v$")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(*_pad_limits(data["grad_unclipped"], data["grad"]))
    ax.set_title(_curve_title("Gradient", old_value, return_, clip_eps, variant))
    if legend:
        ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    return ax


def update_gradient_curve(
    ax: Axes,
    *,
    old_value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float | None = 0.2,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    value_range: tuple[float, float] | None = None,
    num: int | None = None,
    rescale: bool = True,
    title: bool = True,
) -> Axes:
    """Move the artists of a :func:`gradient_curve` to new settings in place; returns ``ax``.

    ``value_range``/``num`` default to the x grid already drawn; ``rescale=False`` keeps the limits,
    ``title=False`` the title.
    """
    g = "valueloss.gradient_curve."
    x_old = find_artist(ax, g + "grad").get_xdata()
    if value_range is None:
        value_range = (float(x_old[0]), float(x_old[-1]))
    data = gradient_curve_data(
        old_value=old_value, return_=return_, clip_eps=clip_eps, variant=variant, loss_type=loss_type,
        huber_delta=huber_delta, value_range=value_range, num=len(x_old) if num is None else num,
    )
    x = data["values"]
    for part in ("unclipped", "grad", "zeroed"):
        find_artist(ax, g + part).set_data(x, data["grad_unclipped" if part == "unclipped" else part])
    _set_span(find_artist(ax, g + "band"), *_band(float(old_value), F.check_clip_eps(clip_eps)))
    find_artist(ax, g + "old_value").set_xdata([float(old_value)] * 2)
    find_artist(ax, g + "return").set_xdata([float(return_)] * 2)
    if rescale:
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(*_pad_limits(data["grad_unclipped"], data["grad"]))
    if title:
        ax.set_title(_curve_title("Gradient", old_value, return_, clip_eps, variant))
    return ax


# --------------------------------------------------------------------------- 2D: the plane (v - v_old, R - v_old)


def plane_grid(extent: float = 1.0, num: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The square grid over the plane: ``(offsets, offsets)`` with ``num`` points in ``[-extent, extent]``.

    Row ``i`` of a surface is ``R - v_old = offsets[i]``, column ``j`` is ``v - v_old = offsets[j]``.
    """
    extent = _check_extent(extent)
    num = _check_num(num)
    offsets = np.linspace(-extent, extent, num)
    return offsets, offsets


SURFACE_PARTS = ("unclipped", "clipped", "difference", "regions", "grad")
"""Every array :func:`surface_data` can compute over the plane."""


def surface_data(
    *,
    clip_eps: float | None = 0.2,
    extent: float = 1.0,
    num: int = 256,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    parts: tuple = SURFACE_PARTS,
) -> dict[str, np.ndarray]:
    """Surfaces over the plane, as ``(num, num)`` float64 arrays (row = ``R - v_old``).

    Keys: ``value_offsets`` (x), ``return_offsets`` (y), and those of ``parts`` (default all):
    ``unclipped``, ``clipped`` (the loss used, ``variant``'s), ``difference`` (``clipped -
    unclipped``), ``regions`` (uint8 :class:`Region` codes), ``grad`` (``d loss / d v`` with
    clipping). Asking only for the parts a picture needs keeps a slider redraw fast.
    """
    with single_thread():
        unknown = set(parts) - set(SURFACE_PARTS)
        if unknown:
            raise ValueError(f"parts must be drawn from {SURFACE_PARTS}; got {sorted(unknown)}")
        clip_eps = F.check_clip_eps(clip_eps)
        x, y = plane_grid(extent, num)
        dv = torch.from_numpy(x).to(_DTYPE).expand(len(y), len(x))
        dr = torch.from_numpy(y).to(_DTYPE).unsqueeze(1).expand(len(y), len(x))
        old = torch.zeros_like(dv)
        common = _common(variant, loss_type, huber_delta)
        out = {"value_offsets": x, "return_offsets": y}
        if {"unclipped", "difference"} & set(parts):
            unclipped = F.elementwise_value_loss(dv, old, dr, clip_eps=None, **common)
            out["unclipped"] = unclipped.numpy()
        if {"clipped", "difference"} & set(parts):
            clipped = F.elementwise_value_loss(dv, old, dr, clip_eps=clip_eps, **common)
            out["clipped"] = clipped.numpy()
        if "difference" in parts:
            out["difference"] = (clipped - unclipped).numpy()
        if "regions" in parts:
            out["regions"] = F.clip_regions(dv, old, dr, clip_eps=clip_eps, **common).numpy()
        if "grad" in parts:
            out["grad"] = F.elementwise_value_loss_grad(dv, old, dr, clip_eps=clip_eps, **common).numpy()
        return out


SURFACE_TITLES = {
    "unclipped": r"unclipped loss $(v-R)^2$",
    "clipped": "clipped loss (the one used)",
    "difference": "clipped minus unclipped",
}
_SURFACE_CMAPS = {"unclipped": "viridis", "clipped": "viridis", "difference": "cividis"}


def _plane_axes(ax: Axes, extent: float) -> None:
    ax.set_xlabel(r"$v - v_{old}$ (how far the value moved)")
    ax.set_ylabel(r"$R - v_{old}$ (where the return is)")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)


def _draw_plane_guides(ax: Axes, g: str, clip_eps: float | None, extent: float, legend: bool) -> None:
    """Band edges ``v - v_old = +-clip_eps`` and the diagonal ``v = R``."""
    eps = np.nan if clip_eps is None else clip_eps
    style = dict(color="white", lw=1.2, ls="--")
    ax.axvline(-eps, gid=g + "band_low", label=r"band edges $v-v_{old}=\pm\epsilon$", **style)
    ax.axvline(eps, gid=g + "band_high", **style)
    ax.plot([-extent, extent], [-extent, extent], color="white", lw=1.0, ls=":", gid=g + "diagonal", label=r"$v = R$")


def _move_plane_guides(ax: Axes, g: str, clip_eps: float | None, extent: float) -> None:
    eps = np.nan if clip_eps is None else clip_eps
    find_artist(ax, g + "band_low").set_xdata([-eps, -eps])
    find_artist(ax, g + "band_high").set_xdata([eps, eps])
    find_artist(ax, g + "diagonal").set_data([-extent, extent], [-extent, extent])


def _surface_title(kind: str, clip_eps: float | None, variant: str) -> str:
    return f"{SURFACE_TITLES[kind]}, $\\epsilon$={_eps_text(clip_eps)}, {variant}"


def loss_surface(
    ax: Axes | None = None,
    *,
    kind: str = "clipped",
    clip_eps: float | None = 0.2,
    extent: float = 1.0,
    num: int = 256,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    vmax: float | None = None,
    colorbar: bool = True,
) -> Axes:
    """Heat map of a loss surface over the plane ``(v - v_old, R - v_old)``.

    ``kind``: ``"unclipped"`` ``(v - R)**2``, ``"clipped"`` (the loss used with clipping) or
    ``"difference"`` (clipped minus unclipped, >= 0 for ``variant="max"``: what clipping adds).
    Dashed white lines mark the band edges, the dotted diagonal ``v = R``. ``vmax`` fixes the top
    of the colour scale (default: the maximum of the data), to compare panels.

    Gids: ``valueloss.loss_surface.{image,band_low,band_high,diagonal}``.
    """
    if kind not in _SURFACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _SURFACE_KINDS))}; got {kind!r}")
    clip_eps = F.check_clip_eps(clip_eps)
    extent = _check_extent(extent)
    data = surface_data(clip_eps=clip_eps, extent=extent, num=num, variant=variant, loss_type=loss_type,
                        huber_delta=huber_delta, parts=(kind,))
    ax = _get_ax(ax, figsize=(5.0, 4.2))
    g = "valueloss.loss_surface."
    z = data[kind]
    image = ax.imshow(
        z, origin="lower", extent=(-extent, extent, -extent, extent), aspect="auto", cmap=_SURFACE_CMAPS[kind],
        vmin=0.0 if kind != "difference" else min(0.0, float(z.min())), vmax=float(z.max()) if vmax is None else vmax,
        interpolation="nearest", interpolation_stage="data", gid=g + "image",
    )
    _draw_plane_guides(ax, g, clip_eps, extent, legend=False)
    _plane_axes(ax, extent)
    ax.set_title(_surface_title(kind, clip_eps, variant))
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="per-token loss" if kind != "difference" else "added loss")
    return ax


def update_loss_surface(
    ax: Axes,
    *,
    kind: str = "clipped",
    clip_eps: float | None = 0.2,
    extent: float | None = None,
    num: int | None = None,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    vmax: float | None = None,
    data: dict | None = None,
    title: bool = True,
) -> Axes:
    """Move a :func:`loss_surface` to new settings in place (``set_data``, ``set_extent``, ``set_clim``).

    ``extent``/``num`` default to the drawn ones. ``data`` may pass a :func:`surface_data` result
    already computed for these settings (the surface explorer computes once for three panels).
    ``title=False`` leaves the title alone.
    """
    g = "valueloss.loss_surface."
    image = find_artist(ax, g + "image")
    if kind not in _SURFACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _SURFACE_KINDS))}; got {kind!r}")
    clip_eps = F.check_clip_eps(clip_eps)
    extent = float(image.get_extent()[1]) if extent is None else _check_extent(extent)
    if data is None:
        num = image.get_array().shape[0] if num is None else num
        data = surface_data(clip_eps=clip_eps, extent=extent, num=num, variant=variant, loss_type=loss_type,
                            huber_delta=huber_delta, parts=(kind,))
    z = data[kind]
    image.set_data(z)
    image.set_extent((-extent, extent, -extent, extent))
    image.set_clim(0.0 if kind != "difference" else min(0.0, float(z.min())), float(z.max()) if vmax is None else vmax)
    _move_plane_guides(ax, g, clip_eps, extent)
    _plane_axes(ax, extent)
    if title:
        ax.set_title(_surface_title(kind, clip_eps, variant))
    return ax


def _region_cmap():
    colors = [REGION_COLORS[r] for r in (Region.INSIDE, Region.CLIPPED, Region.UNCLIPPED)]
    return mcolors.ListedColormap(colors, name="valueloss_regions")


def region_map(
    ax: Axes | None = None,
    *,
    clip_eps: float | None = 0.2,
    extent: float = 1.0,
    num: int = 256,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    legend: bool = True,
) -> Axes:
    """The plane ``(v - v_old, R - v_old)`` coloured by :func:`valueloss.functional.clip_regions`.

    Light blue: inside the band; vermillion: outside the band and the clipped branch wins, so the
    gradient is exactly zero; green: outside and the unclipped branch wins (gradient live).
    The image holds the raw region codes (``get_array()`` gives them back).

    Gids: ``valueloss.region_map.{image,band_low,band_high,diagonal}``.
    """
    clip_eps = F.check_clip_eps(clip_eps)
    extent = _check_extent(extent)
    data = surface_data(clip_eps=clip_eps, extent=extent, num=num, variant=variant, loss_type=loss_type,
                        huber_delta=huber_delta, parts=("regions",))
    ax = _get_ax(ax, figsize=(5.0, 4.2))
    g = "valueloss.region_map."
    ax.imshow(
        data["regions"], origin="lower", extent=(-extent, extent, -extent, extent), aspect="auto",
        cmap=_region_cmap(), vmin=-0.5, vmax=2.5, interpolation="nearest", interpolation_stage="data", gid=g + "image",
    )
    _draw_plane_guides(ax, g, clip_eps, extent, legend=False)
    for line in (find_artist(ax, g + "band_low"), find_artist(ax, g + "band_high"), find_artist(ax, g + "diagonal")):
        line.set_color("0.25")
    _plane_axes(ax, extent)
    ax.set_title(f"Where clipping zeroes the gradient, $\\epsilon$={_eps_text(clip_eps)}, {variant}")
    if legend:
        handles = [Patch(color=REGION_COLORS[r], label=REGION_LABELS[r]) for r in Region]
        handles.append(Line2D([], [], color="0.25", ls=":", label=r"$v = R$"))
        ax.legend(handles=handles, loc="lower right", fontsize="x-small", framealpha=0.9)
    return ax


def update_region_map(
    ax: Axes,
    *,
    clip_eps: float | None = 0.2,
    extent: float | None = None,
    num: int | None = None,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    data: dict | None = None,
    title: bool = True,
) -> Axes:
    """Move a :func:`region_map` to new settings in place; returns ``ax``. ``title=False`` keeps the title."""
    g = "valueloss.region_map."
    image = find_artist(ax, g + "image")
    clip_eps = F.check_clip_eps(clip_eps)
    extent = float(image.get_extent()[1]) if extent is None else _check_extent(extent)
    if data is None:
        num = image.get_array().shape[0] if num is None else num
        data = surface_data(clip_eps=clip_eps, extent=extent, num=num, variant=variant, loss_type=loss_type,
                            huber_delta=huber_delta, parts=("regions",))
    image.set_data(data["regions"])
    image.set_extent((-extent, extent, -extent, extent))
    _move_plane_guides(ax, g, clip_eps, extent)
    _plane_axes(ax, extent)
    if title:
        ax.set_title(f"Where clipping zeroes the gradient, $\\epsilon$={_eps_text(clip_eps)}, {variant}")
    return ax


def _field_arrays(clip_eps, extent, num, variant, loss_type, huber_delta):
    data = surface_data(clip_eps=clip_eps, extent=extent, num=num, variant=variant, loss_type=loss_type,
                        huber_delta=huber_delta, parts=("grad",))
    x, y = np.meshgrid(data["value_offsets"], data["return_offsets"])
    u = -data["grad"]
    spacing = 2 * extent / (num - 1)
    biggest = float(np.abs(u).max())
    scale = biggest / (0.9 * spacing) if biggest > 0 else 1.0
    return x, y, u, np.zeros_like(u), scale


def gradient_field(
    ax: Axes | None = None,
    *,
    clip_eps: float | None = 0.2,
    extent: float = 1.0,
    num: int = 15,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
) -> Axes:
    """Arrows of the descent direction ``-d loss / d v`` over the plane ``(v - v_old, R - v_old)``.

    The gradient moves only ``v``, so every arrow is horizontal; its length is proportional to the
    gradient (the longest arrow spans 0.9 grid cells). Where clipping zeroes the gradient there is
    no arrow, only a dot. Draw it on top of :func:`region_map` to see why.

    Gid: ``valueloss.gradient_field.quiver`` (``U`` holds ``-grad``).
    """
    clip_eps = F.check_clip_eps(clip_eps)
    extent = _check_extent(extent)
    num = _check_num(num)
    ax = _get_ax(ax, figsize=(5.0, 4.2))
    _draw_quiver(ax, clip_eps, extent, num, variant, loss_type, huber_delta)
    _plane_axes(ax, extent)
    if not ax.get_title():
        ax.set_title(f"Descent direction $-\\partial\\ell/\\partial v$, $\\epsilon$={_eps_text(clip_eps)}")
    return ax


def _draw_quiver(ax, clip_eps, extent, num, variant, loss_type, huber_delta):
    x, y, u, v, scale = _field_arrays(clip_eps, extent, num, variant, loss_type, huber_delta)
    return ax.quiver(
        x, y, u, v, angles="xy", scale_units="xy", scale=scale, color=COLORS["loss"], width=0.004,
        headwidth=4, headlength=4, minlength=0.3, gid="valueloss.gradient_field.quiver",
    )


def update_gradient_field(
    ax: Axes,
    *,
    clip_eps: float | None = 0.2,
    extent: float | None = None,
    num: int | None = None,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
) -> Axes:
    """Move a :func:`gradient_field` to new settings; returns ``ax``.

    Changes only the arrows (``set_UVC``) when the grid stays; a new ``extent`` or ``num`` replaces
    the quiver (same gid), since a Quiver cannot move its anchor points.
    """
    quiver = find_artist(ax, "valueloss.gradient_field.quiver")
    old_x = np.asarray(quiver.X, dtype=float).reshape(-1)
    old_num = int(round(np.sqrt(old_x.size)))
    num = old_num if num is None else _check_num(num)
    extent = float(old_x.max()) if extent is None else _check_extent(extent)
    clip_eps = F.check_clip_eps(clip_eps)
    if num != old_num or not np.isclose(extent, float(old_x.max())):
        quiver.remove()
        _draw_quiver(ax, clip_eps, extent, num, variant, loss_type, huber_delta)
    else:
        _, _, u, v, scale = _field_arrays(clip_eps, extent, num, variant, loss_type, huber_delta)
        quiver.scale = scale
        quiver.set_UVC(u, v)
    _plane_axes(ax, extent)
    return ax


# --------------------------------------------------------------------------- descent


def descent_trajectories(
    ax: Axes | None = None,
    *,
    value: float = 0.0,
    return_: float = 1.0,
    clip_eps: float = 0.2,
    lr: float = 0.1,
    steps: int = 60,
    refresh_every: int = 10,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    legend: bool = True,
) -> Axes:
    """Gradient descent on one predicted value, with and without clipping (:func:`.dynamics.simulate_descent`).

    The clipped run moves towards the return until it passes the band edge ``v_old + clip_eps`` (a step may
    overshoot it), then gets no gradient until the old value is refreshed every ``refresh_every`` steps. One
    value alone; a network's predictions keep moving through shared weights (:mod:`valueloss.lessons.escape`). The
    shaded staircase is the band around the old value.

    Gids: ``valueloss.descent.{unclipped,clipped,old_value,return}``.
    """
    common = dict(lr=lr, steps=steps, refresh_every=refresh_every, variant=variant, loss_type=loss_type,
                  huber_delta=huber_delta)
    plain = simulate_descent(value, return_, clip_eps=None, **common)
    clipped = simulate_descent(value, return_, clip_eps=clip_eps, **common)
    ax = _get_ax(ax, figsize=(7.0, 4.0))
    g = "valueloss.descent."
    step = np.arange(clipped.steps + 1)
    old = clipped.old_values.numpy()
    eps = clipped.clip_eps or 0.0
    ax.fill_between(step, old - eps, old + eps, step="post", color=COLORS["band"], alpha=0.3, lw=0,
                    label=r"trust band around $v_{old}$")
    ax.plot(step, old, drawstyle="steps-post", color=COLORS["old_value"], lw=1.2, gid=g + "old_value",
            label=f"old value (refreshed every {refresh_every} steps)")
    ax.plot(step, plain.values.numpy(), color=COLORS["unclipped"], ls="--", lw=1.8, gid=g + "unclipped",
            label="value, no clipping")
    ax.plot(step, clipped.values.numpy(), color=COLORS["loss"], lw=2.2, marker=".", ms=4, gid=g + "clipped",
            label="value, clipped loss")
    ax.axhline(float(return_), color=COLORS["return"], ls="-.", lw=1.2, gid=g + "return", label=r"return $R$")
    stalled = np.flatnonzero(clipped.stalled.numpy())
    ax.plot(stalled, clipped.values.numpy()[stalled], ls="none", marker="o", mfc="none", mec=COLORS["zeroed"],
            ms=7, gid=g + "stalled", label="step with zero gradient")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(r"predicted value $v$")
    ax.set_xlim(0, clipped.steps)
    ax.set_title(f"Gradient descent on one value: lr={lr:g}, $\\epsilon$={_eps_text(clip_eps)}, R={float(return_):.2f}")
    if legend:
        ax.legend(loc="lower right", fontsize="small", framealpha=0.9)
    return ax
