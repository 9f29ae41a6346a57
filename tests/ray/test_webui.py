"""`ampray ui` driven in headless Chromium: a real training run from the Train tab (on the session's Ray
cluster) fills the loss plot with the run's own numbers, a benchmark fills the table and chart, bad input
shows an error in the page and the app keeps serving. A screenshot of each tab goes to
$AMPRAY_ARTIFACTS/ui (default: artifacts/ui)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.unit.helpers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.ui]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("AMPRAY_ARTIFACTS", ROOT / "artifacts")) / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def _need(what: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("AMPRAY_REQUIRE_UI") == "1":
            pytest.fail(f"AMPRAY_REQUIRE_UI=1 but {what} is missing")
        pytest.skip(f"{what} is missing (pip install 'ampray[ui]' playwright; apt-get install chromium)")


@pytest.fixture(scope="module")
def ui_url(ray_address, tmp_path_factory):
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
            found = True
        except ImportError:
            found = False
        _need(module, found)
    _need("chromium", Path(CHROMIUM).exists())
    storage = tmp_path_factory.mktemp("ui-runs")
    port = free_port()
    log = open(storage / "ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "ampray.orchestrator.cli", "ui", "--port", str(port),
                               "--storage-path", str(storage), "--address", ray_address],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"ampray ui did not come up:\n{(storage / 'ui.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, storage
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture()
def page(ui_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(ui_url[0])
        page.wait_for_selector("#train-button")
        yield page
        browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _line_points(page, elem: str) -> list[tuple[float, float]]:
    """Vertices (SVG x, y) of the line mark Vega drew in a plot."""
    d = page.locator(f"#{elem} path[aria-roledescription='line mark']").first.get_attribute("d") or ""
    return [(float(x), float(y)) for x, y in re.findall(r"[ML]\s*([-\d.e]+)[ ,]([-\d.e]+)", d)]


def _wait_text(page, elem: str, needle: str, timeout_s: float) -> str:
    page.wait_for_function(f"document.querySelector('#{elem}').innerText.includes({needle!r})",
                           timeout=timeout_s * 1000)
    return page.locator(f"#{elem}").inner_text()


def test_train_tab_streams_a_real_run_into_the_plots(page, ui_url):
    from ampray.actors.aggregator import read_scalars

    page.locator("#train-epochs input").fill("2")
    page.locator("#train-batch input").fill("64")
    page.locator("#train-button").click()
    seen, deadline = [], time.time() + 240
    while time.time() < deadline:
        text = page.locator("#train-status").inner_text()
        if not seen or seen[-1] != text:
            seen.append(text)
        if text.startswith("Finished"):
            break
        time.sleep(0.2)
    assert seen[-1].startswith("Finished"), seen[-3:]
    assert any(t.startswith("Training") for t in seen), seen  # progress came while the run went on
    match = re.search(r"`?(ui-mlp-[\w-]+)`? ?: step (\d+) / (\d+), (\d) (CPU|GPU) worker\(s\), fp16", seen[-1])
    assert match, seen[-1]
    name, step, total = match.group(1), int(match.group(2)), int(match.group(3))
    assert step == total == 2 * (2048 // (64 * int(match.group(4))))
    # The plot holds the run's own series: as many points as the run's TensorBoard has loss values.
    logdir = ui_url[1] / name / "tensorboard"
    loss = read_scalars(str(logdir))["all/loss/mean"]
    page.wait_for_function("document.querySelector('#loss-plot path[aria-roledescription=\"line mark\"]') !== null")
    points = _line_points(page, "loss-plot")
    assert len(points) == len(loss) == total
    assert f"final loss {loss[-1][1]:.4f}" in seen[-1]
    assert loss[-1][1] < loss[0][1]
    # Numeric axes: steps left to right, and the falling loss drawn falling (SVG y grows downwards).
    assert all(a[0] < b[0] for a, b in zip(points, points[1:]))
    assert points[-1][1] > points[0][1]
    assert len(_line_points(page, "scale-plot")) == total
    summary = page.locator("#train-summary").inner_text()
    assert re.search(rf"\b0\s+{total}\b", summary) and re.search(rf"\b1\s+{total}\b", summary)
    assert summary.count(f"{socket.gethostname()}:cpu") == 2  # where each rank ran
    assert str(logdir) in page.locator("#train-tensorboard").inner_text()
    _shot(page, "train")


def test_benchmark_tab_fills_table_and_chart(page):
    page.get_by_role("tab", name="Benchmark").click()
    page.locator("#bench-batch input").fill("32")
    page.locator("#bench-iters input").fill("5")
    page.locator("#bench-button").click()
    status = _wait_text(page, "bench-status", "fastest is", 120)
    assert "mlp" in status and "batch 32" in status
    table = page.locator("#bench-table").inner_text()
    for precision in ("fp32", "fp16", "bf16"):
        assert precision in table
    bars = "#bench-chart path[aria-roledescription='bar'], #bench-chart path[role='graphics-symbol']"
    page.wait_for_function(f"document.querySelectorAll({bars!r}).length >= 3", timeout=30000)
    # Bars start at zero and follow the table's order: left to right fp32 (tf32), fp16, bf16, each as
    # tall as its median step time (to the pixel's rounding).
    boxes = sorted((b for b in (e.bounding_box() for e in page.locator(bars).all()) if b and b["height"] > 0),
                   key=lambda b: b["x"])
    from ampray.orchestrator.webui import PRECISION_ORDER

    cells = table.split("memory_savings_percent", 1)[1].split()  # row after row: precision, then its values
    order = [c for c in cells if c in PRECISION_ORDER]  # tf32 too on a GPU that has it
    assert order == [p for p in PRECISION_ORDER if p in order] and {"fp32", "fp16", "bf16"} <= set(order), table
    medians = [float(cells[cells.index(name) + 1]) for name in order]
    assert len(boxes) == len(order)
    for box, ms in zip(boxes, medians):
        assert box["height"] / boxes[0]["height"] == pytest.approx(ms / medians[0], rel=0.03, abs=0.02)
    page.wait_for_timeout(500)  # the page's "pending" shading fades after the event ends
    _shot(page, "benchmark")


def test_bad_input_shows_an_error_and_the_app_keeps_running(page):
    page.locator("#train-batch input").fill("-5")
    page.locator("#train-button").click()
    status = _wait_text(page, "train-status", "Error", 60)
    assert "batch_size=-5 is not allowed" in status and "integer >= 1" in status
    _shot(page, "train-error")
    page.get_by_role("tab", name="Benchmark").click()
    model = page.locator("#bench-model input")
    model.fill("resnet")
    model.press("Enter")
    page.locator("#bench-button").click()
    status = _wait_text(page, "bench-status", "Error", 60)
    assert "model_type='resnet' is not allowed" in status and "'mlp', 'cnn', 'gpt'" in status
    _shot(page, "benchmark-error")
    # Still serving: the recommendations come back.
    page.get_by_role("tab", name="Recommendations").click()
    page.locator("#recommend-button").click()
    from ampray.amp.advice import detect_hardware

    _wait_text(page, "recommend-table", detect_hardware()["device_name"], 60)
    assert re.search(r"(Use|Stay in) (fp16|bf16|fp32)", page.locator("#recommend-text").inner_text())
    _shot(page, "recommendations")
