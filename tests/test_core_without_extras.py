"""The core (ValueLoss, functional, fused, diagnose, distributed, peers) works with torch and numpy alone."""

from __future__ import annotations

import os
from pathlib import Path

import no_extras

ROOT = Path(__file__).resolve().parents[1]
# fused imports with loss; its doctest compiles, so it is left out here
CORE = ["functional", "loss", "diagnostics", "distributed", "peers", "record"]


def test_core_tests_pass_with_every_extra_absent():
    """ValueLoss's tests and the core modules' doctests pass in an interpreter where matplotlib, ipywidgets,
    scipy, gymnasium, safetensors, tqdm, IPython and the other extras' packages do not exist (tests/no_extras.py)."""
    os.chdir(ROOT)
    # Only hypothesis's pytest plugin is loaded: the others (nbval, anyio, timeout, ...) serve other tests, and
    # importing them took 2 of this interpreter's 7 seconds.
    result = no_extras.run(
        ["-m", "pytest", "-p", "_hypothesis_pytestplugin", "-q", "-x", "-p", "no:cacheprovider", "tests/test_loss.py",
         *[f"valueloss/{name}.py" for name in CORE]],
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_the_extras_are_absent_there():
    """In that interpreter the extras' packages cannot be found while torch and pytest can, so the test above
    can fail when the core needs an extra."""
    os.chdir(ROOT)
    names = ("matplotlib", "scipy", "tqdm", "ipywidgets", "torch", "numpy", "pytest")
    code = f"import importlib.util; print([importlib.util.find_spec(n) is not None for n in {names!r}])"
    result = no_extras.run(["-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[False, False, False, False, True, True, True]", result.stderr
