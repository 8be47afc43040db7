"""Switch valueloss between the two conventions at the clip band's edges, whatever torch is installed.

torch <= 2.13's ``clamp`` passes the gradient at its bounds (a closed band), torch >= 2.14's passes
none (open): :data:`valueloss.functional.BAND_CLOSED` records which one is installed, and every part
of valueloss that depends on it reads it when called (the fused kernels key on it).
"""

from __future__ import annotations

import contextlib

from valueloss import functional as F


@contextlib.contextmanager
def band(closed: bool):
    """valueloss with the band's edges ``closed`` (as torch <= 2.13's clamp) or open (as torch >= 2.14's)."""
    saved = F.BAND_CLOSED
    F.BAND_CLOSED = closed
    try:
        yield
    finally:
        F.BAND_CLOSED = saved
