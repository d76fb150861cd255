"""Tables and a plot from experiment results (issue 7).

python experiments/tools/report.py RESULTS.json[=TAG] ... [--png assets/retention.png]
Prints markdown: one line per row and K (training minutes, GFLOPs/token, held-out ppl, mean relative
maintenance and above-chance retention over the summary tasks, MMLU), the per-task scores, and a
per-task comparison of rows that differ only in their router (PAR vs untrained). With --png, draws
retention vs training minutes and vs GFLOPs per token (plotly, rendered by headless Chromium).
"""
import argparse
import json
from pathlib import Path

TASK_ORDER = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa", "mmlu"]


def pct(x, digits=1):
    return "–" if x is None else f"{100 * x:.{digits}f}"


def lines(rows):
    out = []
    for r in rows:
        k = str(r["setting"].get("top_k", 2))
        ev = r.get("eval") or {}
        summ = (ev.get("summary_subset") or ev.get("summary") or {}).get("k", {}).get(k, {})
        mmlu = (ev.get("tasks", {}).get("mmlu") or {}).get("k", {}).get(k)
        h = (r.get("heldout") or {}).get(k, {})
        out.append({"label": r["setting"].get("label", ""), "K": k, "minutes": r["train_seconds"] / 60,
                    "gflops": (r.get("gflops_per_token") or {}).get(k),
                    "dense_gflops": (r.get("gflops_per_token") or {}).get("dense"),
                    "ppl": h.get("perplexity"), "dense_ppl": h.get("dense_perplexity"),
                    "agreement": h.get("agreement"), "relative": summ.get("relative_capped"),
                    "above_chance": summ.get("above_chance"), "above_tasks": summ.get("above_chance_tasks"),
                    "ci": summ.get("ci95") or {},
                    "mmlu": mmlu and mmlu.get("acc"), "row": r})
    return out


