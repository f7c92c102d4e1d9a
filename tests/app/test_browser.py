"""The web demo as a user meets it: `python -m mlx_diffusion.app` on a free localhost port, driven in headless
Chromium (Debian's, through Playwright; nothing downloads a browser), and its named API through `gradio_client`.
A screenshot is kept in build/test-artifacts/ (MLX_DIFFUSION_ARTIFACTS overrides)."""

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("MLX_DIFFUSION_ARTIFACTS", ROOT / "build" / "test-artifacts"))
PROMPT = "a red circle on a blue background"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The running app (its URL), with a models folder holding one broken model."""
    models = tmp_path_factory.mktemp("weights")
    (models / "broken").mkdir()
    (models / "broken" / "mlx_diffusion.json").write_text("{not json")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusion.app", "--port", str(port), "--models-dir",
                             str(models)], stdout=log, stderr=subprocess.STDOUT, cwd=models,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=60)
    log.seek(0)
    assert proc.returncode in (0, -15), log.read()[-3000:]  # stopped cleanly: no abort at exit
    log.close()


def _blue_with_red(png: bytes):
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = ((b > 120) & (b > r + 40) & (b > g + 40)).mean()
    red = ((r > 120) & (r > g + 60) & (r > b + 60)).mean()
    assert blue > 0.6 and red > 0.01, (blue, red)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (./setup.sh --test installs it)")
def test_generate_in_a_real_browser(app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(app)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill("3")
            page.locator("#generate").click()
            image = page.locator("#image img")
            image.wait_for(timeout=180_000)
            png = page.request.get(image.get_attribute("src")).body()
            _blue_with_red(png)
            assert Image.open(io.BytesIO(png)).text["prompt"] == PROMPT  # the served PNG carries its settings
            expect(page.locator("#status")).to_contain_text("built-in, seed 3, 20 steps, 64x64")
            expect(page.locator("#download")).to_contain_text(".png")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=ARTIFACTS / "app.png", full_page=True)

            page.locator("#width input").fill("50")  # a size the model does not allow
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("width must be a positive multiple of 8, got 50",
                                                            timeout=60_000)
            page.locator("#model input").click()  # a broken model folder: a message, not a traceback
            page.get_by_role("option", name="broken (broken:").click()
            expect(page.locator("#status")).to_contain_text("model broken cannot be used", timeout=60_000)
            assert "Traceback" not in page.content()

            page.get_by_role("tab", name="Compare").click()  # two models side by side (here both the built-in)
            page.locator("#compare_prompt textarea").fill(PROMPT)
            page.locator("#compare").click()
            expect(page.locator("#compare_status")).to_contain_text("B: built-in, seed 0", timeout=180_000)
            for side in ("#image_a img", "#image_b img"):
                _blue_with_red(page.request.get(page.locator(side).get_attribute("src")).body())

            page.reload()  # and the app still serves
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill("4")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("seed 4", timeout=180_000)
            _blue_with_red(page.request.get(page.locator("#image img").get_attribute("src")).body())
        finally:
            browser.close()


def test_two_concurrent_api_calls_run_one_after_the_other(app):
    from gradio_client import Client

    client = Client(app, verbose=False)
    out = [None, None]

    def call(i):
        out[i] = client.predict(PROMPT, "", "built-in", 20, 7.0, 64, 64, 5 + i, api_name="/generate")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (path, info) in enumerate(out):
        assert info["settings"]["seed"] == 5 + i and info["settings"]["prompt"] == PROMPT
        _blue_with_red(Path(path).read_bytes())
    (a0, a1), (b0, b1) = sorted((info["started"], info["finished"]) for _, info in out)
    assert a1 <= b0  # one after the other, never both at once

    with pytest.raises(Exception, match="width must be a positive multiple of 8"):
        client.predict(PROMPT, "", "built-in", 20, 7.0, 50, 64, 1, api_name="/generate")
