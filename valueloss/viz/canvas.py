"""A canvas widget that shows a matplotlib figure and repaints its changing artists in the browser.

:class:`FigureView` (an anywidget) holds two pictures of one figure: ``background``, a PNG of everything
that stays put (axes, ticks, labels, legends, colour bars; rendered by Agg), and ``frame``, the artists that
move with the sliders, written down by :mod:`valueloss.viz.frames` as the paths and images matplotlib drew
for them. The browser (``canvas.js``) paints the background and replays the frame over it; the background
is sent only when it changes. A slider change thus costs the kernel no rasterizing and no PNG encoding, and
the browser no image decoding: it strokes a few lines and copies the images.
"""

from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets

from .frames import pack_frame, record_artists

__all__ = ["FigureView"]


class FigureView(anywidget.AnyWidget):
    """The live figure of an explorer: ``background`` (PNG bytes), ``background_id``, ``frame`` (bytes).

    ``pixel_ratio`` is set by the page: the screen's device pixels per CSS pixel (2 on most "retina"
    screens). The figure is shown at its size in CSS pixels, so an explorer draws it at ``pixel_ratio``
    times its dpi to stay sharp.
    """

    _esm = Path(__file__).with_name("canvas.js")
    background = traitlets.Bytes(b"").tag(sync=True)
    background_id = traitlets.Int(0).tag(sync=True)
    frame = traitlets.Bytes(b"").tag(sync=True)
    pixel_ratio = traitlets.Float(1.0).tag(sync=True)

    def show(self, figure, artists, background_png: bytes | None = None, *, ratio: float = 1.0) -> None:
        """Send ``artists`` of ``figure`` as the new frame, with a new background first when one is given;
        ``ratio``: the figure's pixels per CSS pixel (the page shows it at its size divided by ``ratio``)."""
        with self.hold_sync():  # one message: the page never pairs a frame with the wrong background
            if background_png is not None:
                self.background = background_png
                self.background_id += 1
            self.frame = pack_frame(record_artists(figure, artists), background=self.background_id, ratio=ratio)
