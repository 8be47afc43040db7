import time, pytest
pytestmark = pytest.mark.browser
def test_probe(lab, page, widgets):
    page.set_viewport_size({"width": 1280, "height": 800})
    lab.open("01_clipped_loss_1d.ipynb")
    lab.watch_first_paints()
    print(page.evaluate("() => [typeof window.__vlPaints, window.__vlPaints && window.__vlPaints.timer]"))
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    for i in range(30):
        time.sleep(0.5)
        print(page.evaluate("() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')].map(c => (c.querySelector('.jp-InputArea-prompt')||{}).textContent).join(' ')"))
        print(page.evaluate("() => JSON.stringify(window.__vlPaints.cells)"))
        print(page.evaluate("() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')].map(c => c.querySelectorAll('.jupyter-matplotlib-canvas-div canvas').length).join(' ')"))
