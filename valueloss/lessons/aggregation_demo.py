"""Ragged batches, figures and a slider explorer for notebooks 04 (masks, aggregation) and 09 (data parallelism).

Imports matplotlib (and ipywidgets inside :func:`explore_normalisation`); ``import valueloss`` does
not load this module. Plot functions take ``ax=None`` and return the Axes. The math lives in
:mod:`valueloss.functional` and :mod:`valueloss.distributed`; nothing here computes a loss of its own.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib import patches as mpatches
from matplotlib.figure import Figure
from torch import Tensor

from .. import functional as F
from .data_parallel import NORMALISATIONS, compare_normalisations, split_batch

__all__ = [
    "COLORS",
    "NormalisationExplorer",
    "error_vs_spread",
    "explore_normalisation",
    "normalisation_figure",
    "plot_error_vs_spread",
    "plot_mask",
    "plot_normalisation_errors",
    "plot_sequence_weights",
    "plot_shards",
    "ragged_batch",
    "sequence_weights",
]

# Okabe & Ito (2008), safe for the common colour-vision deficiencies.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
CHOICE_COLORS = dict(zip(NORMALISATIONS, ("#D55E00", "#E69F00", "#0072B2"), strict=True))


def ragged_batch(
    batch_size: int = 16,
    max_len: int = 64,
    *,
    spread: float = 0.5,
    num_empty: int = 0,
    seed: int = 0,
    error_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple:
    """A synthetic RLHF-like batch with response lengths of a given spread.

    Lengths are drawn uniformly from ``[round((1 - spread) * max_len), max_len]`` (at least 1),
    masks are left-aligned (``action_mask[s, t] = t < length_s``); ``num_empty`` randomly chosen
    sequences are then masked entirely (e.g. responses dropped by an overlong filter). The critic's error on a token
    has standard deviation ``error_scale * (0.5 + length_s / max_len)``: longer responses are
    harder to predict, so the choice of normaliser changes the loss visibly.

    Returns:
        ``(values, old_values, returns, action_mask)``, each ``(batch_size, max_len)``; the mask is bool.

    Example:
        >>> values, old_values, returns, mask = ragged_batch(4, 8, spread=0.0)
        >>> mask.sum(-1).tolist()  # no spread: every response fills the batch
        [8, 8, 8, 8]
    """
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be in [0, 1]; got {spread!r}")
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be positive; got {batch_size} and {max_len}")
    if not 0 <= num_empty <= batch_size:
        raise ValueError(f"num_empty must be in [0, batch_size={batch_size}]; got {num_empty!r}")
    gen = torch.Generator().manual_seed(seed)
    shortest = max(1, round((1.0 - spread) * max_len))
    lengths = torch.randint(shortest, max_len + 1, (batch_size,), generator=gen)
    action_mask = torch.arange(max_len)[None, :] < lengths[:, None]
    empty = torch.randperm(batch_size, generator=gen)[:num_empty]
    action_mask[empty] = False
    returns = torch.randn(batch_size, max_len, generator=gen, dtype=dtype)
    error_std = error_scale * (0.5 + lengths.to(dtype) / max_len)[:, None]
    old_values = returns + error_std * torch.randn(batch_size, max_len, generator=gen, dtype=dtype)
    values = old_values + 0.2 * torch.randn(batch_size, max_len, generator=gen, dtype=dtype)
    return values, old_values, returns, action_mask


def sequence_weights(action_mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Each sequence's share of the reduced loss: row sums of :func:`functional.aggregation_weights`.

    For ``token-mean`` it is ``n_s / N`` (long sequences dominate); for ``seq-mean-token-mean``
    it is ``1 / S`` for every non-empty sequence, so each token of a short sequence weighs more.
    """
    return F.aggregation_weights(action_mask, mode=mode, dtype=torch.float64).sum(dim=-1)


