"""The Trade-offs tab's logic, importable without gradio: accuracy (or chat fidelity) against compute per K.

From a run's stored results only (factorlab.lab reads the run): plot points on analytic GFLOPs or on the run's
benchmarked ms per token (each K beside its FLOPs bound), a table per K or task, FLOPs per component and the
measured speed ratios.
"""
from __future__ import annotations

from . import lab
from .lab import LabError, interval_text, pct
from .flops import flops_per_token

HELDOUT_TASK, MEAN_TASK = "held-out agreement with dense", "mean relative maintenance (capped at 100%)"
CHAT_TASK = "chat fidelity (agreement on the dense model's chat replies)"


def tradeoff_tasks(name: str | None) -> list[str]:
    """What the trade-off plot can show for this run: held-out agreement, the mean, each evaluated task."""
    if not name:
        return []
    m = lab.load_run(name).metrics
    tasks = sorted(((m.get("eval") or {}).get("tasks") or {}))
    chat = [CHAT_TASK] if (m.get("chat_fidelity") or {}).get("by_k") else []
    return ([HELDOUT_TASK] if any(m.get("heldout") or {}) else []) + chat + ([MEAN_TASK] if tasks else []) + tasks


# The x axis of the trade-off plot: analytic compute, or the run's stored benchmark (this machine's wall clock).
COMPUTE_AXES = {"flops": "GFLOPs per token (analytic)", "prefill": "prefill ms per prompt token (measured)",
                "decode": "decode ms per generated token (measured)"}


def tradeoff_view(name: str, task: str, top_k: int, seq_len: int, axis: str = "flops") -> dict:
    """From stored results only: plot points (x on `axis`), a table, FLOPs per component, measured speed.

    A measured axis places dense and each K at the run's benchmarked ms per token; each K also gets its
    limit (dense ms / the FLOPs bound on its speed-up) and K's without a measurement are left out."""
    if axis not in COMPUTE_AXES:
        raise LabError(f"unknown compute axis {axis!r}: use one of {', '.join(COMPUTE_AXES)}")
    run = lab.load_run(name)
    m, shape = run.metrics, lab.run_shape(name)
    info = lab.dense_info(shape["model"])
    dense_flops = flops_per_token(info, seq_len)
    flops_k = {k: lab.run_flops(info, shape, k, seq_len) for k in range(1, shape["num_experts"] + 1)}
    gflops = {None: dense_flops["total"] / 1e9, **{k: f["total"] / 1e9 for k, f in flops_k.items()}}
    points, headers, rows, metric = _task_points(m, task, gflops)
    for row, point in zip(rows, points):
        row.insert(1, "◀ current" if point["k"] == top_k else "")
    axis_note = None
    if axis == "flops":
        for p in points:
            p["x"] = p["gflops"]
    else:
        measured = measured_ms(m, axis)
        if measured is None:
            axis_note = f"no stored benchmark with {axis} yet: run the benchmark (button below) to plot measured time"
        else:
            axis_note = measured["note"]
        points = [p for p in points if measured and p["k"] in measured["ms"]]
        for p in points:
            p["x"] = measured["ms"][p["k"]]
            if p["k"] is not None and p["k"] in measured["limit"]:
                p["limit"] = measured["limit"][p["k"]]
    return {"points": points, "metric": metric, "headers": [headers[0], ""] + headers[1:], "rows": rows,
            "flops": {"dense": dense_flops, f"K={top_k}": flops_k[top_k]}, "bench": bench_rows(m, top_k),
            "bench_note": bench_note(m), "x_title": COMPUTE_AXES[axis], "axis_note": axis_note}


