"""Smoke test until the full suites land."""


def test_import():
    """The package imports and builds a module."""
    import valueloss

    assert valueloss.ValueLoss(0.2).clip_eps == 0.2
