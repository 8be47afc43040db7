"""valueloss: PPO's clipped value-function loss, exact and explained.

``ValueLoss`` is a drop-in for OpenRLHF's; ``valueloss.functional`` holds the math;
``valueloss.diagnostics.diagnose`` summarises a batch. The exports are lazy (PEP 562): ``import
valueloss`` loads nothing heavy, and torch is imported the first time one of them is used, so that
``valueloss inspect`` on a ``.npz`` file runs without torch. Neither matplotlib nor ipywidgets is
ever imported here.

>>> import valueloss
>>> valueloss.ValueLoss.__module__  # the first use imports torch and valueloss.loss
'valueloss.loss'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from . import functional
    from .diagnostics import ValueLossDiagnostics, diagnose
    from .functional import Region
    from .loss import ValueLoss

__version__ = "0.1.0"
__all__ = ["Region", "ValueLoss", "ValueLossDiagnostics", "__version__", "diagnose", "functional"]

_LAZY = {  # exported name -> (submodule, attribute; None for the submodule itself)
    "functional": ("functional", None),
    "Region": ("functional", "Region"),
    "ValueLoss": ("loss", "ValueLoss"),
    "diagnose": ("diagnostics", "diagnose"),
    "ValueLossDiagnostics": ("diagnostics", "ValueLossDiagnostics"),
}


def __getattr__(name: str) -> object:
    """Import an exported name on first access (PEP 562) and cache it in the module."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
