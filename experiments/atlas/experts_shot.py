"""Screenshots of the Experts tab (issue 31) on a run's stored atlas, every view, made as a visitor sees them.

Usage: FACTORLAB_RUNS=runs PYTHONPATH=. .venv/bin/python experiments/atlas/experts_shot.py OUTDIR [RUN] [LAYER] [EXPERT]

Serves app.py in this process (warm start off), loads RUN (default: default) from the runs list, goes Routing -> "Open this
expert in Experts" with LAYER and EXPERT, then saves OUTDIR/6-experts-*.png: the whole tab, the atlas summary
with the layer overview, one expert (summary, domains, vocabulary, logit lens, contexts), the layer
(ablation, co-activation and weight similarity), and the model (ranking, PAR vs untrained, share vs cost).
Also prints the Experts tab's redraw times (handler, from the page's own note) over a few expert changes.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

CHROMIUM = os.environ.get("FACTORLAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def region(page, out: Path, first: str, last: str) -> None:
    """A screenshot of the page from the top of `first` to the bottom of `last` (full width)."""
    a, b = page.locator(first).bounding_box(), page.locator(last).bounding_box()
    top = a["y"] + page.evaluate("window.scrollY")
    bottom = b["y"] + b["height"] + page.evaluate("window.scrollY")
    page.screenshot(path=str(out), full_page=True, clip={"x": 0, "y": top - 8, "width": 1400,
                                                         "height": bottom - top + 16})
    print(f"wrote {out}")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    run, layer, expert = (sys.argv[2:] + ["default", "15", "1"][len(sys.argv) - 2:])[:3]
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FACTORLAB_WARM_START", "off")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import app  # served in this process, on the runs folder of FACTORLAB_RUNS

    _, url, _ = app.launch(prevent_thread_lock=True, server_port=7863, quiet=True)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(240_000)
            page.goto(url)
            page.wait_for_selector("#current-run:has-text('Current run:')")
            if f"Current run: {run}" not in page.inner_text("#current-run"):  # load it from the runs list
                page.get_by_role("tab", name="Factorize & train").click()
                page.get_by_label("Run", exact=True).click()
                page.get_by_role("option", name=run, exact=True).click()
                page.get_by_role("button", name="Load (make current)").click()
                page.wait_for_selector(f"#current-run:has-text('Current run: {run}')")
            page.get_by_role("tab", name="Routing").click()
            page.locator("#routing-atlas-layer input").click()
            page.get_by_role("option", name=layer, exact=True).click()
            page.locator("#routing-expert input[type=number]").fill(expert)
            page.locator("#routing-expert input[type=number]").press("Tab")
            page.locator("#open-expert").click()
            page.wait_for_selector(f"#expert-summary:has-text('Layer {layer}, expert {expert}')")
            page.wait_for_selector("#atlas-overview .js-plotly-plot .scatterlayer")
            page.wait_for_timeout(2500)
            page.screenshot(path=str(out / "6-experts-0-whole-tab.png"), full_page=True)
            region(page, out / "6-experts-1-overview.png", "#atlas-summary", "#atlas-overview")
            region(page, out / "6-experts-2-expert.png", "#expert-summary", "#atlas-contexts")
            region(page, out / "6-experts-3-layer.png", "#atlas-ablation", "#atlas-pair")
            region(page, out / "6-experts-4-model.png", "#atlas-ranking", "#atlas-share")
            ms = []
            for e in (0, 1, 2, 3, 0, 2):
                page.locator("#atlas-expert input[type=number]").fill(str(e))
                page.locator("#atlas-expert input[type=number]").press("Tab")
                page.wait_for_selector(f"#expert-summary:has-text('expert {e} ')")
                text = page.inner_text("#atlas-timing")
                ms.append(float(text.split("atlas in ")[1].split(" ms")[0]))
            print(f"Experts tab redraw (handler, server side): median {statistics.median(ms):.0f} ms, "
                  f"max {max(ms):.0f} ms over {len(ms)} expert changes")
            browser.close()
    finally:
        app.demo.close()


if __name__ == "__main__":
    main()
