#!/usr/bin/env python
"""Soak the prediction service over HTTP: latency, memory over time and errors under a realistic mix.

Sends ``--requests`` predictions one after another (the service has one prediction slot), each once
the server says READY, to a server it starts (``python -m service.serve``, the entry point of
``make serve`` and the Docker image, on a free 127.0.0.1 port) or to ``--url``. The mix, fixed by
``--seed``:

* a ``--new`` fraction with a (scheduler, steps, size) the server has not seen (first use: it may
  calibrate on the request path), the rest repeating a setting already sent;
* a ``--lora`` fraction with ``lora_weights`` (default: the bundled orange LoRA for tiny-shapes). A
  file is served from a loopback HTTP server of its own, as a client's URL would be fetched; the
  server it starts allows 127.0.0.1 (``FASTER_DIFFUSION_ALLOW_HOSTS``), a ``--url`` server must too;
* an ``--img2img`` fraction with an ``image`` (a generated picture, as a data URI).

Schedulers and bounds come from the server's own /openapi.json. Prints p50/p95 latency overall and
per kind, the summed RSS of the server's process tree (the entry point, coglet and its worker)
sampled every ``--rss-every`` seconds, and every error. ``--json`` writes it all.

    python bench/soak.py --requests 120
    python bench/soak.py --url http://127.0.0.1:5000 --pid <server pid> --requests 40
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import http.server
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "weights" / "tiny-shapes-orange-lora" / "pytorch_lora_weights.safetensors"
PROMPTS = ["a red square in the center", "a blue circle on the left", "a green triangle at the top", "a yellow square on the right"]
LORA_PROMPTS = ["an orange circle on the left", "an orange square in the center"]


def plan(n: int, rng: random.Random, schedulers: list[str], steps: range, sizes: list[int],
         new: float, lora: float, img2img: float) -> list[dict]:
    """The requests to send: each a dict of inputs plus "kind" flags. The first request is always new."""
    seen: list[tuple[str, int, int]] = []
    requests_ = []
    for i in range(n):
        if not seen or rng.random() < new:
            while (setting := (rng.choice(schedulers), rng.choice(steps), rng.choice(sizes))) in seen:
                pass
            seen.append(setting)
            is_new = True
        else:
            setting, is_new = rng.choice(seen), False
        scheduler, num_steps, size = setting
        with_lora, with_image = rng.random() < lora, rng.random() < img2img
        inputs = dict(
            prompt=rng.choice(LORA_PROMPTS if with_lora else PROMPTS), scheduler=scheduler,
            num_inference_steps=num_steps, width=size, height=size, seed=i,
        )
        requests_.append(dict(inputs=inputs, new=is_new, lora=with_lora, img2img=with_image))
    return requests_


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def starting_image(size: int = 64) -> str:
    """A data URI of a PNG: a white square on grey, for img2img."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tree_rss(pid: int) -> int:
    """Summed RSS in bytes of a process and all its descendants (shared pages count once per process)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []  # (seconds since start, bytes)
        self.started, self.done = time.monotonic(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.started, tree_rss(self.pid)))
            self.done.wait(self.every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve_file(path: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server on 127.0.0.1 (in a thread) for ``path``'s folder, and the URL of ``path`` on it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(path.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/{path.name}"


def start_server(weights: str | None, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COG_PREDICT_TYPE_STUB="predict.py:Predictor", PORT=str(port), OMP_NUM_THREADS=str(threads),
               FASTER_DIFFUSION_ALLOW_HOSTS="127.0.0.1")  # the LoRA's loopback server (serve_file)
    if weights:
        env["COG_WEIGHTS"] = weights
    proc = subprocess.Popen([sys.executable, "-m", "service.serve", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, timeout: float) -> float:
    """Seconds until /health-check says READY."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            status = requests.get(f"{url}/health-check", timeout=10).json().get("status")
            if status == "READY":
                return time.monotonic() - started
            if status in ("SETUP_FAILED", "DEFUNCT"):
                raise RuntimeError(f"server is {status}")
        except (requests.ConnectionError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"server not READY after {timeout}s")


