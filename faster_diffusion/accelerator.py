"""The accelerator: owns the state of one denoising run and drives the UNet split.

``FasterDiffusion`` attaches to a diffusers pipeline without replacing its
``__call__``. Every diffusers pipeline wraps its denoising loop in
``with self.progress_bar(total=...)``; the accelerator wraps that method, so a
*run* starts when the loop starts and ends (caches freed, stats final) when it
ends, even if the loop raises. Inside a run:

- each UNet call is one sampling step (the SD-family loops call the UNet once
  per step, with the classifier-free-guidance batch concatenated); the step
  index decides whether the encoder runs (``schedules.key_step_indices``);
- a calibrated schedule (``"auto"``, ``"auto:B"``) is resolved at the first UNet
  call, when the run's timesteps and latent size are known, from the first
  matching calibration of: the ``calibration`` argument, this accelerator's
  earlier runs, the model directory's ``calibration/*.json``; with none, this
  run is a stock run that calibrates (``_find_calibration``);
- in parallel mode, a key step's UNet call also runs the decoders of the
  following non-key steps in one batch, and their outputs are returned at those
  steps without running the UNet;
- a ControlNet runs only at key steps; its residuals are replayed otherwise;
- prior noise injection adds ``noise_injection * z_T`` to the (variance-preserving) latent
  after each scheduler step whose *next* timestep is below ``noise_injection_timestep``.

A custom sampling loop can use ``with accel.denoising_run(timesteps): ...``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import Calibration, FeatureRecorder, run_info
from .schedules import check_key_steps, is_calibrated, key_step_indices, parse_key_steps
from .unet_split import (
    ENCODER_HOOK,
    SUPPORTED_UNETS,
    EncoderCacheHook,
    EncoderMode,
    ModelHook,
    add_hook,
    as_float,
    bind_unet_call,
    encoder_modules,
    frames_per_row,
    remove_hook,
    repeat_batch,
)

UNET_HOOK = "faster_diffusion_unet"
CONTROLNET_HOOK = "faster_diffusion_controlnet"
CALIBRATION_DIR = "calibration"  # in a model directory: calibration/*.json, made by script/calibrate
logger = logging.getLogger("faster_diffusion")


@dataclass
class _Run:
    """State of one denoising run. Timesteps are resolved at the first UNet call if not given."""

    num_steps: int
    key_steps: set | None  # None until a calibrated schedule is resolved at the first UNet call
    timesteps: list | None = None
    schedule_source: str = ""
    recorder: FeatureRecorder | None = None  # set when this run calibrates
    step: int = 0  # index of the next UNet call
    precomputed: dict = field(default_factory=dict)  # step -> (timestep, noise prediction)
    output_class: type | None = None  # the UNet's own output class, for the steps answered from `precomputed`
    initial_latent: torch.Tensor | None = None
    scheduler_steps: int = 0
    encoder_passes: int = 0
    decoder_passes: int = 0
    unet_calls: int = 0
    controlnet_passes: int = 0


class FasterDiffusion:
    """Encoder propagation on a diffusers pipeline (or a bare UNet). Create it with ``faster_diffusion.enable``."""

    def __init__(
        self,
        pipe_or_unet,
        key_steps="paper",
        parallel: bool = True,
        max_parallel: int | None = None,
        noise_injection: float = 0.003,
        noise_injection_timestep: float = 500,
        calibration=None,
    ):
        self.pipe = None if isinstance(pipe_or_unet, SUPPORTED_UNETS) else pipe_or_unet
        self.unet = pipe_or_unet if self.pipe is None else getattr(pipe_or_unet, "unet", None)
        if not isinstance(self.unet, SUPPORTED_UNETS):
            found = type(pipe_or_unet).__name__ if self.pipe is None else f"{type(self.pipe).__name__}.unet of type {type(self.unet).__name__}"
            names = ", ".join(cls.__name__ for cls in SUPPORTED_UNETS)
            raise TypeError(f"faster_diffusion.enable needs a pipeline whose `unet` is one of {names}, or the UNet itself; got {found}")
        self.set_params(key_steps, parallel, max_parallel, noise_injection, noise_injection_timestep)
        self.given_calibrations = _as_calibrations(calibration)
        self.calibrations: list[Calibration] = []  # made by this accelerator's calibrating runs
        self._model_calibrations: list[Calibration] | None = None  # read on first need
        self.stats: dict = {}
        self._run: _Run | None = None
        self._mode = EncoderMode()
        self._cache_hooks: list[ModelHook] = []  # ControlNet hooks holding per-run caches
        self._encoder: list[tuple[torch.nn.Module, ModelHook]] = []  # the hooked encoder modules
        self._controlnets: list[torch.nn.Module] = []
        self._enabled = False

    # -- configuration -------------------------------------------------------------------------------------------

    def set_params(self, key_steps="paper", parallel=True, max_parallel=None, noise_injection=0.003, noise_injection_timestep=500):
        """Validates and sets the acceleration parameters (takes effect at the next run)."""
        parse_key_steps(key_steps)
        if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
            raise ValueError(f"max_parallel={max_parallel!r} must be None or an integer >= 1")
        if not 0 <= float(noise_injection) <= 1:
            raise ValueError(f"noise_injection={noise_injection!r} must lie in [0, 1]")
        self.key_steps = key_steps
        self.parallel = bool(parallel)
        self.max_parallel = max_parallel
        self.noise_injection = float(noise_injection)
        self.noise_injection_timestep = float(noise_injection_timestep)

    # -- install / remove ------------------------------------------------------------------------------------------

    def enable(self) -> "FasterDiffusion":
        if self._enabled:
            return self
        self._hook_encoder()
        add_hook(self.unet, _UNetHook(self), UNET_HOOK)
        controlnet = getattr(self.pipe, "controlnet", None)
        if controlnet is not None:
            hook = _ControlNetHook(self)
            add_hook(controlnet, hook, CONTROLNET_HOOK)
            self._controlnets = [controlnet]
            self._cache_hooks.append(hook)
        if self.pipe is not None:
            # Instance attribute shadowing DiffusionPipeline.progress_bar; removed by disable().
            self.pipe.progress_bar = self._progress_bar
        self.unet._faster_diffusion = self
        self._enabled = True
        return self

    def disable(self) -> None:
        """Removes every hook; the pipeline is the stock one again."""
        if not self._enabled:
            return
        self._end_run()
        self._unhook_encoder()
        remove_hook(self.unet, UNET_HOOK)
        for controlnet in self._controlnets:
            remove_hook(controlnet, CONTROLNET_HOOK)
        if self.pipe is not None:
            self.pipe.__dict__.pop("progress_bar", None)
        self.unet.__dict__.pop("_faster_diffusion", None)
        self._cache_hooks, self._controlnets = [], []
        self._enabled = False

    def _hook_encoder(self) -> None:
        """Hooks the UNet's encoder modules. Called by enable() and at every run: a LoRA loaded or
        unloaded since may have swapped one (peft wraps a targeted conv_in in a new module)."""
        modules = encoder_modules(self.unet)
        if [module for module, _ in self._encoder] == modules:
            return
        self._unhook_encoder()
        for module in modules:
            hook = EncoderCacheHook(self._mode)
            add_hook(module, hook, ENCODER_HOOK)
            self._encoder.append((module, hook))

    def _unhook_encoder(self) -> None:
        for module, _ in self._encoder:
            remove_hook(module, ENCODER_HOOK)
        self._encoder = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()

    # -- runs ------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def denoising_run(self, timesteps=None):
        """Brackets one sampling loop. ``timesteps``: the loop's timesteps; if None, read from the
        pipeline's scheduler at the first UNet call (the loop may run a head or tail of them)."""
        if not self._enabled:
            raise RuntimeError("faster_diffusion: denoising_run() on a disabled accelerator")
        if self._run is not None:
            raise RuntimeError("faster_diffusion: denoising runs cannot be nested")
        if timesteps is None and self.pipe is None:
            raise ValueError("faster_diffusion: denoising_run(timesteps) needs the loop's timesteps on a bare UNet")
        self._hook_encoder()
        if timesteps is not None:
            timesteps = list(timesteps)
            num_steps = len(timesteps)
        else:  # SD-family pipelines set _num_timesteps just before their loop
            num_steps = getattr(self.pipe, "_num_timesteps", None) or len(self.pipe.scheduler.timesteps)
        # Resolving the schedule here makes a bad one fail before any sampling step; a calibrated one
        # waits for the first UNet call (it needs the timesteps and latent size), still before any step.
        check_key_steps(self.key_steps, num_steps)
        if is_calibrated(self.key_steps):
            self._run = _Run(num_steps, None, timesteps)
        else:
            self._run = _Run(num_steps, set(key_step_indices(self.key_steps, num_steps)), timesteps, str(self.key_steps))
        scheduler = getattr(self.pipe, "scheduler", None)
        if self.noise_injection > 0 and scheduler is not None:
            scheduler.step = self._wrap_scheduler_step(scheduler)
        try:
            yield self
        finally:
            if scheduler is not None:
                scheduler.__dict__.pop("step", None)
            self._end_run()

    def _progress_bar(self, iterable=None, total=None):
        bar = type(self.pipe).progress_bar(self.pipe, iterable=iterable, total=total)
        if iterable is not None:  # not the `with self.progress_bar(total=...)` loop form
            return bar
        return _chain_contexts(self.denoising_run(), bar)

    def _resolve_timesteps(self, timestep) -> None:
        """Finds the loop's timesteps in the pipeline scheduler's list from the first UNet call."""
        all_t = list(self.pipe.scheduler.timesteps)
        t = as_float(timestep)
        n = min(self._run.num_steps, len(all_t))
        tail = len(all_t) - n
        if float(all_t[tail]) == t:  # img2img / inpainting: strength keeps the tail
            start = tail
        else:  # full list, or SDXL's denoising_end keeps the head
            matches = [j for j, s in enumerate(all_t) if float(s) == t]
            if not matches:
                raise RuntimeError(f"faster_diffusion: UNet called at t={t}, which is not in the scheduler's timesteps")
            start = matches[0]
        self._run.timesteps = all_t[start : start + n]

    def _scheduler_name(self) -> str:
        return type(self.pipe.scheduler).__name__ if self.pipe is not None else "unknown"

    def _resolve_schedule(self, latent_size) -> None:
        """Picks a calibrated run's key steps, or makes it a stock run that calibrates."""
        run = self._run
        scheduler = self._scheduler_name()
        found = self._find_calibration(scheduler, run.timesteps, latent_size)
        if found is None:
            run.key_steps = set(range(run.num_steps))
            run.schedule_source = "calibrating: this run is stock and records the encoder features"
            run.recorder = FeatureRecorder(self.unet).attach(record_steps=False)
            run.recorder.timesteps = [as_float(t) for t in run.timesteps]
            run.recorder.latent_size = latent_size
            logger.warning(
                "faster_diffusion: no calibration for %s %d steps at %s latents; this run is stock and calibrates",
                scheduler, run.num_steps, "x".join(map(str, latent_size)),
            )
            return
        calibration, source = found
        run.key_steps = set(key_step_indices(self.key_steps, run.num_steps, calibration))
        run.schedule_source = f"{self.key_steps} from {source}"

    def _find_calibration(self, scheduler: str, timesteps, latent_size):
        """(calibration, where it came from) for this run, or None. A calibration of a longer run
        whose timesteps contain this run's as a contiguous slice serves too (img2img, inpainting)."""
        candidates = [
            *((c, _given_source(c)) for c in self.given_calibrations),
            *((c, f"a calibration made by an earlier run ({c.describe()})") for c in self.calibrations),
            *((c, f"file {c.path}") for c in self._shipped_calibrations()),
        ]
        for calibration, source in candidates:  # exact matches first, then slices, each in order of preference
            if calibration.matches(scheduler, timesteps, latent_size):
                return calibration, source
        for calibration, source in candidates:
            part = calibration.for_run(scheduler, timesteps, latent_size)
            if part is not None:
                return part, f"{source}, {part.info['slice_of']}"
        return None

    def _shipped_calibrations(self) -> list[Calibration]:
        """The model directory's calibration/*.json (read once)."""
        if self._model_calibrations is None:
            model_dir = _model_dir(self.pipe, self.unet)
            self._model_calibrations = [] if model_dir is None else shipped_calibrations(model_dir)
        return self._model_calibrations

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
            "faster_diffusion: calibrated %s; %s now gives key steps %s",
            calibration.describe(), self.key_steps, key_step_indices(self.key_steps, run.num_steps, calibration),
        )

    def _end_run(self) -> None:
        run, self._run = self._run, None
        self._mode.active = False
        for hook in (*self._cache_hooks, *(hook for _, hook in self._encoder)):
            hook.cache = None
        if run is None:
            return
        if run.recorder is not None:
            self._finish_calibration(run)
        self.stats = {
            "steps": run.num_steps,
            "key_steps": sorted(run.key_steps or ()),
            "schedule_source": run.schedule_source,
            "encoder_passes": run.encoder_passes,
            "decoder_passes": run.decoder_passes,
            "unet_calls": run.unet_calls,
            "controlnet_passes": run.controlnet_passes,
            "parallel": self.parallel,
            "noise_injection": self.noise_injection,
        }

    def _decoder_steps(self, i: int) -> list[int]:
        """The steps whose decoders run in the UNet call of step ``i``."""
        run = self._run
        if not self.parallel:
            return [i]
        limit = len(run.timesteps) if self.max_parallel is None else min(len(run.timesteps), i + self.max_parallel)
        steps = [i]
        while steps[-1] + 1 < limit and steps[-1] + 1 not in run.key_steps:
            steps.append(steps[-1] + 1)
        return steps

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

    def _unet_forward(self, original_forward, args, kwargs):
        run = self._run
        call = bind_unet_call(self.unet, args, kwargs)
        return_dict = call.pop("return_dict")
        sample, timestep = call["sample"], call["timestep"]
        if run.timesteps is None:
            self._resolve_timesteps(timestep)
        if run.key_steps is None:
            self._resolve_schedule(tuple(sample.shape[2:]))  # (height, width), or (frames, height, width)
        i = run.step
        run.step += 1
        if i >= len(run.timesteps):
            raise RuntimeError(f"faster_diffusion: UNet called {i + 1} times in a run of {len(run.timesteps)} steps")

        if i in run.precomputed:
            t, noise_pred = run.precomputed.pop(i)
            _check_timestep(timestep, t, i)
            return _output(noise_pred, return_dict, run.output_class)

        steps = self._decoder_steps(i)
        rows, group = sample.shape[0], len(steps)
        frames = frames_per_row(self.unet, sample)
        if group > 1:
            _check_timestep(timestep, run.timesteps[i], i)
            call = {k: repeat_batch(v, (rows, rows * frames), group) for k, v in call.items() if k != "timestep"}
            call["timestep"] = torch.stack(
                [torch.as_tensor(run.timesteps[s]).to(sample.device).expand(rows) for s in steps]
            ).flatten()

        is_key = i in run.key_steps
        self._mode.active, self._mode.compute = True, is_key
        self._mode.rows, self._mode.group_size = rows * frames, group
        try:
            output = original_forward(**call, return_dict=True)
        finally:
            self._mode.active = False
        run.output_class, noise_pred = type(output), output.sample
        run.unet_calls += 1
        run.encoder_passes += int(is_key)
        run.decoder_passes += group
        chunks = noise_pred.split(rows)
        for s, chunk in zip(steps[1:], chunks[1:]):
            run.precomputed[s] = (run.timesteps[s], chunk)
        return _output(chunks[0], return_dict, run.output_class)