def measured_ms(m: dict, phase: str) -> dict | None:
    """The stored benchmark's median ms per token for `phase` (prefill: per prompt token; decode: per
    generated token), dense (key None) and each K, with each K's limit; None without such a measurement."""
    bench = m.get("bench") or {}
    raw, settings = (bench.get("raw") or {}).get(phase), bench.get("settings") or {}
    tokens = settings.get("prefill") if phase == "prefill" else settings.get("decode")
    if not raw or "dense" not in raw or not tokens:
        return None
    ms = {None if k == "dense" else int(k): 1000 * v["median_s"] / tokens for k, v in raw.items()}
    limits = {**(bench.get("limits") or {}), **(bench.get("limits_measured") or {})}  # per-token K: as it ran
    limit = {int(k): ms[None] / lim[phase] for k, lim in limits.items() if lim.get(phase) and int(k) in ms}
    machine = bench.get("machine") or {}
    what = (f"{tokens}-token prefill, last position's logits" if phase == "prefill"
            else f"{tokens} greedy tokens after a {settings.get('decode_prompt', '?')}-token prompt, batch 1")
    note = (f"x = median wall-clock ms per token of the run's stored benchmark ({what}; {settings.get('repeats')} "
            f"alternating repeats, {machine.get('threads')} threads, {settings.get('dtype', 'float32')}, on "
            f"{machine.get('cpu') or machine.get('device')}); open markers = each K's limit, dense time / the "
            "FLOPs bound on its speed-up" + (" (per-token K: at the experts it ran on the benchmark's tokens)"
                                             if bench.get("limits_measured") else ""))
    return {"ms": ms, "limit": limit, "note": note}


def _task_points(m: dict, task: str, gflops: dict) -> tuple[list[dict], list[str], list[list], str]:
    def point(label, k, score, stderr=None):
        return {"label": label, "k": k, "gflops": gflops[k], "score": score, "stderr": stderr}

    points, rows = [], []
    if task == HELDOUT_TASK:
        headers = ["model", "agreement", "perplexity", "KL (nats/token)", "tokens", "GFLOPs/token"]
        held = {int(k): v for k, v in (m.get("heldout") or {}).items() if v}
        if held:
            first = next(iter(held.values()))
            points.append(point("dense", None, 1.0))
            rows.append(["dense", "100%", round(first["dense_perplexity"], 3), 0.0, first["tokens"], gflops[None]])
        for k, v in sorted(held.items()):
            points.append(point(f"K={k}", k, v["agreement"]))
            rows.append([f"K={k}", pct(v["agreement"]), round(v["perplexity"], 3), round(v["kl"], 4), v["tokens"],
                         gflops[k]])
        return points, headers, _round(rows), "top-1 agreement with dense"
    if task == CHAT_TASK:
        return _chat_points(m.get("chat_fidelity") or {}, point)
    ev = m.get("eval") or {}
    if task == MEAN_TASK:
        headers = ["model", "relative (capped)", "relative (uncapped)", "above-chance retention", "tasks"]
        points.append(point("dense", None, 1.0))
        rows.append(["dense", "100%", "100%", "100%", ", ".join(sorted(ev.get("tasks", {})))])
        for k, s in sorted(((ev.get("summary") or {}).get("k") or {}).items(), key=lambda kv: int(kv[0])):
            if s.get("relative_capped") is not None:
                points.append(point(f"K={k}", int(k), s["relative_capped"]))
            excluded = s.get("above_chance_excluded") or []
            note = f" (undefined for {', '.join(excluded)}: left out)" if excluded else ""
            ci = s.get("ci95") or {}
            rows.append([f"K={k}", f"{pct(s.get('relative_capped'))}{interval_text(ci.get('relative_capped'))}",
                         pct(s.get("relative")),
                         f"{pct(s.get('above_chance'))}{interval_text(ci.get('above_chance'))}{note}",
                         ", ".join(s.get("tasks", []))])
        return points, headers, rows, "relative maintenance (factorized / dense)"
    entry = (ev.get("tasks") or {}).get(task)
    if not entry:
        return [], ["model"], [], "score"
    metric = entry.get("main_metric", "acc")
    headers = ["model", metric, "± stderr", "acc", "acc_norm", "relative", "above chance", "items", "GFLOPs/token"]
    d = entry["dense"]
    points.append(point("dense", None, d[metric], d["stderr"].get(metric)))
    rows.append(["dense", pct(d[metric]), pct(d["stderr"].get(metric)), pct(d["acc"]), pct(d.get("acc_norm")),
                 "100%", "100%", d["n"], gflops[None]])
    for k, r in sorted(entry["k"].items(), key=lambda kv: int(kv[0])):
        points.append(point(f"K={k}", int(k), r[metric], r["stderr"].get(metric)))
        rows.append([f"K={k}", pct(r[metric]), pct(r["stderr"].get(metric)), pct(r["acc"]), pct(r.get("acc_norm")),
                     pct(r.get("relative")), pct(r.get("above_chance")) or "undefined (dense ≤ chance)", r["n"],
                     gflops[int(k)]])
    return points, headers, _round(rows), f"{task} {metric} (chance {pct(entry.get('chance'))})"


