#!/usr/bin/env python
"""faster-diffusion side by side with DeepCache and ToMe (issue #13): the bundled tiny-shapes model on CPU,
SD1.5's architecture at 512² fp16 on a GPU (bench/gpu.sh).

One process, one pipeline, the same prompts and seeds for every method:
``faster_diffusion.quality.evaluate.prompt_set(num_prompts, 1)`` gives the captions and
seeds; image ``k`` starts from ``torch.Generator().manual_seed(seed_k)`` in every method.
DDIM-50, guidance 7.5, batch 1 (one image per ``pipe(...)`` call), CPU by default.

Models (``--model``): a StableDiffusionPipeline directory (default weights/tiny-shapes), or
``sd15`` / ``toy``: bench/speed.py's ``build_pipeline``, SD1.5's architecture (or a toy one)
with random weights, nothing to download. ``--resolution`` defaults to the model's native
size (512 for sd15), ``--dtype`` to fp16 on cuda and fp32 on cpu. On cuda every timed call
is bracketed by ``torch.cuda.synchronize()``; the generators stay on the CPU.

Timing: each method first runs ``--warmup`` untimed calls; then, per repeat and per
prompt, every method runs once in turn (the order rotates by one each prompt), so
slow drifts of a shared machine hit every method alike. A timed call is the ordinary
``pipe(prompt, ..., output_type="latent")``: text encoding and the denoising loop.
The VAE decode, the same for every method, runs untimed afterwards; its median is
reported once. Seconds per image are the median over prompts x repeats; the speed-up
is stock's median over the method's. One torch thread by default (``--threads``): on
a 2-core machine that another job kept busy, 2 threads made a call about 100x slower.

Quality, against the stock images of the same seeds (first repeat): mean PSNR and
SSIM (scikit-image, data range 1, as in ``faster_diffusion.quality.evaluate``; SSIM is
None where scikit-image is not installed), and colour / shape / position adherence read by
``faster_diffusion.quality.shapes.detect`` against the caption: for a pipeline directory
only (the shapes detector reads what tiny-shapes draws; the random-weights models draw
noise, and their adherence is None). Every later repeat must reproduce the first repeat's
latents; the largest difference is reported per method.

Methods (``--methods``, a comma list; ``+`` composes, applied left to right):

  stock                 the unaccelerated pipeline (always run: it is the reference)
  deepcache:N           DeepCache 0.1.1 ``DeepCacheSDHelper``, cache_interval=N, cache_branch_id=0
  tome:R                tomesd 0.1.3 ``apply_patch(pipe, ratio=R)`` (defaults otherwise). ToMe
                        draws its random merge partition from a generator it keeps across
                        calls; here it is reseeded with the image's seed before each call,
                        so ToMe images are reproducible and the same in every repeat
  fd:SPEC               ``faster_diffusion.enable(pipe, key_steps=SPEC, parallel=True,
                        noise_injection=0.003)``; "auto" / "auto:B" use the model's shipped
                        calibration/*.json. Without one (sd15, toy) the method's first call is a
                        stock run that calibrates: the warm-up makes that call, then one more with
                        the calibrated schedule; the JSON's ``calibrated_in_warmup`` and notes say so
  fd-seq:SPEC           the same with parallel=False
  fd:auto+tome:0.5      both (faster-diffusion hooks the UNet's encoder blocks, ToMe swaps the
                        class of its transformer blocks; they compose in either order)
  fd-seq:SPEC+deepcache:N
                        sequential faster-diffusion under DeepCache (opt-in; see below)

faster-diffusion + DeepCache: both cache UNet features. They compose only with
sequential faster-diffusion enabled first (DeepCache then wraps faster-diffusion's
hooked forwards and must be disabled first). With ``parallel=True`` faster-diffusion
runs the decoders of a key step's group in one UNet call of 2 x group rows and never
calls the UNet at the group's other steps: DeepCache counts steps by UNet calls (it
sees only key steps) and replays up-block outputs cached at another batch size, so the
first group of a different size fails ("Sizes of tensors must match") and groups of
equal size silently reuse deep features of other steps. With DeepCache enabled first,
its UNet wrapper reads the timestep from ``args[1]``, but faster-diffusion calls the
UNet's forward with keyword arguments: IndexError. Such combinations are refused.

    python bench/peers.py                                  # 24 prompts, 3 repeats
    python bench/peers.py --num-prompts 4 --repeats 1      # quick check
    python bench/peers.py --methods stock,tome:0.5,fd:auto,fd:auto+tome:0.5 --plot bench/results/peers.png
    python bench/peers.py --device cuda --model sd15 --num-prompts 4 --repeats 2 --out /tmp/peers_sd15   # as gpu.sh
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import speed  # noqa: E402

DEFAULT_MODEL = common.ROOT / "weights" / "tiny-shapes"
RANDOM_MODELS = ("sd15", "toy")  # speed.build_pipeline's random-weight pipelines: no adherence, no shipped calibration
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_OUT = common.BENCH / "results" / "peers_cpu_tiny_shapes"
DEFAULT_METHODS = (
    "stock",
    "deepcache:2", "deepcache:3", "deepcache:4", "deepcache:5",
    "tome:0.3", "tome:0.5",
    "fd:paper", "fd:uniform:2", "fd:uniform:3", "fd:uniform:5", "fd:auto", "fd:auto:9", "fd:auto:12",
    "fd:auto+tome:0.5",
)
NOISE_INJECTION = 0.003
DEEPCACHE_BRANCH = 0
PEERS = {"deepcache": ("DeepCache", "DeepCache==0.1.1"), "tome": ("tomesd", "tomesd==0.1.3")}


# -- methods --------------------------------------------------------------------------------------------------------


class Part:
    """One acceleration applied to a pipeline: enable / disable around calls, ``before_call`` per image."""

    kind = ""
    family = ""

    def __init__(self, param: str):
        self.param = param

    def enable(self, pipe) -> None:
        pass

    def disable(self, pipe) -> None:
        pass

    def before_call(self, pipe, seed: int) -> None:
        pass

    def stats(self, steps: int) -> dict:
        return {}


class DeepCachePart(Part):
    kind, family = "deepcache", "DeepCache"

    def __init__(self, param: str):
        super().__init__(param)
        self.interval = int(param)
        if self.interval < 1:
            raise ValueError(f"deepcache:{param}: the interval must be >= 1")
        self.helper = None

    @property
    def label(self) -> str:
        return f"DeepCache interval {self.interval}"

    def enable(self, pipe) -> None:
        from DeepCache import DeepCacheSDHelper

        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=self.interval, cache_branch_id=DEEPCACHE_BRANCH)
        self.helper.enable()

    def disable(self, pipe) -> None:
        if self.helper is not None:
            self.helper.disable()
            self.helper = None
            _drop_plain_forwards(pipe.unet)

    def stats(self, steps: int) -> dict:
        full = math.ceil(steps / self.interval)  # steps i with i % interval == 0 run the whole UNet
        return {"full_unet_steps": full, "partial_unet_steps": steps - full}


class ToMePart(Part):
    kind, family = "tome", "ToMe"

    def __init__(self, param: str):
        super().__init__(param)
        self.ratio = float(param)
        if not 0 < self.ratio < 1:
            raise ValueError(f"tome:{param}: the ratio must lie in (0, 1)")

    @property
    def label(self) -> str:
        return f"ToMe ratio {self.ratio:g}"

    def enable(self, pipe) -> None:
        import tomesd

        tomesd.apply_patch(pipe, ratio=self.ratio)

    def disable(self, pipe) -> None:
        import tomesd

        tomesd.remove_patch(pipe)

    def before_call(self, pipe, seed: int) -> None:
        import torch

        # ToMe keeps one generator across calls (forked from the global RNG at first use); reseeding it per
        # image makes its random merge partition a function of the image's seed.
        pipe.unet._tome_info["args"]["generator"] = torch.Generator(device=pipe.device).manual_seed(seed)


class FasterPart(Part):
    kind, family = "fd", "faster-diffusion"

    def __init__(self, param: str, parallel: bool = True):
        import faster_diffusion

        super().__init__(param)
        faster_diffusion.parse_key_steps(param)  # a bad spec fails before any sampling
        self.parallel = parallel
        self.accel = None
        self.learned = []  # calibrations made by a calibrating run (a model without a shipped one), reused later

    @property
    def label(self) -> str:
        return f"faster-diffusion {self.param}" + ("" if self.parallel else " sequential")

    def enable(self, pipe) -> None:
        import faster_diffusion

        self.accel = faster_diffusion.enable(pipe, key_steps=self.param, parallel=self.parallel, noise_injection=NOISE_INJECTION,
                                             calibration=self.learned or None)

    def disable(self, pipe) -> None:
        import faster_diffusion

        if self.accel is not None:
            self.learned += self.accel.calibrations
        faster_diffusion.disable(pipe)
        self.accel = None

    def stats(self, steps: int) -> dict:
        s = dict(self.accel.stats) if self.accel is not None else {}
        keep = ("key_steps", "schedule_source", "encoder_passes", "decoder_passes", "unet_calls", "parallel", "noise_injection")
        return {k: s.get(k) for k in keep}


class Method:
    """A name from ``--methods``: one or more parts, enabled left to right and disabled in reverse."""

    def __init__(self, name: str, parts: list[Part]):
        self.name = name
        self.parts = parts

    @property
    def family(self) -> str:
        if not self.parts:
            return "stock"
        names = []
        for p in self.parts:
            names.append(p.family + ("" if not isinstance(p, FasterPart) or p.parallel else " (sequential)"))
        return " + ".join(names)

    @property
    def label(self) -> str:
        return "stock" if not self.parts else " + ".join(p.label for p in self.parts)

    @property
    def param(self) -> str:
        return ", ".join(p.param for p in self.parts)

    def enable(self, pipe) -> None:
        for p in self.parts:
            p.enable(pipe)

    def disable(self, pipe) -> None:
        for p in reversed(self.parts):
            p.disable(pipe)

    def before_call(self, pipe, seed: int) -> None:
        for p in self.parts:
            p.before_call(pipe, seed)

    def stats(self, steps: int) -> dict:
        out = {}
        for p in self.parts:
            out.update(p.stats(steps))
        fd = next((p for p in self.parts if isinstance(p, FasterPart)), None)
        dc = next((p for p in self.parts if isinstance(p, DeepCachePart)), None)
        if fd is not None and dc is not None:  # DeepCache (the outer wrapper) replays the encoder at its cached steps
            out["encoder_passes"] = sum(1 for i in out.get("key_steps") or () if i % dc.interval == 0)
        elif fd is not None:
            out["encoder_passes"] = out.get("encoder_passes")
        elif dc is not None:
            out["encoder_passes"] = out["full_unet_steps"]
        else:
            out["encoder_passes"] = steps
        return out


def parse_method(name: str) -> Method:
    """'fd:auto+tome:0.5' -> Method. Raises ValueError for unknown kinds and for combinations that cannot work."""
    name = name.strip()
    if name == "stock":
        return Method(name, [])
    parts = []
    for item in name.split("+"):
        kind, _, param = item.strip().partition(":")
        if not param:
            raise ValueError(f"{item!r}: expected KIND:PARAM (deepcache:3, tome:0.5, fd:auto, fd-seq:paper)")
        if kind == "deepcache":
            parts.append(DeepCachePart(param))
        elif kind == "tome":
            parts.append(ToMePart(param))
        elif kind in ("fd", "fd-seq"):
            parts.append(FasterPart(param, parallel=(kind == "fd")))
        else:
            raise ValueError(f"{item!r}: unknown method {kind!r}; use stock, deepcache:N, tome:R, fd:SPEC or fd-seq:SPEC")
    kinds = [p.kind for p in parts]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{name!r}: a method may appear once in a composition")
    if "deepcache" in kinds and "fd" in kinds:
        fd = parts[kinds.index("fd")]
        if fd.parallel:
            raise ValueError(
                f"{name!r}: DeepCache does not compose with parallel faster-diffusion (the UNet sees only key steps, "
                "with 2 x group rows, and DeepCache replays features cached at another batch size); use fd-seq:SPEC"
            )
        if kinds.index("deepcache") < kinds.index("fd"):
            raise ValueError(
                f"{name!r}: enable faster-diffusion before DeepCache (DeepCache's UNet wrapper reads the timestep from "
                "args[1], and faster-diffusion calls the UNet's forward with keyword arguments)"
            )
    return Method(name, parts)


def missing_peers(method: Method) -> list[str]:
    """The peer packages a method needs that are not importable."""
    import importlib.util

    out = []
    for p in method.parts:
        if p.kind in PEERS and importlib.util.find_spec(PEERS[p.kind][0]) is None:
            out.append(PEERS[p.kind][1])
    return out


def _drop_plain_forwards(unet) -> None:
    """DeepCache's disable leaves each wrapped module's own bound ``forward`` as an instance attribute; drop those
    (only those: a wrapper someone else installed stays) so the UNet is stock again."""
    for module in unet.modules():
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward and getattr(fwd, "__self__", None) is module:
            del module.forward


# -- sampling -------------------------------------------------------------------------------------------------------


def load_pipeline(model: str, device: str, dtype: str):
    """(pipeline, description): speed.build_pipeline's (a directory, or the random-weights sd15 / toy)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    pipe, description = speed.build_pipeline(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, description


