"""Shared fixtures and helpers.

``model_dir``: the model directory the service tests load: the bundled ``weights/tiny-shapes``
pipeline when it is present; otherwise a tiny random-weights StableDiffusionPipeline
(``tiny_pipelines.tiny_sd``) saved once per test session, so the service tests always run.

``pipe`` (a module's tiny random SD pipeline), ``sample`` (its final latents for a prompt, step
count and seed) and ``difference`` (how far two outputs are, relative to their range): the
helpers the library's tests share. ``entry_point``: ``python -m service.serve`` (what ``make serve``
and the Dockerfile run) on a free port, READY, stopped afterwards.

Every test gets its own service cache directory (``FASTER_DIFFUSION_CACHE``), so none reads or
writes the user's ``~/.cache/faster-diffusion``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import requests
import torch

from faster_diffusion.unet_split import map_tensors

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "weights" / "tiny-shapes"
SIZE = 32  # pixels of the tiny pipelines' images: 16x16 latents with the tiny VAE
PROMPT = "a red square in the center"


def build_tiny_random_pipeline(path: Path) -> Path:
    """Saves the tests' tiny random-weights StableDiffusionPipeline (16x16 images) under ``path``."""
    from tiny_pipelines import tiny_sd

    tiny_sd().save_pretrained(path)
    return Path(path)


def bundled_model_available() -> bool:
    return (BUNDLED / "model_index.json").is_file()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """$FASTER_DIFFUSION_TEST_WEIGHTS if set, weights/tiny-shapes if committed, else a tiny random pipeline."""
    override = os.environ.get("FASTER_DIFFUSION_TEST_WEIGHTS")
    if override:
        return Path(override)
    if bundled_model_available():
        return BUNDLED
    return build_tiny_random_pipeline(tmp_path_factory.mktemp("tiny-random-sd"))


@pytest.fixture(autouse=True)
def service_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh cache directory for the service (calibrations, downloads) in every test."""
    path = tmp_path_factory.mktemp("service-cache")
    monkeypatch.setenv("FASTER_DIFFUSION_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def pipe():
    """A tiny random-weights StableDiffusionPipeline, one per test module."""
    from tiny_pipelines import tiny_sd

    return tiny_sd()


def sample(pipe, prompt=PROMPT, steps=12, seed=0, size=SIZE, **kwargs):
    """The pipeline's final latents (``output_type="latent"`` unless given) for ``prompt``, seeded."""
    kwargs.setdefault("output_type", "latent")
    return pipe(
        prompt, num_inference_steps=steps, height=size, width=size,
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images


def forecast_coefficients(plan: str) -> list:
    """Per step of an explicit plan run without a calibration (weight 1), c in f1 + c * (f1 - f0) at its X and Y
    steps: the distance past the latest full step over the distance between the latest two, where two full steps
    ran with only deep steps (D, X, C, Y) after them; None elsewhere."""
    coefficients, full = [], []
    for i, letter in enumerate(plan):
        if letter == "F":
            full = [*full[-1:], i]
        elif letter in "SE":  # they recompute the forecast module (a group of encoder steps keeps other steps' rows)
            full = []
        coefficients.append((i - full[1]) / (full[1] - full[0]) if letter in "XY" and len(full) == 2 else None)
    return coefficients


def features_forecast_at(plan: str):
    """A forward hook for ``unet_split.forecast_module`` that makes a deep plan's D steps at the X and Y steps of
    ``plan`` what deep_forecast replays: the module's output extrapolated from the latest two full steps."""
    coefficients, state = forecast_coefficients(plan), {"step": -1, "full": []}

    def hook(module, args, output):
        state["step"] += 1
        i = state["step"]
        if plan[i] == "F":
            state["full"] = [*state["full"][-1:], output]
        c = coefficients[i]
        if c is None:
            return output
        f0, f1 = state["full"]
        return map_tensors(lambda x1, x0: x1 + c * (x1 - x0), f1, f0)  # an attention layer's output is a tuple

    return hook


def guidance_reused_at(plan: str):
    """A forward hook (``register_forward_hook(..., with_kwargs=True)``) that makes a deep plan's D steps what
    deep_cfg computes at the C steps of ``plan`` (and deep_cfg_forecast at its Y steps): the unconditional output
    replaced by the conditional one less the guidance difference of the latest step that ran both rows (at a Y
    step, extrapolated from the latest two full steps' as ``forecast_coefficients`` says). The reference for
    deep_cfg (``plan.replace("C", "D")`` with this hook)."""
    coefficients, state = forecast_coefficients(plan), {"step": -1, "full": []}

    def hook(module, args, kwargs, output):
        state["step"] += 1
        i = state["step"]
        unconditional, conditional = output[0].chunk(2)  # pipelines call the UNet with return_dict=False
        if plan[i] not in "CY":
            state["latest"] = conditional - unconditional
            if plan[i] == "F":
                state["full"] = [*state["full"][-1:], state["latest"]]
            return output
        c = coefficients[i]
        reused = state["latest"] if c is None else state["full"][1] + c * (state["full"][1] - state["full"][0])
        return (torch.cat([conditional - reused, conditional]),)

    return hook


def difference(a, b):
    """Largest absolute difference relative to the outputs' range (an untrained UNet's latents reach ~30)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


class Served(NamedTuple):
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        """Polls /health-check until READY, as a client would (coglet frees its slot a few ms after
        answering a prediction, so a request right after one may get 409)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                if requests.get(f"{self.url}/health-check", timeout=10).json().get("status") == "READY":
                    return
            except (requests.ConnectionError, ValueError):
                pass
            time.sleep(0.25)
        pytest.fail(f"not READY after {timeout}s:\n{self.log()[-3000:]}")


@contextlib.contextmanager
def entry_point(cwd: Path, log_path: Path, environ: dict, startup_timeout: float):
    """``python -m service.serve`` on ``predict.py:Predictor`` in ``cwd``, with ``environ`` (the venv first on
    PATH, as coglet's worker runs ``python`` from it), in a session of its own; yields ``Served`` once READY.
    Afterwards SIGTERM, which the entry point hands to coglet, then SIGKILL to the group after 30 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COG_PREDICT_TYPE_STUB="predict.py:Predictor", PORT=str(port))  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.serve", "--host", "127.0.0.1"], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        served = Served(f"http://127.0.0.1:{port}", proc, log_path)
        served.wait_ready(startup_timeout)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
