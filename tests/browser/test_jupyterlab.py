"""Notebooks in JupyterLab, driven like a student would: Run All, then the slider.

``01_clipped_loss_1d.ipynb`` (its 1D explorer, straight from valueloss.viz.widgets) and ``explorer.ipynb``
(the app's dashboard, whose first figure is the same explorer driven by the shared sliders).
Runs every cell through the Run menu, finds the 1D explorer (the output holding a ``clip_eps`` slider
and an ipympl canvas), steps ``clip_eps`` with the keyboard and checks that the figure's pixels change
and that no cell shows an error, neither on screen nor in the notebook saved from the browser, except an
exercise's stub (tagged ``raises-exception``, which JupyterLab runs past), whose ``NotImplementedError`` is the
lesson. Screenshots before/after go to test-artifacts/browser/.
"""

import json

import pytest

pytestmark = pytest.mark.browser

NOTEBOOKS = ("01_clipped_loss_1d.ipynb", "explorer.ipynb")
STUB_TAGS = {"raises-exception", "nbval-raises-exception"}  # an exercise's stub: it raises until the learner fills it


def stub_cells(notebook: dict) -> list[int]:
    """Indices of the code cells that are exercise stubs, expected to raise NotImplementedError."""
    return [i for i, cell in enumerate(notebook["cells"])
            if cell["cell_type"] == "code" and STUB_TAGS & set(cell["metadata"].get("tags", []))]


def unexpected_errors(texts: list[str], stubs: int) -> list[str]:
    """The error texts on screen other than the stubs' NotImplementedError (one per stub)."""
    others = [text for text in texts if "NotImplementedError" not in text]
    assert len(texts) - len(others) == stubs, f"expected {stubs} stub error(s) on screen, got {texts}"
    return others
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_explorer_redraws_in_jupyterlab(notebook, lab, page, widgets, served_root, artifacts, latency_log):
    """Run All shows no error, and a keyboard step of clip_eps changes the explorer's figure pixels."""
    stem = notebook.removesuffix(".ipynb")
    stubs = stub_cells(json.loads((served_root / notebook).read_text()))
    lab.open(notebook)
    lab.run_all(timeout=240)
    assert unexpected_errors(lab.error_texts(), len(stubs)) == []

    outputs = page.locator(".jp-OutputArea-output").filter(has=page.locator(".jupyter-matplotlib-canvas-div"))
    explorer = outputs.filter(has=widgets.slider(page, "clip_eps")).first
    explorer.scroll_into_view_if_needed()
    slider = widgets.slider(explorer, "clip_eps")
    figure = explorer.locator(".jupyter-matplotlib-canvas-div").first  # the 1D explorer comes first
    before = widgets.wait_until_stable(figure)
    box = figure.bounding_box()
    assert box["width"] > 400 and box["height"] > 250, f"explorer figure not drawn: {box}"
    shot_before = artifacts(f"jupyterlab-{stem}-before.png", explorer.screenshot())

    assert widgets.step_and_wait(slider, [figure], [before]), "moving clip_eps did not redraw the figure"
    widgets.wait_until_stable(figure)
    shot_after = artifacts(f"jupyterlab-{stem}-after.png", explorer.screenshot())
    assert widgets.changed_pixels(shot_before.read_bytes(), shot_after.read_bytes()) > 0

    samples = []
    for i in range(4):  # reported, not asserted: four steps give a median; each must redraw
        ms = widgets.latency_ms(slider, figure, "ArrowLeft" if i % 2 == 0 else "ArrowRight")
        assert ms is not None, "a clip_eps step did not redraw the figure"
        samples.append(ms)
    latency_log(f"JupyterLab {stem}, clip_eps -> 1D explorer figure", samples)

    assert unexpected_errors(lab.error_texts(), len(stubs)) == []
    lab.save()
    saved = json.loads((served_root / notebook).read_text())
    errors = [(i, out["ename"]) for i, cell in enumerate(saved["cells"]) for out in cell.get("outputs", [])
              if out["output_type"] == "error"]
    assert errors == [(i, "NotImplementedError") for i in stubs]
    assert all(cell.get("execution_count") for cell in saved["cells"] if cell["cell_type"] == "code")
