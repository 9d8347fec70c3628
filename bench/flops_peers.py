#!/usr/bin/env python
"""UNet FLOPs per image of faster-diffusion, DeepCache and ToMe on SD1.5 (added 2026-11-29, 6dce525).

Same convention as ``bench/flops.py`` (whose functions this uses): the UNet is built
from its public config on the meta device, ``FlopCounterMode`` counts every
matmul / convolution / attention op it dispatches (1 multiply-add = 2 FLOPs), and
"per image" means both classifier-free-guidance rows. DDIM-50 at 512² by default.

How each method is counted:

* stock and ToMe (``tomesd.apply_patch(unet, ratio=R)``, tomesd's defaults: merging
  for self-attention only, in the blocks at the latent's full resolution): one UNet
  forward times the step count; a step's FLOPs do not depend on its timestep. ToMe's
  own work (the similarity matmul of its bipartite matching) is counted too; its
  gathers and scatters are not arithmetic.
* DeepCache (``DeepCacheSDHelper``, ``cache_interval=N``, ``cache_branch_id=0``):
  the whole loop runs through the helper, on every timestep, so its own skip rule
  decides which modules run. With branch 0 the helper (DeepCache 0.1.1) runs the
  whole UNet at steps i with i % N == 0 and, at the other steps, only the time
  embedding, ``conv_in``, the last resnet + transformer of the last up block and
  ``conv_out``; every down block (the first included), the mid block and the rest
  of the up path are replayed. (DeepCache's standalone SD pipeline,
  ``DeepCache/sd``, runs more at branch 0: also the first resnet + transformer of
  the first down block and the second-to-last pair of the last up block. That
  variant is reported as an estimate from per-module counts, ``deepcache_sd_pipeline``
  in the JSON.)
* faster-diffusion (``fd:SPEC``, parallel) and its composition with ToMe
  (``fd:SPEC+tome:R``): the whole loop through the engine (``flops.count_run``).
  A calibrated "auto" schedule needs the model's calibration; its FLOPs equal any
  schedule's with as many key steps.

    python bench/flops_peers.py                  # SD1.5 512² DDIM-50: the table + bench/results/flops_peers.json
    python bench/flops_peers.py --methods stock,deepcache:3,tome:0.5,fd:paper --json /tmp/f.json
    python bench/flops_peers.py --model toy --resolution 64 --device cpu      # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402
import peers  # noqa: E402

DEFAULT_METHODS = (
    "stock", "deepcache:2", "deepcache:3", "deepcache:4", "deepcache:5", "tome:0.3", "tome:0.5",
    "fd:paper", "fd:uniform:2", "fd:uniform:3", "fd:uniform:5", "fd:paper+tome:0.5",
)


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, depth=None)


def _timestep_tensors(timesteps):
    """CPU 0-d tensors: DeepCache's UNet wrapper reads ``args[1].item()``; the UNet moves them to the sample's device."""
    import torch

    return [torch.tensor(t) for t in timesteps]


@contextlib.contextmanager
def tome_patched(unet, ratio: float | None):
    if ratio is None:
        yield
        return
    import tomesd

    tomesd.apply_patch(unet, ratio=ratio)
    try:
        yield
    finally:
        tomesd.remove_patch(unet)


def count_forward(unet, rows: int, resolution: int) -> tuple[int, dict]:
    """FLOPs of one UNet forward (as patched now) and per-module FLOPs by full module name."""
    import torch

    sample, kwargs = flops.unet_inputs(unet, rows, resolution, device=unet.device)
    counter = _flop_counter()
    with torch.no_grad(), counter:
        unet(sample, 999, **kwargs)
    per_module = {name: sum(int(v) for v in ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def count_deepcache(unet, rows: int, resolution: int, timesteps: list, interval: int) -> dict:
    """The whole loop through DeepCacheSDHelper: total FLOPs and the FLOPs of each step."""
    import torch
    from DeepCache import DeepCacheSDHelper

    sample, kwargs = flops.unet_inputs(unet, rows, resolution, device=unet.device)
    ts = _timestep_tensors(timesteps)
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=torch.stack(ts)))  # what the helper reads
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=peers.DEEPCACHE_BRANCH)
    helper.enable()
    per_step = []
    try:
        with torch.no_grad():
            for t in ts:
                counter = _flop_counter()
                with counter:
                    unet(sample, t, **kwargs)
                per_step.append(counter.get_total_flops())
    finally:
        helper.disable()
        peers._drop_plain_forwards(unet)
    full = [i for i in range(len(ts)) if i % interval == 0]
    return {"total": sum(per_step), "per_step": per_step, "full_steps": len(full), "partial_steps": len(ts) - len(full),
            "partial_step_flops": per_step[1] if len(per_step) > 1 and interval > 1 else None}


def deepcache_sd_pipeline_extra(unet, per_module: dict) -> int:
    """FLOPs that DeepCache's standalone SD pipeline (DeepCache/sd, branch 0) runs at a partial step on top of
    the helper: the first down block's first resnet + transformer and the last up block's second-to-last pair."""
    prefix = "UNet2DConditionModel."
    last = len(unet.up_blocks) - 1
    up = unet.up_blocks[last]
    names = ["down_blocks.0.resnets.0", f"up_blocks.{last}.resnets.{len(up.resnets) - 2}"]
    if getattr(unet.down_blocks[0], "attentions", None):
        names.append("down_blocks.0.attentions.0")
    if getattr(up, "attentions", None):
        names.append(f"up_blocks.{last}.attentions.{len(up.attentions) - 2}")
    return sum(per_module.get(prefix + n, 0) for n in names)


def count_method(unet, method, rows: int, resolution: int, timesteps: list, stock_forward: int, per_module: dict) -> dict:
    """FLOPs of one sampling run of ``method`` (a ``peers.Method``), with what ran."""
    parts = {p.kind: p for p in method.parts}
    steps = len(timesteps)
    tome = parts.get("tome")
    with tome_patched(unet, tome.ratio if tome else None):
        if "deepcache" in parts and "fd" in parts:
            raise ValueError(f"{method.name}: counting faster-diffusion with DeepCache is not supported here")
        if "deepcache" in parts:
            dc = count_deepcache(unet, rows, resolution, timesteps, parts["deepcache"].interval)
            extra = deepcache_sd_pipeline_extra(unet, per_module) * dc["partial_steps"]
            return {"total": dc["total"], "full_unet_steps": dc["full_steps"], "partial_unet_steps": dc["partial_steps"],
                    "encoder_passes": dc["full_steps"], "partial_step_flops": dc["partial_step_flops"],
                    "deepcache_sd_pipeline_total": dc["total"] + extra}
        if "fd" in parts:
            fd = parts["fd"]
            res = flops.count_run(unet, rows, resolution, timesteps, "parallel" if fd.parallel else "sequential", fd.param)
            return {"total": res["total"], "encoder_passes": res["stats"].get("encoder_passes"),
                    "key_steps": res["stats"].get("key_steps"), "unet_calls": res["stats"].get("unet_calls")}
        one, _ = count_forward(unet, rows, resolution) if tome else (stock_forward, None)
        return {"total": one * steps, "encoder_passes": steps, "forward_flops": one}


def run(model: str, resolution: int, sampler: str, steps: int, names: list[str], cfg: bool, device: str, log=print) -> list[dict]:
    with flops.one_thread():
        t0 = time.perf_counter()
        unet = flops.build_meta_unet(common.load_unet_config(model), device)
        rows = 2 if cfg else 1
        timesteps = flops.sampler_timesteps(sampler, steps)
        stock_forward, per_module = count_forward(unet, rows, resolution)
        stock = stock_forward * steps
        log(f"[{model} {resolution}px {common.SAMPLER_NAMES[sampler]}-{steps}] one forward {stock_forward / 1e9:,.1f} GFLOPs "
            f"({rows} rows); stock {stock / 1e9:,.0f} GFLOPs/img")
        out = []
        for name in names:
            method = peers.parse_method(name)
            missing = peers.missing_peers(method)
            if missing:
                log(f"  skipped {name}: {', '.join(missing)} not installed")
                continue
            t1 = time.perf_counter()
            res = count_method(unet, method, rows, resolution, timesteps, stock_forward, per_module)
            row = {
                "model": model, "resolution": resolution, "sampler": sampler, "steps": steps, "cfg": cfg,
                "method": name, "family": method.family, "label": method.label,
                "gflops_per_image": res.pop("total") / 1e9, "stock_gflops_per_image": stock / 1e9, **res,
            }
            row["reduction"] = 1 - row["gflops_per_image"] / row["stock_gflops_per_image"]
            if "deepcache_sd_pipeline_total" in row:
                g = row.pop("deepcache_sd_pipeline_total") / 1e9
                row["deepcache_sd_pipeline"] = {"gflops_per_image": g, "reduction": 1 - g / row["stock_gflops_per_image"],
                                                "estimated": "helper count + per-module FLOPs of the extra modules"}
            out.append(row)
            log(f"  {name:<20} {row['gflops_per_image']:>10,.0f} GFLOPs/img  -{row['reduction']:.1%}  ({time.perf_counter() - t1:.1f}s)")
        log(f"  counted in {time.perf_counter() - t0:.1f}s")
        return out


def table(rows: list[dict]) -> str:
    headers = ["model", "res", "sampler", "method", "encoder passes", "GFLOPs/img", "reduction", "speed-up bound"]
    out = []
    for r in rows:
        out.append([
            r["model"], f"{r['resolution']}²", f"{common.SAMPLER_NAMES[r['sampler']]}-{r['steps']}", r["label"],
            f"{r['encoder_passes']}/{r['steps']}", flops._fmt(r["gflops_per_image"]), f"−{100 * r['reduction']:.1f}%",
            f"{1 / (1 - r['reduction']):.2f}×" if r["reduction"] < 1 else "∞",
        ])
    return common.markdown_table(headers, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="sd15 | sd21 | sdxl | toy | PATH to a UNet config.json (default sd15)")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: the model's native size; toy 64)")
    ap.add_argument("--sampler", default="ddim:50", help="SAMPLER:STEPS (default ddim:50)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list in bench/peers.py's notation")
    ap.add_argument("--no-cfg", action="store_true", help="1 UNet row per image")
    ap.add_argument("--device", default="meta", choices=["meta", "cpu"], help="meta (default) or cpu (toy configs only)")
    ap.add_argument("--json", default=None, help="output JSON (default: $OUT/flops_peers.json if OUT is set, else bench/results/flops_peers.json)")
    args = ap.parse_args(argv)

    out = Path(args.json) if args.json else (Path(os.environ["OUT"]) if os.environ.get("OUT") else common.BENCH / "results") / "flops_peers.json"
    [(sampler, steps)] = common.parse_sampler_steps(args.sampler)
    resolution = args.resolution or (common.MODELS[args.model][1] if args.model in common.MODELS else 64)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    rows = run(args.model, resolution, sampler, steps, names, not args.no_cfg, args.device)
    result = {"environment": common.environment("cpu"), "packages": peers._versions(),
              "convention": "FLOPs = 2 x multiply-adds (torch.utils.flop_counter); per image = "
              + ("1 UNet row" if args.no_cfg else "both classifier-free-guidance rows"),
              "rows": rows}
    common.write_json(out, result)
    print()
    print(table(rows))
    dc = [r for r in rows if "deepcache_sd_pipeline" in r]
    if dc:
        print("\nDeepCache's standalone SD pipeline at branch 0 (also runs down_blocks.0's first resnet + transformer and the "
              "last up block's second-to-last pair at partial steps; estimated): "
              + ", ".join(f"interval {r['method'].split(':')[1]}: −{100 * r['deepcache_sd_pipeline']['reduction']:.1f}%" for r in dc))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
