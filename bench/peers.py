#!/usr/bin/env python
"""faster-diffusion side by side with DeepCache and ToMe: the bundled tiny-shapes model on CPU,
SD1.5's architecture at 512² fp16 on a GPU (bench/gpu.sh).

One process, one pipeline, the same prompts and seeds for every method:
``faster_diffusion.quality.evaluate.prompt_set(num_prompts, seeds)`` gives the captions and
seeds; call ``k`` starts from ``torch.Generator().manual_seed(seed_k)`` in every method.
DDIM-50 (``--sampler``, ``--steps``: any sampler of ``faster_diffusion.samplers``), guidance 7.5,
``--batch`` images per ``pipe(...)`` call (``num_images_per_prompt``; default 1), CPU by default.

Models (``--model``): a StableDiffusionPipeline directory (default weights/tiny-shapes), or
``sd15`` / ``toy``: bench/speed.py's ``build_pipeline``, SD1.5's architecture (or a toy one)
with random weights, nothing to download. ``--resolution`` defaults to the model's native
size (512 for sd15), ``--dtype`` to fp16 on cuda and fp32 on cpu. On cuda every timed call
is bracketed by ``torch.cuda.synchronize()``; the generators stay on the CPU.

Before timing: the model's shipped calibrations (``calibration/*.json``) are loaded once and given to
every faster-diffusion method (``enable(..., calibration=...)``). A ``plan:auto`` method on a model
without a shipped calibration that has an error model for this run gets one fitted first
(``faster_diffusion.calibrate(..., plans=True)`` on ``--calibration-prompts`` captions, then
``validate_plan``); the JSON records it. The planner's cost model is measured on this device at
the run's batch by its first call, in the warm-up.

Timing: each method first runs ``--warmup`` untimed calls; then, per repeat and per
prompt, every method runs once in turn (the order rotates by one each prompt), so
slow drifts of a shared machine hit every method alike. A timed call is the ordinary
``pipe(prompt, ..., output_type="latent")``: text encoding and the denoising loop.
The VAE decode, the same for every method, runs untimed afterwards; its median is
reported once. Seconds per call are the median over prompts x repeats (per image: over
``--batch``); the speed-up is stock's median over the method's. One torch thread by default (``--threads``): on
a 2-core machine that another job kept busy, 2 threads made a call about 100x slower.

Quality, against the stock images of the same seeds (first repeat): mean PSNR and
SSIM (scikit-image, data range 1, as in ``faster_diffusion.quality.evaluate``; SSIM is
None where scikit-image is not installed), and colour / shape / position adherence read by
``faster_diffusion.quality.shapes.detect`` against the caption: for a pipeline directory
only (the shapes detector reads what tiny-shapes draws; the random-weights models draw
noise, and their adherence is None). Every later repeat must reproduce the first repeat's
latents; the largest difference is reported per method.

FLOPs: after the timed calls, one more untimed call per method under
``torch.utils.flop_counter.FlopCounterMode`` (convention: a multiply-add is 2 FLOPs), and the
VAE decode once; "FLOP speed-up" is stock's FLOPs of the whole call (text encoder, denoising loop,
decode) over the method's; ``flop_speedup_loop`` leaves the decode out, as the timed call does.
(After the timed calls: the planner learns its per-step overhead from every call's time, and a
call under the counter is many times slower.) For planner methods the stats also give the
planner's ``predicted_speedup`` (stats of the timed calls) next to the measured time speed-up,
and every plan the timed calls ran.

Methods (``--methods``, a comma list; ``+`` composes, applied left to right):

  stock                 the unaccelerated pipeline (always run: it is the reference)
  deepcache:N           DeepCache 0.1.1 ``DeepCacheSDHelper``, cache_interval=N, cache_branch_id=0
  tome:R                tomesd 0.1.3 ``apply_patch(pipe, ratio=R)`` (defaults otherwise). ToMe
                        draws its random merge partition from a generator it keeps across
                        calls; here it is reseeded with the image's seed before each call,
                        so ToMe images are reproducible and the same in every repeat
  plan:SPEC             ``faster_diffusion.enable(pipe, plan=SPEC, calibration=...)``: a level of reuse
                        per step (full, encoder, shallow, deep, deep_cfg and their forecasts); SPEC is "auto",
                        "auto:T" (the most faithful plan predicted T times faster than stock on this device)
                        or the letters of every step ("FDDFCC...", "FXXFYY...")
  fd:SPEC               ``faster_diffusion.enable(pipe, key_steps=SPEC, parallel=True,
                        noise_injection=0.003)`` (encoder propagation); "auto" / "auto:B" use the
                        model's shipped calibration/*.json. Without one (sd15, toy) the method's first call is a
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
    python bench/peers.py --methods stock,deepcache:3,plan:auto,plan:auto:2.5 --plot docs/figures/frontier.png
    python bench/peers.py --sampler DPMSolverMultistep --steps 20 --batch 16 --num-prompts 2
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
    "deepcache:2", "deepcache:3", "deepcache:4", "deepcache:5", "deepcache:6",
    "fd:uniform:3", "fd:auto", "fd:auto:12", "fd:auto:10",
    "plan:auto", "plan:auto:1.5", "plan:auto:2", "plan:auto:2.5", "plan:auto:3", "plan:auto:3.5", "plan:auto:4",
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
        self.calibrations = []  # the model's shipped calibrations, loaded once by run() before the warm-up
        self.learned = []  # calibrations made by a calibrating run (a model without a shipped one), reused later

    @property
    def label(self) -> str:
        return f"faster-diffusion {self.param}" + ("" if self.parallel else " sequential")

    def enable(self, pipe) -> None:
        import faster_diffusion

        self.accel = faster_diffusion.enable(pipe, key_steps=self.param, parallel=self.parallel, noise_injection=NOISE_INJECTION,
                                             calibration=(self.calibrations + self.learned) or None)

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


class PlanPart(Part):
    """``faster_diffusion.enable(pipe, plan=SPEC)``: a level of reuse for every step, from the planner."""

    kind, family = "plan", "planner"

    def __init__(self, param: str):
        import faster_diffusion

        super().__init__(param)
        faster_diffusion.parse_plan(param)  # a bad spec fails before any sampling
        self.auto = param.strip().lower().startswith("auto")
        self.family = "planner" if self.auto else "plan (explicit)"
        self.accel = None
        self.calibrations = []  # shipped (or fitted in the warm-up) calibrations, given by run() before the warm-up

    @property
    def label(self) -> str:
        return f"planner {self.param}" if self.auto else f"plan {self.param}"

    def enable(self, pipe) -> None:
        import faster_diffusion

        self.accel = faster_diffusion.enable(pipe, plan=self.param, parallel=True, calibration=self.calibrations or None)

    def disable(self, pipe) -> None:
        import faster_diffusion

        faster_diffusion.disable(pipe)
        self.accel = None

    def stats(self, steps: int) -> dict:
        s = dict(self.accel.stats) if self.accel is not None else {}
        keep = ("plan", "levels", "schedule_source", "encoder_passes", "decoder_passes", "unet_calls", "predicted_speedup",
                "measured_speedup", "unet_flops", "stock_unet_flops")
        return {k: s.get(k) for k in keep}


FASTER_DIFFUSION_PARTS = (FasterPart, PlanPart)


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
        fd = next((p for p in self.parts if isinstance(p, FASTER_DIFFUSION_PARTS)), None)
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
        elif kind == "plan":
            parts.append(PlanPart(param))
        else:
            raise ValueError(f"{item!r}: unknown method {kind!r}; use stock, deepcache:N, tome:R, plan:SPEC, fd:SPEC or fd-seq:SPEC")
    kinds = [p.kind for p in parts]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{name!r}: a method may appear once in a composition")
    if "plan" in kinds and ("fd" in kinds or "deepcache" in kinds):
        raise ValueError(
            f"{name!r}: plan:SPEC is faster-diffusion's own deep reuse; it does not compose with fd:SPEC (one accelerator "
            "a pipeline) or DeepCache (both replay the UNet's deep features)"
        )
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


def sample_latents(pipe, prompt: str, seed: int, steps: int, guidance: float, size: int, batch: int = 1):
    """One timed call of ``batch`` images: (seconds, latents)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    speed.sync(pipe.device.type)
    t0 = time.perf_counter()
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generator,
               num_images_per_prompt=batch, output_type="latent")
    speed.sync(pipe.device.type)
    return time.perf_counter() - t0, out.images


