"""Notebooks in JupyterLab (a 1280x800 window), driven like a student would: Run All, then the slider.

``01_clipped_loss_1d.ipynb`` (its 1D explorer, straight from valueloss.viz.widgets) and ``explorer.ipynb``
(the app's dashboard, whose first figure is the same explorer driven by the shared sliders).
Runs every cell through the Run menu, finds the 1D explorer (the output holding a ``clip_eps`` slider
and a live figure), steps ``clip_eps`` with the keyboard and checks that the figure's pixels change
and that no cell shows an error, neither on screen nor in the notebook saved from the browser, except an
exercise's stub (tagged ``raises-exception``, which JupyterLab runs past), whose ``NotImplementedError`` is the
lesson. Every figure fits the window (inside the notebook panel, no sideways scrolling), each explorer paints
within the first-paint ceiling of its cell finishing, single steps answer within the 1D ceiling, and a
two-second drag of clip_eps ends on the final picture without a backlog (ceilings: three times the goals of
issue 22; the medians are reported). Screenshots before/after and of the window go to test-artifacts/browser/.
"""

import json

import pytest

pytestmark = pytest.mark.browser

# Both notebooks of issue 22's table: notebook 01's explorer and the app's dashboard in JupyterLab.
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
def test_explorer_redraws_in_jupyterlab(notebook, lab, page, widgets, served_root, artifacts, latency_log, drag_log,
                                      goals):
    """Run All shows no error, the figures fit 1280x800 and paint at once, and clip_eps redraws without lag."""
    stem = notebook.removesuffix(".ipynb")
    stubs = stub_cells(json.loads((served_root / notebook).read_text()))
    page.set_viewport_size(goals.window)
    lab.open(notebook)
    lab.watch_first_paints()
    lab.run_all(timeout=240)
    assert unexpected_errors(lab.error_texts(), len(stubs)) == []

    paints = lab.first_paints()  # waits until every figure that appeared has painted
    canvases = page.locator(".valueloss-figure")
    assert paints and all(p["paint"] is not None and p["done"] is not None for p in paints), paints
    first_paint = goals.first_paints(f"JupyterLab {stem}", paints)
    assert max(first_paint) <= goals.ceiling * goals.ms["first paint"], paints
    figures = [canvases.nth(i) for i in range(canvases.count())]
    boxes = goals.fits(page, figures, ".jp-NotebookPanel:not(.lm-mod-hidden)")

    outputs = page.locator(".jp-OutputArea-output").filter(has=page.locator(".valueloss-figure"))
    explorer = outputs.filter(has=widgets.slider(page, "clip_eps")).first
    explorer.scroll_into_view_if_needed()
    artifacts(f"jupyterlab-{stem}-1280x800.png", page.screenshot())
    print(f"{stem}: figure boxes at 1280x800: {[(round(b['x']), round(b['width'])) for b in boxes]}")
    slider = widgets.slider(explorer, "clip_eps")
    figure = explorer.locator(".valueloss-figure").first  # the 1D explorer comes first
    before = widgets.wait_until_stable(figure)
    box = figure.bounding_box()
    assert box["width"] > 400 and box["height"] > 250, f"explorer figure not drawn: {box}"
    shot_before = artifacts(f"jupyterlab-{stem}-before.png", explorer.screenshot())

    assert widgets.step_and_wait(slider, [figure], [before]), "moving clip_eps did not redraw the figure"
    widgets.wait_until_stable(figure)
    shot_after = artifacts(f"jupyterlab-{stem}-after.png", explorer.screenshot())
    assert widgets.changed_pixels(shot_before.read_bytes(), shot_after.read_bytes()) > 0

    samples = []
    for i in range(4):  # four steps give a median; each must redraw
        ms = widgets.latency_ms(slider, figure, "ArrowLeft" if i % 2 == 0 else "ArrowRight")
        assert ms is not None, "a clip_eps step did not redraw the figure"
        samples.append(ms)
    median = latency_log(f"JupyterLab {stem}, clip_eps -> 1D explorer figure", samples)
    assert median <= goals.ceiling * goals.ms["1D"], samples

    start = float(widgets.readout(slider))
    drag = widgets.drag(slider, [figure])
    drag_log[0](f"JupyterLab {stem}", drag, ["1D explorer"])
    assert widgets.readout(slider) == f"{start + 0.60:.2f}", "the slider did not take every key press"
    drag_log[1](drag, ["1D explorer"])
    if notebook != "explorer.ipynb":  # the app hides the explorer's caption: its notes say the settings
        assert f"clip_eps = {start + 0.60:.2f}" in explorer.locator(".valueloss-settings").inner_text()

    assert unexpected_errors(lab.error_texts(), len(stubs)) == []
    lab.save()
    saved = json.loads((served_root / notebook).read_text())
    errors = [(i, out["ename"]) for i, cell in enumerate(saved["cells"]) for out in cell.get("outputs", [])
              if out["output_type"] == "error"]
    assert errors == [(i, "NotImplementedError") for i in stubs]
    assert all(cell.get("execution_count") for cell in saved["cells"] if cell["cell_type"] == "code")