def summarize(results: list[dict]) -> dict:
    def stats(rows):
        latencies = [r["seconds"] for r in rows if r["ok"]]
        if not latencies:
            return {"n": len(rows)}
        return {"n": len(rows), "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "max": max(latencies)}

    groups = {"all": results, "new setting": [r for r in results if r["new"]], "repeated setting": [r for r in results if not r["new"]],
              "lora": [r for r in results if r["lora"]], "no lora": [r for r in results if not r["lora"]],
              "img2img": [r for r in results if r["img2img"]], "text-to-image": [r for r in results if not r["img2img"]]}
    return {name: stats(rows) for name, rows in groups.items() if rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", help="a running server (default: start `python -m service.serve` on 127.0.0.1)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--weights", help="COG_WEIGHTS for the server it starts (default: the service's choice)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server it starts")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--new", type=float, default=0.25, help="fraction of requests with a setting not sent before")
    parser.add_argument("--lora", type=float, default=0.25, help="fraction with lora_weights")
    parser.add_argument("--lora-weights", default=str(LORA), help="a URL, or a file to serve on 127.0.0.1")
    parser.add_argument("--img2img", type=float, default=0.2, help="fraction with an image (img2img)")
    parser.add_argument("--steps", default="10-50", help="step counts to draw from, LOW-HIGH")
    parser.add_argument("--sizes", default="64-128", help="sizes to draw from, LOW-HIGH in multiples of 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-every", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server it started on the way out

    lora_weights, files = args.lora_weights, None
    if "://" not in lora_weights:
        files, lora_weights = serve_file(Path(lora_weights))
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{os.getpid()}.log"
        proc, url = start_server(args.weights, args.threads, log_path)
        pid = proc.pid
        print(f"server: {url} (pid {pid}, OMP_NUM_THREADS={args.threads}), log {log_path}", flush=True)
    sampler = RssSampler(pid, args.rss_every) if pid else None
    if sampler:
        sampler.start()
    try:
        startup = wait_ready(url, 600)
        ready_rss = tree_rss(pid) / 2**20 if pid else float("nan")
        schema = requests.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
        low_steps, high_steps = map(int, args.steps.split("-"))
        low_size, high_size = map(int, args.sizes.split("-"))
        todo = plan(args.requests, random.Random(args.seed), schema["Scheduler"]["enum"], range(low_steps, high_steps + 1),
                    list(range(low_size, high_size + 1, 8)), args.new, args.lora, args.img2img)
        image = starting_image()
        results = []
        for i, request in enumerate(todo):
            inputs = dict(request["inputs"])
            if request["lora"]:
                inputs["lora_weights"] = lora_weights
            if request["img2img"]:
                inputs.update(image=image, prompt_strength=0.7)
            wait_ready(url, 120)
            started = time.monotonic()
            try:
                response = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=600)
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
                error = None if response.status_code == 200 and body.get("status") == "succeeded" else f"HTTP {response.status_code}: {body.get('error') or body.get('detail') or response.text[:200]}"
            except requests.RequestException as exc:
                error = f"{type(exc).__name__}: {exc}"
            seconds = time.monotonic() - started
            row = dict(index=i, seconds=seconds, ok=error is None, error=error, **{k: request[k] for k in ("new", "lora", "img2img")},
                       setting=f"{inputs['scheduler']}-{inputs['num_inference_steps']} {inputs['width']}px")
            rss = row["rss_mib"] = tree_rss(pid) / 2**20 if pid else float("nan")
            results.append(row)
            flags = ",".join(k for k in ("new", "lora", "img2img") if request[k]) or "repeat"
            print(f"{i + 1:4d} {row['setting']:>30} {flags:>20} {seconds:7.2f}s rss {rss:7.1f} MiB {error or ''}", flush=True)
    finally:
        if files:
            files.shutdown()
        if sampler:
            sampler.done.set()
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    summary = summarize(results)
    print(f"\nready after {startup:.1f}s; {len(results)} requests, {sum(not r['ok'] for r in results)} errors")
    print(f"{'requests':>18} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for name, s in summary.items():
        print(f"{name:>18} {s['n']:4d} {s.get('p50', float('nan')):7.2f} {s.get('p95', float('nan')):7.2f} {s.get('max', float('nan')):7.2f}")
    if pid:
        marks = [("ready", ready_rss)] + [(f"#{r['index'] + 1}", r["rss_mib"]) for r in results if (r["index"] + 1) % 10 == 0 or r is results[-1]]
        peak = max(b for _, b in sampler.samples) / 2**20
        print(f"server RSS (process tree, MiB), after request: " + "  ".join(f"{m} {v:.0f}" for m, v in marks) + f"; peak {peak:.0f}")
    for row in results:
        if row["error"]:
            print(f"error at request {row['index'] + 1} ({row['setting']}): {row['error']}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=dt.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv), url=url,
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs", commit=git_commit(), startup_seconds=startup, ready_rss_mib=ready_rss,
            summary=summary, rss=sampler.samples if sampler else [], results=results), indent=1))


def git_commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
        return commit + ("+changes" if dirty.strip() else "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