def call(pipe, method: Method, prompt: str, seed: int, args):
    """One call with ``method`` enabled: (seconds, latents, the method's stats)."""
    method.enable(pipe)
    try:
        method.before_call(pipe, seed)
        seconds, latents = sample_latents(pipe, prompt, seed, args.steps, args.guidance, args.resolution, args.batch)
        return seconds, latents, method.stats(args.steps)
    finally:
        method.disable(pipe)


def count_flops(fn) -> float:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_call(pipe, method: Method, prompt: str, seed: int, args) -> tuple[float, dict]:
    """FLOPs of one call with ``method`` (untimed), and its stats."""
    out = {}

    def one():
        out["call"] = call(pipe, method, prompt, seed, args)

    flops = count_flops(one)
    return flops, out["call"][2]


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


def shipped_calibrations(model: str) -> list:
    """The model directory's calibration/*.json as ``faster_diffusion.Calibration`` objects ([] for sd15 / toy)."""
    import faster_diffusion

    if model in RANDOM_MODELS:
        return []
    found = []
    for path in sorted((Path(model) / "calibration").glob("*.json")):
        try:
            found.append(faster_diffusion.Calibration.load(path))
        except (ValueError, KeyError, TypeError, OSError) as err:
            print(f"peers.py: skipping calibration {path} ({err})", file=sys.stderr)
    return found


