"""Load: N visitors chat and route through the served app while a training job runs (README "Hosting").

Usage (from the repository root, the machine otherwise idle):
    PYTHONPATH=. .venv/bin/python experiments/hosting/load_test.py [--sessions 8] [--seconds 180] [--out FILE]

What it does: trains a `quick` run (the run the visitors use) through the library, serves `app.py` in a
subprocess on a private runs folder (as a host would), starts a second `quick` training job through the
page's API, then has N gradio_client sessions (each its own browser session) each load the run and loop
{chat one message (max 24 new tokens, sampled), route one text} until the time is up. Every request is
timed from the client (queueing included: what a visitor waits). Reports per endpoint the count, p50,
p95 and max latency, every error, whether the training job kept progressing, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = json.loads((ROOT / "assets" / "examples.json").read_text())["chat"]
TEXTS = [e["text"] for e in json.loads((ROOT / "assets" / "examples.json").read_text())["routing"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--runs-dir", default=None, help="a runs folder to reuse (its run `quick` is trained if absent)")
    p.add_argument("--no-training", action="store_true", help="no background training job (a baseline)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args()

    from factorlab.models import load_model
    from factorlab.recipe import preset
    from factorlab.workflows import train_run

    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="factorlab-load-"))
    if not (runs / "quick").exists():
        start = time.perf_counter()
        train_run(preset("quick"), "quick", runs_dir=runs, loaded=load_model("default"))
        print(f"quick run trained in {time.perf_counter() - start:.0f} s", flush=True)
    load_before = os.getloadavg()

    port = free_port()
    env = {**os.environ, "FACTORLAB_RUNS": str(runs), "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    from gradio_client import Client

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                trainer = Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not serving yet
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the app did not start: {server.stderr.read() if server.poll() else ''}")
                time.sleep(1)
        controls = dict(zip(_outputs(trainer), trainer.predict(name="quick", api_name="/recipe_preset")))
        controls.pop("upload", None)
        if not args.no_training:
            trainer.predict(name="background", **controls, upload=None, api_name="/train_start")
        job_start = trainer.predict(api_name="/job_poll")[0]

        latencies: dict[str, list[float]] = {"chat": [], "routing": []}
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def visitor(i: int) -> None:
            rng = random.Random(i)
            try:
                client = Client(url, verbose=False)
                client.predict("quick", api_name="/run_load")
            except Exception as exc:  # noqa: BLE001 - counted
                with lock:
                    errors.append(f"session {i} start: {exc}")
                return
            while time.monotonic() < stop_at:
                for endpoint, call in (
                        ("chat", lambda: client.predict(message=rng.choice(PROMPTS), dense_history=[], moe_history=[],
                                                        temperature=0.7, top_p=0.9, max_new=args.max_new,
                                                        seed=rng.randrange(1000), k=2, colour=False, layer=None,
                                                        api_name="/chat")),
                        ("routing", lambda: client.predict(text=rng.choice(TEXTS), k=2, colour="top-1 expert",
                                                           expert=0, api_name="/routing"))):
                    t = time.perf_counter()
                    try:
                        call()
                        with lock:
                            latencies[endpoint].append(time.perf_counter() - t)
                    except Exception as exc:  # noqa: BLE001 - counted
                        with lock:
                            errors.append(f"session {i} {endpoint}: {exc}")

        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(args.sessions)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        job_end = trainer.predict(api_name="/job_poll")[0]
        if not args.no_training:
            trainer.predict(api_name="/job_cancel")
    finally:
        server.terminate()
        server.wait(30)

    report = {
        "sessions": args.sessions, "chat_concurrency": int(os.environ.get("FACTORLAB_CHAT_CONCURRENCY", "4")),
        "background_training": not args.no_training, "seconds": args.seconds, "wall_s": round(wall, 1), "max_new_tokens": args.max_new,
        "errors": errors,
        "latency_s": {name: {"count": len(v), "p50": round(statistics.median(v), 2) if v else None,
                             "p95": round(percentile(v, 0.95), 2) if v else None,
                             "max": round(max(v), 2) if v else None} for name, v in latencies.items()},
        "training_job": {"at_start": _strip(job_start), "at_end": _strip(job_end)},
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "load_average_before": load_before},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _outputs(client) -> list[str]:
    """Names of the settings /recipe_preset returns, in order (the app's SETTINGS by component id)."""
    import app

    names = {component._id: name for name, component in app.SETTINGS.items()}
    dependency = next(d for d in app.demo.config["dependencies"] if d["api_name"] == "recipe_preset")
    return [names[i] for i in dependency["outputs"]]


def _strip(html) -> str:
    import re

    if not isinstance(html, str):  # the poll skipped its redraw: nothing changed
        return "unchanged"
    return " ".join(re.sub(r"<[^>]+>", " ", html or "").split())[:300]


if __name__ == "__main__":
    main()
