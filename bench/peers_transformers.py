#!/usr/bin/env python
"""faster-diffusion on a transformer side by side with diffusers' own cache hooks, in one process.

The bundled ``weights/tiny-shapes-flux`` (a FluxPipeline with true classifier-free guidance: two
transformer calls a step, each in its own ``cache_context``) at its default call: ``negative_prompt=""``,
``true_cfg_scale=4``, 28 FlowMatch Euler steps, 64², ``max_sequence_length=32``, batch ``--batch``, CPU fp32,
1 torch thread. ``--model`` takes another FluxPipeline directory.

Methods (``--methods``, a comma list; stock always runs, it is the reference):

  fbc:T          diffusers FirstBlockCacheConfig(threshold=T)
  taylorseer:N   diffusers TaylorSeerCacheConfig(cache_interval=N) (its other settings at their defaults)
  magcache:T     diffusers MagCacheConfig(threshold=T, mag_ratios=...) with the ratios of its own calibration
                 run (``calibrate=True`` on the first prompt, before any timing)
  fastercache    diffusers FasterCacheConfig(spatial_attention_block_skip_range=2, is_guidance_distilled=True:
                 FluxPipeline guides by two calls, not a batch FasterCache could split), the pipeline's timestep
  pab:N          diffusers PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=N), the pipeline's timestep
  steps:N        the stock pipeline at N steps (fewer steps: the accelerator that needs no library)
  fd:SPEC        faster_diffusion.enable(pipe, key_steps=SPEC): the paper's encoder propagation (DiT version)
  plan:SPEC      faster_diffusion.enable(pipe, plan=SPEC): explicit levels, or "auto"/"auto:T" where calibrated

diffusers' hooks are applied with ``pipe.transformer.enable_cache(config)`` and removed with
``disable_cache()``; ours with ``faster_diffusion.enable`` / ``disable``. Timing: ``--warmup`` untimed calls
per method, then per repeat and prompt every method once, the order rotating by one each prompt; seconds
per image are the median over prompts x repeats of the whole call (``output_type="np"``: text encoders,
loop, VAE decode). FLOPs: one more call per method under ``FlopCounterMode``. Quality: PSNR to the stock
image of the same seed and the shapes detector's colour / shape / position against the caption.

    python bench/peers_transformers.py --out bench/results/peers_transformers_cpu_tiny_shapes_flux
    python bench/peers_transformers.py --plot RESULT.json FIGURE.png    # frontiers in time and in FLOPs of a run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

import common

import numpy as np
import torch

DEFAULT_METHODS = ("fbc:0.05,fbc:0.1,fbc:0.2,fbc:0.4,taylorseer:2,taylorseer:3,taylorseer:4,magcache:0.06,magcache:0.12,"
                   "fastercache,pab:2,fd:paper")


#: ``--model`` names: a public transformer config of bench/configs with random weights, text encoders of one layer
#: at the real widths (their compute is small beside the transformer's), the real VAE's layout
ARCHITECTURES = {"flux-dev": "flux1_dev_transformer.json", "sd35-medium": "sd35_medium_transformer.json", "toy-flux": None}
TOY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=False)


def random_pipeline(name: str, device: str, dtype):
    """A FluxPipeline or StableDiffusion3Pipeline of architecture ``name`` with random weights (nothing downloaded)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    config = TOY_FLUX if ARCHITECTURES[name] is None else json.loads((common.CONFIGS / ARCHITECTURES[name]).read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    tokenizer = CLIPTokenizer.from_pretrained(common.ROOT / "weights" / "tiny-shapes" / "tokenizer")  # any vocabulary will do
    vocab = len(tokenizer)
    toy = ARCHITECTURES[name] is None

    def clip(hidden, projection=False):
        cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=max(1, hidden // 64),
                             vocab_size=vocab, max_position_embeddings=77, projection_dim=hidden)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    t5 = T5EncoderModel(T5Config(d_model=config["joint_attention_dim"], d_kv=64, num_heads=max(1, config["joint_attention_dim"] // 64),
                                 d_ff=2 * config["joint_attention_dim"], num_layers=1, vocab_size=vocab))
    latent = config["in_channels"] if name == "sd35-medium" else config["in_channels"] // 4  # Flux packs 2x2 latents
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, layers_per_block=1 if toy else 2,
                        block_out_channels=(8, 8, 16, 16) if toy else (128, 256, 512, 512), norm_num_groups=8 if toy else 32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's precision: FLUX.1-dev in fp32 would take 48 GB first
    try:
        with torch.device(device):
            if name == "sd35-medium":
                transformer = SD3Transformer2DModel(**config)
            else:
                transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    if name == "sd35-medium":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip(768, True),
                                        tokenizer=tokenizer, text_encoder_2=clip(1280, True), tokenizer_2=tokenizer,
                                        text_encoder_3=t5, tokenizer_3=tokenizer)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip(config["pooled_projection_dim"]),
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer)
    return pipe.to(device, dtype)


