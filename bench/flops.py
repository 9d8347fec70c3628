#!/usr/bin/env python
"""UNet FLOPs per image, stock vs faster-diffusion, on the real SD architectures.

The UNets are built from their public configs (bench/configs/) on PyTorch's meta
device: no weights, no memory, no arithmetic. ``torch.utils.flop_counter.FlopCounterMode``
counts the FLOPs of every matmul/convolution/attention op that the UNet dispatches
(convention: 1 multiply-add = 2 FLOPs; norms, activations and softmax are not
counted). Compute does not depend on weight values, so these are the true FLOPs.

With classifier-free guidance (the default, as in the paper) each sampling step
runs the UNet on 2 rows per image (unconditional + conditional); "per image"
FLOPs are the FLOPs of those 2 rows. The stock count is N x one UNet forward
(FLOPs do not depend on the timestep); the faster-diffusion count runs the whole
sampling loop through the engine (``accel.denoising_run``) in parallel mode, which
does the same arithmetic as sequential mode in fewer, larger UNet calls
(``--sequential`` counts sequential mode instead).

    python bench/flops.py                       # SD1.5/SD2.1/SDXL table + bench/results/flops.json
    python bench/flops.py --models sd15 --schedules paper
    python bench/flops.py --config path/to/unet/config.json --resolution 64 --name mine
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# Li et al. 2023 (arXiv 2312.09608), Table 1: SD1.5, 512x512, GFLOPs (per image, as published).
PAPER = {
    ("ddim", 50): {"stock_gflops": 37050, "faster_gflops": 27350},
    ("dpmpp", 20): {"stock_gflops": 14821, "faster_gflops": 11743},
}
DEFAULT_SCHEDULES = {"sd15": "paper,uniform:2,uniform:5,uniform:10", "sd21": "paper", "sdxl": "paper"}
ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "_flash_attention", "_efficient_attention")


def build_meta_unet(config: dict, device: str = "meta"):
    """The UNet on the meta device (no memory, no arithmetic); device='cpu' for toy configs, where
    real tiny tensors are faster than the meta device's Python shape functions."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.eval()


def unet_inputs(unet, rows: int, resolution: int, device="meta", dtype=None, frames=None, vae_scale=8) -> tuple:
    """(sample, kwargs) for one UNet call on ``rows`` rows at image size ``resolution``.

    Video UNets (3D, motion): ``frames`` gives a (rows, C, frames, H, W) sample. Pixel-space UNets
    (DeepFloyd IF): ``vae_scale=1``; the text states have ``encoder_hid_dim`` features when the UNet
    projects them (IF's T5), and stage II's noise level arrives as ``class_labels``."""
    import torch

    cfg = unet.config
    latent = resolution // vae_scale
    shape = (rows, cfg.in_channels, latent, latent) if frames is None else (rows, cfg.in_channels, frames, latent, latent)
    sample = torch.randn(*shape, device=device, dtype=dtype)
    text_dim = getattr(cfg, "encoder_hid_dim", None) or cfg.cross_attention_dim
    # AnimateDiff's pipeline repeats the text states per frame (UNetMotionModel does not); the 3D UNet repeats them itself
    text_rows = rows * frames if frames and type(unet).__name__ == "UNetMotionModel" else rows
    kwargs = {"encoder_hidden_states": torch.randn(text_rows, common.TEXT_TOKENS, text_dim, device=device, dtype=dtype)}
    if getattr(cfg, "class_embed_type", None) == "timestep":  # IF stage II: the upscaled image's noise level
        kwargs["class_labels"] = torch.randint(0, 1000, (rows,), device=device)
    if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text embedding + 6 micro-conditioning ids
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text_dim, device=device, dtype=dtype),
            "time_ids": torch.randn(rows, 6, device=device, dtype=dtype),
        }
    return sample, kwargs


def _split(flop_counts: dict) -> dict:
    """Per-part FLOPs of one stock forward: encoder (conv_in, down blocks, mid block) vs the rest."""
    parts = {"encoder_ops": {}, "decoder_ops": {}}
    top = {}
    for name, ops in flop_counts.items():
        # the UNet's class name (UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel), then a direct child
        m = re.fullmatch(r"UNet\w*Model\.(conv_in|down_blocks\.\d+|mid_block|[a-z_]+|up_blocks\.\d+)", name)
        if m:
            top[m.group(1)] = {str(op).split(".")[-1]: int(v) for op, v in ops.items()}
    for name, ops in top.items():
        if name in ("down_blocks", "up_blocks"):
            continue  # the ModuleList; its children are listed one by one
        encoder = name in ("conv_in", "transformer_in", "mid_block") or name.startswith("down_blocks.")  # as unet_split.encoder_modules
        part = "encoder_ops" if encoder else "decoder_ops"
        for op, v in ops.items():
            parts[part][op] = parts[part].get(op, 0) + v
    parts["modules"] = {k: sum(v.values()) for k, v in top.items() if k not in ("down_blocks", "up_blocks")}
    return parts


