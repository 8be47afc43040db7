"""Checks of the stored notebooks' form (nbval, run by `make test`, checks their content)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ALL_NOTEBOOKS = sorted(NOTEBOOKS[0].parent.glob("*.ipynb")) if NOTEBOOKS else []
STUB_TAGS = {"raises-exception", "nbval-raises-exception"}  # an exercise's stub: its NotImplementedError is the lesson


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    """Title, learning goals with a time estimate, numbered sections, summary and going further, in order."""
    text = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")
    assert re.match(r"^# \S", text), "the notebook opens with a title"
    positions = [text.find(heading) for heading in ("Learning goals", "## 1", "## Summary", "## Going further")]
    assert -1 not in positions and positions == sorted(positions), positions
    assert re.search(r"\b\d+\s*min", text), "an estimated time is given"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_executed_in_order_without_errors(path):
    """Stored executed top to bottom: execution counts 1..n, no error outputs but an exercise stub's
    NotImplementedError (in a cell tagged to raise), under 1.5 MB."""
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    errors = [(o["ename"], set(c["metadata"].get("tags", []))) for c in code for o in c["outputs"]
              if o["output_type"] == "error"]
    assert not [error for error in errors if not (error[0] == "NotImplementedError" and STUB_TAGS & error[1])]
    assert path.stat().st_size < 1.5e6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_most_outputs_are_compared(path):
    """At least two thirds of the code cells with output are compared by nbval (not marked to be ignored)."""
    with_output = [c for c in _cells(path) if c["cell_type"] == "code" and c["outputs"]]
    ignored = [c for c in with_output if {"nbval-ignore-output", "nbval-skip"} & set(c["metadata"].get("tags", []))]
    assert with_output and len(ignored) <= len(with_output) / 3, f"{len(ignored)} of {len(with_output)} ignored"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_live_in_tags_not_in_the_source(path):
    """No cell's source names nbval: its markers are cell tags, out of the text a learner reads."""
    assert not [_source(c) for c in _cells(path) if "nbval" in _source(c).lower()]


# A cell draws if, outside comments and imports, it uses pyplot, a figure, .show(), or one of the package's
# drawing functions (their names start with plot_ or name a picture: key_figure, loss_surface, ...).
DRAWING_CALL = re.compile(
    r"\bplt\.|\bfig\b|\.show\(|\bplot_\w*\(|\b(key_figure|surface_panels|loss_contours|wide_difference|loss_surface"
    r"|region_map|gradient_field|descent_trajectories|loss_curve|gradient_curve)\("
)
FIGURE_REPR = re.compile(r"<Figure size \d+x\d+")
PICTURES = {"image/png", "image/svg+xml", "image/jpeg", "application/vnd.jupyter.widget-view+json"}


def cells_drawing_without_image(cells: list[dict]) -> list[int]:
    """Indices of the code cells that draw (by their source, or a stored ``<Figure size ...>`` repr) but store no
    picture among their outputs."""
    missing = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        code = "\n".join(line.split("#")[0] for line in _source(cell).splitlines()
                         if not re.match(r"\s*(import |from \S+ import )", line))  # without comments and imports
        texts = [
            "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            for output in cell["outputs"]
        ]
        stored = {kind for output in cell["outputs"] for kind in output.get("data", {})}
        if (DRAWING_CALL.search(code) or any(FIGURE_REPR.search(text) for text in texts)) and not PICTURES & stored:
            missing.append(index)
    return missing


def _code_cell(source: str, outputs: list[dict]) -> dict:
    return {"cell_type": "code", "source": source, "outputs": outputs, "metadata": {}, "execution_count": 1}


def test_a_drawing_cell_without_an_image_is_found():
    """The figure check flags a cell whose figure was stored only as its text repr (as 08's report once was),
    and a plt cell with no output; it passes the same cells once they hold a PNG, and cells that draw nothing."""
    repr_only = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
                 "data": {"text/plain": "<Figure size 1100x750 with 4 Axes>"}}
    with_png = {**repr_only, "data": {**repr_only["data"], "image/png": "iVBORw0KGgo="}}
    cells = [
        _code_cell("# The report as a figure (clip_eps = 0.2)\nplot_report(report)", [repr_only]),
        _code_cell("fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()", []),
        _code_cell("make_report(batch)", [repr_only]),  # no drawing call in the source, but a figure's repr
        _code_cell("plot_report(report)", [with_png]),
        _code_cell("from valueloss.viz.batch_plot import plot_report\nprint(1)  # plot_report() draws later", []),
        {"cell_type": "markdown", "source": "plt.show()", "metadata": {}},
    ]
    assert cells_drawing_without_image(cells) == [0, 1, 2]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_every_drawing_cell_stores_an_image(path):
    """Every code cell that draws stores its picture (a PNG, or a widget view), so the notebook reads as it ran."""
    assert cells_drawing_without_image(_cells(path)) == []