def diffusers_config(method: str, pipe, mag_ratios):
    """The diffusers cache config of ``method``, or None for one of ours."""
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    name, _, arg = method.partition(":")
    timestep = lambda: pipe.current_timestep  # noqa: E731  (FluxPipeline's, in its own units)
    if name == "fbc":
        return FirstBlockCacheConfig(threshold=float(arg))
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(arg), taylor_factors_dtype=torch.float32)
    if name == "magcache":
        return MagCacheConfig(threshold=float(arg), mag_ratios=mag_ratios, num_inference_steps=len(mag_ratios))
    if name == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, is_guidance_distilled=True, current_timestep_callback=timestep)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(arg), current_timestep_callback=timestep)
    return None


def mag_calibration(pipe, call) -> list[float]:
    """MagCache's own calibration: one stock run with ``calibrate=True``; the ratios it prints."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=call["num_inference_steps"]))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            pipe(**call)
    finally:
        pipe.transformer.disable_cache()
    lists = re.findall(r"\[([-0-9.eE, ]+)\]", printed.getvalue())
    if not lists:
        raise RuntimeError(f"MagCache printed no ratios: {printed.getvalue()[-300:]}")
    return [float(x) for x in lists[-1].split(",")]


@contextlib.contextmanager
def applied(method: str, pipe, mag_ratios, calibration=None):
    import faster_diffusion

    if method == "stock" or method.startswith("steps:"):
        yield None
        return
    config = diffusers_config(method, pipe, mag_ratios)
    if config is not None:
        pipe.transformer.enable_cache(config)
        try:
            yield None
        finally:
            pipe.transformer.disable_cache()
        return
    name, _, spec = method.partition(":")
    options = {"key_steps": spec} if name == "fd" else {"plan": spec}
    accel = faster_diffusion.enable(pipe, **options, calibration=calibration)
    try:
        yield accel
    finally:
        faster_diffusion.disable(pipe)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(common.ROOT / "weights" / "tiny-shapes-flux"),
                    help=f"a FluxPipeline directory, or random weights of {', '.join(ARCHITECTURES)}")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=None, help="true_cfg_scale (default 4, the bundled model's), or guidance_scale "
                    "for SD3 and a Flux with a guidance embedding")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="images per call (num_images_per_prompt)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flops", dest="flops", action="store_false")
    ap.add_argument("--calibration-budget", type=float, default=12.0,
                    help="random weights: the stock images plan:auto's calibration is made within, before any timing "
                         "(the bundled model plans from the calibrations it ships)")
    ap.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results" / "peers_transformers_cpu_tiny_shapes_flux")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline
    from torch.utils.flop_counter import FlopCounterMode

    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import FLUX_CALL, prompt_set

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    trained = args.model not in ARCHITECTURES
    if trained:
        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
        fixed = {**FLUX_CALL, "true_cfg_scale": args.guidance or FLUX_CALL["true_cfg_scale"]}
    else:  # random weights: the architecture's own kind of guidance, no adherence to read
        pipe = random_pipeline(args.model, args.device, dtype)
        distilled = isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
        guidance = {"guidance_scale": args.guidance or 3.5} if distilled else (
            {"negative_prompt": "", "true_cfg_scale": args.guidance or 4.0} if isinstance(pipe, FluxPipeline)
            else {"guidance_scale": args.guidance or 5.0})
        fixed = {"height": args.resolution, "width": args.resolution, **guidance}
    pipe.set_progress_bar_config(disable=True)
    methods = ["stock", *[m for m in args.methods.split(",") if m and m != "stock"]]
    items = prompt_set(args.num_prompts, 1)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def call(prompt, seed, method="stock"):
        steps = int(method.partition(":")[2]) if method.startswith("steps:") else args.steps
        return dict(prompt=prompt, num_inference_steps=steps, num_images_per_prompt=args.batch, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **fixed)

    mag_ratios = mag_calibration(pipe, call(*items[0])) if any(m.startswith("magcache") for m in methods) else None
    calibration = None
    if not trained and any(m.startswith("plan:auto") for m in methods):  # random weights ship no calibration
        import faster_diffusion

        started = time.perf_counter()
        calibration = faster_diffusion.calibrate(pipe, [items[0][0]], args.steps, plans=True, compute_budget=args.calibration_budget, **fixed)
        print(f"  plan:auto's calibration: {calibration.info['spent']} stock images in {time.perf_counter() - started:.1f}s", flush=True)
    seconds = {m: [] for m in methods}
    images = {m: {} for m in methods}
    stats = {}
    for m in methods:  # warm-up
        with applied(m, pipe, mag_ratios, calibration):
            for _ in range(args.warmup):
                pipe(**call(*items[0], m))
    for r in range(args.repeats):
        for k, (prompt, seed) in enumerate(items):
            shift = (r * len(items) + k) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                with applied(m, pipe, mag_ratios, calibration) as accel:
                    synchronize()
                    begin = time.perf_counter()
                    out = pipe(**call(prompt, seed, m)).images
                    synchronize()
                    seconds[m].append((time.perf_counter() - begin) / args.batch)
                    if accel is not None and accel.stats:
                        stats[m] = {key: accel.stats.get(key) for key in ("plan", "levels", "key_steps", "schedule_source")}
                if r == 0:
                    images[m][k] = out
        print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
    flops = {}
    if args.flops:
        for m in methods:
            with applied(m, pipe, mag_ratios, calibration), FlopCounterMode(display=False) as counter:
                pipe(**call(*items[0], m))
            flops[m] = counter.get_total_flops() / args.batch
    rows = []
    stock_s = statistics.median(seconds["stock"])
    for m in methods:
        psnr, right = [], {"colour": 0, "shape": 0, "position": 0, "all": 0}
        for k, (prompt, _) in enumerate(items):
            for ref, img in zip(images["stock"][k], images[m][k]):
                mse = float(np.mean((ref.astype(np.float64) - img.astype(np.float64)) ** 2))
                psnr.append(float("inf") if mse == 0 else 10 * np.log10(1.0 / mse))
                if not trained:  # random weights draw no shapes
                    continue
                target = shapes.parse_caption(prompt)
                found = shapes.detect((img * 255).round().astype(np.uint8)).attributes
                ok = [found.colour == target.colour, found.shape == target.shape, found.position == target.position]
                for key, hit in zip(("colour", "shape", "position"), ok):
                    right[key] += hit
                right["all"] += all(ok)
        n = len(psnr)
        s = statistics.median(seconds[m])
        rows.append({"method": m, "seconds": round(s, 4), "speedup": round(stock_s / s, 3),
                     "flop_speedup": round(flops["stock"] / flops[m], 3) if flops else None,
                     "psnr": round(float(np.mean(psnr)), 2) if m != "stock" else None,
                     **{key: (round(v / n, 4) if trained else None) for key, v in right.items()}, "stats": stats.get(m)})
    env = common.environment(args.device)
    result = {"environment": env, "model": str(args.model), "dtype": str(dtype), "device": args.device,
              "call": {**fixed, "num_inference_steps": args.steps, "batch": args.batch},
              "prompts": args.num_prompts, "repeats": args.repeats, "mag_ratios": mag_ratios, "rows": rows}
    lines = ["| method | s/image | speed-up | FLOP speed-up | PSNR to stock | colour | shape | position | all three |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        fs = f"{row['flop_speedup']:.2f}×" if row["flop_speedup"] else "–"
        ps = "–" if row["psnr"] is None else f"{row['psnr']:.1f} dB"
        lines.append(f"| {row['method']} | {row['seconds']:.3f} | {row['speedup']:.2f}× | {fs} | {ps} | "
                     + " | ".join("–" if row[k] is None else f"{100 * row[k]:.1f}%" for k in ("colour", "shape", "position", "all")) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"# Transformer peers on {Path(args.model).name}\n\n- {json.dumps(result['call'])}\n"
                                           f"- {env.get('date_utc')}, commit {env.get('git_commit')}, load {env.get('load_avg')}\n"
                                           f"- command: `{' '.join(sys.argv)}`\n\n{table}\n")
    return 0


#: plot legend and colour of each method family (by the method's prefix)
FAMILIES = {"plan": ("faster-diffusion plan:auto / auto:T", "tab:green"), "fbc": ("FirstBlockCache", "tab:blue"),
            "taylorseer": ("TaylorSeerCache", "tab:purple"), "magcache": ("MagCache", "tab:brown"),
            "steps": ("stock, fewer steps", "tab:grey"), "fastercache": ("FasterCache", "tab:pink"),
            "pab": ("PyramidAttentionBroadcast", "tab:olive"), "fd": ("encoder propagation, paper schedule", "tab:orange")}


def plot(result: dict, path: Path) -> None:
    """Speed-up in time (left) and in FLOPs (right) against PSNR to stock, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    families = {}
    for row in result["rows"]:
        if row["psnr"] is not None and row["method"].split(":")[0] in FAMILIES:
            families.setdefault(row["method"].split(":")[0], []).append(row)
    for ax, key, label in zip(axes, ("speedup", "flop_speedup"), ("speed-up in time (median s/image)", "speed-up in FLOPs (whole call)")):
        for family, rows in families.items():
            rows = sorted((r for r in rows if r.get(key)), key=lambda r: r[key])
            name, colour = FAMILIES[family]
            ax.plot([r[key] for r in rows], [r["psnr"] for r in rows], marker="o", color=colour, label=name,
                    linestyle="-" if len(rows) > 1 else "none")
            for r in rows:
                ax.annotate(r["method"].partition(":")[2] or r["method"], (r[key], r["psnr"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.axhline(40, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR to stock images (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    call = result["call"]
    fig.suptitle(f"{Path(result['model']).name}, {call['num_inference_steps']} steps, batch {call['batch']}, "
                 f"{result['prompts']} captions, {result['environment'].get('date_utc')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:  # --plot RESULT.json FIGURE.png: the frontiers of a run's results
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
