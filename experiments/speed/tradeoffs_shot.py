"""Screenshot of the Trade-offs tab on measured time (issue 28), made the way a visitor would make it.

Usage: FACTORLAB_RUNS=runs PYTHONPATH=. .venv/bin/python experiments/speed/tradeoffs_shot.py OUT.png [PORT] [--stored]

Serves app.py (warm start off) on the runs folder, opens the newest run, starts the Trade-offs tab's
benchmark (prefill 256, decode 32, 3 repeats: every K against dense, in the background worker), waits
for it, switches the compute axis to measured decode ms per token and saves a screenshot of the tab.
Run it alone: the benchmark it starts is timed on this machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

CHROMIUM = os.environ.get("FACTORLAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def main() -> None:
    if len([a for a in sys.argv[1:] if a != "--stored"]) < 1:
        raise SystemExit(__doc__)
    args = [a for a in sys.argv[1:] if a != "--stored"]
    out, port = args[0], args[1] if len(args) > 1 else "7861"
    env = {**os.environ, "FACTORLAB_WARM_START": "off", "GRADIO_SERVER_PORT": port, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("#current-run:has-text('Current run:')")  # the page has loaded its run
            page.get_by_role("tab", name="Trade-offs").click()
            page.wait_for_timeout(2000)
            if "--stored" not in sys.argv:  # else: the run's stored benchmark is plotted as it is
                page.get_by_role("button", name="Run benchmark (background)").click()
                page.wait_for_selector("#job:has-text('bench'):has-text('done')")
            page.get_by_text("decode ms per generated token (measured)").click()
            page.wait_for_selector("#trade-plot:has-text('limit (FLOPs bound)')")
            page.wait_for_timeout(1500)
            page.screenshot(path=out, full_page=True)
            browser.close()
        print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
