"""valueloss: PPO's clipped value-function loss, exact and explained.

``ValueLoss`` is a drop-in for OpenRLHF's; ``valueloss.functional`` holds the math;
``valueloss.diagnostics.diagnose`` summarises a batch. Importing this package loads torch only.
"""

from . import functional
from .diagnostics import ValueLossDiagnostics, diagnose
from .functional import Region
from .loss import ValueLoss

__version__ = "0.1.0"
__all__ = ["Region", "ValueLoss", "ValueLossDiagnostics", "__version__", "diagnose", "functional"]
