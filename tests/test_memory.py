"""service.memory: the worker's memory stays flat when requests bring new image sizes.

What grew (docs/operations.md): torch's per-thread cache of oneDNN convolutions, one per coglet
prediction thread, and glibc arenas; the fix is the worker's environment (``WORKER_ENVIRONMENT``),
which the entry point (``service.serve``) and cog.yaml give it, and ``malloc_trim`` after each
prediction.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT, entry_point

from service.memory import WORKER_ENVIRONMENT, bound_thread_caches, release_freed_memory, worker_environment

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_blocks_are_returned_to_the_system():
    blocks = [bytearray(64 * 1024 - 64) for _ in range(2000)]  # ~125 MiB of blocks below mmap's threshold
    keep = blocks[-1]  # the top of the heap stays in use: only malloc_trim gives the rest back
    del blocks
    before = rss_kib()
    assert release_freed_memory() is True
    assert rss_kib() < before - 50 * 1024, (before, rss_kib())
    del keep


# Convolutions at 240 input shapes on three threads in turn, as coglet runs predictions; prints the
# growth of glibc's in-use bytes (mallinfo2) in MiB. oneDNN's process-wide primitive cache is off
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0) so that what is left is what the per-thread caches hold.
NEW_SHAPES_ON_THREADS = textwrap.dedent("""
    import ctypes, queue, threading
    import torch

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Conv2d(32, 4, 1)).eval()
    threads = []
    for _ in range(3):
        jobs, done = queue.Queue(), queue.Queue()
        def serve(jobs=jobs, done=done):
            while True:
                size = jobs.get()
                with torch.no_grad():
                    net(torch.randn(1, 4, size, size + 1))
                done.put(size)
        threading.Thread(target=serve, daemon=True).start()
        threads.append((jobs, done))

    def run(sizes):
        for k, size in enumerate(sizes):
            jobs, done = threads[k % 3]
            jobs.put(size)
            done.get()

    run(range(4, 16))  # each thread's first convolutions
    before = libc.mallinfo2().uordblks
    run(range(16, 256))
    print((libc.mallinfo2().uordblks - before) / 2**20)
""")


def in_use_growth_mib(**environment) -> float:
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENVIRONMENT}
    env.update(environment, OMP_NUM_THREADS="1", ONEDNN_PRIMITIVE_CACHE_CAPACITY="0")
    done = subprocess.run([sys.executable, "-c", NEW_SHAPES_ON_THREADS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_the_per_thread_convolution_cache_does_not_grow_with_new_shapes():
    bounded = in_use_growth_mib(**worker_environment({}))
    torch_default = in_use_growth_mib(LRU_CACHE_CAPACITY="1024")
    assert torch_default > 5, f"the per-thread caches held only {torch_default:.1f} MiB: the test measures nothing"
    assert bounded < 2, f"{bounded:.1f} MiB after 240 new shapes with {WORKER_ENVIRONMENT} (torch's default: {torch_default:.1f})"


def test_bound_thread_caches_sets_the_capacity_unless_the_environment_has_one():
    environ = {}
    assert bound_thread_caches(environ) == "LRU_CACHE_CAPACITY=1, MALLOC_ARENA_MAX=unset"
    assert environ == {"LRU_CACHE_CAPACITY": "1"}
    environ = {"LRU_CACHE_CAPACITY": "64", "MALLOC_ARENA_MAX": "4"}
    assert bound_thread_caches(environ) == "LRU_CACHE_CAPACITY=64, MALLOC_ARENA_MAX=4"
    assert environ == {"LRU_CACHE_CAPACITY": "64", "MALLOC_ARENA_MAX": "4"}


def test_cog_yaml_gives_a_built_image_the_same_environment():
    listed = yaml.safe_load((ROOT / "cog.yaml").read_text())["environment"]
    assert dict(item.split("=", 1) for item in listed) == WORKER_ENVIRONMENT


# -- the entry point, with a predictor that answers with its own environment ----------------------------------

ENVIRONMENT_PREDICTOR = textwrap.dedent("""
    import os
    from cog import BaseRunner, Input

    class Predictor(BaseRunner):
        def run(self, name: str = Input(description="an environment variable")) -> str:
            return os.environ.get(name, "unset")
""")


def worker_sees(tmp_path: Path, names: list[str], **environment) -> dict[str, str]:
    """Starts `python -m service.serve` as `make serve` does, on a predictor that returns os.environ[name]."""
    tmp_path.mkdir()
    (tmp_path / "predict.py").write_text(ENVIRONMENT_PREDICTOR)
    environ = {k: v for k, v in os.environ.items() if k not in WORKER_ENVIRONMENT}
    environ.update(environment, PYTHONPATH=str(ROOT))
    seen = {}
    with entry_point(tmp_path, tmp_path / "serve.log", environ, startup_timeout=120) as server:
        for name in names:
            server.wait_ready(30)
            response = requests.post(f"{server.url}/predictions", json={"input": {"name": name}}, timeout=60)
            assert response.json()["status"] == "succeeded", response.text
            seen[name] = response.json()["output"]
    return seen


def test_the_entry_point_gives_the_worker_its_memory_settings(tmp_path):
    names = list(WORKER_ENVIRONMENT)
    assert worker_sees(tmp_path / "default", names) == WORKER_ENVIRONMENT
    assert worker_sees(tmp_path / "operator", names, MALLOC_ARENA_MAX="4") == {**WORKER_ENVIRONMENT, "MALLOC_ARENA_MAX": "4"}
