"""Test tiers: every test gets the markers its place implies, so a developer can pick a tier with ``-m``.

* ``browser``: everything under ``tests/browser/`` (Chromium through Playwright, real servers);
* ``notebooks``: every notebook cell nbval collects under ``notebooks/``;
* ``compile``: the doctests of ``valueloss/fused.py`` (its examples run the compiled path: seconds of inductor);
* ``compile`` and ``slow`` are otherwise set explicitly where a test compiles (``@pytest.mark.compile``) or is the
  long version of a test that ``make test`` runs short (``@pytest.mark.slow``).

``make test`` runs all but ``slow``, ``make test-fast`` none of the four, ``make test-slow`` only ``slow``
(docs/testing.md). The markers are registered in pyproject.toml, and ``--strict-markers`` refuses others.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
BROWSER = ROOT / "tests" / "browser"
NOTEBOOKS = ROOT / "notebooks"
COMPILING_DOCTESTS = {ROOT / "valueloss" / "fused.py"}


def tier_markers(path: Path, doctest: bool = False) -> list[str]:
    """The markers a test collected from ``path`` (a doctest if ``doctest``) gets from where it lives."""
    path = path.resolve()
    if path.is_relative_to(BROWSER):
        return ["browser"]
    if path.suffix == ".ipynb" and path.is_relative_to(NOTEBOOKS):
        return ["notebooks"]
    if doctest and path in COMPILING_DOCTESTS:
        return ["compile"]
    return []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark browser tests, nbval's notebook cells and the compiling doctests by their path."""
    for item in items:
        for name in tier_markers(Path(item.path), doctest=isinstance(item, pytest.DoctestItem)):
            item.add_marker(getattr(pytest.mark, name))
