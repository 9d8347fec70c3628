"""Shared helpers for the benchmarks: model configs, environment info, JSON output.

Everything that touches the faster-diffusion engine goes through ``accelerate()``
so the benchmarks follow one small function if the engine's API changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONFIGS = BENCH / "configs"
if str(ROOT) not in sys.path:  # run as `python bench/flops.py` from a checkout
    sys.path.insert(0, str(ROOT))

# name -> (UNet config file, default image resolution, text context length)
MODELS = {
    "sd15": ("sd15_unet.json", 512),
    "sd21": ("sd21_unet.json", 768),
    "sdxl": ("sdxl_unet.json", 1024),
}
TEXT_TOKENS = 77  # CLIP context length of every SD text encoder

# Stable Diffusion's noise schedule (scheduler/scheduler_config.json of SD1.5 and SD2.1 base).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1,
)

# A toy SD-shaped UNet (same block types as SD1.5) for smoke tests and `--cpu-smoke`.
TOY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)


def load_unet_config(name_or_path: str) -> dict:
    """A UNet config: a name in MODELS, 'toy', or a path to a config.json."""
    if name_or_path == "toy":
        return dict(TOY_UNET)
    if name_or_path in MODELS:
        path = CONFIGS / MODELS[name_or_path][0]
    else:
        path = Path(name_or_path)
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def make_scheduler(sampler: str, base_config=None):
    """'ddim' or 'dpmpp' (DPM-Solver++ 2M, the multistep solver the paper pairs with 20 steps), from the
    project's sampler table, on SD1.5's noise schedule or, given ``base_config``, on a model's own (its
    prediction type and timestep spacing)."""
    from faster_diffusion import samplers

    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; use {' or '.join(SAMPLER_NAMES)}")
    if base_config is None:
        base_config = dict(SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    return samplers.make_scheduler(sampler, base_config)


#: the benchmarks' samplers: their short names (aliases in faster_diffusion.samplers) -> label
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}


def parse_sampler_steps(text: str) -> list[tuple[str, int]]:
    """'ddim:50,dpmpp:20' -> [('ddim', 50), ('dpmpp', 20)]."""
    out = []
    for item in text.split(","):
        sampler, _, steps = item.strip().partition(":")
        if sampler not in SAMPLER_NAMES or not steps.isdigit():
            raise SystemExit(f"bad sampler spec {item!r}: expected e.g. ddim:50 or dpmpp:20")
        out.append((sampler, int(steps)))
    return out


# -- the engine ----------------------------------------------------------------------------------------------------


def accelerate(pipe_or_unet, mode: str, key_steps="paper", max_parallel=None, **kwargs):
    """Puts ``pipe_or_unet`` in ``mode``: 'stock' (engine off), 'sequential', 'parallel' or
    'parallel:N' (parallel with max_parallel=N steps per decoder batch).

    Returns the accelerator (None for stock). The single place the benchmarks call the engine.
    """
    import faster_diffusion

    faster_diffusion.disable(pipe_or_unet)
    if mode == "stock":
        return None
    name, _, limit = mode.partition(":")
    if name not in ("sequential", "parallel") or (limit and (name != "parallel" or not limit.isdigit())):
        raise ValueError(f"unknown mode {mode!r}: use stock, sequential, parallel or parallel:N")
    return faster_diffusion.enable(
        pipe_or_unet, key_steps=key_steps, parallel=(name == "parallel"),
        max_parallel=int(limit) if limit else max_parallel, **kwargs,
    )


def key_step_indices(spec, steps: int) -> list[int]:
    import faster_diffusion

    return list(faster_diffusion.key_step_indices(spec, steps))


# -- environment and output ----------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    import diffusers
    import torch

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        env["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: str | Path, data) -> None:
    """Writes atomically (results survive a kill between writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