def summary_table(ls):
    print("| setting | K | train min | GFLOPs/token (seq 512) | held-out ppl (dense) | agreement | "
          "mean relative maintenance | mean above-chance retention | MMLU acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in ls:
        print(f"| {x['label']} | {x['K']} | {x['minutes']:.1f} | {x['gflops']:.3f} of {x['dense_gflops']:.3f} | "
              f"{x['ppl']:.1f} ({x['dense_ppl']:.1f}) | {x['agreement']:.3f} | {pct(x['relative'])}%"
              f"{interval(x['ci'].get('relative_capped'))} | {pct(x['above_chance'])}%"
              f"{interval(x['ci'].get('above_chance'))} | {pct(x['mmlu'])} |")
    if any(x["ci"] for x in ls):
        print("\n[a–b]: 95% paired bootstrap interval over the items (rows that stored per-item outcomes)")


def interval(ci) -> str:
    return f" [{pct(ci[0], 0)}–{pct(ci[1], 0)}]" if ci else ""


def task_table(ls):
    tasks = [t for t in TASK_ORDER if any(t in (x["row"].get("eval") or {}).get("tasks", {}) for x in ls)]
    first = ls[0]["row"]["eval"]["tasks"]
    print("| task (metric, items) | dense | " + " | ".join(f"{x['label']} K={x['K']}" for x in ls) + " |")
    print("|---|---|" + "---|" * len(ls))
    for t in tasks:
        d = first[t]
        metric = d["main_metric"]
        cells = []
        for x in ls:
            e = x["row"]["eval"]["tasks"][t]["k"][x["K"]]
            cells.append(f"{pct(e[metric])} (rel {pct(e['relative'], 0)}%, above {pct(e['above_chance'], 0)}%)")
        print(f"| {t} ({metric}, {d['n']}) | {pct(d['dense'][metric])} | " + " | ".join(cells) + " |")


def par_vs_untrained(ls):
    """Pairs of rows with the same K, one with a trained router and one with router_steps 0 (or mode none)."""
    for k in sorted({x["K"] for x in ls}):
        same_k = [x for x in ls if x["K"] == k]
        par = [x for x in same_k if x["row"]["setting"].get("router_steps", 300) > 0
               and x["row"]["setting"].get("mode", "experts") != "none"]
        base = [x for x in same_k if x not in par]
        for p in par[:1]:
            for b in base:
                wins, rows = 0, []
                for t, e in p["row"]["eval"]["tasks"].items():
                    if t == "mmlu":
                        continue
                    m = e["main_metric"]
                    a, c = e["k"][k][m], b["row"]["eval"]["tasks"][t]["k"][k][m]
                    wins += a > c
                    rows.append(f"{t} {pct(a)} vs {pct(c)}")
                print(f"- K={k}: {p['label']} vs {b['label']}: better on {wins} of {len(rows)} tasks ({'; '.join(rows)})")


def short(label: str) -> str:
    base, _, tag = label.partition(" [")
    return (base.split(":")[0].split(" (")[0] + (f" [{tag}" if tag else "")).strip()


def plot(ls, png: Path):
    import tempfile

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from playwright.sync_api import sync_playwright

    fig = make_subplots(rows=1, cols=2, subplot_titles=("retention vs training time", "retention vs compute"))
    for metric, name, symbol in (("above_chance", "above-chance retention", "circle"),
                                 ("relative", "relative maintenance", "diamond")):
        for col, xkey in ((1, "minutes"), (2, "gflops")):
            fig.add_trace(go.Scatter(
                x=[x[xkey] for x in ls], y=[100 * (x[metric] or 0) for x in ls], mode="markers+text",
                marker=dict(symbol=symbol, size=11), name=name, showlegend=col == 1,
                legendgroup=metric, text=[short(x["label"]) if metric == "above_chance" else "" for x in ls],
                textposition="middle right", textfont=dict(size=9), marker_color="#1f77b4" if metric == "above_chance" else "#ff7f0e"), 1, col)
    dense_g = ls[0]["dense_gflops"]
    fig.add_trace(go.Scatter(x=[dense_g], y=[100], mode="markers", marker=dict(symbol="star", size=14,
                  color="black"), name="dense model (100%)", showlegend=True), 1, 2)
    fig.update_xaxes(range=[0, max(x["minutes"] for x in ls) * 1.35], row=1, col=1)
    fig.update_xaxes(range=[0.18, dense_g * 1.05], row=1, col=2)
    fig.add_hline(y=90, line_dash="dot", annotation_text="goal: relative 90%")
    fig.add_hline(y=60, line_dash="dot", annotation_text="goal: above-chance 60%")
    fig.update_xaxes(title_text="training minutes on the 2-core machine (most rows: 1 thread, two rows at a time)", row=1, col=1)
    fig.update_xaxes(title_text="GFLOPs per token (sequence of 512)", row=1, col=2)
    fig.update_yaxes(title_text="% of the dense model (7 tasks, mean)", row=1, col=1)
    fig.update_layout(width=1200, height=520, template="plotly_white", margin=dict(l=60, r=20, t=50, b=60),
                      legend=dict(orientation="h", y=-0.18))
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "plot.html"
        fig.write_html(html, include_plotlyjs=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 520})
            page.goto(html.as_uri())
            page.wait_for_selector(".scatterlayer")
            page.screenshot(path=str(png))
            browser.close()
    print(f"plot: {png}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--png")
    args = ap.parse_args()
    rows = []
    for item in args.results:  # PATH or PATH=TAG (the tag is appended to that file's labels)
        path, _, tag = item.partition("=")
        for r in json.loads(Path(path).read_text())["rows"]:
            if r.get("status") == "done":
                if tag:
                    r["setting"]["label"] = f"{r['setting'].get('label', '')} [{tag}]"
                rows.append(r)
    ls = lines(rows)
    summary_table(ls)
    print()
    task_table(ls)
    print()
    par_vs_untrained(ls)
    if args.png:
        plot(ls, Path(args.png))


if __name__ == "__main__":
    main()
