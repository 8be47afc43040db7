"""valueloss.viz.frames: what matplotlib draws for an artist, written down in canvas pixels, exactly.

A small decoder of the message format (the module docstring) reads the ops back; every coordinate,
colour, width, dash and clip rectangle is checked against what matplotlib itself computes. That the
browser paints these ops to the same picture as Agg is checked in tests/browser/test_canvas_replay.py.
"""

import io
import json
import struct

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from valueloss.viz.frames import pack_frame, record_artists  # noqa: E402

DPI = 100


def decode(message: bytes) -> dict:
    """The header of a packed frame, with each op's vertices, codes and pixels attached as arrays."""
    (size,) = struct.unpack_from("<I", message)
    header = json.loads(message[4:4 + size])
    body = message[4 + size:]
    for op in header["ops"]:
        if "path" in op:
            offset, count = op["path"]
            op["xy"] = np.frombuffer(body, dtype="<f4", count=2 * count, offset=offset).reshape(count, 2)
            op["code_list"] = np.frombuffer(body, dtype=np.uint8, count=count, offset=op["codes"])
        else:
            offset, size = op["image"]
            op["rgba"] = np.asarray(Image.open(io.BytesIO(body[offset:offset + size])).convert("RGBA"))
    return header


@pytest.fixture
def figure():
    fig = Figure(figsize=(4, 3), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    return fig, ax


def test_a_line_is_recorded_in_canvas_pixels_with_its_style(figure):
    """Vertices = transData of the points with y flipped; colour, alpha, width (pt -> px) and dashes as drawn."""
    fig, ax = figure
    (line,) = ax.plot([1, 5, 9], [2, 8, 3], color="#0072B2", alpha=0.5, lw=3, ls="--", solid_capstyle="round")
    frame = decode(pack_frame(record_artists(fig, [line]), background=7))
    assert frame["background"] == 7 and (frame["width"], frame["height"]) == (400, 300)
    (op,) = frame["ops"]
    expected = ax.transData.transform([[1, 2], [5, 8], [9, 3]])
    expected[:, 1] = 300 - expected[:, 1]
    np.testing.assert_allclose(op["xy"], expected, atol=1e-3)
    assert list(op["code_list"]) == [1, 2, 2]  # MOVETO, LINETO, LINETO
    assert op["stroke"] == pytest.approx([0, 0x72 / 255, 0xB2 / 255, 0.5]) and op["fill"] is None
    assert op["width"] == pytest.approx(3 * DPI / 72)
    offset, dashes = op["dashes"]
    assert dashes == pytest.approx([d * DPI / 72 for d in line._dash_pattern[1]])  # matplotlib's, in points
    box = ax.bbox.extents
    assert op["clip"] == pytest.approx([box[0], 300 - box[3], box[2] - box[0], box[3] - box[1]])


def test_a_filled_patch_and_its_face_alpha(figure):
    """A span's polygon is filled with its face colour (alpha kept) and stroked with its edge colour."""
    fig, ax = figure
    span = ax.axvspan(2, 4, facecolor=(1, 0, 0, 0.25), edgecolor="black", lw=1)
    (op,) = decode(pack_frame(record_artists(fig, [span])))["ops"]
    assert op["fill"] == pytest.approx([1, 0, 0, 0.25]) and op["stroke"] == pytest.approx([0, 0, 0, 1])
    assert op["code_list"][-1] == 79  # CLOSEPOLY (its vertex carries no point)
    xs = op["xy"][op["code_list"] != 79, 0]
    low, high = ax.transData.transform([[2, 0], [4, 0]])[:, 0]
    assert xs.min() == pytest.approx(low, abs=0.51) and xs.max() == pytest.approx(high, abs=0.51)  # snapped


def test_nan_points_break_the_line_instead_of_reaching_the_page(figure):
    """A NaN in the data starts a new sub-path (MOVETO), as Agg draws it; no NaN is sent."""
    fig, ax = figure
    (line,) = ax.plot([1, 2, 3, 4, 5], [1, 2, np.nan, 4, 5])
    (op,) = decode(pack_frame(record_artists(fig, [line])))["ops"]
    assert np.isfinite(op["xy"]).all()
    assert list(op["code_list"]) == [1, 2, 1, 2]


def test_an_image_arrives_as_the_pixels_matplotlib_resampled_top_row_first(figure):
    """An image op carries the RGBA matplotlib made for the screen, top row first, at its top-left corner."""
    fig, ax = figure
    data = np.array([[0.0, 1.0], [1.0, 0.0]])
    image = ax.imshow(data, cmap="gray", interpolation="nearest", extent=(0, 10, 0, 10), origin="upper")
    (op,) = decode(pack_frame(record_artists(fig, [image])))["ops"]
    rgba = op["rgba"]
    height, width = rgba.shape[:2]
    assert abs(width - ax.bbox.width) <= 2 and abs(height - ax.bbox.height) <= 2
    assert op["y"] == pytest.approx(300 - ax.bbox.y1, abs=1) and op["x"] == pytest.approx(ax.bbox.x0, abs=1)
    # origin='upper': data[0, 0] = 0 (black) is drawn at the top left, data[0, 1] = 1 (white) at the top right.
    assert rgba[2, 2, :3].tolist() == [0, 0, 0] and rgba[2, -3, :3].tolist() == [255, 255, 255]
    assert rgba[-3, 2, :3].tolist() == [255, 255, 255]


def test_hatching_and_clip_paths_are_refused_not_drawn_differently(figure):
    """What the page could not draw the same way raises a ValueError saying what."""
    fig, ax = figure
    hatched = ax.axvspan(2, 4, hatch="//")
    with pytest.raises(ValueError, match="hatching"):
        record_artists(fig, [hatched])
    (line,) = ax.plot([1, 2], [1, 2])
    line.set_clip_path(ax.patch.get_path(), ax.transAxes)
    with pytest.raises(ValueError, match="rectangular clipping only"):
        record_artists(fig, [line])


def test_a_collection_in_one_opaque_style_is_one_op_with_every_item(figure):
    """Opaque arrows of one colour become one compound path with all their vertices (painting them at once
    gives the same pixels); several colours or transparency keep matplotlib's item-by-item drawing."""
    fig, ax = figure
    x, y = np.meshgrid([2.0, 5.0, 8.0], [3.0, 7.0])
    arrows = ax.quiver(x, y, np.ones_like(x), np.zeros_like(x), color="black")
    (op,) = decode(pack_frame(record_artists(fig, [arrows])))["ops"]
    assert op["fill"] == pytest.approx([0, 0, 0, 1])
    assert (op["code_list"] == 1).sum() == 6  # one MOVETO per arrow
    tails = ax.transData.transform(np.column_stack([x.ravel(), y.ravel()]))
    tails[:, 1] = 300 - tails[:, 1]
    starts = op["xy"][op["code_list"] == 1]
    assert all(np.linalg.norm(starts - tail, axis=1).min() < 6 for tail in tails)  # each arrow near its tail

    coloured = ax.quiver(x, y, np.ones_like(x), np.zeros_like(x), color=["red", "blue"] * 3)
    assert len(decode(pack_frame(record_artists(fig, [coloured])))["ops"]) == 6
    faint = ax.quiver(x, y, np.ones_like(x), np.zeros_like(x), color="black", alpha=0.5)
    assert len(decode(pack_frame(record_artists(fig, [faint])))["ops"]) == 6
