"""Screenshots of every tab of the lab into assets/screenshots/*.png (each kept under 300 KB).

Trains a small run, evaluates and benchmarks it (in a private runs folder unless --runs-dir is
given), then walks the page in headless Chromium. Needs /usr/bin/chromium and Playwright:
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python scripts/screenshots.py
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_BYTES = 300_000
log = logging.getLogger("screenshots")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run(name: str, layers: str, train_tokens: int, tasks: list[str], limit: int) -> None:
    """Train, evaluate and benchmark one run through factorlab.lab's job functions (as the buttons do)."""
    from factorlab import lab, lab_jobs
    from factorlab.jobs import get_manager

    if name in lab.run_names():
        return
    from factorlab.recipe import preset

    recipe = preset("quick", layers=layers, data="local", train_tokens=train_tokens)
    jobs = [lab_jobs.start_training(recipe, name=name)]
    get_manager().wait(jobs[0])
    jobs += [lab_jobs.start_eval(name, tasks, limit), lab_jobs.start_bench(name, 128, 16, 2)]
    for job_id in jobs:
        info = get_manager().wait(job_id)
        if info.state != "done":
            raise RuntimeError(f"{info.kind} job failed: {info.error}")
        log.info("%s job done in %.0f s", info.kind, info.finished - info.started)


def shrink(path: Path) -> None:
    """Quantize to a 256-colour palette (UI screenshots lose nothing visible) until under MAX_BYTES."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for colours, scale in ((256, 1.0), (128, 1.0), (128, 0.8), (64, 0.7)):
        out = image if scale == 1.0 else image.resize((int(image.width * scale), int(image.height * scale)))
        out.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            return
    raise RuntimeError(f"{path} is still {path.stat().st_size} bytes")


def fill(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    field.press("Tab")


def settle(page, selector: str, quiet_s: float = 1.5, timeout_s: float = 300) -> None:
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = page.inner_text(selector)
        if text != last:
            last, since = text, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        page.wait_for_timeout(250)


def capture(url: str, out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(url)
        page.wait_for_selector("#current-run:has-text('Current run')")

        def shot(name: str) -> None:
            page.wait_for_timeout(800)
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            shrink(path)
            shots.append(path)

        page.get_by_role("tab", name="Factorize & train").click()  # the landing tab is Start here
        page.locator("#split").get_by_text("random", exact=True).click()
        page.locator("#factorize").click()
        page.wait_for_selector("#train-status:has-text('exactness check')")
        shot("1-factorize-and-train")

        page.get_by_role("tab", name="Routing").click()
        page.locator("#route").click()
        page.wait_for_selector("#heatmap .js-plotly-plot .heatmaplayer")
        shot("2-routing")

        page.get_by_role("tab", name="Trade-offs").click()
        page.wait_for_selector("#trade-plot .js-plotly-plot .scatterlayer")
        shot("3-tradeoffs")

        page.get_by_role("tab", name="Chat").click()
        fill(page, "max-new", 40)
        page.get_by_text("Colour the factorized reply by expert").click()
        page.locator("#message textarea").fill("Give me three tips for a good night's sleep.")
        page.locator("#message textarea").press("Enter")
        page.wait_for_selector("#stats-moe:has-text('tokens/s')")
        settle(page, "#chat-moe")
        shot("4-chat")

        page.get_by_role("tab", name="About").click()
        shot("5-about")
        browser.close()
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default=None, help="runs folder (default: a fresh temporary one)")
    parser.add_argument("--out", default=str(ROOT / "assets" / "screenshots"))
    parser.add_argument("--layers", default="8-15", help="layers of the demo run")
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=40, help="evaluation items per task")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["FACTORLAB_RUNS"] = args.runs_dir or tempfile.mkdtemp(prefix="factorlab-shots-")
    os.environ["FACTORLAB_WARM_START"] = "off"  # the demo run below is what the pages show
    sys.path.insert(0, str(ROOT))
    import app

    prepare_run("demo-4e2k", args.layers, args.train_tokens, args.tasks.split(","), args.limit)
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for path in capture(url, out, args.chromium):
            log.info("%s: %d KB", path, path.stat().st_size // 1024)
    finally:
        app.demo.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