def count_stock_forward(unet, rows: int, resolution: int, **input_kw) -> dict:
    """``input_kw``: unet_inputs' frames / vae_scale, for video and pixel-space UNets."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sample, kwargs = unet_inputs(unet, rows, resolution, device=unet.device, **input_kw)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        unet(sample, 999, **kwargs)
    total = counter.get_total_flops()
    parts = _split(counter.get_flop_counts())
    enc, dec = sum(parts["encoder_ops"].values()), sum(parts["decoder_ops"].values())
    if enc + dec != total:  # everything the UNet runs lies in one of its direct children
        raise RuntimeError(f"FLOP split does not add up: {enc} + {dec} != {total}")
    return {"total": total, "encoder": enc, "decoder": dec, **parts}


def count_run(unet, rows: int, resolution: int, timesteps: list, mode: str, key_steps, **input_kw) -> dict:
    """FLOPs of a whole sampling loop through the engine, and the engine's stats (``input_kw``: as count_stock_forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sample, kwargs = unet_inputs(unet, rows, resolution, device=unet.device, **input_kw)
    accel = common.accelerate(unet, mode, key_steps=key_steps)
    counter = FlopCounterMode(display=False, depth=None)
    try:
        run = accel.denoising_run(timesteps) if accel is not None else contextlib.nullcontext()
        with torch.no_grad(), counter, run:
            for t in timesteps:  # python numbers: meta tensors hold no values to compare timesteps with
                unet(sample, t, **kwargs)
        stats = dict(accel.stats) if accel is not None else {"steps": len(timesteps), "unet_calls": len(timesteps)}
    finally:
        common.accelerate(unet, "stock")
    return {"total": counter.get_total_flops(), "stats": stats}


def sampler_timesteps(sampler: str, steps: int) -> list:
    scheduler = common.make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def paper_convention(part_ops: dict) -> float:
    """FLOPs with attention matmuls counted at half weight (see docs/benchmarks.md)."""
    return sum(v * (0.5 if any(a in op for a in ATTENTION_OPS) else 1.0) for op, v in part_ops.items())


