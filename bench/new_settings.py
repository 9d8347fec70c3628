"""The service under settings it has not seen: memory, the cost of a first use, and after a restart.

Starts Cog's HTTP server on predict.py (as `make serve` does, on its own port and its own cache
directory) and, over HTTP:

1. memory: ``--memory-requests`` requests in a row, each with a new (sampler, steps, size); the
   server's resident memory (the HTTP process and its worker, from /proc) after each;
2. first use: ``--settings`` more new settings, each sent twice in a row (same seed); the first
   request's latency against the repeat's;
3. restart: the server is stopped and started again on the same cache directory; the settings
   of (2) are sent twice again: a setting used before the restart against its repeat.

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
        self.proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=common.ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/health-check", timeout=5).json().get("status") == "READY":
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited; see {log}")
            time.sleep(1)
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

    def rss_mib(self) -> float:
        """Resident memory of the server's process group (the HTTP process and its worker)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != self.proc.pid:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, ProcessLookupError):
                continue
        return total / 1024

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def wall_time(body: dict) -> float:
    for line in body.get("logs", "").splitlines():
        if line.startswith("wall_time="):
            return float(line.split("=")[1].split("s")[0])
    return float("nan")


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
    print(f"cache {cache}, server log {log}", flush=True)
    result = {"environment": common.environment(), "weights": str(args.weights), "threads": args.threads}
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
            result["memory"]["rss_40th_minus_10th_mib"] = round(rss[40] - rss[10], 1)

        first_use = []
        chosen = settings(args.settings, offset=args.memory_requests)
        for setting in chosen:
            (first, b1), (repeat, b2) = server.predict(**base, **setting), server.predict(**base, **setting)
            first_use.append({**setting, "first_s": round(first, 3), "repeat_s": round(repeat, 3),
                              "ratio": round(first / repeat, 3), "first_wall_s": wall_time(b1), "repeat_wall_s": wall_time(b2),
                              "derived": "derived in" in b1["logs"]})  # fmt: skip
            print(f"first use {setting} {first:.2f}s, repeat {repeat:.2f}s: {first / repeat:.2f}x", flush=True)
        result["first_use"] = {"settings": first_use, "median_ratio": round(statistics.median(r["ratio"] for r in first_use), 3)}
    finally:
        server.stop()

    server = Server(args.weights, cache, log, args.threads)
    try:
        server.predict(**base)  # warm-up, as after any start
        after = []
        for setting in chosen:
            (first, b1), (repeat, _) = server.predict(**base, **setting), server.predict(**base, **setting)
            after.append({**setting, "first_s": round(first, 3), "repeat_s": round(repeat, 3), "ratio": round(first / repeat, 3),
                          "derived": "derived in" in b1["logs"]})  # fmt: skip
            print(f"after restart {setting} {first:.2f}s, repeat {repeat:.2f}s: {first / repeat:.2f}x", flush=True)
        result["after_restart"] = {"settings": after, "median_ratio": round(statistics.median(r["ratio"] for r in after), 3),
                                   "max_ratio": max(r["ratio"] for r in after)}  # fmt: skip
    finally:
        server.stop()
    summary = {k: result[k].get(m) for k, m in (("memory", "rss_40th_minus_10th_mib"), ("first_use", "median_ratio"),
                                                 ("after_restart", "median_ratio"))}  # fmt: skip
    print(summary, flush=True)
    if args.out is not None:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
