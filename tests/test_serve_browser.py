"""The web UI in a real headless Chromium (Debian's, driven by Playwright): the runs page, a run, an
adapter, a generation started from the UI with that adapter on the smoke model (CPU, 64 px, 2 steps,
2 images), and its images in the gallery. Screenshots go to docs/ (the README shows them)."""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from _serve import Server, make_project  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("DERMKOHYA_SCREENSHOTS", ROOT / "docs"))


def _real_adapter(model: Path, path: Path) -> None:
    """A kohya-format LoRA over the smoke model (random weights: bench/generate_throughput.py's writer)."""
    spec = importlib.util.spec_from_file_location("generate_throughput", ROOT / "bench" / "generate_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_random_kohya_lora(model, path, rank=4)
    gc.collect()


@pytest.mark.browser
@pytest.mark.slow
def test_ui_runs_run_adapter_generate_gallery(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from _smoke import link_smoke_model

    root = make_project(tmp_path)
    _real_adapter(link_smoke_model(root), root / "artifacts" / "demo" / "demo.safetensors")
    server = Server(root).wait_ready()
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url + "/")
            expect(page.locator("#runs")).to_contain_text("demo")
            expect(page.locator("#runs")).to_contain_text("collected")
            page.screenshot(path=str(SHOTS / "serve-runs.png"))

            page.click("#runs a[href='/runs/demo']")
            expect(page.locator("svg#loss polyline")).to_have_count(1)
            expect(page.locator("img[alt$='demo_000010_00.png']")).to_have_count(1)
            page.screenshot(path=str(SHOTS / "serve-run.png"), full_page=True)

            page.goto(server.url + "/adapters/demo")
            expect(page.locator("table").first).to_contain_text("artifacts/demo/demo.safetensors")
            page.click("#generate-with")
            expect(page.locator("select[name=adapter]")).to_have_value("artifacts/demo/demo.safetensors")
            page.fill("input[name=diagnosis]", "scaly plaque")
            page.select_option("select[name=skin_type]", "V")
            page.fill("input[name=count]", "2")
            page.fill("input[name=steps]", "2")
            page.fill("input[name=width]", "64")
            page.click("#generate button")
            expect(page.locator("#message")).to_contain_text("queued job")
            expect(page.locator("#jobs")).to_contain_text("finished", timeout=600_000)
            page.screenshot(path=str(SHOTS / "serve-jobs.png"))

            page.click("#jobs a")
            expect(page.locator("#gallery img")).to_have_count(2)
            expect(page.locator("#gallery")).to_contain_text("scaly plaque · FST V · seed")
            page.wait_for_function("Array.from(document.querySelectorAll('#gallery img')).every(i => i.complete && i.naturalWidth === 64)")
            page.screenshot(path=str(SHOTS / "serve-gallery.png"))
            browser.close()
    finally:
        server.stop()