def run_timesteps(pipe, steps: int) -> list[float]:
    """The timesteps of a ``steps``-step run of the pipeline's scheduler."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def plan_calibration(pipe, args, calibrations: list, log) -> tuple[object | None, dict]:
    """(a calibration fitted now, what was used): ``plan:auto`` needs a calibration with an error model for this
    scheduler, step count and size; without one among ``calibrations``, one is fitted (``calibrate(...,
    plans=True)`` and ``validate_plan``) on ``--calibration-prompts`` captions that the benchmark does not use."""
    import faster_diffusion
    from faster_diffusion.quality.evaluate import prompt_set

    scheduler, timesteps = type(pipe.scheduler).__name__, run_timesteps(pipe, args.steps)
    latent = args.resolution // int(getattr(pipe, "vae_scale_factor", 8))
    for c in calibrations:
        if c.error_model is not None and c.matches(scheduler, timesteps, (latent, latent)):
            return None, {"source": f"file {c.path}" if c.path else "given", "fitted": False}
    k = args.calibration_prompts
    items = prompt_set(args.num_prompts + k, 1)[args.num_prompts :]
    prompts, seeds = [p for p, _ in items], [s for _, s in items]
    kwargs = dict(guidance_scale=args.guidance, height=args.resolution, width=args.resolution)
    log(f"  no calibration with an error model for {scheduler} {args.steps} steps at {latent}x{latent}: fitting one on {k} captions")
    t0 = time.perf_counter()
    calibration = faster_diffusion.calibrate(pipe, prompts, args.steps, seeds=seeds, plans=True, **kwargs)
    t1 = time.perf_counter()
    plan, report = faster_diffusion.validate_plan(pipe, calibration, **kwargs)
    info = {"source": "fitted in the warm-up", "fitted": True, "prompts": prompts, "seeds": seeds,
            "calibrate_s": round(t1 - t0, 1), "validate_s": round(time.perf_counter() - t1, 1), "validated_plan": plan,
            "correction": report.get("correction"), "level_correction": report.get("level_correction")}
    log(f"  fitted in {info['calibrate_s']}s, validated in {info['validate_s']}s: auto -> {plan}")
    return calibration, info


# -- the benchmark --------------------------------------------------------------------------------------------------


def run(args, methods: list[Method], log=print, on_repeat=None) -> dict:
    import numpy as np
    import torch

    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import prompt_set
    from faster_diffusion.samplers import make_scheduler

    pipe, description = load_pipeline(args.model, args.device, args.dtype)
    if args.resolution is None:
        args.resolution = speed.native_resolution(pipe)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    items = prompt_set(args.num_prompts, args.seeds)
    # the shapes detector reads what tiny-shapes draws; a random-weights model draws noise
    targets = None if args.model in RANDOM_MODELS else [shapes.parse_caption(p) for p, _ in items for _ in range(args.batch)]
    guidance, size = args.guidance, args.resolution

    # the decode used below equals the pipeline's own output_type="np" path
    prompt, seed = items[0]
    reference = pipe(prompt, num_inference_steps=2, guidance_scale=guidance, height=size, width=size,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images
    _, lat = sample_latents(pipe, prompt, seed, 2, guidance, size)
    decode_check = float(np.abs(decode(pipe, lat) - np.asarray(reference, dtype=np.float32)).max())

    # calibrations: loaded (or fitted) once, before any timed call
    t0 = time.perf_counter()
    calibrations = shipped_calibrations(args.model)
    meta = {"model_description": description, "calibrations_loaded": len(calibrations),
            "calibrations_load_s": round(time.perf_counter() - t0, 3)}
    plan_parts = [p for m in methods for p in m.parts if isinstance(p, PlanPart)]
    if any(p.auto for p in plan_parts):
        fitted, meta["plan_calibration"] = plan_calibration(pipe, args, calibrations, log)
        if fitted is not None:
            calibrations = [fitted] + calibrations
    for m in methods:
        for p in m.parts:
            if isinstance(p, FASTER_DIFFUSION_PARTS):
                p.calibrations = list(calibrations)

    calibrated_in_warmup = []
    meta["calibrated_in_warmup"] = calibrated_in_warmup
    for w in range(args.warmup):
        for m in methods:
            s, _, stats = call(pipe, m, prompt, seed, args)
            log(f"  warm-up {w + 1}/{args.warmup} {m.name:<22} {s:7.3f}s" + (f" {stats['plan']}" if stats.get("plan") else ""))
            if calibrating(stats):  # a stock run that calibrated: warm up the calibrated schedule too
                calibrated_in_warmup.append(m.name)
                s, _, _ = call(pipe, m, prompt, seed, args)
                log(f"  warm-up {w + 1}/{args.warmup} {m.name:<22} {s:7.3f}s (calibrated by the call before)")

    state = {m.name: {"seconds": [], "latents": [None] * len(items), "images": [None] * len(items),
                      "repeat_max_abs_diff": 0.0, "stats": None, "calibrating_calls": 0, "plans": {}, "predicted": []}
             for m in methods}
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
                if st["stats"].get("plan"):
                    st["plans"][st["stats"]["plan"]] = st["plans"].get(st["stats"]["plan"], 0) + 1
                if st["stats"].get("predicted_speedup") is not None:
                    st["predicted"].append(st["stats"]["predicted_speedup"])
                if st["latents"][k] is None:
                    st["latents"][k] = latents
                    t0 = time.perf_counter()
                    st["images"][k] = decode(pipe, latents)
                    decode_seconds.append((time.perf_counter() - t0) / args.batch)
                else:
                    diff = float((latents - st["latents"][k]).abs().max())
                    st["repeat_max_abs_diff"] = max(st["repeat_max_abs_diff"], diff)
        log(f"  repeat {r + 1}/{args.repeats}: {len(items)} prompts x {len(methods)} methods in {time.perf_counter() - t_repeat:.1f}s")
        if on_repeat is not None and r + 1 < args.repeats:
            on_repeat(dict(summarize(args, methods, state, targets, decode_seconds, decode_check, partial=True), **meta))

    # FLOPs: one more call per method, untimed, after the timed ones (see the module docstring)
    if args.flops:
        prompt, seed = items[0]
        for m in methods:
            st = state[m.name]
            st["flops"], flop_stats = flop_call(pipe, m, prompt, seed, args)
            st["flop_call_plan"] = flop_stats.get("plan")
            log(f"  FLOPs {m.name:<22} {st['flops'] / 1e9 / args.batch:8.3f} GFLOP per image")
        meta["decode_flops_per_image"] = count_flops(lambda: decode(pipe, state["stock"]["latents"][0])) / args.batch
    return dict(summarize(args, methods, state, targets, decode_seconds, decode_check, meta.get("decode_flops_per_image")), **meta)


def calibrating_notes(result: dict) -> list[str]:
    """A calibrated schedule with no shipped calibration makes its first run a stock one (the warm-up, normally)."""
    notes = [f"{name}: no shipped calibration for this model, sampler and size; its first warm-up call calibrated "
             "(an untimed stock run), the timed calls use that calibration" for name in result.get("calibrated_in_warmup", ())]
    return notes + [f"{r['method']}: {r['calibrating_calls']} timed call(s) calibrated (ran stock); use --warmup >= 1"
                    for r in result["methods"] if r["calibrating_calls"]]


def summarize(args, methods, state, targets, decode_seconds, decode_check, decode_flops=None, partial=False) -> dict:
    import numpy as np

    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import fidelity
    from faster_diffusion.samplers import sampler

    stock_images = np.concatenate(state["stock"]["images"])
    stock_median = statistics.median(state["stock"]["seconds"])
    stock_flops = state["stock"].get("flops")
    rows = []
    for m in methods:
        st = state[m.name]
        images = np.concatenate(st["images"])
        psnr, ssim, same = fidelity(stock_images, images)
        med = statistics.median(st["seconds"])
        row = {
            "method": m.name, "family": m.family, "label": m.label, "param": m.param,
            "seconds": st["seconds"], "median_s_per_call": med, "median_s_per_image": med / args.batch,
            "mean_s_per_image": statistics.fmean(st["seconds"]) / args.batch,
            "min_s": min(st["seconds"]), "max_s": max(st["seconds"]),
            "speedup_vs_stock": stock_median / med,
            "psnr": psnr, "ssim": ssim, "identical_images": same,
            "adherence": None if targets is None else shapes.score([shapes.detect(im) for im in images], targets),
            "repeat_max_abs_diff": st["repeat_max_abs_diff"],
            "calibrating_calls": st["calibrating_calls"],
            "stats": st["stats"],
        }
        if st.get("flops") is not None and stock_flops:
            row["gflops_per_image_loop"] = st["flops"] / args.batch / 1e9  # the timed call: text encoding + the loop
            row["flop_speedup_loop"] = stock_flops / st["flops"]
            if decode_flops is not None:
                whole = st["flops"] / args.batch + decode_flops
                row["gflops_per_image"] = whole / 1e9  # the whole call, decode included
                row["flop_speedup_vs_stock"] = (stock_flops / args.batch + decode_flops) / whole
        if st["plans"]:
            row["plans"] = st["plans"]  # every plan the timed calls ran, with its count
            row["flop_call_plan"] = st.get("flop_call_plan")
        if decode_seconds:  # the call as a user times it: the untimed decode added back to both
            decode = statistics.median(decode_seconds)
            row["speedup_whole_call"] = (stock_median / args.batch + decode) / (med / args.batch + decode)
        if st["predicted"]:  # the planner predicts the whole call (its cost model times the decode)
            row["predicted_speedup"] = statistics.median(st["predicted"])
            row["predicted_over_measured"] = row["predicted_speedup"] / row.get("speedup_whole_call", row["speedup_vs_stock"])
        rows.append(row)
    out = {
        "model": str(args.model), "device": args.device, "dtype": args.dtype, "resolution": args.resolution,
        "steps": args.steps, "sampler": sampler(args.sampler).label, "sampler_name": sampler(args.sampler).name,
        "guidance": args.guidance, "num_prompts": args.num_prompts, "seeds": args.seeds, "images": len(stock_images),
        "repeats": args.repeats, "warmup": args.warmup, "batch": args.batch,
        "noise_injection": NOISE_INJECTION, "deepcache_branch": DEEPCACHE_BRANCH,
        "timed": "pipe(..., output_type='latent'): text encoding + denoising loop; VAE decode untimed",
        "flops": "FlopCounterMode, one untimed call per method after the timed calls; gflops_per_image and "
                 "flop_speedup_vs_stock include the VAE decode, *_loop leave it out" if decode_flops is not None else None,
        "decode_median_s_per_image": statistics.median(decode_seconds) if decode_seconds else None,
        "decode_check_max_abs_diff": decode_check,
        "methods": rows,
    }
    if partial:
        out["partial"] = True
    return out


# -- output ---------------------------------------------------------------------------------------------------------


def _load(values) -> str:
    return "–" if not values else " / ".join(f"{v:.2f}" for v in values)


def _fmt(x: float | None, nd: int, pct: bool = False) -> str:
    if x is None:
        return "–"
    return "inf" if math.isinf(x) else f"{x:.{nd}%}" if pct else f"{x:.{nd}f}"


def table(result: dict) -> str:
    headers = ["method", "encoder passes", "s/image (median)", "speed-up", "whole call", "FLOP speed-up", "predicted", "PSNR to stock",
               "SSIM to stock", "colour", "shape", "position", "all three"]
    rows = []
    for r in result["methods"]:
        a = r["adherence"] or {}
        enc = r["stats"].get("encoder_passes") if r["stats"] else None
        flop = r.get("flop_speedup_vs_stock")
        rows.append([
            r["label"], f"{enc}/{result['steps']}" if enc is not None else "", f"{r['median_s_per_image']:.3f}",
            f"{r['speedup_vs_stock']:.2f}×", "–" if r.get("speedup_whole_call") is None else f"{r['speedup_whole_call']:.2f}×",
            "–" if flop is None else f"{flop:.2f}×",
            "" if r.get("predicted_speedup") is None else f"{r['predicted_speedup']:.2f}×",
            _fmt(r["psnr"], 2), _fmt(r["ssim"], 4),
            *(_fmt(a.get(k), 1, pct=True) for k in ("colour", "shape", "position", "all")),
        ])
    return common.markdown_table(headers, rows)


def plan_lines(result: dict) -> list[str]:
    """The plans the planner's timed calls ran (F full, E encoder, S shallow, D deep), one line a method."""
    lines = []
    for r in result["methods"]:
        for plan, count in (r.get("plans") or {}).items():
            lines.append(f"- {r['label']}: `{plan}` ({count} of {len(r['seconds'])} timed calls)")
    return lines


