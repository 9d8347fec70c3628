#!/usr/bin/env python
"""Seconds per image and peak memory: stock vs faster-diffusion (sequential, parallel).

All modes run in one process on one pipeline, on the same seeds, after warm-up;
repeats are interleaved (stock, sequential, parallel, stock, ...) so slow drifts
of a shared machine hit every mode alike; the median of ``--repeats`` runs is
reported with its ratio to stock.

Models (``--model``):
  sd15        StableDiffusionPipeline with SD1.5's architecture and random weights:
              UNet, VAE and CLIP text encoder from their public configs
              (bench/configs/), a byte-level tokenizer (no vocabulary download).
              Compute does not depend on weight values.
  tiny-shapes the bundled weights/tiny-shapes pipeline (skipped if absent)
  toy         a toy SD-shaped pipeline (smoke tests)
  PATH        any diffusers StableDiffusionPipeline directory

Timing covers the ordinary ``pipe(prompt, ...)`` call: text encoding, the
denoising loop and, with ``--output-type pt`` (default on GPU), VAE decoding;
``--output-type latent`` (default on CPU) stops after the loop. GPU timings are
bracketed by ``torch.cuda.synchronize()``; peak memory is
``torch.cuda.max_memory_allocated`` (GPU) or the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs before each run) on CPU.

    python bench/speed.py --device cpu --model sd15 --resolution 128 --samplers ddim:50 --repeats 5
    python bench/speed.py --device cuda --model sd15 --resolution 512 --samplers ddim:50,dpmpp:20 --batch 1,4
    python bench/speed.py --device cuda ... --compile blocks --channels-last
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MODES = ("stock", "sequential", "parallel")
PROMPT = "a photograph of an astronaut riding a horse"


# -- pipelines ------------------------------------------------------------------------------------------------------


def byte_tokenizer(max_length: int):
    """A byte-level CLIP BPE tokenizer with no merges (every character is a token); no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def random_pipeline(unet_config: dict, vae_config: dict, text_config: dict, device: str, dtype, seed: int = 0):
    """A StableDiffusionPipeline with these architectures and random weights, built on ``device``."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(text_config.get("max_position_embeddings", 77))
    text_config = dict(text_config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):  # random init on the device (fast on a GPU)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items() if not k.startswith("_")}))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=common.make_scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def build_pipeline(model: str, device: str, dtype):
    """(pipeline, description) or (None, reason) for a model that is not available."""
    import json

    import torch

    if model == "sd15":
        cfg = lambda n: json.loads((common.CONFIGS / n).read_text())  # noqa: E731
        pipe = random_pipeline(common.load_unet_config("sd15"), cfg("sd15_vae.json"), cfg("sd15_text_encoder.json"), device, dtype)
        return pipe, "SD1.5 architecture (UNet, VAE, CLIP ViT-L text encoder from public configs), random weights"
    if model == "toy":
        vae = dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, in_channels=3, out_channels=3, latent_channels=4,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=520,
                    max_position_embeddings=77, projection_dim=32)
        return random_pipeline(common.load_unet_config("toy"), vae, text, device, dtype), "toy SD-shaped pipeline, random weights"
    path = common.ROOT / "weights" / "tiny-shapes" if model == "tiny-shapes" else Path(model)
    if not (path / "model_index.json").is_file():
        return None, f"{path} not found (no model_index.json)"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    del torch
    return pipe, f"{path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path} (trained weights)"


def native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


# -- compile -----------------------------------------------------------------------------------------------------------


def _raise_recompile_limits():
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                        ("accumulated_cache_size_limit", 1024), ("accumulated_recompile_limit", 1024)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))


def compile_unet(unet, how: str, mode: str | None = None, dynamic: bool | None = None) -> str:
    """Compiles the UNet in a way that coexists with the accelerator's hooks; returns a description.

    'blocks': ``faster_diffusion.compile_blocks`` (the library's recipe, docs/compile.md: every region
    of the UNet that holds no replayed module is compiled, the plan's dispatch stays eager).
    'unet': ``unet.compile()`` (whole UNet incl. the hooks' Python; for comparison).
    """
    import faster_diffusion

    _raise_recompile_limits()
    opts = {} if mode in (None, "", "default") else {"mode": mode}
    if dynamic is not None:  # True: one graph per region for every batch size (parallel mode varies the batch)
        opts["dynamic"] = dynamic
    if how == "unet":
        unet.compile(**opts)
        return f"unet.compile({opts or ''})"
    if how != "blocks":
        raise ValueError(f"unknown --compile {how!r}")
    regions = faster_diffusion.compile_blocks(unet, **opts)
    return f"faster_diffusion.compile_blocks: {len(regions)} regions{''.join(f' {k}={v}' for k, v in opts.items())}"


# -- measurement ---------------------------------------------------------------------------------------------------


class Memory:
    """Peak memory of one run: CUDA allocator peak, or peak RSS on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.reset = True
            except OSError:
                self.reset = False
            self.base = self._status("VmRSS")

    def stop(self) -> dict:
        import torch

        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return {"peak_bytes": peak, "base_bytes": self.base, "peak_over_base_bytes": peak - self.base,
                    "kind": "torch.cuda.max_memory_allocated"}
        peak = self._status("VmHWM")
        kind = "peak RSS (VmHWM reset per run)" if self.reset else "peak RSS of the process so far (VmHWM; reset unavailable)"
        return {"peak_bytes": peak, "base_bytes": self.base,
                "peak_over_base_bytes": None if peak is None or self.base is None else peak - self.base, "kind": kind}


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_run(pipe, device: str, *, batch: int, steps: int, resolution: int, seed: int, output_type: str, guidance: float):
    import torch

    mem = Memory(device)
    generator = torch.Generator("cpu").manual_seed(seed)
    sync(device)
    mem.start()
    t0 = time.perf_counter()
    out = pipe(
        prompt=[PROMPT] * batch, num_inference_steps=steps, height=resolution, width=resolution,
        guidance_scale=guidance, generator=generator, output_type=output_type,
    )
    sync(device)
    seconds = time.perf_counter() - t0
    images = out.images if hasattr(out, "images") else out[0]
    return seconds, mem.stop(), images


def _max_diff(a, b) -> float | None:
    import torch

    try:
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        return float((a - b).abs().max())
    except Exception:
        return None


def bench_config(pipe, args, sampler: str, steps: int, batch: int, log, on_repeat=None) -> dict:
    """All modes for one (sampler, steps, batch): warm-up, interleaved repeats, medians."""
    pipe.scheduler = common.make_scheduler(sampler, pipe.scheduler.config)
    kw = dict(batch=batch, steps=steps, resolution=args.resolution, output_type=args.output_type, guidance=args.guidance)
    modes = args.modes
    res = {m: {"seconds": [], "memory": [], "stats": None} for m in modes}
    first_images = {}
    for w in range(args.warmup):
        for m in modes:
            common.accelerate(pipe, m, key_steps=args.key_steps, max_parallel=args.max_parallel)
            t0 = time.perf_counter()
            one_run(pipe, args.device, seed=args.seed, **dict(kw, steps=args.warmup_steps or steps))
            log(f"    warm-up {w + 1}/{args.warmup} {m:<10} {time.perf_counter() - t0:7.2f}s")
    for r in range(args.repeats):
        for m in modes:
            accel = common.accelerate(pipe, m, key_steps=args.key_steps, max_parallel=args.max_parallel)
            seconds, memory, images = one_run(pipe, args.device, seed=args.seed + r, **kw)
            res[m]["seconds"].append(seconds)
            res[m]["memory"].append(memory)
            if accel is not None:
                res[m]["stats"] = dict(accel.stats)
            if r == 0:
                first_images[m] = images
            log(f"    run {r + 1}/{args.repeats} {m:<10} {seconds:7.3f}s  peak {memory['peak_bytes'] / 2**20:9.1f} MiB")
        if on_repeat is not None and r + 1 < args.repeats:  # partial results survive a kill
            on_repeat(_summarize(args, sampler, steps, batch, modes, res, first_images, partial=True))
    common.accelerate(pipe, "stock")
    return _summarize(args, sampler, steps, batch, modes, res, first_images)


def _summarize(args, sampler, steps, batch, modes, res, first_images, partial=False) -> dict:
    out = {"model": args.model, "sampler": sampler, "sampler_name": common.SAMPLER_NAMES[sampler], "steps": steps,
           "batch": batch, "resolution": args.resolution, "modes": {}}
    if partial:
        out["partial"] = True
    stock_median = statistics.median(res["stock"]["seconds"]) if "stock" in res else None
    stock_peak = max(x["peak_bytes"] or 0 for x in res["stock"]["memory"]) if "stock" in res else None
    for m in modes:
        secs = res[m]["seconds"]
        med = statistics.median(secs)
        peak = max(x["peak_bytes"] or 0 for x in res[m]["memory"])
        over = [x["peak_over_base_bytes"] for x in res[m]["memory"] if x["peak_over_base_bytes"] is not None]
        entry = {
            "seconds": secs, "median_s": med, "min_s": min(secs), "max_s": max(secs),
            "median_s_per_image": med / batch,
            "spread": (max(secs) - min(secs)) / med if med else None,
            "peak_mem_bytes": peak, "peak_over_base_bytes": max(over) if over else None,
            "memory_kind": res[m]["memory"][0]["kind"], "engine_stats": res[m]["stats"],
        }
        if stock_median:
            entry["speedup_vs_stock"] = stock_median / med
        if stock_peak:
            entry["peak_mem_vs_stock"] = peak / stock_peak
        out["modes"][m] = entry
    if "sequential" in first_images and "parallel" in first_images:
        out["parallel_vs_sequential_max_abs_diff"] = _max_diff(first_images["sequential"], first_images["parallel"])
    return out


def table(results: list[dict]) -> str:
    headers = ["model", "device", "dtype", "res", "sampler", "steps", "batch", "compile", "mode",
               "s/image (median)", "speedup vs stock", "peak mem (MiB)", "mem vs stock"]
    rows = []
    for r in results:
        for m, e in r["modes"].items():
            rows.append([
                r["model"], r["device"], r["dtype"], f"{r['resolution']}²", r["sampler_name"], r["steps"], r["batch"],
                r["compile"], m, f"{e['median_s_per_image']:.3f}",
                f"{e['speedup_vs_stock']:.2f}×" if "speedup_vs_stock" in e else "",
                f"{e['peak_mem_bytes'] / 2**20:.0f}" if e["peak_mem_bytes"] else "",
                f"{100 * (e['peak_mem_vs_stock'] - 1):+.0f}%" if "peak_mem_vs_stock" in e else "",
            ])
    return common.markdown_table(headers, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--model", default="sd15", help="sd15 | tiny-shapes | toy | PATH (default sd15)")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: 512 for sd15 on cuda, 128 on cpu; native for others)")
    ap.add_argument("--samplers", default="ddim:50", help="comma list of SAMPLER:STEPS, e.g. ddim:50,dpmpp:20")
    ap.add_argument("--batch", default="1", help="comma list of images per call (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per mode (default 5; median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed full runs per mode first (default 1)")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="sampling steps of the warm-up runs (default: same as the timed runs; fewer saves time on CPU)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of stock, sequential, parallel, parallel:N (max_parallel=N); default stock,sequential,parallel")
    ap.add_argument("--key-steps", default="paper", help="key-step schedule (default paper)")
    ap.add_argument("--max-parallel", type=int, default=None, help="engine max_parallel (default None: whole groups)")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5: 2 UNet rows per image)")
    ap.add_argument("--output-type", default=None, choices=["pt", "pil", "np", "latent"],
                    help="pt/pil/np include VAE decoding; latent times up to the end of the loop (default pt on cuda, latent on cpu)")
    ap.add_argument("--compile", default="none", choices=["none", "blocks", "unet"], help="torch.compile (default none)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--compile-dynamic", default="auto", choices=["auto", "true", "false"],
                    help="torch.compile dynamic= (auto: PyTorch's default, recompiles once a batch size changes)")
    ap.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="output JSON (default: $OUT/speed.json if OUT is set, else bench/results/speed.json)")
    args = ap.parse_args(argv)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("speed.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.output_type = args.output_type or ("pt" if cuda else "latent")
    args.modes = [m.strip() for m in args.modes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cuda:
        torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path on x86
    else:
        torch.backends.cudnn.benchmark = True
    out_path = Path(args.json) if args.json else (Path(os.environ["OUT"]) if os.environ.get("OUT") else common.BENCH / "results") / "speed.json"
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    pipe, description = build_pipeline(args.model, args.device, dtype)
    if pipe is None:
        log(f"speed.py: skipping model {args.model!r}: {description}")
        return 0
    pipe.set_progress_bar_config(disable=True)
    if args.resolution is None:
        args.resolution = (512 if cuda else 128) if args.model == "sd15" else native_resolution(pipe)
    compiled = "none"
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if args.compile != "none":
        dynamic = {"auto": None, "true": True, "false": False}[args.compile_dynamic]
        compiled = compile_unet(pipe.unet, args.compile, args.compile_mode, dynamic)
    log(f"[speed] {description}; built in {time.perf_counter() - t0:.1f}s on {args.device} {args.dtype}; "
        f"{args.resolution}px; compile: {compiled}; channels_last: {args.channels_last}; threads {torch.get_num_threads()}")

    settings = {k: (v if not isinstance(v, list) else list(v)) for k, v in vars(args).items()}
    result = {"environment": common.environment(args.device), "settings": settings, "model_description": description,
              "compile_description": compiled, "results": []}
    common.write_json(out_path, result)
    for sampler, steps in common.parse_sampler_steps(args.samplers):
        for batch in [int(b) for b in str(args.batch).split(",")]:
            log(f"  {args.model} {sampler}-{steps} batch {batch} {args.resolution}px compile={args.compile} channels_last={args.channels_last}")
            t1 = time.perf_counter()

            def extra():
                return dict(device=args.device, dtype=args.dtype, compile=args.compile + ("+cl" if args.channels_last else ""),
                            output_type=args.output_type, guidance=args.guidance, key_steps=args.key_steps,
                            max_parallel=args.max_parallel, wall_s=time.perf_counter() - t1)

            def on_repeat(partial):
                common.write_json(out_path, dict(result, results=[*result["results"], dict(partial, **extra())]))

            r = bench_config(pipe, args, sampler, steps, batch, log, on_repeat)
            r.update(extra())
            result["results"].append(r)
            result["environment"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            common.write_json(out_path, result)  # incremental
            log(table([r]))
    log("")
    log(table(result["results"]))
    log(f"\nwrote {out_path} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
