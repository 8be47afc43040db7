"""The Voilà app (notebooks/explorer.ipynb, served as by ``make app``) in Chromium.

Every shared control and figure renders; each slider, moved with the keyboard, redraws exactly the
figures it drives; the slider -> figure latency and a two-second drag are measured, reported, and held to
ceilings of three times the goals of issue 22 (1D figure 50 ms, the planes 100 ms, drag settled 250 ms after
the last key, first paint 1.5 s after the dashboard appears).
Set VALUELOSS_APP_SCREENSHOT=path (``make screenshot`` does) to also write the README's screenshot.
"""

import io
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

PANELS = ("loss-curve", "surface", "gradient")
DRIVES = {  # shared control -> the panels whose figure must change (the others must not)
    "clip_eps": {"loss-curve", "surface", "gradient"},
    "old_value": {"loss-curve", "gradient"},
    "return": {"loss-curve", "gradient"},
    "extent": {"surface", "gradient"},
}


# Installed before the page loads: notes when the dashboard first shows and when each panel's canvas first
# holds a non-transparent pixel on its middle row (polled every 20 ms; no pixel hashing).
FIRST_PAINTS = """
(() => {
  const state = window.__vlAppPaints = { shown: null, painted: {} };
  const timer = setInterval(() => {
    const now = performance.now();
    if (state.shown === null && document.querySelector('.valueloss-dashboard')) state.shown = now;
    for (const panel of %s) {
      if (state.painted[panel]) continue;
      const canvas = document.querySelector(`.valueloss-panel-${panel} .valueloss-figure canvas`);
      if (!canvas || !canvas.width || !canvas.height) continue;
      const row = canvas.getContext('2d').getImageData(0, canvas.height >> 1, canvas.width, 1).data;
      for (let i = 3; i < row.length; i += 4) if (row[i]) { state.painted[panel] = now; break; }
    }
    if (Object.keys(state.painted).length === %d) clearInterval(timer);
  }, 20);
})();
"""


@pytest.fixture(scope="module")
def app(browser_context, voila_server, widget_driver, artifacts):
    """(page, WidgetDriver) of the app rendered once in a tab; the tab is closed after the module."""
    page = browser_context.new_page()
    page.page_errors = []
    page.on("pageerror", lambda exc: page.page_errors.append(str(exc)))
    page.add_init_script(FIRST_PAINTS % (list(PANELS), len(PANELS)))
    try:
        page.goto(voila_server.url("/voila/render/explorer.ipynb"), timeout=120_000)
        page.locator(".valueloss-dashboard").wait_for(state="visible", timeout=120_000)
        for panel in PANELS:
            page.locator(f".valueloss-panel-{panel} .valueloss-figure").wait_for(timeout=60_000)
        yield page, widget_driver(page)
    except BaseException:
        artifacts("FAILED-voila-app.png", page.screenshot(full_page=True))
        raise
    finally:
        page.close()


def figure(page, panel):
    """The live figure of one panel of the dashboard."""
    return page.locator(f".valueloss-panel-{panel} .valueloss-figure")


def shared_slider(page, ui, name):
    """The visible shared slider ``name`` (the explorers' own sliders are hidden)."""
    return ui.slider(page.locator(".valueloss-shared-controls"), name)


def inked_fraction(png: bytes) -> float:
    """Fraction of pixels of a screenshot that are not (near) white."""
    from PIL import Image

    gray = Image.open(io.BytesIO(png)).convert("L")
    histogram = gray.histogram()
    return 1.0 - sum(histogram[245:]) / sum(histogram)


def test_every_control_and_figure_renders(app, artifacts):
    """Four shared sliders, three drawn figures with an explanation each, no code, no error."""
    page, ui = app
    controls = page.locator(".valueloss-shared-controls")
    for name in DRIVES:
        slider = shared_slider(page, ui, name)
        assert slider.count() == 1 and slider.is_visible(), name
        assert ui.readout(slider) != ""
    assert page.locator(".widget-slider:visible").count() == len(DRIVES), "an explorer's own slider is visible"
    ui.wait_until_all_stable([figure(page, panel) for panel in PANELS])
    for panel in PANELS:
        canvas = figure(page, panel)
        box = canvas.bounding_box()
        assert box["width"] > 400 and box["height"] > 250, (panel, box)
        assert inked_fraction(canvas.screenshot()) > 0.05, f"{panel} figure looks blank"
        note = page.locator(f".valueloss-panel-{panel} .valueloss-note")
        assert note.is_visible() and len(note.inner_text()) > 100, panel
    assert controls.is_visible()
    assert page.get_by_text("app.dashboard()").count() == 0, "the app shows code"
    assert page.locator(".jp-CodeCell .jp-InputArea, .jp-CodeMirrorEditor").count() == 0, "the app shows code"
    errors = page.locator("[data-mime-type='application/vnd.jupyter.stderr'], .jp-RenderedText[data-mime-type*=error]")
    assert errors.count() == 0, errors.all_inner_texts()
    assert page.get_by_text("Error displaying widget").count() == 0
    assert page.page_errors == []
    artifacts("voila-app.png", app_screenshot(page, ui))
    if os.environ.get("VALUELOSS_APP_SCREENSHOT"):
        readme_image(artifacts("voila-app.png", app_screenshot(page, ui)), Path(os.environ["VALUELOSS_APP_SCREENSHOT"]))


