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