class _UNetHook(ModelHook):
    """Routes UNet calls made inside a denoising run through the accelerator."""

    def __init__(self, accel: FasterDiffusion):
        super().__init__()
        self.accel = accel

    def new_forward(self, module, *args, **kwargs):
        if self.accel._run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.accel._unet_forward(self.fn_ref.original_forward, args, kwargs)


class _ControlNetHook(ModelHook):
    """Runs the ControlNet at key steps only; its residuals are replayed at the other steps."""

    def __init__(self, accel: FasterDiffusion):
        super().__init__()
        self.accel = accel
        self.cache = None

    def new_forward(self, module, *args, **kwargs):
        run = self.accel._run
        if run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        # The ControlNet is called just before the UNet call of step `run.step`.
        if run.key_steps is not None and run.step not in run.key_steps and self.cache is not None:
            return self.cache
        self.cache = self.fn_ref.original_forward(*args, **kwargs)
        run.controlnet_passes += 1
        return self.cache


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


def shipped_calibrations(model_dir) -> list[Calibration]:
    """The calibrations a model directory ships in calibration/*.json (each knows its ``path``);
    unreadable files are skipped with a warning."""
    found = []
    for path in sorted((Path(model_dir) / CALIBRATION_DIR).glob("*.json")):
        try:
            found.append(Calibration.load(path))
        except (ValueError, KeyError, TypeError, OSError) as err:
            logger.warning("faster_diffusion: skipping calibration file %s (%s)", path, err)
    return found


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


def _check_timestep(timestep, expected, i: int) -> None:
    if as_float(timestep) != as_float(expected):
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
