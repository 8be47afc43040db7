"""The explorer dashboard carries a still picture for readers without a running kernel (GitHub, nbviewer)."""

import base64
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.image import imread  # noqa: E402

from valueloss.viz import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _image(data: str):
    return imread(io.BytesIO(base64.b64decode(data)))


def test_the_dashboard_displays_as_a_widget_with_a_picture_of_its_three_figures():
    board = app.Dashboard(backend="agg", extent=2.5)
    try:
        bundle = board._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle and bundle["text/plain"] == repr(board)
        picture = _image(bundle["image/png"])
        heights = [round(e.figure.get_figheight() * 80) for e in board.explorers.values()]
        assert abs(picture.shape[0] - sum(heights)) <= 3 and picture.shape[1] <= 1280
        assert picture[..., :3].std() > 0.1  # not blank
        before = board.to_png()
        board.controls["clip_eps"].value = 0.6  # the picture follows the settings
        assert board.to_png() != before
    finally:
        board.close()


def test_the_explorer_notebook_stores_that_picture():
    cells = json.loads((ROOT / "notebooks" / "explorer.ipynb").read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    pictures = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 1 and _image(pictures[0]).shape[0] > 600