def sample_latents(pipe, prompt: str, seed: int, steps: int, guidance: float, size: int):
    """One timed call: (seconds, latents)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    speed.sync(pipe.device.type)
    t0 = time.perf_counter()
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generator,
               output_type="latent")
    speed.sync(pipe.device.type)
    return time.perf_counter() - t0, out.images


def call(pipe, method: Method, prompt: str, seed: int, args):
    """One call with ``method`` enabled: (seconds, latents, the method's stats)."""
    method.enable(pipe)
    try:
        method.before_call(pipe, seed)
        seconds, latents = sample_latents(pipe, prompt, seed, args.steps, args.guidance, args.resolution)
        return seconds, latents, method.stats(args.steps)
    finally:
        method.disable(pipe)


def calibrating(stats: dict) -> bool:
    """Whether the call ran stock to calibrate a schedule (a calibrated schedule without a calibration for the run)."""
    return str(stats.get("schedule_source", "")).startswith("calibrating")


def decode(pipe, latents):
    """What the pipeline does after its loop for output_type='np' (no safety checker on this model)."""
    import numpy as np
    import torch

    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
    return np.asarray(images, dtype=np.float32)


# -- the benchmark --------------------------------------------------------------------------------------------------


def run(args, methods: list[Method], log=print, on_repeat=None) -> dict:
    import numpy as np
    import torch

    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import prompt_set

    pipe, description = load_pipeline(args.model, args.device, args.dtype)
    if args.resolution is None:
        args.resolution = speed.native_resolution(pipe)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    items = prompt_set(args.num_prompts, 1)
    # the shapes detector reads what tiny-shapes draws; a random-weights model draws noise
    targets = None if args.model in RANDOM_MODELS else [shapes.parse_caption(p) for p, _ in items]
    guidance, size = args.guidance, args.resolution

    # the decode used below equals the pipeline's own output_type="np" path
    prompt, seed = items[0]
    reference = pipe(prompt, num_inference_steps=2, guidance_scale=guidance, height=size, width=size,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images
    _, lat = sample_latents(pipe, prompt, seed, 2, guidance, size)
    decode_check = float(np.abs(decode(pipe, lat) - np.asarray(reference, dtype=np.float32)).max())

    calibrated_in_warmup = []
    meta = {"model_description": description, "calibrated_in_warmup": calibrated_in_warmup}
    for w in range(args.warmup):
        for m in methods:
            s, _, stats = call(pipe, m, prompt, seed, args)
            log(f"  warm-up {w + 1}/{args.warmup} {m.name:<22} {s:7.3f}s")
            if calibrating(stats):  # a stock run that calibrated: warm up the calibrated schedule too
                calibrated_in_warmup.append(m.name)
                s, _, _ = call(pipe, m, prompt, seed, args)
                log(f"  warm-up {w + 1}/{args.warmup} {m.name:<22} {s:7.3f}s (calibrated by the call before)")

    state = {m.name: {"seconds": [], "latents": [None] * len(items), "images": [None] * len(items),
                      "repeat_max_abs_diff": 0.0, "stats": None, "calibrating_calls": 0} for m in methods}
    decode_seconds = []
    for r in range(args.repeats):
        t_repeat = time.perf_counter()
        for k, (prompt, seed) in enumerate(items):
            order = methods[k % len(methods):] + methods[: k % len(methods)]
            for m in order:
                st = state[m.name]
                seconds, latents, st["stats"] = call(pipe, m, prompt, seed, args)
                st["calibrating_calls"] += calibrating(st["stats"])
                st["seconds"].append(seconds)
                if st["latents"][k] is None:
                    st["latents"][k] = latents
                    t0 = time.perf_counter()
                    st["images"][k] = decode(pipe, latents)[0]
                    decode_seconds.append(time.perf_counter() - t0)
                else:
                    diff = float((latents - st["latents"][k]).abs().max())
                    st["repeat_max_abs_diff"] = max(st["repeat_max_abs_diff"], diff)
        log(f"  repeat {r + 1}/{args.repeats}: {len(items)} prompts x {len(methods)} methods in {time.perf_counter() - t_repeat:.1f}s")
        if on_repeat is not None and r + 1 < args.repeats:
            on_repeat(dict(summarize(args, methods, state, targets, decode_seconds, decode_check, partial=True), **meta))
    return dict(summarize(args, methods, state, targets, decode_seconds, decode_check), **meta)


def calibrating_notes(result: dict) -> list[str]:
    """A calibrated schedule with no shipped calibration makes its first run a stock one (the warm-up, normally)."""
    notes = [f"{name}: no shipped calibration for this model, sampler and size; its first warm-up call calibrated "
             "(an untimed stock run), the timed calls use that calibration" for name in result.get("calibrated_in_warmup", ())]
    return notes + [f"{r['method']}: {r['calibrating_calls']} timed call(s) calibrated (ran stock); use --warmup >= 1"
                    for r in result["methods"] if r["calibrating_calls"]]


def summarize(args, methods, state, targets, decode_seconds, decode_check, partial=False) -> dict:
    import numpy as np

    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import fidelity

    stock_images = np.stack(state["stock"]["images"])
    stock_median = statistics.median(state["stock"]["seconds"])
    rows = []
    for m in methods:
        st = state[m.name]
        images = np.stack(st["images"])
        psnr, ssim, same = fidelity(stock_images, images)
        med = statistics.median(st["seconds"])
        rows.append({
            "method": m.name, "family": m.family, "label": m.label, "param": m.param,
            "seconds": st["seconds"], "median_s_per_image": med, "mean_s_per_image": statistics.fmean(st["seconds"]),
            "min_s": min(st["seconds"]), "max_s": max(st["seconds"]),
            "speedup_vs_stock": stock_median / med,
            "psnr": psnr, "ssim": ssim, "identical_images": same,
            "adherence": None if targets is None else shapes.score([shapes.detect(im) for im in images], targets),
            "repeat_max_abs_diff": st["repeat_max_abs_diff"],
            "calibrating_calls": st["calibrating_calls"],
            "stats": st["stats"],
        })
    out = {
        "model": str(args.model), "device": args.device, "dtype": args.dtype, "resolution": args.resolution,
        "steps": args.steps, "sampler": "DDIM", "guidance": args.guidance,
        "num_prompts": args.num_prompts, "repeats": args.repeats, "warmup": args.warmup, "batch": 1,
        "noise_injection": NOISE_INJECTION, "deepcache_branch": DEEPCACHE_BRANCH,
        "timed": "pipe(..., output_type='latent'): text encoding + denoising loop; VAE decode untimed",
        "decode_median_s_per_image": statistics.median(decode_seconds) if decode_seconds else None,
        "decode_check_max_abs_diff": decode_check,
        "methods": rows,
    }
    if partial:
        out["partial"] = True
    return out


# -- output ---------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, nd: int, pct: bool = False) -> str:
    if x is None:
        return "–"
    return "inf" if math.isinf(x) else f"{x:.{nd}%}" if pct else f"{x:.{nd}f}"


def table(result: dict) -> str:
    headers = ["method", "encoder passes", "s/image (median)", "speed-up", "PSNR to stock", "SSIM to stock",
               "colour", "shape", "position", "all three"]
    rows = []
    for r in result["methods"]:
        a = r["adherence"] or {}
        enc = r["stats"].get("encoder_passes") if r["stats"] else None
        rows.append([
            r["label"], f"{enc}/{result['steps']}" if enc is not None else "", f"{r['median_s_per_image']:.3f}",
            f"{r['speedup_vs_stock']:.2f}×", _fmt(r["psnr"], 2), _fmt(r["ssim"], 4),
            *(_fmt(a.get(k), 1, pct=True) for k in ("colour", "shape", "position", "all")),
        ])
    return common.markdown_table(headers, rows)


def markdown(result: dict, env: dict, notes: list[str]) -> str:
    hardware = ", ".join(str(x) for x in (env.get("gpu"), env.get("cpu")) if x)
    lines = [
        f"# faster-diffusion, DeepCache and ToMe on {Path(result['model']).name}",
        "",
        f"- model: `{result['model']}` ({result.get('model_description')}); {result['resolution']}², DDIM-{result['steps']}, "
        f"guidance {result['guidance']}, batch 1, {result['device']} {result['dtype']}",
        f"- hardware: {hardware}, {env.get('cpu_count')} CPU cores, torch {env.get('torch')} with "
        f"{env.get('torch_threads')} threads, diffusers {env.get('diffusers')}; {env.get('date_utc')}",
        f"- command: `{env.get('command')}`",
        f"- {result['num_prompts']} prompts x 1 seed, {result['repeats']} interleaved repeats after {result['warmup']} warm-up "
        f"call(s) per method; seconds per image = median over prompts x repeats of the timed call "
        f"({result['timed']}; decode median {result['decode_median_s_per_image'] or 0:.3f}s)",
        "- PSNR / SSIM: mean over images against the stock image of the same seed; adherence: "
        "`faster_diffusion.quality.shapes.detect` against the caption (– for random weights); encoder passes: steps "
        "that run the UNet's encoder (DeepCache: its full steps)",
        f"- faster-diffusion: parallel, noise injection {result['noise_injection']}; DeepCache: cache_branch_id "
        f"{result['deepcache_branch']}; ToMe: tomesd defaults, generator reseeded per image",
    ]
    lines += [f"- note: {n}" for n in notes]
    lines += ["", table(result), ""]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in result["methods"]:
        if r["family"] != "stock" and not math.isinf(r["psnr"]):
            families.setdefault(r["family"], []).append(r)
    for family, rows in families.items():
        # along the family's knob: fewer encoder passes (DeepCache, faster-diffusion), then faster (ToMe's ratio)
        rows = sorted(rows, key=lambda r: (-(r["stats"] or {}).get("encoder_passes", 0), r["speedup_vs_stock"]))
        xs, ys = [r["speedup_vs_stock"] for r in rows], [r["psnr"] for r in rows]
        ax.plot(xs, ys, marker="o", label=family, linestyle="-" if len(rows) > 1 else "none")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["param"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.text(1.0, ax.get_ylim()[1], " stock (PSNR ∞)", va="top", fontsize=7, color="grey")
    ax.set_xlabel("speed-up vs stock (median s/image)")
    ax.set_ylabel("PSNR to stock images (dB)")
    ax.set_title(f"{Path(result['model']).name} {result['resolution']}², DDIM-{result['steps']}, guidance {result['guidance']}, "
                 f"{result['num_prompts']} prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="a StableDiffusionPipeline directory (default weights/tiny-shapes), or sd15 / toy (random weights)")
    ap.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's native size)")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--num-prompts", type=int, default=24, help="captions from prompt_set(N, 1) (default 24)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method and prompt (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per method first (default 1)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list (see above); stock is always added")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: this model's ops are too small to gain from more, and on a busy "
                         "machine a second thread makes every op wait for it; 0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md (default bench/results/peers_cpu_tiny_shapes)")
    ap.add_argument("--plot", default=None, help="PATH of a PNG: speed-up (x) against PSNR to stock (y), one line per family")
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.repeats < 1 or args.warmup < 0 or args.steps < 1:
        ap.error("--num-prompts, --repeats and --steps must be >= 1, --warmup >= 0")

    import torch

    from faster_diffusion.quality.evaluate import _jsonable

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("peers.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as bench/speed.py; the warm-up meets every shape the timed calls do
    elif args.model in RANDOM_MODELS:
        torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path on x86 (as bench/speed.py)
    if args.model not in RANDOM_MODELS and not (Path(args.model) / "model_index.json").is_file():
        print(f"peers.py: no pipeline at {args.model}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "stock" not in names:
        names.insert(0, "stock")
    try:
        methods = [parse_method(n) for n in names]
    except ValueError as err:
        ap.error(str(err))
    notes, kept = [], []
    for m in methods:
        missing = missing_peers(m)
        if missing:
            notes.append(f"skipped {m.name}: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
            print(f"peers.py: {notes[-1]}", flush=True)
        else:
            kept.append(m)
    methods = kept

    out = Path(args.out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    jpath, mpath = out.parent / (out.name + ".json"), out.parent / (out.name + ".md")
    env = common.environment(args.device)
    env["packages"] = _versions()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"[peers] {args.model}; {len(methods)} methods x {args.num_prompts} prompts x {args.repeats} repeats; "
        f"DDIM-{args.steps}, guidance {args.guidance}, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()

    def write(result):
        common.write_json(jpath, _jsonable({"environment": env, "settings": vars(args), "notes": notes + calibrating_notes(result),
                                            **result}))

    result = run(args, methods, log, on_repeat=write)
    result["wall_s"] = time.perf_counter() - t0
    write(result)
    notes += calibrating_notes(result)
    mpath.write_text(markdown(result, env, notes))
    if args.plot:
        plot(result, args.plot)
    log("")
    log(table(result))
    for n in notes:
        log(f"note: {n}")
    log(f"\nwrote {jpath} and {mpath}" + (f" and {args.plot}" if args.plot else "") + f" ({result['wall_s']:.0f}s)")
    return 0


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("DeepCache", "tomesd", "scikit-image", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