def markdown(result: dict, env: dict, notes: list[str]) -> str:
    hardware = ", ".join(str(x) for x in (env.get("gpu"), env.get("cpu")) if x)
    lines = [
        f"# faster-diffusion, DeepCache and ToMe on {Path(result['model']).name}",
        "",
        f"- model: `{result['model']}` ({result.get('model_description')}); {result['resolution']}², "
        f"{result['sampler']}-{result['steps']}, guidance {result['guidance']}, batch {result['batch']}, "
        f"{result['device']} {result['dtype']}",
        f"- hardware: {hardware}, {env.get('cpu_count')} CPU cores, torch {env.get('torch')} with "
        f"{env.get('torch_threads')} threads, diffusers {env.get('diffusers')}; {env.get('date_utc')}; load average (1/5/15 min) "
        f"{_load(env.get('load_avg'))} at the start, {_load(result.get('load_avg_end'))} at the end; commit {env.get('git_commit')}",
        f"- command: `{env.get('command')}`",
        f"- {result['num_prompts']} prompts x {result['seeds']} seed(s) x batch {result['batch']} = {result['images']} images, "
        f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up call(s) per method; seconds per image = "
        f"median over prompts x repeats of the timed call over the batch "
        f"({result['timed']}; decode median {result['decode_median_s_per_image'] or 0:.3f}s)",
        "- PSNR / SSIM: mean over images against the stock image of the same seed; adherence: "
        "`faster_diffusion.quality.shapes.detect` against the caption (– for random weights); encoder passes: steps "
        "that run the UNet's encoder (DeepCache: its full steps)",
        "- FLOP speed-up: stock's FLOPs of the whole call (text encoder, loop, VAE decode) over the method's, by "
        "`torch.utils.flop_counter.FlopCounterMode`; whole call: the speed-up with the untimed VAE decode's median "
        "added to both; predicted: the planner's own prediction (`accel.stats`) of its time speed-up for the whole call",
        f"- faster-diffusion: parallel, noise injection {result['noise_injection']} (planner: none); DeepCache: "
        f"cache_branch_id {result['deepcache_branch']}; ToMe: tomesd defaults, generator reseeded per image",
    ]
    if result.get("plan_calibration"):
        pc = result["plan_calibration"]
        lines.append(f"- planner calibration: {pc['source']}" + (
            f" ({len(pc['prompts'])} captions, calibrate {pc['calibrate_s']}s, validate {pc['validate_s']}s)" if pc.get("fitted") else ""))
    lines += [f"- note: {n}" for n in notes]
    lines += ["", table(result), ""]
    plans = plan_lines(result)
    if plans:
        lines += ["Plans of the timed calls:", "", *plans, ""]
    return "\n".join(lines)


