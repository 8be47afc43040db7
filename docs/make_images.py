"""Draw the README thumbnails: the key figure of each notebook, as small PNGs under docs/images/.

Run from the repository root (``.venv/bin/python docs/make_images.py``); ``--out DIR`` writes
elsewhere (the test does). Each figure repeats the calls of the notebook cell it stands for, so
the thumbnail shows what the notebook shows.
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from valueloss.viz import plotting  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
DPI = 55


def start_here() -> Figure:
    """00: the loss against the new value (section 4 of the notebook)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    plotting.loss_curve(fig.subplots(), old_value=0.0, return_=1.0, clip_eps=0.2, value_range=(-1.0, 2.5))
    return fig


def clipped_loss_1d() -> Figure:
    """01: loss and gradient against the new value (section 1)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_grad = fig.subplots(1, 2)
    plotting.loss_curve(ax_loss, old_value=0.0, return_=1.0, clip_eps=0.2, value_range=(-2.5, 2.5))
    plotting.gradient_curve(ax_grad, old_value=0.0, return_=1.0, clip_eps=0.2, value_range=(-2.5, 2.5))
    return fig


def loss_surfaces() -> Figure:
    """02: unclipped, clipped and difference surfaces (section 2)."""
    fig = Figure(figsize=(15, 4.3), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 3), ["unclipped", "clipped", "difference"], strict=True):
        plotting.loss_surface(ax, kind=kind, clip_eps=0.2, extent=1.0, num=256,
                              vmax=4.0 if kind != "difference" else None)
    return fig


def gradients() -> Figure:
    """03: region map with the gradient field, and one value's descent, whose pull stops past the band edge."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_map, ax_descent = fig.subplots(1, 2)
    plotting.region_map(ax_map, clip_eps=0.2, extent=1.0, num=256)
    plotting.gradient_field(ax_map, clip_eps=0.2, extent=1.0, num=15)
    plotting.descent_trajectories(ax_descent, value=0.0, return_=1.0, clip_eps=0.2, lr=0.1, steps=60, refresh_every=10)
    return fig


FIGURES = {
    "00_start_here": start_here,
    "01_clipped_loss_1d": clipped_loss_1d,
    "02_loss_surfaces": loss_surfaces,
    "03_gradients": gradients,
}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "images", help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in FIGURES.items():
        path = args.out / f"{name}.png"
        make().savefig(path, dpi=DPI, metadata={"Software": None})
        written.append(path)
        print(path)
    return written


if __name__ == "__main__":
    main()
