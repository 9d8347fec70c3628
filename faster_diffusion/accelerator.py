"""The accelerator: owns the state of one denoising run and drives a denoiser family's split.

The denoiser is a UNet (``unet_split``) or a transformer (``transformer_split``); what differs between them
is asked of its family (``family.DenoiserFamily``), never branched on here.

``FasterDiffusion`` attaches to a diffusers pipeline without replacing its
``__call__``. Diffusers pipelines wrap their denoising loop in
``with self.progress_bar(total=...)`` (DiT: ``for t in self.progress_bar(timesteps)``);
the accelerator wraps that method, so a *run* starts when the loop starts and ends
(caches freed, stats final) when it ends, even if the loop raises. Inside a run:

- each model call is one sampling step (the SD-family loops call the UNet once
  per step, with the classifier-free-guidance batch concatenated; Flux with true
  CFG calls the transformer once per branch, each in its own ``cache_context``,
  and the second call belongs to the step of the first); the step index decides
  whether the encoder runs (``schedules.key_step_indices``);
- a calibrated schedule (``"auto"``, ``"auto:B"``) is resolved at the first UNet
  call, when the run's timesteps and latent size are known, from the first
  matching calibration of: the ``calibration`` argument, this accelerator's
  earlier runs, the model directory's ``calibration/*.json``; with none, this
  run is a stock run that calibrates (``_find_calibration``);
- in parallel mode, a key step's call also runs the decoders of the
  following non-key steps in one batch, and their outputs are returned at those
  steps without running the model;
- a ControlNet runs only at key steps; its residuals are replayed otherwise;
- prior noise injection adds ``noise_injection * z_T`` to the (variance-preserving) latent
  after each scheduler step whose *next* timestep is below ``noise_injection_timestep``.

With ``plan`` instead of ``key_steps``, every step has a level of reuse (``family.LEVELS``: full,
encoder, shallow, deep, ...; each family supports some); ``plan="auto"`` / ``"auto:T"`` are chosen at the
first model call from the calibration's error model and this device's cost model, measured then on the
run's own inputs (``faster_diffusion.plan``). Key steps are the plan of full and encoder steps.

A custom sampling loop can use ``with accel.denoising_run(timesteps): ...``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import sys
import time
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .calibration import Calibration, FeatureRecorder, derive, nearest, run_info, shipped_calibrations
from .plan import (
    AutoPlan,
    CostModel,
    check_levels,
    choose,
    count_flops,
    decoder_groups,
    parse_plan,
    plan_letters,
    sample_channels,
    sample_positions,
)
from .schedules import check_key_steps, is_calibrated, key_step_indices, parse_key_steps
from .family import (
    CONDITIONAL_ONLY,
    DECODER_REPLAYING,
    ENCODER,
    FORECASTING,
    FULL,
    OUTPUT,
    BranchAwareHook,
    StepMode,
    add_hook,
    as_float,
    family_of,
    hooks_changed,
    remove_hook,
    repeat_batch,
)
from .transformer_split import SUPPORTED_TRANSFORMERS, TransformerFamily
from .unet_split import ENCODER_HOOK, SUPPORTED_UNETS, ModelHook, ReplayHook

UNET_HOOK = "faster_diffusion_unet"
CONTROLNET_HOOK = "faster_diffusion_controlnet"
logger = logging.getLogger("faster_diffusion")
#: decoder-group sizes the cost model times (others are interpolated)
TIMED_GROUPS = (1, 2, 4, 8)
MAX_DERIVED = 64  # calibrations derived for plans kept by an accelerator (a few KB to ~200 KB each)
#: cost models measured in this process: denoiser -> {(sample shape, dtype, device): CostModel}; every accelerator
#: of a model shares them, so that enabling one again does not measure again
_COST_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass
class AcceleratorConfig:
    """The accelerator's options, their defaults written once (``enable`` and ``set_params`` take them).

    ``key_steps``: encoder propagation at these key steps (``schedules``; default ``"paper"``).
    ``plan``: instead, a level of reuse for every step: ``"auto"``, ``"auto:T"`` or explicit (``plan``).
    ``parallel``: run the decoders of a full step and the encoder-propagated steps after it as one batch.
    ``max_parallel``: at most this many steps per decoder batch (bounds memory); None = a whole group.
    ``noise_injection`` / ``noise_injection_timestep``: prior noise injection; None = 0.003 with key steps
    (the paper's), 0 with a plan (plans are chosen for fidelity to the stock images). Applied only with a
    scheduler that has ``scale_model_input`` (not the flow-matching ones).
    ``encoder_depth``: a transformer's encoder, its first K blocks (default: the paper's 18 of 28, as a share)."""

    key_steps: object = None
    plan: object = None
    parallel: bool = True
    max_parallel: int | None = None
    noise_injection: float | None = None
    noise_injection_timestep: float = 500
    encoder_depth: int | None = None

    def __post_init__(self):
        if self.plan is not None and self.key_steps is not None:
            raise ValueError(f"plan={self.plan!r} and key_steps={self.key_steps!r}: give one of them, not both")
        if self.plan is not None:
            parse_plan(self.plan)
        else:
            self.key_steps = "paper" if self.key_steps is None else self.key_steps
            parse_key_steps(self.key_steps)
        if self.max_parallel is not None and (isinstance(self.max_parallel, bool) or not isinstance(self.max_parallel, int) or self.max_parallel < 1):
            raise ValueError(f"max_parallel={self.max_parallel!r} must be None or an integer >= 1")
        if self.noise_injection is None:
            self.noise_injection = 0.0 if self.plan is not None else 0.003
        if not 0 <= float(self.noise_injection) <= 1:
            raise ValueError(f"noise_injection={self.noise_injection!r} must lie in [0, 1]")
        self.noise_injection = float(self.noise_injection)
        self.noise_injection_timestep = float(self.noise_injection_timestep)
        self.parallel = bool(self.parallel)
        if self.encoder_depth is not None and (isinstance(self.encoder_depth, bool) or not isinstance(self.encoder_depth, int) or self.encoder_depth < 1):
            raise ValueError(f"encoder_depth={self.encoder_depth!r} must be None or an integer >= 1 (a transformer's first K blocks)")

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class _Run:
    """State of one denoising run. Timesteps and levels are resolved at the first model call if not given."""

    num_steps: int
    levels: list | None  # the level of every step; None until resolved at the first model call
    timesteps: list | None = None
    schedule_source: str = ""
    recorder: FeatureRecorder | None = None  # set when this run calibrates
    step: int = 0  # index of the next step (its model call, or its first branch's)
    precomputed: dict = field(default_factory=dict)  # (step, guidance branch) -> (timestep, noise prediction)
    output_class: type | None = None  # the model's own output class, for the steps answered from `precomputed`
    initial_latent: torch.Tensor | None = None
    scheduler_steps: int = 0
    groups: dict | None = None  # first step -> the steps whose decoders its model call runs (from the levels, once)
    calls: list = field(default_factory=list)  # (level, decoder group size) of every model call (a step's first branch)
    noise_injection: float = 0.0  # as applied (none with a scheduler without scale_model_input)
    conditional_output: torch.Tensor | None = None  # a step's first-branch output, until its second branch's call
    reuses_guidance: bool = False  # the levels have conditional-only steps
    guidance_difference: torch.Tensor | None = None  # of the latest step that ran both rows, for those steps
    full_guidance: dict = field(default_factory=dict)  # step -> guidance difference, at the latest two lone full steps
    controlnet_passes: int = 0
    cost: CostModel | None = None  # this device's cost model, for plans
    predicted_speedup: float | None = None
    started: float = field(default_factory=time.perf_counter)
    measuring: float = 0.0  # seconds spent measuring the cost model, not part of the loop's time
    planning: float = 0.0  # seconds spent choosing the plan (not per-step work: kept out of the step overhead)
    loop_locals: dict = field(default_factory=dict)  # the variables of the pipeline call that opened the loop
    full_outputs: dict = field(default_factory=dict)  # guidance branch -> the latest full step's output, for output steps

    @property
    def key_steps(self) -> list[int]:
        return [i for i, level in enumerate(self.levels or ()) if level == FULL]


class FasterDiffusion:
    """Encoder propagation and deeper reuse on a diffusers pipeline (or a bare UNet). Create it with
    ``faster_diffusion.enable``."""

    def __init__(self, pipe_or_unet, config: AcceleratorConfig | None = None, calibration=None):
        found = family_of(pipe_or_unet)
        if found is None:
            model = next((m for m in (getattr(pipe_or_unet, name, None) for name in ("unet", "transformer")) if m is not None), None)
            if any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in (pipe_or_unet, model)):
                # a compiled UNet forward would trace the per-step hooks: graph breaks and a recompile per level
                raise TypeError(
                    "faster_diffusion.enable got a torch.compile'd UNet (OptimizedModule), which does not compose with "
                    "the accelerator's per-step dispatch; put back the uncompiled UNet (pipe.unet = pipe.unet._orig_mod), "
                    "enable, and compile its blocks with faster_diffusion.compile_blocks(pipe) (docs/compile.md)"
                )
            names = ", ".join(cls.__name__ for cls in (*SUPPORTED_UNETS, *SUPPORTED_TRANSFORMERS))
            where = type(pipe_or_unet).__name__ if model is None else f"{type(pipe_or_unet).__name__} with a {type(model).__name__}"
            raise TypeError(f"faster_diffusion.enable needs a pipeline whose `unet` or `transformer` is one of {names}, or the model itself; got {where}")
        self.family, self.unet = found  # `unet`: the denoiser, a UNet or a transformer (the name kept for callers)
        self.pipe = None if pipe_or_unet is self.unet else pipe_or_unet
        if isinstance(self.family, TransformerFamily) and getattr(self.pipe, "transformer_2", None) is not None:
            # Wan 2.2's low-noise expert: its steps would run unaccelerated and out of the run's count
            raise TypeError(f"faster_diffusion.enable: {type(self.pipe).__name__} with a second transformer (transformer_2, "
                            "Wan 2.2's experts) is not supported yet")
        if isinstance(self.family, TransformerFamily) and getattr(self.pipe, "controlnet", None) is not None:
            # its residuals enter between the blocks the levels replay
            raise TypeError(f"faster_diffusion.enable: {type(self.pipe).__name__} (a ControlNet on a transformer) is not supported yet")
        self.config = config or AcceleratorConfig()
        self._check_options(self.config)
        if isinstance(self.family, TransformerFamily):
            self.family = TransformerFamily(self.config.encoder_depth)
        self.given_calibrations = _as_calibrations(calibration)
        self.calibrations: list[Calibration] = []  # made by this accelerator's calibrating runs
        self._derived: dict[tuple, tuple[Calibration, Calibration]] = {}  # run -> (source, derived for plans)
        self.cost_models: dict[tuple, CostModel] = cost_models(self.unet)  # measured on this device, shared
        self.stats: dict = {}
        self._run: _Run | None = None
        self._mode = StepMode()
        self._replay_hooks: list[tuple[torch.nn.Module, ModelHook]] = []
        self._model_hook: _ModelHook | None = None
        self._loop_locals: dict = {}  # the variables of the pipeline call whose loop starts the next run
        self._iteration = None  # (the pipeline call's frame, the generator) of a run over an iterable-form loop
        self._controlnets: list[tuple[torch.nn.Module, "_ControlNetHook"]] = []
        self._saved_progress_bar = None  # the instance attribute enable() shadows, if the pipeline had one
        self._enabled = False

    # the options, read through the config
    key_steps = property(lambda self: self.config.key_steps)
    plan = property(lambda self: self.config.plan)
    parallel = property(lambda self: self.config.parallel)
    max_parallel = property(lambda self: self.config.max_parallel)
    noise_injection = property(lambda self: self.config.noise_injection)
    noise_injection_timestep = property(lambda self: self.config.noise_injection_timestep)
    model = property(lambda self: self.unet)

    # -- configuration -------------------------------------------------------------------------------------------

    def set_params(self, **options) -> None:
        """Validates and sets options of ``AcceleratorConfig`` (takes effect at the next run); the others
        keep their defaults, as with ``enable``."""
        config = AcceleratorConfig(**options)
        self._check_options(config)
        if isinstance(self.family, TransformerFamily) and config.encoder_depth != self.family.encoder_depth:
            self.family = TransformerFamily(config.encoder_depth)
            if self._enabled:
                self._unhook_modules()  # the next run hooks the new split
        self.config = config

    def _check_options(self, config: AcceleratorConfig) -> None:
        """Fails, naming the option, on what this model's family cannot take."""
        if config.encoder_depth is not None and not isinstance(self.family, TransformerFamily):
            raise ValueError(f"encoder_depth={config.encoder_depth!r} applies to transformers; a UNet's encoder is its down and mid blocks")

    # -- install / remove ------------------------------------------------------------------------------------------

    def enable(self) -> "FasterDiffusion":
        if self._enabled:
            return self
        self._hook_modules()
        self._model_hook = _ModelHook(self)
        add_hook(self.unet, self._model_hook, UNET_HOOK)
        controlnet = getattr(self.pipe, "controlnet", None)
        if controlnet is not None:
            hook = _ControlNetHook(self)
            add_hook(controlnet, hook, CONTROLNET_HOOK)
            self._controlnets = [(controlnet, hook)]
        if self.pipe is not None:
            # An instance attribute shadowing DiffusionPipeline.progress_bar; disable() puts back what was there.
            self._saved_progress_bar = self.pipe.__dict__.get("progress_bar")
            self.pipe.progress_bar = self._progress_bar
        self.unet._faster_diffusion = self
        self._enabled = True
        return self

    def disable(self) -> None:
        """Removes every hook; the pipeline is the stock one again."""
        if not self._enabled:
            return
        if self._iteration is not None:
            self._iteration[1].close()
        self._end_run()
        self._unhook_modules()
        remove_hook(self.unet, UNET_HOOK)
        for controlnet, _ in self._controlnets:
            remove_hook(controlnet, CONTROLNET_HOOK)
        if self.pipe is not None:
            del self.pipe.progress_bar
            if self._saved_progress_bar is not None:
                self.pipe.progress_bar = self._saved_progress_bar
        self.unet.__dict__.pop("_faster_diffusion", None)
        self._controlnets, self._saved_progress_bar = [], None
        self._enabled = False

    def _hook_modules(self) -> None:
        """Hooks every module some level replays. Called by enable() and at every run: a LoRA loaded or
        unloaded since may have swapped one (peft wraps a targeted conv_in in a new module)."""
        if self._replay_hooks and [module for module, _ in self._replay_hooks] == self.family.hooked_modules(self.unet):
            return
        self._unhook_modules()
        self._replay_hooks = self.family.add_hooks(self.unet, self._mode, ENCODER_HOOK)
        hooks_changed(self.unet)

    def _unhook_modules(self) -> None:
        for module, _ in self._replay_hooks:
            remove_hook(module, ENCODER_HOOK)
        self._replay_hooks = []
        hooks_changed(self.unet)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()

    # -- runs ------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def denoising_run(self, timesteps=None):
        """Brackets one sampling loop. ``timesteps``: the loop's timesteps; if None, read from the
        pipeline's scheduler at the first model call (the loop may run a head or tail of them)."""
        if not self._enabled:
            raise RuntimeError("faster_diffusion: denoising_run() on a disabled accelerator")
        if self._run is not None:
            raise RuntimeError("faster_diffusion: denoising runs cannot be nested")
        if timesteps is None and self.pipe is None:
            raise ValueError("faster_diffusion: denoising_run(timesteps) needs the loop's timesteps on a bare UNet")
        self._hook_modules()
        loop_locals, self._loop_locals = self._loop_locals, {}
        self._mode.guidance = self.family.guidance(self.pipe, loop_locals) if self.pipe is not None else None
        if timesteps is not None:
            timesteps = list(timesteps)
            num_steps = len(timesteps)
        else:  # SD-family pipelines set _num_timesteps just before their loop
            num_steps = getattr(self.pipe, "_num_timesteps", None) or len(self.pipe.scheduler.timesteps)
        # Resolving the levels here makes a bad spec fail before any sampling step; a calibrated one
        # waits for the first model call (it needs the timesteps and latent size), still before any step.
        self._run = _Run(num_steps, self._static_levels(num_steps), timesteps, loop_locals=loop_locals)
        scheduler = getattr(self.pipe, "scheduler", None) if self.noise_injection > 0 else None
        if not hasattr(scheduler, "scale_model_input"):  # a flow-matching latent is no variance-preserving one
            scheduler = None
        self._run.noise_injection = self.noise_injection if scheduler is not None else 0.0
        saved_step = scheduler.__dict__.get("step") if scheduler is not None else None
        if scheduler is not None:
            scheduler.step = self._wrap_scheduler_step(scheduler)
        try:
            yield self
        finally:
            if scheduler is not None:  # put back what was there (an instance attribute, or the class's method)
                del scheduler.step
                if saved_step is not None:
                    scheduler.step = saved_step
            self._end_run()

    def _static_levels(self, num_steps: int) -> list | None:
        """The levels of a run that needs no calibration; None for a calibrated spec (resolved later)."""
        if self.plan is None:
            check_key_steps(self.key_steps, num_steps)
            if is_calibrated(self.key_steps):
                return None
            keys = set(key_step_indices(self.key_steps, num_steps))
            return [FULL if i in keys else ENCODER for i in range(num_steps)]
        spec = parse_plan(self.plan)
        if isinstance(spec, AutoPlan):
            return None
        check_levels(spec, num_steps, self._guided())
        supported = self.family.supported_levels(self.unet)
        unsupported = sorted(set(spec) - set(supported))
        if unsupported:
            raise ValueError(f"plan: levels {unsupported} need {self.family.cheap_levels_need}; {type(self.unet).__name__} supports {list(supported)}")
        return list(spec)

    def _guided(self) -> bool:
        return self._mode.guidance is not None

    def _cheap_levels(self) -> tuple[str, ...]:
        """The levels below full this run can take (conditional-only ones need guidance on two halves)."""
        return tuple(lv for lv in self.family.supported_levels(self.unet, self._guided()) if lv != FULL)

    def _progress_bar(self, iterable=None, total=None):
        bar = type(self.pipe).progress_bar(self.pipe, iterable=iterable, total=total)
        caller = sys._getframe(1)
        if self._iteration is not None and self._iteration[0] is not caller:
            self._iteration[1].close()  # a loop an exception left: its run ends before this call's
        if self._run is not None:  # a bar inside the loop
            return bar
        # the pipeline call's variables say how it guides (PixArt, DiT and Flux keep that in locals)
        self._loop_locals = dict(caller.f_locals)
        if iterable is not None:  # DiT's `for t in self.progress_bar(timesteps)`
            iteration = self._iterate_in_run(bar)
            self._iteration = (caller, iteration)
            return iteration
        return _chain_contexts(self.denoising_run(), bar)

    def _iterate_in_run(self, bar):
        """A run over a loop of the iterable form; it ends when the loop does, or is closed by the next call."""
        try:
            with self.denoising_run():
                yield from bar
        finally:
            self._iteration = None

    def _resolve_timesteps(self, timestep) -> None:
        """Finds the loop's timesteps in the pipeline scheduler's list from the first model call."""
        all_t = list(self.pipe.scheduler.timesteps)
        t = as_float(timestep)
        n = min(self._run.num_steps, len(all_t))
        tail = len(all_t) - n
        if _same_timestep(all_t[tail], t):  # img2img / inpainting: strength keeps the tail
            start = tail
        else:  # full list, or SDXL's denoising_end keeps the head
            matches = [j for j, s in enumerate(all_t) if _same_timestep(s, t)]
            if not matches:
                raise RuntimeError(f"faster_diffusion: UNet called at t={t}, which is not in the scheduler's timesteps")
            start = matches[0]
        self._run.timesteps = all_t[start : start + n]

    def _scheduler_name(self) -> str:
        return type(self.pipe.scheduler).__name__ if self.pipe is not None else "unknown"

    def _resolve_levels(self, original_forward, call) -> None:
        """Picks a calibrated run's levels, or makes it a stock run that calibrates."""
        run = self._run
        latent_size = self.family.latent_size(call)  # (height, width), or (frames, height, width)
        scheduler = self._scheduler_name()
        spec = str(parse_plan(self.plan)) if self.plan is not None else self.key_steps
        found = self._find_calibration(scheduler, run.timesteps, latent_size)
        if found is None:
            run.levels = [FULL] * run.num_steps
            run.schedule_source = "calibrating: this run is stock and records the encoder features"
            run.recorder = FeatureRecorder(self.unet, self.family).attach(record_steps=False)
            run.recorder.timesteps = [as_float(t) for t in run.timesteps]
            run.recorder.latent_size = latent_size
            logger.warning(
                "faster_diffusion: no calibration for %s %d steps at %s latents; this run is stock and calibrates",
                scheduler, run.num_steps, "x".join(map(str, latent_size)),
            )
            return
        calibration, source = found
        if self.plan is None or calibration.error_model is None:
            keys = set(key_step_indices(self.key_steps if self.plan is None else "auto", run.num_steps, calibration))
            run.levels = [FULL if i in keys else ENCODER for i in range(run.num_steps)]
            note = "" if self.plan is None else " (it has no error model for plans: encoder propagation at auto's key steps; faster_diffusion.calibrate fits one)"
            run.schedule_source = f"{spec} from {source}{note}"
            return
        run.cost = self._cost_model(original_forward, call)
        started = time.perf_counter()
        choice = _choose(parse_plan(self.plan), calibration.error_model, run.cost, self.parallel, self.max_parallel, self._cheap_levels())
        run.planning = time.perf_counter() - started
        run.levels = list(choice.levels)
        run.predicted_speedup = round(choice.time_speedup(run.cost), 3)
        snr = calibration.error_model.snr_db(choice.error)
        run.schedule_source = f"{spec} from {source} (predicted {run.predicted_speedup:.2f}x, {snr:.1f} dB)"

    def _find_calibration(self, scheduler: str, timesteps, latent_size):
        """(calibration, where it came from) for this run, or None. A calibration of a longer run
        whose timesteps contain this run's as a contiguous slice serves too (img2img, inpainting).
        A plan needs an error model: without one for this run, it is derived from the nearest calibration
        that has one (``calibration.derive``: another size, step count or sampler), as the service does."""
        candidates = [
            *((c, _given_source(c)) for c in self.given_calibrations),
            *((c, f"a calibration made by an earlier run ({c.describe()})") for c in self.calibrations),
            *((c, f"file {c.path}") for c in self._shipped_calibrations()),
        ]
        if self.plan is not None:
            planning = [(c, source) for c, source in candidates if c.error_model is not None]
            found = _matching(planning, scheduler, timesteps, latent_size) or self._derived_for_plan(
                [c for c, _ in planning], scheduler, timesteps, latent_size
            )
            if found is not None:
                return found
        return _matching(candidates, scheduler, timesteps, latent_size)

    def _derived_for_plan(self, sources, scheduler: str, timesteps, latent_size):
        """(calibration derived from the nearest of ``sources``, where it came from), or None; kept, so that
        the next run of the setting plans from the same error model (the plan is chosen once)."""
        source = nearest(sources, scheduler, timesteps, latent_size)
        if source is None:
            return None
        key = (scheduler, tuple(as_float(t) for t in timesteps), tuple(latent_size))
        kept = self._derived.get(key)
        if kept is None or kept[0] is not source:
            if len(self._derived) >= MAX_DERIVED:
                self._derived.clear()
            kept = self._derived[key] = (source, derive(source, timesteps, latent_size, scheduler))
        return kept[1], f"a calibration {kept[1].info['source']}"

    def _shipped_calibrations(self) -> list[Calibration]:
        """The model directory's calibration/*.json (read once per process and file version)."""
        model_dir = _model_dir(self.pipe, self.unet)
        return [] if model_dir is None else shipped_calibrations(model_dir)

    def _finish_calibration(self, run: _Run) -> None:
        recorder, run.recorder = run.recorder, None
        recorder.detach()
        if run.step != run.num_steps:  # the loop did not finish: nothing to learn from
            return
        info = run_info(self.pipe, [], run.num_steps, {}) if self.pipe is not None else {}
        info["source"] = "calibrated by a stock first run"
        calibration = recorder.calibration(self._scheduler_name(), info)
        self.calibrations.append(calibration)
        logger.warning(
            "faster_diffusion: calibrated %s; auto now gives key steps %s (plans need an error model: faster_diffusion.calibrate)",
            calibration.describe(), key_step_indices("auto", run.num_steps, calibration),
        )

    def _end_run(self) -> None:
        run, self._run = self._run, None
        self._mode.active = False
        for _, hook in (*self._controlnets, *self._replay_hooks):
            hook.reset_state(None)
        if run is None:
            return
        if run.recorder is not None:
            self._finish_calibration(run)
        levels = run.levels or []
        self.stats = {
            "steps": run.num_steps,
            "key_steps": run.key_steps,
            "schedule_source": run.schedule_source,
            "encoder_passes": sum(level == FULL for level, _ in run.calls),
            "decoder_passes": sum(g for level, g in run.calls if level in (FULL, ENCODER)),
            "unet_calls": len(run.calls),
            "controlnet_passes": run.controlnet_passes,
            "parallel": self.parallel,
            "noise_injection": run.noise_injection,
        }
        if self.plan is not None:
            self.stats.update(plan=plan_letters(levels), levels={lv: levels.count(lv) for lv in dict.fromkeys(levels)})
            if run.cost is not None and run.step == run.num_steps:
                if self.unet.device.type == "cuda":
                    torch.cuda.synchronize()
                # the loop as timed, with the call's work outside it as measured for the cost model
                seconds = time.perf_counter() - run.started - run.measuring - run.planning + run.cost.call_overhead
                self.stats.update(
                    predicted_speedup=run.predicted_speedup,
                    measured_speedup=round(run.cost.stock_seconds(run.num_steps) / seconds, 3),
                    unet_flops=run.cost.plan_flops(levels),
                    stock_unet_flops=run.cost.plan_flops([FULL] * run.num_steps),
                )

    def _wrap_scheduler_step(self, scheduler):
        step = scheduler.step

        def step_with_noise_injection(model_output, timestep, sample, *args, **kwargs):
            run = self._run
            if run.scheduler_steps == 0:
                # z_T at unit scale: sigma-parametrised schedulers (Euler and kin) start from z_T * init_noise_sigma,
                # which a zero-terminal-SNR schedule makes ~4096
                run.initial_latent = sample / scheduler.init_noise_sigma
            output = step(model_output, timestep, sample, *args, **kwargs)
            run.scheduler_steps += 1
            k = run.scheduler_steps
            if run.recorder is None and run.timesteps is not None and k < len(run.timesteps) and as_float(run.timesteps[k]) < self.noise_injection_timestep:
                # the paper adds alpha * z_T to the variance-preserving latent; a sigma-parametrised latent is
                # that latent divided by scale_model_input's factor 1 / sqrt(sigma^2 + 1) (1 for DDIM, DPM-Solver)
                to_vp = scheduler.scale_model_input(sample.new_ones(()), run.timesteps[k])
                injected = _prev_sample(output) + self.noise_injection * run.initial_latent / to_vp
                output = _with_prev_sample(output, injected)
            return output

        return step_with_noise_injection

    # -- the UNet call ---------------------------------------------------------------------------------------------

    def _call_model(self, original_forward, call, level: str, timesteps: list):
        """One model call at ``level`` running the decoders of ``timesteps`` (a group when more than one)."""
        latent = self.family.latent(call)
        rows, group = latent.shape[0], len(timesteps)
        inside = self.family.rows_inside(self.unet, latent)
        guidance = self._mode.guidance
        if level in CONDITIONAL_ONLY and guidance.layout == "halves":  # the caller adds the unconditional rows
            call, rows = guidance.cond_half(call, rows), rows // 2
        if group > 1:
            call = {k: repeat_batch(v, (rows, rows * inside), group) for k, v in call.items() if k != "timestep"}
            call["timestep"] = torch.stack([self._model_timestep(t, rows, latent) for t in timesteps]).flatten()
        mode = self._mode
        mode.active, mode.level, mode.rows, mode.group_size = True, level, rows * inside, group
        try:
            return original_forward(**call, return_dict=True)
        finally:
            mode.active = False

    def _model_timestep(self, t, rows: int, latent: torch.Tensor) -> torch.Tensor:
        """A scheduler timestep as the pipeline passes it to the model, for ``rows`` rows."""
        t = torch.as_tensor(t).to(latent.device).expand(rows)
        scale = self.family.timestep_scale(self.unet)
        return t if scale == 1 else t.to(latent.dtype) / scale

    def _cost_model(self, original_forward, call) -> CostModel:
        """This device's cost model at the run's batch and size: measured once on the run's own inputs. Its costs
        are a step's: with a call per guidance branch, the calls a step at each level makes (``Guidance.calls``)."""
        sample = self.family.latent(call)
        # guided: the levels measured (deep_cfg needs guidance) and the call's work around the loop differ
        key = (tuple(sample.shape), str(sample.dtype), str(sample.device), self._guided())
        levels = self._cheap_levels()
        found = self.cost_models.get(key)
        if found is not None and set(levels) <= set(found.level):  # (one kept from before a level was added is not)
            return found
        nearest = _nearest_cost_model(self.cost_models, key, levels)
        if nearest is not None:  # another batch or size: predicted from a measured one, nothing timed
            self.cost_models[key] = nearest.predicted(tuple(sample.shape))
            return self.cost_models[key]
        started = time.perf_counter()
        t = call["timestep"]
        # decoder outputs for the replaying levels, and no history kept (the fake one below stays; a previous run's
        # setting would have the group calls clear it and time the forecasts as plain replays)
        keep = self._mode.keep_decoder, self._mode.keep_history
        self._mode.keep_decoder, self._mode.keep_history = True, False

        def seconds(level, group):
            return _seconds(lambda: self._call_model(original_forward, call, level, [t] * group), sample.device)

        timings = {("full", g): [] for g in TIMED_GROUPS} | {(lv, 1): [] for lv in levels if lv != OUTPUT}
        forecast = self._forecast_hook()
        with torch.no_grad():
            seconds(FULL, 1)  # warm-up, and the features the other levels replay
            if forecast is not None:  # two full steps' features to extrapolate from, so that a forecast does its work
                kept = forecast.snapshot()
                forecast.set_history([(0, kept), (1, kept)])
                self._mode.step = 2
            for _ in range(5):  # rounds, interleaved; the least of each is the least disturbed by other work
                for level, group in timings:
                    timings[level, group].append(seconds(level, group))
            # (an output step calls no model: nothing to time or count)
            flops = {level: 0.0 if level == OUTPUT else count_flops(lambda lv=level: self._call_model(original_forward, call, lv, [t]))
                     for level in [FULL, *levels]}
            curve = self._flop_curve(original_forward, call, flops)
        self._mode.keep_decoder, self._mode.keep_history = keep
        if forecast is not None:
            forecast.set_history([])
        calls = self._mode.guidance.calls if self._guided() else (lambda level: 1)
        least = {k: min(v) * calls(k[0]) for k, v in timings.items()} | {(OUTPUT, 1): 0.0}  # (never timed)
        # measured once and then fixed, so that a plan is chosen once per spec, error model and cost model
        cost = CostModel(
            full={g: least[FULL, g] for g in TIMED_GROUPS},
            level={lv: least[lv, 1] for lv in levels},
            step_overhead=self._step_overhead(call),
            call_overhead=self._call_overhead(call),
            flops={level: f * calls(level) for level, f in flops.items()},
            info={"sample_shape": list(sample.shape), "dtype": key[1], "device": key[2], "guided": key[3]},
            flop_curve={level: [x * calls(level) for x in c] for level, c in curve.items()},
        )
        self.cost_models[key] = cost
        self._run.measuring += time.perf_counter() - started
        return cost

    def _flop_curve(self, original_forward, call, flops: dict) -> dict:
        """Each level's FLOPs per row of the sample as c + a T + b T^2 in the latent's pixels T (``CostModel.flop_curve``):
        ``flops`` at this size and counts at two larger ones (``DenoiserFamily.resized``). Empty where the family
        makes no larger call (a ControlNet's residuals, a video UNet's frames)."""
        t = call["timestep"]
        resized = [self.family.resized(self.unet, call, k) for k in (1, 2)]
        if any(c is None for c in resized):
            return {}
        rows = self.family.latent(call).shape[0]
        # a forecast does the multiply-adds of the level it forecasts; a level that computes nothing (output) stays 0
        counted = [level for level in flops if level not in FORECASTING and flops[level]]
        per_row = {level: [flops[level] / rows] for level in counted}
        for bigger in resized:
            for level in counted:  # full first: the replaying levels read what it keeps at this size
                per_row[level].append(count_flops(lambda lv=level: self._call_model(original_forward, bigger, lv, [t])) / rows)
        pixels = np.array([sample_positions(self.family.latent(c).shape) for c in (call, *resized)], dtype=np.float64)
        powers = np.stack([np.ones(3), pixels, pixels**2], axis=1)
        curve = {level: np.linalg.solve(powers, np.array(counts)).tolist() for level, counts in per_row.items()}
        curve.update({level: curve[base] for level, base in FORECASTING.items() if level in flops})
        curve.update({level: [0.0, 0.0, 0.0] for level in flops if not flops[level]})
        return curve

    def _step_overhead(self, call) -> float:
        """Seconds of a sampling step outside the model, on a copy of the scheduler: what a pipeline does around the
        model call (the guidance batch, scale_model_input where the sampler has it, guidance) and the scheduler step."""
        if self.pipe is None or self._run.timesteps is None:
            return 0.0
        sample, t = self.family.latent(call), self._run.timesteps[0]
        halves = self._guided() and self._mode.guidance.layout == "halves"
        latents = sample[: max(1, sample.shape[0] // 2)] if halves else sample

        def step(scheduler):
            model_input = torch.cat([latents] * 2)
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(model_input, t)
            uncond, cond = model_input.chunk(2)
            scheduler.step(uncond + 7.5 * (cond - uncond), t, latents)

        return _least_seconds(step, sample.device, prepare=lambda: copy.deepcopy(self.pipe.scheduler), repeats=5)

    def _call_overhead(self, call) -> float:
        """Seconds of a text-to-image call outside its loop, at this run's batch and size: setting the
        scheduler's timesteps, encoding the prompt (and the negative prompt under guidance) and the VAE
        decode. The same for every plan, it weighs on a short run's speed-up as a user times it."""
        if self.pipe is None or self._run.timesteps is None:
            return 0.0
        sample, steps = self.family.latent(call), len(self._run.timesteps)
        guided = self._guided()
        halves = guided and self._mode.guidance.layout == "halves"
        images = max(1, sample.shape[0] // 2) if halves else sample.shape[0]
        shift = {}  # a flow sampler's shift for this size (FluxPipeline's mu), as the pipeline passed it
        if "mu" in self._run.loop_locals and "mu" in inspect.signature(self.pipe.scheduler.set_timesteps).parameters:
            shift["mu"] = self._run.loop_locals["mu"]
        seconds = _least_seconds(lambda scheduler: scheduler.set_timesteps(steps, **shift), sample.device,
                                 prepare=lambda: copy.deepcopy(self.pipe.scheduler))
        encode = getattr(self.pipe, "encode_prompt", None)
        parameters = inspect.signature(encode).parameters if encode is not None else {}
        arguments = {"prompt": "", "device": sample.device, "num_images_per_prompt": images}
        # (SD3's encode_prompt requires its other prompts: None uses the first)
        arguments.update({name: None for name, p in parameters.items() if name.startswith("prompt_") and p.default is p.empty})
        if arguments.keys() <= parameters.keys():
            encodings = 1  # SD's encode_prompt encodes the negative prompt too; Flux's is called once a branch
            if "do_classifier_free_guidance" in parameters:
                arguments["do_classifier_free_guidance"] = guided
            elif guided:
                encodings = 2
            if "max_sequence_length" in parameters and "max_sequence_length" in self._run.loop_locals:
                arguments["max_sequence_length"] = self._run.loop_locals["max_sequence_length"]
            seconds += encodings * _least_seconds(lambda _: encode(**arguments), sample.device)
        vae = getattr(self.pipe, "vae", None)
        latent_size = self.family.latent_size(call)
        if len(latent_size) == 2 and hasattr(vae, "decode"):  # image latents (a video pipeline decodes frame by frame)
            latents = torch.zeros(images, vae.config.latent_channels, *latent_size, dtype=vae.dtype, device=sample.device)
            seconds += _least_seconds(lambda _: vae.decode(latents), sample.device)
        return seconds

    def _model_forward(self, original_forward, args, kwargs):
        run, mode = self._run, self._mode
        call = self.family.bind_call(self.unet, args, kwargs)
        if self.family.runs_stock(call):
            return original_forward(*args, **kwargs)
        return_dict = call.pop("return_dict")
        timestep = as_float(call["timestep"]) * self.family.timestep_scale(self.unet)  # in the scheduler's units
        if run.timesteps is None:
            self._resolve_timesteps(timestep)
        if run.levels is None:
            self._resolve_levels(original_forward, call)
        if run.groups is None:
            run.groups = {g[0]: g for g in decoder_groups(run.levels, self.parallel, self.max_parallel)}
            run.reuses_guidance = any(level in CONDITIONAL_ONLY for level in run.levels)
            mode.keep_decoder = any(level in DECODER_REPLAYING for level in run.levels)
            mode.keep_history = any(level in FORECASTING for level in run.levels)
            mode.forecast_weights = self._forecast_weights(call) if mode.keep_history else {}
        guidance, branch = mode.guidance, self._model_hook.branch()
        # with a call per guidance branch, the second branch's call is part of the step of the call before
        second = guidance is not None and guidance.layout == "calls" and branch == guidance.second
        i = run.step - 1 if second else run.step
        run.step += 0 if second else 1
        mode.step, mode.branch = i, branch
        if not 0 <= i < len(run.timesteps):
            raise RuntimeError(f"faster_diffusion: the model called {run.step} times in a run of {len(run.timesteps)} steps")

        if (i, branch) in run.precomputed:
            t, noise_pred = run.precomputed.pop((i, branch))
            _check_timestep(timestep, t, i)
            return _output(noise_pred, return_dict, run.output_class)

        level = run.levels[i]
        if level == OUTPUT:  # nothing computed: the segment's full step's output again
            return _output(run.full_outputs[branch], return_dict, run.output_class)
        steps = run.groups.get(i, [i])
        if len(steps) > 1:
            _check_timestep(timestep, run.timesteps[i], i)
        output = self._call_model(original_forward, call, level, [run.timesteps[s] if len(steps) > 1 else call["timestep"] for s in steps])
        run.output_class, noise_pred = type(output), output.sample
        if not second:
            run.calls.append((level, len(steps)))
        if level in CONDITIONAL_ONLY:
            if guidance.layout == "halves":
                noise_pred = guidance.with_unconditional(noise_pred, self._reused_guidance(level))
            else:  # the unconditional call of this step is answered without running the model
                run.precomputed[(i, guidance.second)] = (run.timesteps[i], noise_pred - self._reused_guidance(level))
        chunks = noise_pred.split(self.family.latent(call).shape[0])
        if level == FULL:
            run.full_outputs[branch] = chunks[0]
        if run.reuses_guidance and level not in CONDITIONAL_ONLY:  # the group's latest step, whose features are kept
            self._keep_guidance_difference(i, level, len(steps), chunks[-1], second)
        for s, chunk in zip(steps[1:], chunks[1:]):
            run.precomputed[(s, branch)] = (run.timesteps[s], chunk)
        return _output(chunks[0], return_dict, run.output_class)

    def _keep_guidance_difference(self, i: int, level: str, group: int, latest: torch.Tensor, second: bool) -> None:
        """The guidance difference (conditional less unconditional output) of the latest step that ran both, for
        the conditional-only steps: from the halves of one call, or from the second branch's call and the first's."""
        run, guidance = self._run, self._mode.guidance
        if guidance.layout == "calls" and not second:
            run.conditional_output = latest
            return
        run.guidance_difference = run.conditional_output - latest if second else guidance.difference(latest)
        if level == FULL and group == 1:  # a point a forecast may extrapolate from
            run.full_guidance = dict([*list(run.full_guidance.items())[-1:], (i, run.guidance_difference)])

    def _forecast_weights(self, call) -> dict:
        """The forecasting levels' fitted weights from the run's calibration, the one ``auto`` planned with (an
        explicit plan's too); without one, forecasts extrapolate linearly."""
        found = self._find_calibration(self._scheduler_name(), self._run.timesteps, self.family.latent_size(call))
        model = found[0].error_model if found is not None else None
        return model.forecast_weight if model is not None else {}

    def _reused_guidance(self, level: str) -> torch.Tensor:
        """The guidance difference a conditional-only step reuses: the latest step's that ran both rows, or at a
        forecasting level extrapolated like the features, from the full steps the forecast module kept."""
        run, hook = self._run, self._forecast_hook()
        coefficient = hook.forecast_coefficient() if level in FORECASTING and hook is not None else None
        if coefficient is None:
            return run.guidance_difference
        (s0, _), (s1, _) = hook.history
        d0, d1 = run.full_guidance[s0], run.full_guidance[s1]
        return d1 + coefficient * (d1 - d0)

    def _forecast_hook(self) -> ReplayHook | None:
        return next((hook for _, hook in self._replay_hooks if getattr(hook, "forecasts", False)), None)


class _ModelHook(BranchAwareHook):
    """Routes the denoiser's calls made inside a denoising run through the accelerator; knows each call's
    guidance branch from the pipeline's ``cache_context(name)``."""

    def __init__(self, accel: FasterDiffusion):
        super().__init__()
        self.accel = accel

    def new_forward(self, module, *args, **kwargs):
        if self.accel._run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.accel._model_forward(self.fn_ref.original_forward, args, kwargs)


class _ControlNetHook(ModelHook):
    """Runs the ControlNet at full steps only; its residuals are replayed at the other steps."""

    _is_stateful = True

    def __init__(self, accel: FasterDiffusion):
        super().__init__()
        self.accel = accel
        self.cache = None

    def new_forward(self, module, *args, **kwargs):
        run = self.accel._run
        if run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        # The ControlNet is called just before the UNet call of step `run.step`.
        if run.levels is not None and run.levels[run.step] != FULL and self.cache is not None:
            return self.cache
        self.cache = self.fn_ref.original_forward(*args, **kwargs)
        run.controlnet_passes += 1
        return self.cache

    def reset_state(self, module):
        self.cache = None
        return module


_CHOICES: dict = {}  # (spec, error model, cost model, their state, options) -> Choice


def _choose(spec, model, cost, parallel, max_parallel, levels):
    """``plan.choose``, solved once per spec, error model and cost model in their current state (the dynamic
    programme takes longer than a small model's whole run)."""
    key = (str(spec), id(model), id(cost), model.correction, tuple((k, tuple(v)) for k, v in sorted(model.level_correction.items())),
           model.target_snr_db, cost.step_overhead, cost.call_overhead, parallel, max_parallel, levels)
    found = _CHOICES.get(key)
    if found is not None and found[0] is model and found[1] is cost:
        return found[2]
    if len(_CHOICES) > 256:
        _CHOICES.clear()
    choice = choose(spec, model, cost, parallel, max_parallel, levels)
    _CHOICES[key] = (model, cost, choice)
    return choice


def _matching(candidates, scheduler: str, timesteps, latent_size):
    """The first of ``candidates`` ((calibration, source) pairs) made for exactly this run, else the first
    whose run contains it as a slice; with where it came from, or None."""
    for calibration, source in candidates:
        if calibration.matches(scheduler, timesteps, latent_size):
            return calibration, source
    for calibration, source in candidates:
        part = calibration.for_run(scheduler, timesteps, latent_size)
        if part is not None:
            return part, f"{source}, {part.info['slice_of']}"
    return None


def _nearest_cost_model(models: dict, key, levels) -> CostModel | None:
    """The measured cost model (of the same dtype, device and guidance, with a FLOP curve and ``levels``) whose
    batch and size are nearest the sample shape of ``key``, in log ratio; None if there is none."""
    shape, *rest = key

    def distance(item):
        (other, *other_rest), _ = item
        return abs(np.log(other[0] / shape[0])) + abs(np.log(sample_positions(other) / sample_positions(shape)))

    candidates = [(k, m) for k, m in models.items() if list(k[1:]) == rest and len(k[0]) == len(shape)
                  and sample_channels(k[0]) == sample_channels(shape)
                  and "predicted_from" not in m.info and m.flop_curve and set(levels) <= set(m.level)]
    return min(candidates, key=distance)[1] if candidates else None


def cost_models(unet) -> dict:
    """The cost models measured in this process for ``unet`` (a pipeline's or the UNet itself), keyed by
    ``(sample shape, dtype, device, guided)``: the dictionary itself, so that a server can save them and put
    them back after a restart (``CostModel.to_dict`` / ``from_dict``) instead of measuring again."""
    unet = getattr(unet, "unet", unet)
    return _COST_MODELS.setdefault(unet, {})


def _as_calibrations(calibration) -> list[Calibration]:
    """The ``calibration`` argument as a list: None, a Calibration, a JSON path, or a list of these."""
    if calibration is None:
        return []
    if isinstance(calibration, (Calibration, str, Path)):
        calibration = [calibration]
    result = []
    for item in calibration:
        if isinstance(item, (str, Path)):
            item = Calibration.load(item)
        if not isinstance(item, Calibration):
            raise TypeError(f"calibration: expected a Calibration or the path of its JSON file, got {type(item).__name__}")
        result.append(item)
    return result


def _given_source(calibration: Calibration) -> str:
    """How stats name a calibration passed to ``enable``: its file, or what made it."""
    if calibration.path is not None:
        return f"file {calibration.path}"
    made = calibration.info.get("source")
    return "the calibration argument" + (f" ({made})" if made else "")


def _model_dir(pipe, unet) -> Path | None:
    """The local directory the model was loaded from, if any (diffusers records it as name_or_path)."""
    candidates = [getattr(pipe, "name_or_path", None)]
    unet_path = getattr(unet.config, "_name_or_path", None)
    if unet_path:
        candidates.append(Path(unet_path).parent)  # <model>/unet
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _seconds(fn, device) -> float:
    """Seconds of ``fn()``, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def _least_seconds(fn, device, prepare=lambda: None, repeats: int = 3) -> float:
    """The least time of ``fn(prepare())`` over ``repeats`` runs, ``prepare`` untimed, without autograd."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            state = prepare()
            times.append(_seconds(lambda: fn(state), device))
    return min(times)


def _same_timestep(a, b) -> bool:
    """Equal up to float rounding (FluxPipeline passes t / 1000, read back here times 1000)."""
    a, b = as_float(a), as_float(b)
    return a == b or abs(a - b) <= 1e-4 * max(1.0, abs(b))


def _check_timestep(timestep, expected, i: int) -> None:
    if not _same_timestep(timestep, expected):
        raise RuntimeError(
            f"faster_diffusion: step {i} was called with t={as_float(timestep)} but the run's timesteps say "
            f"t={as_float(expected)}; the sampling loop does not follow its scheduler's timesteps"
        )


def _output(noise_pred, return_dict: bool, output_class):
    return output_class(sample=noise_pred) if return_dict else (noise_pred,)


def _prev_sample(output):
    return output[0] if isinstance(output, tuple) else output.prev_sample


def _with_prev_sample(output, prev_sample):
    if isinstance(output, tuple):
        return (prev_sample, *output[1:])
    output.prev_sample = prev_sample
    return output


@contextlib.contextmanager
def _chain_contexts(outer, inner):
    with outer, inner as value:
        yield value
