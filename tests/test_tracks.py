"""The notebooks form two tracks: Learn (00-06 and the explorer) and Practice (07-10), mapped in notebook 00.

Learn notebooks teach the idea and carry no engineering: no float rounding, compilers, torch versions or
test plumbing (those live in the Practice notebooks). The map in 00 names every notebook with a time,
the Practice notebooks say where they stand, and the README links them all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
LEARN = [name for name in ALL if re.match(r"0[0-6]_", name)] + ["explorer"]
PRACTICE = [name for name in ALL if re.match(r"(0[7-9]|1\d)_", name)]

# Words that belong to the Practice track (or to the test suite), not to a learner's first reading.
JARGON = re.compile(
    r"\bulps?\b|inductor|\bATen\b|torch\s*2\.\d+|nbval|bitwise|bit for bit|subgradient|dynamo"
    r"|torch\.compile|\bDDP\b|\bFSDP\b|all_reduce|host sync|float32 rounding",
    re.IGNORECASE,
)


def _cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def jargon_in(cells: list[dict]) -> list[str]:
    """Every jargon word in the cells' sources, with its cell index."""
    return [f"cell {i}: {m.group(0)!r}" for i, c in enumerate(cells) for m in JARGON.finditer(_text(c))]


def test_the_tracks_cover_every_notebook():
    assert len(LEARN) == 8 and len(PRACTICE) == 4, (LEARN, PRACTICE)
    assert sorted(LEARN + PRACTICE) == ALL


def test_jargon_detector_finds_engineering_words():
    cells = [{"source": ["the clamp's minimum-norm subgradient changed in torch 2.14;"]},
             {"source": ["one ulp of float32 rounding, through inductor"]},
             {"source": ["why clip the critic at all?"]}]
    assert jargon_in(cells) == ["cell 0: 'subgradient'", "cell 0: 'torch 2.14'", "cell 1: 'ulp'",
                                "cell 1: 'float32 rounding'", "cell 1: 'inductor'"]


@pytest.mark.parametrize("name", LEARN)
def test_learn_notebooks_carry_no_engineering_jargon(name):
    assert jargon_in(_cells(name)) == []


def test_the_map_in_00_lists_every_notebook_with_a_time():
    (map_cell,) = [c for c in _cells("00_start_here") if _text(c).startswith("## 5. The map of this suite")]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w]+)` \|.*\| (\d+) min \|$", _text(map_cell), re.M)}
    assert sorted(rows) == ALL
    assert "Recommended path" in _text(map_cell)


@pytest.mark.parametrize("position, name", list(enumerate(PRACTICE, start=1)))
def test_practice_notebooks_say_where_they_stand(position, name):
    header = _text(_cells(name)[0])
    assert f"*Practice track, {position} of {len(PRACTICE)}." in header


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert all(f"(notebooks/{name}.ipynb)" in readme for name in ALL)
