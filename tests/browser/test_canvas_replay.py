"""The live figure draws the same picture as matplotlib: canvas.js replaying a frame in Chromium vs Agg.

Each explorer's live view (backend "canvas") holds a background PNG and a frame (the paths and images of
its moving artists). Here the browser module itself (valueloss/viz/canvas.js, imported as the page imports
it) paints them on a canvas, and the pixels are compared with Agg's complete picture of the same figure.
Lines differ only at their anti-aliased edges, so the test counts pixels that differ visibly; a picture of
other settings must fail the same comparison (the check can tell a wrong figure from a right one).
"""

import base64
import io

import numpy as np
import pytest

pytestmark = pytest.mark.browser

VISIBLE = 48  # a channel differs by more than this: the pixel looks different
# At most this fraction of visibly different pixels: the same picture. Measured in Chromium 2026-12-03:
# 0.08 % (1D), 0.63 % (surfaces: the images' edges), 0.35 % (gradient); the other settings' picture differs
# in 0.65 %, 2.8 % and 14 % of the pixels.
SAME = {"LossCurveExplorer": 0.003, "SurfaceExplorer": 0.012, "GradientExplorer": 0.008}

LOAD = """async (source) => {
  const url = URL.createObjectURL(new Blob([source], { type: 'text/javascript' }));
  window.__canvas = await import(url);
}"""

PAINT = """async ([background, frame]) => {
  const bytes = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes(background)], { type: 'image/png' }));
  const parsed = window.__canvas.parseFrame(bytes(frame));
  const canvas = document.createElement('canvas');
  canvas.width = parsed.width; canvas.height = parsed.height;
  const images = await window.__canvas.decodeImages(parsed);
  window.__canvas.replay(canvas.getContext('2d'), parsed, bitmap, images);
  return canvas.toDataURL('image/png');
}"""


def _rgba(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(int)


def _different(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels in which some channel differs by more than VISIBLE."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.abs(a - b).max(axis=2) > VISIBLE).mean())


@pytest.mark.parametrize("name", ["LossCurveExplorer", "SurfaceExplorer", "GradientExplorer"])
def test_replayed_frame_matches_the_agg_picture(page, name):
    """Background + replayed frame in Chromium = Agg's picture of the figure; the other settings' picture does not."""
    pytest.importorskip("anywidget")
    from pathlib import Path

    from valueloss.viz import canvas, widgets

    page.set_content("<html><body></body></html>")
    page.evaluate(LOAD, Path(canvas.__file__).with_name("canvas.js").read_text())
    explorer = getattr(widgets, name)(backend="canvas", clip_eps=0.3)
    try:
        view = explorer.view

        def painted() -> np.ndarray:
            encoded = [base64.b64encode(bytes(view.background)).decode(), base64.b64encode(bytes(view.frame)).decode()]
            return _rgba(base64.b64decode(page.evaluate(PAINT, encoded).split(",", 1)[1]))

        first, first_agg = painted(), _rgba(explorer.to_png())
        explorer.controls["clip_eps"].value = 0.8
        second, second_agg = painted(), _rgba(explorer.to_png())
        same = max(_different(first, first_agg), _different(second, second_agg))
        assert same <= SAME[name]
        # The check can fail: each replay is at least 3x as far from the other settings' Agg picture.
        assert min(_different(first, second_agg), _different(second, first_agg)) > 3 * same
    finally:
        explorer.close()