def _chat_points(stored: dict, point) -> tuple[list[dict], list[str], list[list], str]:
    """Trade-off points and table of the stored chat fidelity: agreement per K, with its other measures."""
    prefixes = (stored.get("settings") or {}).get("prefixes", [])
    headers = ["model", "agreement [95% CI]", "KL (nats/token)", "NLL gap (nats/token)",
               *[f"identical {p} tokens" for p in prefixes], "prompts"]
    points = [point("dense", None, 1.0)]
    rows = [["dense", pct(1.0), 0.0, 0.0, *[pct(1.0)] * len(prefixes), stored["settings"]["prompts"]]]
    for k, f in sorted((stored.get("by_k") or {}).items(), key=lambda kv: int(kv[0])):
        points.append({**point(f"K={k}", int(k), f["agreement"]), "interval": f["agreement_ci"]})
        rows.append([f"K={k}", f"{pct(f['agreement'])}{interval_text(f['agreement_ci'])}", round(f["kl"], 4),
                     round(f["nll_gap"], 4), *[pct(f["identical"][str(p)]) for p in prefixes],
                     stored["settings"]["prompts"]])
    return points, headers, rows, "chat: top-1 agreement with dense on its greedy replies"


def _round(rows: list[list]) -> list[list]:
    return [[round(v, 4) if isinstance(v, float) else v for v in row] for row in rows]


def bench_rows(m: dict, top_k: int) -> list[list] | None:
    """Measured speed ratios per K from metrics["bench"], or None when no benchmark was stored."""
    bench = m.get("bench")
    if not bench or "k" not in bench:
        return None
    raw = bench.get("raw", {})
    rows = []
    for k, speed in sorted(bench["k"].items(), key=lambda kv: int(kv[0])):
        limits = (bench.get("limits_measured") or {}).get(k) or bench.get("limits", {}).get(k, {})
        decode = raw.get("decode", {})
        rows.append([f"K={k}{' ◀' if int(k) == top_k else ''}", _ratio(speed.get("prefill_speedup")),
                     _ratio(limits.get("prefill")), _ratio(speed.get("decode_speedup")), _ratio(limits.get("decode")),
                     _ratio(speed.get("ffn_speedup")),
                     f"{decode[k]['tokens_per_s']:.1f} vs {decode['dense']['tokens_per_s']:.1f}"
                     if k in decode and "dense" in decode else None])
    return rows


def bench_note(m: dict) -> str | None:
    """How the stored benchmark was measured, so a noisy number can be judged; None without one."""
    bench = m.get("bench")
    if not bench or "settings" not in bench:
        return None
    s, machine = bench["settings"], bench.get("machine", {})
    load = machine.get("load_average_before")
    ran = ", ".join(f"K={k} {v.get('prefill', 0):.2f} / {v.get('decode', 0):.2f}"
                    for k, v in (bench.get("mean_k") or {}).items())
    return (f"prefill {s.get('prefill')} tokens, decode {s.get('decode')} tokens, median of {s.get('repeats')} "
            f"alternating repeats, {machine.get('threads')} threads on {machine.get('cpu') or machine.get('device')}"
            f"{f', load average {load[0]:.1f} before' if load else ''}"
            + (f"; experts per token that per-token K ran on these tokens (prefill / decode): {ran}; its limits are "
               "at that share" if ran else ""))


BENCH_COLUMNS = ["K", "prefill speedup", "prefill limit (FLOPs)", "decode speedup", "decode limit (FLOPs)",
                 "one FFN layer speedup", "decode tokens/s (K vs dense)"]


def _ratio(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f}×"
