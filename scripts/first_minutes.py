"""Time a fresh lab's first minutes as a visitor sees them, in headless Chromium (issue 29's measurement).

Waits for the page to be served, asks both models one question (the dense side answers before any run),
then waits for the warm start's first run to become current on the page and for the default recipe to be
offered, switches to it, and prints the seconds from --since to each (JSON with --out). Screenshots of the
landing tab during and after the warm start go to --shots. From a fresh clone (see README, "A fresh start"):

    export HF_HUB_OFFLINE=1 FACTORLAB_CACHE=$(mktemp -d)      # the embedded model not yet converted
    T0=$(date +%s.%N); bash scripts/app.sh > app.log 2>&1 &
    until .venv/bin/python -c "import playwright" 2>/dev/null; do sleep 2; done
    .venv/bin/python scripts/first_minutes.py --since "$T0" --out first_minutes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import urllib.request
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUICK_RUN, DEFAULT_RUN = "warm-quick", "warm-default"  # factorlab.warmstart's run names (not imported: no torch)


def wait_served(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not served within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, default=None, help="epoch seconds the start was launched (date +%%s.%%N)")
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--mode", default=os.environ.get("FACTORLAB_WARM_START", "quick").strip().lower() or "quick",
                        choices=["quick", "default"], help="the app's FACTORLAB_WARM_START")
    parser.add_argument("--max-new", type=int, default=32, help="new tokens of the one chat question")
    parser.add_argument("--timeout-min", type=float, default=40.0, help="give up after this many minutes")
    parser.add_argument("--shots", default="test-artifacts/first-minutes")
    parser.add_argument("--out", default=None, help="write the timings as JSON here")
    parser.add_argument("--chromium", default=os.environ.get("FACTORLAB_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    since = args.since if args.since is not None else time.time()
    timeout_ms = int(args.timeout_min * 60_000)
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.time() - since, 1)
        print(f"{marks[name]:8.1f} s  {name}", flush=True)

    wait_served(args.url, args.timeout_min * 60)
    mark("page served (HTTP 200)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(timeout_ms)
        page.goto(args.url)
        page.wait_for_selector("#guide-chat")
        mark("landing tab shown")
        page.screenshot(path=str(shots / "1-landing-warming.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        field = page.locator("#max-new input").first
        field.fill(str(args.max_new))
        field.press("Tab")
        page.get_by_role("tab", name="Start here").click()
        page.locator("#guide-chat").click()
        page.wait_for_selector("#chat-moe .bot")  # the factorized side's note (or reply) comes with the first token
        mark("first dense token (guided step 2)")

        first = QUICK_RUN if args.mode == "quick" else DEFAULT_RUN
        # the header names the run as current ("No run yet: ... training `warm-quick`" names it too)
        page.wait_for_selector(f"#current-run:has-text('Current run: {first}')")
        mark(f"first run current on the page ({first})")
        page.get_by_role("tab", name="Start here").click()
        page.screenshot(path=str(shots / "2-landing-first-run.png"), full_page=True)
        if args.mode == "quick":
            page.wait_for_selector("#switch-offer:has-text('default recipe is trained')")
            mark("default recipe offered")
            page.screenshot(path=str(shots / "3-landing-offer.png"), full_page=True)
            page.locator("#switch").click()
            page.wait_for_selector(f"#current-run:has-text('Current run: {DEFAULT_RUN}')")
            mark(f"default recipe current on the page ({DEFAULT_RUN})")
            page.screenshot(path=str(shots / "4-landing-default.png"), full_page=True)
        browser.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"seconds_since_start": marks, "mode": args.mode, "url": args.url,
                                              "machine": {"cpus": os.cpu_count(), "cpu": platform.processor()
                                                          or platform.machine()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
