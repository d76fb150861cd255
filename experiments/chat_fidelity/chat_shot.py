"""Screenshots of the Chat tab answering issue 30's two example prompts, made the way a visitor would.

Usage: PYTHONPATH=. .venv/bin/python experiments/chat_fidelity/chat_shot.py RUN OUT_PREFIX [PORT]

Copies the run into a private runs folder (so the page opens it as its current run), serves app.py
(warm start off), opens Chat, and for each prompt sends it with the tab's defaults (temperature 0.7,
top-p 0.9, 128 new tokens, seed 0, K=2), waits until both replies stop changing and saves
OUT_PREFIX-1.png and OUT_PREFIX-2.png; the replies' text is written to OUT_PREFIX.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from factorlab.runs import runs_root
from scripts.screenshots import settle

CHROMIUM = os.environ.get("FACTORLAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
PROMPTS = ["What is the capital of France?", "Give me three tips for a good night's sleep."]


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    run, prefix = sys.argv[1], sys.argv[2]
    port = sys.argv[3] if len(sys.argv) > 3 else "7862"
    runs = Path(tempfile.mkdtemp(prefix="chat-shot-"))
    shutil.copytree(runs_root() / run, runs / run)
    env = {**os.environ, "FACTORLAB_WARM_START": "off", "GRADIO_SERVER_PORT": port, "HF_HUB_OFFLINE": "1",
           "FACTORLAB_RUNS": str(runs)}
    server = subprocess.Popen([sys.executable, "app.py"], env=env)
    url = f"http://127.0.0.1:{port}"
    replies = []
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
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector(f"#current-run:has-text('Current run: {run}')")
            page.get_by_role("tab", name="Chat").click()
            for i, prompt in enumerate(PROMPTS, 1):
                page.locator("button.lg:has-text('Clear')").click()  # an empty conversation for each prompt
                page.wait_for_timeout(1500)
                page.fill("#message textarea", prompt)
                page.press("#message textarea", "Enter")
                page.wait_for_selector("#stats-moe:has-text('tokens/s')")
                settle(page, "#chat-moe", quiet_s=6.0, timeout_s=900)
                moe = page.inner_text("#chat-moe")
                stats = page.inner_text("#stats-moe")
                page.screenshot(path=f"{prefix}-{i}.png", full_page=True)
                replies.append({"prompt": prompt, "factorized_pane": moe, "factorized_stats": stats})
            browser.close()
        Path(f"{prefix}.json").write_text(json.dumps({"run": run, "replies": replies}, indent=1))
        print(f"wrote {prefix}-1.png, {prefix}-2.png, {prefix}.json")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
