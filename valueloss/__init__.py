"""valueloss: PPO's clipped value-function loss, exact and explained.

``ValueLoss`` is a drop-in for OpenRLHF's; :mod:`valueloss.functional` holds the math;
:func:`valueloss.diagnose` summarises a batch; :class:`Recorder` (:mod:`valueloss.record`) saves every N-th
batch a loss sees, for ``valueloss inspect DIR``. This is the torch-only core: the notebooks' pictures
and explorers live in :mod:`valueloss.viz`, their demos in :mod:`valueloss.lessons`, the batch report in
:mod:`valueloss.batch` and the training runs in :mod:`valueloss.experiments`, each with its own extra.
"""

from __future__ import annotations

from . import functional
from .diagnostics import ValueLossDiagnostics, diagnose
from .functional import Region
from .loss import ValueLoss
from .record import Recorder

__version__ = "0.1.0"
__all__ = ["Recorder", "Region", "ValueLoss", "ValueLossDiagnostics", "__version__", "diagnose", "functional"]