@contextlib.contextmanager
def one_thread():
    """Counting is single-threaded Python work; intra-op threads only add synchronisation (badly so
    on a busy machine, where every tiny op waits for a descheduled second thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_model(name: str, config: dict, resolution: int, samplers, schedules, images: int, cfg: bool, mode: str,
              device: str = "meta") -> list[dict]:
    with one_thread():
        return _run_model(name, config, resolution, samplers, schedules, images, cfg, mode, device)


def _run_model(name, config, resolution, samplers, schedules, images, cfg, mode, device) -> list[dict]:
    t0 = time.time()
    unet = build_meta_unet(config, device)
    rows = images * (2 if cfg else 1)
    one = count_stock_forward(unet, rows, resolution)
    b1 = count_stock_forward(unet, 1, resolution) if rows != 1 else one
    print(
        f"[{name} {resolution}px] one forward: {one['total'] / 1e9:.1f} GFLOPs for {rows} rows "
        f"({b1['total'] / 1e9:.1f} at batch 1); encoder share {one['encoder'] / one['total']:.2%}",
        flush=True,
    )
    rows_out = []
    for sampler, steps in samplers:
        timesteps = sampler_timesteps(sampler, steps)
        for spec in schedules:
            keys = common.key_step_indices(spec, steps)
            res = count_run(unet, rows, resolution, timesteps, mode, spec)
            stock = one["total"] * steps
            faster = res["total"]
            predicted = len(keys) * one["total"] + (steps - len(keys)) * (one["total"] - one["encoder"])
            # paper-convention estimate: attention matmuls at half weight, batch-1 forward
            enc_p, dec_p = paper_convention(b1["encoder_ops"]), paper_convention(b1["decoder_ops"])
            paper_conv_reduction = (steps - len(keys)) * enc_p / (steps * (enc_p + dec_p))
            row = {
                "model": name,
                "resolution": resolution,
                "sampler": sampler,
                "sampler_name": common.SAMPLER_NAMES[sampler],
                "steps": steps,
                "schedule": spec,
                "key_steps": keys,
                "images": images,
                "cfg": cfg,
                "unet_rows_per_step": rows,
                "count_mode": mode,
                "stock_gflops_per_image": stock / images / 1e9,
                "faster_gflops_per_image": faster / images / 1e9,
                "reduction": 1 - faster / stock,
                "predicted_reduction": 1 - predicted / stock,
                "encoder_share": one["encoder"] / one["total"],
                "gflops_per_forward_batch1": b1["total"] / 1e9,
                "gflops_per_forward_batch1_paper_convention": (enc_p + dec_p) / 1e9,
                "reduction_paper_convention": paper_conv_reduction,
                "encoder_passes": res["stats"].get("encoder_passes"),
                "decoder_passes": res["stats"].get("decoder_passes"),
                "unet_calls": res["stats"].get("unet_calls"),
                "engine_stats": res["stats"],
            }
            paper = PAPER.get((sampler, steps)) if name == "sd15" and resolution == 512 and spec == "paper" else None
            if paper:
                row["paper_stock_gflops"] = paper["stock_gflops"]
                row["paper_faster_gflops"] = paper["faster_gflops"]
                row["paper_reduction"] = 1 - paper["faster_gflops"] / paper["stock_gflops"]
                row["paper_gflops_per_step"] = paper["stock_gflops"] / steps
                row["reduction_minus_paper_pp"] = 100 * (row["reduction"] - row["paper_reduction"])
                row["reduction_rel_diff_to_paper"] = row["reduction"] / row["paper_reduction"] - 1
            rows_out.append(row)
            print(
                f"  {sampler}-{steps} {spec:<10} keys={len(keys):>2} stock {stock / images / 1e12:8.2f} TFLOPs/img "
                f"faster {faster / images / 1e12:8.2f}  -{row['reduction']:.2%}"
                + (f" (paper -{row['paper_reduction']:.2%})" if paper else ""),
                flush=True,
            )
    modules = {k: v / 1e9 for k, v in b1["modules"].items()}
    print(f"  per-module GFLOPs at batch 1: " + ", ".join(f"{k} {v:.1f}" for k, v in modules.items()), flush=True)
    print(f"  [{name}] counted in {time.time() - t0:.1f}s", flush=True)
    for row in rows_out:
        row["module_gflops_batch1"] = modules
        row["op_gflops_batch1"] = {part: {op: v / 1e9 for op, v in b1[part + "_ops"].items()} for part in ("encoder", "decoder")}
    return rows_out


def _fmt(gflops: float) -> str:
    return f"{gflops:,.0f}" if gflops >= 100 else f"{gflops:.3g}"


def table(rows: list[dict]) -> str:
    headers = [
        "model", "res", "sampler", "steps", "schedule", "key steps", "encoder passes",
        "stock GFLOPs/img", "faster GFLOPs/img", "reduction", "paper reduction", "diff (pp)",
    ]
    out = []
    for r in rows:
        out.append([
            r["model"], f"{r['resolution']}²", r["sampler_name"], r["steps"], r["schedule"], len(r["key_steps"]),
            r["encoder_passes"], _fmt(r["stock_gflops_per_image"]), _fmt(r["faster_gflops_per_image"]),
            f"−{100 * r['reduction']:.1f}%",
            f"−{100 * r['paper_reduction']:.1f}%" if "paper_reduction" in r else "",
            f"{r['reduction_minus_paper_pp']:+.2f}" if "paper_reduction" in r else "",
        ])
    return common.markdown_table(headers, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sd21,sdxl", help="comma list of sd15, sd21, sdxl, toy (default: all three SD)")
    ap.add_argument("--config", help="a UNet config.json to count instead of --models (use with --resolution, --name)")
    ap.add_argument("--name", default="custom", help="row name for --config")
    ap.add_argument("--resolution", type=int, help="image size in pixels (default: the model's native size)")
    ap.add_argument("--samplers", default="ddim:50,dpmpp:20", help="comma list of SAMPLER:STEPS (default ddim:50,dpmpp:20)")
    ap.add_argument("--schedules", help="comma list of key-step specs (default: sd15 paper,uniform:2,uniform:5,uniform:10; others paper)")
    ap.add_argument("--images", type=int, default=1, help="images per prompt batch (default 1)")
    ap.add_argument("--no-cfg", action="store_true", help="count 1 UNet row per image (no classifier-free guidance)")
    ap.add_argument("--sequential", action="store_true", help="count the engine in sequential mode (same FLOPs, slower to count)")
    ap.add_argument("--device", default="meta", choices=["meta", "cpu"],
                    help="meta (default; no memory) or cpu (faster for toy configs only)")
    ap.add_argument("--json", default=None, help="output JSON (default: $OUT/flops.json if OUT is set, else bench/results/flops.json)")
    args = ap.parse_args(argv)

    import os

    out = Path(args.json) if args.json else (Path(os.environ["OUT"]) if os.environ.get("OUT") else common.BENCH / "results") / "flops.json"
    samplers = common.parse_sampler_steps(args.samplers)
    mode = "sequential" if args.sequential else "parallel"
    if args.config:
        todo = [(args.name, common.load_unet_config(args.config), args.resolution or 512)]
    else:
        todo = []
        for name in args.models.split(","):
            name = name.strip()
            native = common.MODELS[name][1] if name in common.MODELS else 64
            todo.append((name, common.load_unet_config(name), args.resolution or native))

    result = {"environment": common.environment("cpu"), "convention": "FLOPs = 2 x multiply-adds (torch.utils.flop_counter); "
              "per image = both classifier-free-guidance rows" if not args.no_cfg else "FLOPs = 2 x multiply-adds; 1 UNet row per image", "rows": []}
    for name, config, resolution in todo:
        specs = (args.schedules or DEFAULT_SCHEDULES.get(name, "paper")).split(",")
        result["rows"] += run_model(name, config, resolution, samplers, [s.strip() for s in specs], args.images, not args.no_cfg, mode, args.device)
        common.write_json(out, result)  # incremental
    print()
    print(table(result["rows"]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