#: plot legend of each family, and its colour
FAMILY_STYLE = {
    "DeepCache": ("DeepCache (intervals)", "tab:blue"),
    "faster-diffusion": ("encoder propagation alone (fd:)", "tab:orange"),
    "planner": ("planner (plan:auto, plan:auto:T)", "tab:green"),
    "plan (explicit)": ("explicit plans (plan:FDD...)", "tab:red"),
    "ToMe": ("ToMe", "tab:purple"),
}


def _plot_order(r: dict) -> tuple:
    # along the family's knob: fewer encoder passes (DeepCache, faster-diffusion), then faster
    return (-((r["stats"] or {}).get("encoder_passes") or 0) if r["family"] != "planner" else 0, r["speedup_vs_stock"])


def plot(result: dict, path: str | Path) -> None:
    """Two frontiers: speed-up in time (left) and in FLOPs (right) against PSNR to stock, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_flops = any(r.get("flop_speedup_vs_stock") for r in result["methods"])
    fig, axes = plt.subplots(1, 2 if with_flops else 1, figsize=(13 if with_flops else 7, 4.8), squeeze=False)
    families: dict[str, list[dict]] = {}
    for r in result["methods"]:
        if r["family"] != "stock" and not math.isinf(r["psnr"]):
            families.setdefault(r["family"], []).append(r)
    xkeys = [("speedup_vs_stock", "speed-up in time vs stock (median s/image)")]
    if with_flops:
        xkeys.append(("flop_speedup_vs_stock", "speed-up in FLOPs vs stock (whole call, FlopCounterMode)"))
    for ax, (key, xlabel) in zip(axes[0], xkeys):
        for family, rows in families.items():
            # the planner along its knob (the speed-up it predicted), the others along theirs
            rows = sorted((r for r in rows if r.get(key)),
                          key=lambda r: (r.get("predicted_speedup") or 0, r[key]) if family == "planner" else _plot_order(r))
            label, colour = FAMILY_STYLE.get(family, (family, None))
            xs, ys = [r[key] for r in rows], [r["psnr"] for r in rows]
            ax.plot(xs, ys, marker="o", label=label, color=colour, linestyle="-" if len(rows) > 1 else "none")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(r["param"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR to stock images (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['model']).name} {result['resolution']}², {result['sampler']}-{result['steps']}, guidance "
                 f"{result['guidance']}, batch {result['batch']}, {result['images']} images", fontsize=10)
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
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument("--sampler", default="DDIM",
                    help="a sampler of faster_diffusion.samplers (name or alias: DDIM, DPMSolverMultistep / dpmpp, UniPC, ...)")
    ap.add_argument("--batch", type=int, default=1, help="images per call (num_images_per_prompt; default 1)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per caption (default 1): prompt_set(num_prompts, seeds)")
    ap.add_argument("--calibration-prompts", type=int, default=4,
                    help="captions plan:auto's calibration is fitted on when the model ships none for the run (default 4)")
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting calls")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: this model's ops are too small to gain from more, and on a busy "
                         "machine a second thread makes every op wait for it; 0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md (default bench/results/peers_cpu_tiny_shapes)")
    ap.add_argument("--plot", default=None, help="PATH of a PNG: speed-up in time and in FLOPs (x) against PSNR to stock (y), "
                                                  "one line per family")
    args = ap.parse_args(argv)
    if min(args.num_prompts, args.repeats, args.steps, args.batch, args.seeds, args.calibration_prompts) < 1 or args.warmup < 0:
        ap.error("--num-prompts, --seeds, --repeats, --steps, --batch and --calibration-prompts must be >= 1, --warmup >= 0")
    from faster_diffusion.samplers import sampler

    try:
        sampler(args.sampler)
    except ValueError as err:
        ap.error(str(err))

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
    log(f"[peers] {args.model}; {len(methods)} methods x {args.num_prompts} prompts x {args.seeds} seeds x batch {args.batch} "
        f"x {args.repeats} repeats; {sampler(args.sampler).label}-{args.steps}, guidance {args.guidance}, {args.device} "
        f"{args.dtype}, {torch.get_num_threads()} threads; load average {env.get('load_avg')}")
    t0 = time.perf_counter()

    def write(result):
        common.write_json(jpath, _jsonable({"environment": env, "settings": vars(args), "notes": notes + calibrating_notes(result),
                                            **result}))

    result = run(args, methods, log, on_repeat=write)
    result["wall_s"] = time.perf_counter() - t0
    result["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write(result)
    notes += calibrating_notes(result)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError as err:  # the GPU machine may lack matplotlib; the JSON and table stand
            notes.append(f"no plot: {err}")
            args.plot = None
    mpath.write_text(markdown(result, env, notes))
    log("")
    log(table(result))
    for line in plan_lines(result):
        log(line)
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
