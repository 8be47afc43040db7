"""Self-test of the browser harness on a tiny notebook written here: a slider, a matplotlib line, a live figure.

Independent of the explorers: it uses only :class:`valueloss.viz.canvas.FigureView` (the live figure they
draw on), so if these fail, the browser, the servers, the widget front-ends or that view are broken, not
the explorers. A slider with a callback must change the figure's pixels; a slider without one must not
(the negative control proves the harness can tell the difference).
"""

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "harness_selftest.ipynb"
CELLS = [
    "import io\nimport ipywidgets as widgets\nimport numpy as np\nfrom matplotlib.figure import Figure\n"
    "from valueloss.viz.canvas import FigureView",
    # 'slope' redraws the line; 'inert' is connected to nothing. The background is drawn once, without the line.
    """x = np.linspace(0, 1, 50)
fig = Figure(figsize=(4, 3))
ax = fig.subplots()
(line,) = ax.plot(x, x, animated=True)
ax.set_ylim(0, 3)
background = io.BytesIO()
fig.savefig(background, format="png")
view = FigureView()
view.show(fig, [line], background.getvalue())
slope = widgets.FloatSlider(value=1.0, min=0.5, max=3.0, step=0.25, description="slope")
inert = widgets.FloatSlider(value=1.0, min=0.5, max=3.0, step=0.25, description="inert")
slope.observe(lambda change: (line.set_ydata(change["new"] * x), view.show(fig, [line])), names="value")
widgets.VBox([slope, inert, view])""",
]


@pytest.fixture(scope="module")
def selftest_notebook(served_root):
    """Write the throwaway notebook into the servers' root; return its name."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, served_root / NOTEBOOK)
    return NOTEBOOK


def check_slider_moves_figure(page, widgets, timeout=20.0):
    """Pressing a key on 'slope' changes readout and pixels; on 'inert' it changes the readout only."""
    figure = page.locator(".valueloss-figure").first
    figure.wait_for(state="visible", timeout=90_000)
    slope, inert = widgets.slider(page, "slope"), widgets.slider(page, "inert")
    before = widgets.wait_until_stable(figure)

    widgets.press(inert, "ArrowRight")
    assert widgets.readout(inert) == "1.25"
    assert not widgets.wait_for_change(figure, before, timeout=2.0), "figure changed without a callback"

    widgets.press(slope, "ArrowRight")
    assert widgets.readout(slope) == "1.25"
    assert widgets.wait_for_change(figure, before, timeout=timeout), "slider callback did not redraw the figure"


def test_jupyterlab_slider_redraws_live_figure(lab, page, widgets, selftest_notebook):
    """In JupyterLab a keyboard step on a slider redraws the live figure, and only through its callback."""
    lab.open(selftest_notebook)
    lab.run_all()
    assert lab.error_texts() == []
    check_slider_moves_figure(page, widgets)


@pytest.mark.slow  # the JupyterLab check above tests the same harness in make test; this is its Voilà twin
def test_voila_slider_redraws_live_figure(voila_server, page, widgets, selftest_notebook):
    """In Voilà (sources stripped) a keyboard step on a slider redraws the live figure."""
    page.goto(voila_server.url(f"/voila/render/{selftest_notebook}"))
    check_slider_moves_figure(page, widgets)
    assert page.locator(".jp-InputArea").count() == 0, "Voilà shows code although sources are stripped"


def test_drag_check_tells_a_backlog_from_a_live_drag(goals):
    """The drag analysis passes a live drag and fails a replaying backlog, a late final picture and a frozen one."""
    keys = [i * 33.0 for i in range(60)]  # 60 presses at 30/s: the last at 1947 ms
    live = [[0, 1]] + [[100.0 * i + 50, 10 + i] for i in range(20)] + [[2100.0, 99]]
    backlog = [[0, 1]] + [[2000.0 + 40 * i, 10 + i] for i in range(30)] + [[3300.0, 99]]
    replay = live[:-1] + [[2100.0, 99], [2200.0, 42], [2300.0, 99]]  # the final picture, a stale one, again
    late = live[:-1] + [[3000.0, 99]]
    frozen = [[0, 1], [100.0, 2]]  # one frame, then nothing
    result = goals.analyse_drag(keys, [live, backlog, replay, late, frozen])
    assert result["settle_ms"][0] == 2100.0 - 1947.0 and result["during"][0] == 19 and result["after"][0] == 2
    goals.check_drag({k: v[:1] for k, v in result.items() if k != "keys"}, ["live"])
    for i, name in enumerate(["backlog", "replay", "late", "frozen"], start=1):
        with pytest.raises(AssertionError):
            goals.check_drag({k: v[i:i + 1] for k, v in result.items() if k != "keys"}, [name])
