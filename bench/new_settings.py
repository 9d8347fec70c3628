"""The service under settings it has not seen: memory, the cost of a first use, and after a restart.

Starts the service as `make serve` does (``python -m service.serve``: the entry point, coglet and
its worker, with service/memory.py's worker environment), on its own port and its own cache
directory, and, over HTTP:

1. memory: ``--memory-requests`` requests in a row, each with a new (sampler, steps, size); the
   server's resident memory (the entry point, coglet and the worker, summed from /proc) after each;
2. first use: ``--settings`` more new settings, each sent twice in a row (same seed); the first
   request's latency against the repeat's;
3. restart: the server is stopped and started again on the same cache directory; the settings
   of (2) are sent twice again: a setting used before the restart against its repeat.

``--settings 0`` runs the memory part alone.

    python bench/new_settings.py --out bench/results/new_settings_cpu_tiny_shapes.json
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from service.memory import WORKER_ENVIRONMENT, worker_environment  # noqa: E402

SAMPLERS = ("DDIM", "DPMSolverMultistep", "EulerDiscrete", "EulerAncestralDiscrete", "UniPC", "PNDM")


def settings(count: int, offset: int = 0) -> list[dict]:
    """``count`` distinct (sampler, steps, size) inputs: sizes 64-128 px, steps 11-60, no two alike."""
    sizes = [(w, h) for w in range(64, 129, 8) for h in range(64, 129, 8) if (w, h) != (64, 64)]
    out = []
    for k in range(offset, offset + count):
        w, h = sizes[(k * 7) % len(sizes)]
        out.append({"scheduler": SAMPLERS[k % len(SAMPLERS)], "num_inference_steps": 11 + (k * 13) % 50,
                    "width": w, "height": h})  # fmt: skip
    assert len({tuple(s.values()) for s in out}) == count
    return out


class Server:
    def __init__(self, weights: Path, cache: Path, log: Path, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   COG_PREDICT_TYPE_STUB="predict.py:Predictor", PORT=str(self.port), COG_WEIGHTS=str(weights),
                   FASTER_DIFFUSION_CACHE=str(cache), OMP_NUM_THREADS=str(threads))  # fmt: skip
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.serve", "--host", "127.0.0.1"], cwd=common.ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                status = requests.get(f"{self.url}/health-check", timeout=5).json().get("status")
            except (requests.RequestException, ValueError):
                status = None
            if status == "READY":
                return
            if status == "SETUP_FAILED" or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"server setup failed or exited; see {log}")
            time.sleep(1)
        self.stop()
        raise SystemExit(f"server not ready after 600 s; see {log}")

    def predict(self, **inputs) -> tuple[float, dict]:
        for _ in range(100):  # coglet 0.23.1 frees its slot just after answering: a 409 right after is retried
            started = time.perf_counter()
            response = requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=900)
            seconds = time.perf_counter() - started
            if response.status_code != 409:
                break
            time.sleep(0.1)
        body = response.json()
        if body.get("status") != "succeeded":
            raise SystemExit(f"prediction failed: {body.get('error')}\n{body.get('logs')}")
        return seconds, body

    def processes(self) -> list[int]:
        """The entry point and its descendants (coglet runs in a process group of its own)."""
        parents = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        tree, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += parents.get(pid, [])
        return tree

    def rss_mib(self) -> float:
        """Resident memory of the server: the entry point, coglet and its worker."""
        total = 0
        for pid in self.processes():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self) -> None:
        tree = self.processes()
        self.proc.send_signal(signal.SIGTERM)  # the entry point hands it to coglet and exits with it
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        self._log.close()


def wall_time(body: dict) -> float:
    for line in body.get("logs", "").splitlines():
        if line.startswith("wall_time="):
            return float(line.split("=")[1].split("s")[0])
    return float("nan")


def first_use(server: Server, base: dict, chosen: list[dict], label: str = "first use") -> dict:
    """Each setting twice in a row: the first request's latency against the repeat's."""
    rows = []
    for setting in chosen:
        (first, b1), (repeat, b2) = server.predict(**base, **setting), server.predict(**base, **setting)
        rows.append({**setting, "first_s": round(first, 3), "repeat_s": round(repeat, 3), "ratio": round(first / repeat, 3),
                     "first_wall_s": wall_time(b1), "repeat_wall_s": wall_time(b2), "derived": "derived in" in b1["logs"]})  # fmt: skip
        print(f"{label} {setting} {first:.2f}s, repeat {repeat:.2f}s: {first / repeat:.2f}x", flush=True)
    return {"settings": rows, "median_ratio": round(statistics.median(r["ratio"] for r in rows), 3),
            "max_ratio": max(r["ratio"] for r in rows)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--memory-requests", type=int, default=40)
    ap.add_argument("--settings", type=int, default=8, help="first use vs repeat: this many new settings")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--cache", type=Path, default=None, help="the server's cache directory (default: a new temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    cache = args.cache or Path(tempfile.mkdtemp(prefix="fd-cache-"))
    log = Path(tempfile.mkdtemp(prefix="fd-server-")) / "server.log"
    result = {"environment": common.environment(), "weights": str(args.weights), "threads": args.threads,
              "worker_environment": {k: v for k, v in worker_environment().items() if k in WORKER_ENVIRONMENT}}  # fmt: skip
    print(f"cache {cache}, server log {log}, worker environment {result['worker_environment']}", flush=True)
    server = Server(args.weights, cache, log, args.threads)
    base = {"prompt": "a red square in the center", "seed": 1}
    try:
        server.predict(**base)  # warm-up at the defaults
        rss = [round(server.rss_mib(), 1)]
        memory = []
        for k, setting in enumerate(settings(args.memory_requests)):
            seconds, body = server.predict(**base, **setting)
            rss.append(round(server.rss_mib(), 1))
            memory.append({**setting, "seconds": round(seconds, 3), "rss_mib": rss[-1]})
            print(f"memory {k + 1:2d} {setting} {seconds:.2f}s rss {rss[-1]:.0f} MiB", flush=True)
        result["memory"] = {"rss_after_warmup_mib": rss[0], "requests": memory}
        if args.memory_requests >= 40:
            result["memory"].update(rss_10th_mib=rss[10], rss_40th_mib=rss[40], rss_40th_minus_10th_mib=round(rss[40] - rss[10], 1))
            print(f"memory: {rss[10]:.1f} MiB after the 10th, {rss[40]:.1f} after the 40th: {rss[40] - rss[10]:+.1f} MiB", flush=True)

        chosen = settings(args.settings, offset=args.memory_requests)
        if chosen:
            result["first_use"] = first_use(server, base, chosen)
    finally:
        server.stop()

    if chosen:
        server = Server(args.weights, cache, log, args.threads)
        try:
            server.predict(**base)  # warm-up, as after any start
            result["after_restart"] = first_use(server, base, chosen, label="after restart")
        finally:
            server.stop()
    summary = {k: result[k].get(m) for k, m in (("memory", "rss_40th_minus_10th_mib"), ("first_use", "median_ratio"),
                                                 ("after_restart", "median_ratio")) if k in result}  # fmt: skip
    print(summary, flush=True)
    if args.out is not None:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