def app_screenshot(page, ui) -> bytes:
    """The whole app, top to bottom (the viewport is made tall enough for one shot, then restored)."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": 2200})
    try:
        page.mouse.move(0, 0)
        ui.wait_until_all_stable([figure(page, panel) for panel in PANELS])
        return page.locator(".valueloss-dashboard").screenshot()
    finally:
        page.set_viewport_size(size)


def readme_image(source: Path, target: Path, width: int = 1280) -> None:
    """Downscale the app screenshot for the README."""
    from PIL import Image

    image = Image.open(source)
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(target, optimize=True)


@pytest.mark.parametrize("name", list(DRIVES))
def test_slider_redraws_the_figures_it_drives(app, name, artifacts):
    """A keyboard step on a shared slider changes the pixels of the figures it drives, and only those."""
    page, ui = app
    figures = {panel: figure(page, panel) for panel in PANELS}
    before = dict(zip(PANELS, ui.wait_until_all_stable(list(figures.values())), strict=True))
    shots = {panel: figures[panel].screenshot() for panel in DRIVES[name]}
    slider = shared_slider(page, ui, name)
    driven = sorted(DRIVES[name])
    presses = ui.step_and_wait(slider, [figures[p] for p in driven], [before[p] for p in driven])
    assert presses, f"{name} did not redraw all of {driven}"
    after = dict(zip(PANELS, ui.wait_until_all_stable(list(figures.values())), strict=True))
    for panel in PANELS:
        if panel not in DRIVES[name]:
            assert after[panel] == before[panel], f"{name} changed the {panel} figure, which it does not drive"
    for panel in DRIVES[name]:
        now = figures[panel].screenshot()
        assert ui.changed_pixels(shots[panel], now) > 0, (name, panel)
        artifacts(f"voila-{name}-{panel}-after.png", now)


def test_first_paint_of_every_figure(app, goals):
    """Each figure paints within the first-paint ceiling of the dashboard appearing."""
    page, ui = app
    state = page.evaluate("() => window.__vlAppPaints")
    assert state["shown"] is not None and sorted(state["painted"]) == sorted(PANELS), state
    delays = [{"cell": panel, "done": state["shown"], "paint": state["painted"][panel], "figures": 1}
              for panel in PANELS]
    worst = max(goals.first_paints("Voilà app (dashboard shown)", delays))
    assert worst <= goals.ceiling * goals.ms["first paint"], state


def test_slider_to_figure_latency(app, latency_log, goals):
    """Time from a clip_eps key press to the first changed frame of each figure: medians within 3x the goals."""
    page, ui = app
    slider = shared_slider(page, ui, "clip_eps")
    for panel, steps, goal in (("loss-curve", 4, "1D"), ("surface", 4, "plane"), ("gradient", 4, "plane")):
        samples = []
        for i in range(steps):
            ms = ui.latency_ms(slider, figure(page, panel), "ArrowRight" if i % 2 == 0 else "ArrowLeft")
            assert ms is not None, f"the {panel} figure did not change after a clip_eps step"
            samples.append(ms)
        median = latency_log(f"Voilà app, clip_eps -> {panel} figure", samples)
        assert median <= goals.ceiling * goals.ms[goal], (panel, samples)


def test_drag_ends_on_the_final_picture_without_a_backlog(app, drag_log):
    """Two seconds of clip_eps key repeat (30/s): frames during the drag, the final picture soon after, no replay."""
    page, ui = app
    slider = shared_slider(page, ui, "clip_eps")
    ui.wait_until_all_stable([figure(page, panel) for panel in PANELS])
    start = float(ui.readout(slider))
    key, final = ("ArrowRight", start + 0.60) if start <= 0.35 else ("ArrowLeft", start - 0.60)
    result = ui.drag(slider, [figure(page, panel) for panel in PANELS], key=key)
    record, check = drag_log
    record("Voilà app", result, list(PANELS))
    assert ui.readout(slider) == f"{final:.2f}", "the slider did not take every key press"
    check(result, list(PANELS))
    note = page.locator(".valueloss-panel-loss-curve .valueloss-note").inner_text()
    assert f"= {final:.2f}" in note, f"the notes do not show the final clip_eps {final:.2f}: {note}"


# A second Voilà page (about 10 s), so slow; the pixel ratio's kernel side is tested in test_widgets. `page` comes
# first: the browser then outlives the kernel this page starts (it checks for leftover processes when it closes).
@pytest.mark.slow
def test_figures_are_drawn_at_the_screens_pixel_ratio(page, voila_server):
    """On a 2x screen (emulated) each live figure gets twice as many canvas pixels as CSS pixels from the
    kernel, at the figure's CSS size of 840 pixels: sharp, not doubled in size nor halved."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 2,
                                                    "mobile": False})
    try:
        page.goto(voila_server.url("/voila/render/explorer.ipynb"), timeout=120_000)
        # Each view first shows the 1x picture at half size, then the kernel's 2x one.
        page.wait_for_function("""() => {
          const canvases = [...document.querySelectorAll('.valueloss-figure canvas')];
          return canvases.length === 3 && canvases.every(
            (c) => c.width === 2 * c.getBoundingClientRect().width && c.getBoundingClientRect().width === 840);
        }""", timeout=60_000)
    finally:
        cdp.send("Emulation.clearDeviceMetricsOverride")
        cdp.detach()