def _new_ax(ax, figsize=(6.0, 3.5)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def plot_mask(action_mask: Tensor, ax=None):
    """The mask as an image: a row per sequence, a column per token position; filled = counted."""
    ax = _new_ax(ax)
    cmap = mcolors.ListedColormap(["#FFFFFF", COLORS[0]])
    ax.imshow(action_mask.to(torch.float64).numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    counts = action_mask.sum(-1).tolist()
    handles = [
        mpatches.Patch(facecolor=COLORS[0], label="response token (mask 1, counted)"),
        mpatches.Patch(facecolor="#FFFFFF", edgecolor="0.5", label="padding (mask 0, ignored)"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_xlabel("token position t")
    ax.set_ylabel("sequence s")
    length = action_mask.shape[-1]
    ax.set_title(f"action_mask: {len(counts)} sequences, T = {length}, {int(sum(counts))} response tokens")
    return ax


def plot_sequence_weights(action_mask: Tensor, modes: Sequence[str] = ("token-mean", "seq-mean-token-mean"), ax=None):
    """Grouped bars: the share of each sequence in the loss under each mode, sequences sorted by length."""
    ax = _new_ax(ax)
    lengths = action_mask.sum(-1)
    order = torch.argsort(lengths, stable=True)
    x = np.arange(len(order))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        shares = sequence_weights(action_mask, mode)[order].numpy()
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, shares, width, label=mode, color=COLORS[i % len(COLORS)])
    ax.set_xticks(x, [str(int(n)) for n in lengths[order]])
    ax.set_xlabel("sequences, sorted by length (label: unmasked tokens $n_s$)")
    ax.set_ylabel("share of the loss")
    ax.set_title(f"Share of the loss per sequence ({len(order)} sequences, {int(lengths.sum())} tokens)")
    ax.legend()
    return ax


def plot_shards(action_mask: Tensor, num_shards: int, num_micro_batches: int, ax=None):
    """Bars of each sequence's token count, coloured by rank, with each micro-batch's token total."""
    ax = _new_ax(ax)
    lengths = action_mask.sum(-1).to(torch.float64)
    pieces = split_batch(lengths, num_shards, num_micro_batches)
    start = 0
    for rank, shard in enumerate(pieces):
        for micro, mb in enumerate(shard):
            x = np.arange(start, start + len(mb))
            ax.bar(x, mb.numpy(), 0.85, color=COLORS[rank % len(COLORS)], label=f"rank {rank}" if micro == 0 else None)
            if len(mb):
                ax.text(x.mean(), float(mb.max()) + 1, f"{int(mb.sum())}", ha="center", va="bottom", fontsize=8)
            start += len(mb)
            ax.axvline(start - 0.5, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(0, max(float(lengths.max()), 1.0) * 1.15)
    ax.set_xlabel("sequence s (dotted lines: micro-batch boundaries, numbers: tokens per micro-batch)")
    ax.set_ylabel("unmasked tokens $n_s$")
    ax.set_title(f"{num_shards} rank(s) x {num_micro_batches} micro-batch(es)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never on one
    return ax


def plot_normalisation_errors(result, ax=None):
    """Bars of the relative gradient error of each normalisation choice (from :func:`compare_normalisations`)."""
    ax = _new_ax(ax)
    errors = [100.0 * result.grad_errors[c] for c in NORMALISATIONS]
    bars = ax.bar(list(NORMALISATIONS), errors, color=[CHOICE_COLORS[c] for c in NORMALISATIONS])
    for bar, err in zip(bars, errors, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{err:.2f}%", ha="center", va="bottom")
    ax.set_ylim(0, max(max(errors) * 1.25, 1.0))
    ax.set_ylabel(r"$\|g - g_{full}\| / \|g_{full}\|$ (%)")
    ax.set_xlabel("normalisation of each micro-batch")
    ax.set_title(
        f"{result.mode}: gradient error vs the full batch\n"
        f"({result.num_shards} ranks x {result.num_micro_batches} micro-batches)"
    )
    return ax


def error_vs_spread(
    spreads: Sequence[float],
    *,
    mode: str = "token-mean",
    num_shards: int = 2,
    num_micro_batches: int = 2,
    batch_size: int = 16,
    max_len: int = 64,
    num_empty: int = 0,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    clip_eps: float | None = 0.2,
) -> dict:
    """Mean relative gradient error of each normalisation choice over ``seeds``, per length spread.

    Returns ``{choice: np.ndarray of len(spreads)}`` for every choice in :data:`NORMALISATIONS`.
    """
    errors = {c: np.zeros(len(spreads)) for c in NORMALISATIONS}
    for i, spread in enumerate(spreads):
        for seed in seeds:
            batch = ragged_batch(batch_size, max_len, spread=spread, num_empty=num_empty, seed=seed)
            result = compare_normalisations(
                *batch, num_shards=num_shards, num_micro_batches=num_micro_batches, mode=mode, clip_eps=clip_eps
            )
            for c in NORMALISATIONS:
                errors[c][i] += result.grad_errors[c] / len(seeds)
    return errors


def plot_error_vs_spread(spreads: Sequence[float], errors: dict, *, title: str = "", ax=None):
    """Lines of the relative gradient error (%) of each choice against the length spread."""
    ax = _new_ax(ax)
    markers = dict(zip(NORMALISATIONS, ("o", "s", "^"), strict=True))
    top = 0.0
    for c in NORMALISATIONS:
        ax.plot(spreads, 100.0 * np.asarray(errors[c]), marker=markers[c], color=CHOICE_COLORS[c], label=c)
        top = max(top, 100.0 * float(np.max(errors[c])))
    ax.set_ylim(-0.03 * max(top, 1.0), 1.4 * max(top, 1.0))  # room for the legend above the lines
    ax.set_xlabel("length spread (0: all responses equally long, 1: from 1 token to max_len)")
    ax.set_ylabel(r"$\|g - g_{full}\| / \|g_{full}\|$ (%)")
    ax.set_title(title or "Gradient error of each normalisation vs length spread")
    ax.legend(loc="upper left", ncols=3)
    return ax


def normalisation_figure(
    *,
    spread: float = 0.6,
    num_shards: int = 2,
    num_micro_batches: int = 2,
    mode: str = "token-mean",
    num_empty: int = 0,
    batch_size: int = 16,
    max_len: int = 64,
    seed: int = 0,
    fig: Figure | None = None,
) -> Figure:
    """The explorer's figure: the split of a ragged batch (left) and each choice's gradient error (right)."""
    if fig is None:
        fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    fig.clear()
    ax_split, ax_err = fig.subplots(1, 2, width_ratios=(1.4, 1.0))
    batch = ragged_batch(batch_size, max_len, spread=spread, num_empty=num_empty, seed=seed)
    result = compare_normalisations(*batch, num_shards=num_shards, num_micro_batches=num_micro_batches, mode=mode)
    plot_shards(batch[3], num_shards, num_micro_batches, ax=ax_split)
    ax_split.set_title(
        f"spread {spread:.2f}, {num_empty} empty: {num_shards} rank(s) x {num_micro_batches} micro-batch(es)"
    )
    plot_normalisation_errors(result, ax=ax_err)
    fig.result = result  # the numbers behind the right panel, for tests and curious readers
    return fig


class NormalisationExplorer:
    """Sliders for length spread, empty sequences, ranks and micro-batches, and a mode menu.

    Each change redraws :func:`normalisation_figure`.

    The figure is drawn with Agg into an ``ipywidgets.Image``, so it updates in JupyterLab, Voila and
    classic notebooks alike, whatever the matplotlib backend. ``widget`` is the box to display.
    """

    def __init__(
        self,
        *,
        spread: float = 0.6,
        num_shards: int = 2,
        num_micro_batches: int = 2,
        mode: str = "token-mean",
        num_empty: int = 0,
        batch_size: int = 16,
        max_len: int = 64,
        seed: int = 0,
    ) -> None:
        import ipywidgets as widgets

        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        style = {"description_width": "initial"}
        self.spread = widgets.FloatSlider(
            value=spread, min=0.0, max=1.0, step=0.05, description="length spread", style=style
        )
        self.num_shards = widgets.IntSlider(value=num_shards, min=1, max=4, description="ranks (dp_size)", style=style)
        self.num_micro_batches = widgets.IntSlider(
            value=num_micro_batches, min=1, max=4, description="micro-batches per rank", style=style
        )
        self.num_empty = widgets.IntSlider(
            value=num_empty, min=0, max=batch_size // 2, description="empty sequences", style=style
        )
        self.mode = widgets.Dropdown(options=list(F.AGGREGATION_MODES), value=mode, description="mode", style=style)
        self.figure = Figure(figsize=(11.0, 4.0), layout="constrained")
        self.image = widgets.Image(format="png")
        controls = (self.spread, self.num_empty, self.num_shards, self.num_micro_batches, self.mode)
        for control in controls:
            control.observe(self.update, names="value")
        rows = [widgets.HBox(controls[:2]), widgets.HBox(controls[2:4]), widgets.HBox(controls[4:])]
        self.widget = widgets.VBox([*rows, self.image])
        self.update()

    @property
    def result(self):
        """The :class:`~valueloss.distributed.NormalisationComparison` shown right now."""
        return self.figure.result

    def update(self, change=None) -> None:
        """Redraw the figure for the current control values."""
        normalisation_figure(
            spread=self.spread.value,
            num_shards=self.num_shards.value,
            num_micro_batches=self.num_micro_batches.value,
            mode=self.mode.value,
            num_empty=self.num_empty.value,
            batch_size=self.batch_size,
            max_len=self.max_len,
            seed=self.seed,
            fig=self.figure,
        )
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        self.image.value = buffer.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def explore_normalisation(**kwargs) -> NormalisationExplorer:
    """Interactive demo of notebook 09: how each normaliser's gradient error moves with spread and splits.

    Keyword arguments are the starting values of :class:`NormalisationExplorer`.
    """
    return NormalisationExplorer(**kwargs)
