"""Calibrated key steps: pick each model's schedule from how its encoder features move.

One stock run records a fixed random sample of every encoder module's output at
every step (``FeatureRecorder``). From it, ``cost[i, j]`` is what reusing step
``i``'s features at step ``j`` costs: the squared L2 distance between the two
steps' outputs relative to step ``j``'s, averaged over the batch rows and summed
over the modules (``conv_in``, the 3D UNet's ``transformer_in``, each down block's skip
features, the mid block).
A schedule's *reuse cost* is the sum of ``cost[k(j), j]`` over its non-key steps,
``k(j)`` being the latest key at or before ``j``. ``Calibration.schedule`` finds
the key set of least reuse cost by dynamic programming, exactly: for a budget of
encoder passes, or the fewest passes whose mean reuse cost per step is at most a
tolerance. ``refine`` then improves a budget's schedule by a local search on the
final latents' distance to the stock run's, and ``validate`` checks the tolerance's schedule
on outputs: a sampler can be more sensitive to reused features than the features show.

Why a random sample of coordinates: the encoder features of SD1.5 at 512² are 6.7 M
values a row per step; ``SKETCH_SIZE`` coordinates a module (the same ones at every
step) estimate the relative distances closely (tests/test_calibration.py compares them
with the exact ones) while the stored sketch stays small: 37.5 MiB for 4 prompts x 50
steps with guidance at SD1.5 512², whatever the size (``python bench/calibration.py``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .plan import (
    CHEAP_LEVELS,
    DEFAULT_PLAN_SNR_DB,
    FORECAST_MARGIN_DB,
    MAX_RUN,
    AutoPlan,
    CostModel,
    ErrorModel,
    choose,
    count_flops,
    plan_letters,
    segment_gaps,
)
from .family import (
    CONDITIONAL_ONLY,
    ENCODER,
    FORECASTING,
    FULL,
    OUTPUT,
    SECOND_BRANCH,
    BranchAwareHook,
    DenoiserFamily,
    ModelHook,
    StepMode,
    add_hook,
    as_float,
    family_of,
    hooks_changed,
    remove_hook,
)

logger = logging.getLogger("faster_diffusion")

SKETCH_SIZE = 4096  # coordinates kept per module and batch row
SKETCH_SEED = 0
RECORDER_HOOK = "faster_diffusion_recorder"
#: ``key_steps="auto"``: the fewest encoder passes whose mean reuse cost per step is at most this.
#: Chosen on the bundled model (docs/calibration.md); a model whose features move faster gets more keys.
DEFAULT_TOLERANCE = 0.025
#: ``validate``: the least signal-to-error ratio (dB) of the final latents against the stock run's.
#: On the bundled model every 20-50-step schedule at >= 22 dB kept >= 99.5% of images right, and
#: UniPC-20's tolerance schedule at 17.7 dB kept 78.5% (docs/calibration.md).
MIN_OUTPUT_SNR_DB = 20.0
FORMAT_VERSION = 1
CALIBRATION_DIR = "calibration"  # in a model directory: calibration/*.json, made by script/calibrate
#: the relative size of the perturbation of a step's output that measures the final latent's sensitivity to it
PERTURBATION = 0.02


def _feature_tensors(output) -> list[torch.Tensor]:
    """The tensors of an encoder module's output the decoder reads: a down block's skip features
    (its second output), otherwise the output itself."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple):
        return list(output[1])
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)]


class _SketchHook(BranchAwareHook):
    """Appends a fixed random sample of the module's output coordinates (per batch row) at each step: at the
    first call of a step that calls the model once per guidance branch."""

    def __init__(self, recorder: "FeatureRecorder", slot: int):
        super().__init__()
        self.recorder, self.slot = recorder, slot

    def post_forward(self, module, output):
        if self.branch() != SECOND_BRANCH:
            self.recorder._record(self.slot, _feature_tensors(output))
        return output


class _StepHook(BranchAwareHook):
    """Notes each step's timestep (in the scheduler's units) and latent size."""

    def __init__(self, recorder: "FeatureRecorder"):
        super().__init__()
        self.recorder = recorder

    def pre_forward(self, module, *args, **kwargs):
        if self.branch() != SECOND_BRANCH:
            family = self.recorder.family
            call = family.bind_call(module, args, kwargs)
            self.recorder.timesteps.append(as_float(call["timestep"]) * family.timestep_scale(module))
            self.recorder.latent_size = family.latent_size(call)  # (height, width), or (frames, height, width)
        return args, kwargs


class FeatureRecorder:
    """Records encoder-feature sketches of every step while attached (a UNet's encoder modules, a transformer's
    encoder output: ``DenoiserFamily.feature_modules``)."""

    def __init__(self, model, family: DenoiserFamily | None = None, sketch_size: int = SKETCH_SIZE, seed: int = SKETCH_SEED):
        self.unet = model
        self.family = family or family_of(model)[0]
        self.modules = self.family.feature_modules(model)
        self.sketch_size, self.seed = sketch_size, seed
        self.sketches: list[list[torch.Tensor]] = [[] for _ in self.modules]  # [module][step] -> (rows, D)
        self.timesteps: list[float] = []
        self.latent_size: tuple[int, ...] | None = None
        self._indices: list[list[torch.Tensor] | None] = [None] * len(self.modules)  # per module, per output tensor

    def attach(self, record_steps: bool = True) -> "FeatureRecorder":
        """Hooks the feature modules and, with ``record_steps``, the model (to note timesteps and latent size;
        a caller that already knows them sets ``timesteps`` and ``latent_size`` itself)."""
        for slot, module in enumerate(self.modules):
            add_hook(module, _SketchHook(self, slot), RECORDER_HOOK)
        if record_steps:
            add_hook(self.unet, _StepHook(self), RECORDER_HOOK)
        hooks_changed(self.unet)
        return self

    def detach(self) -> None:
        for module in (*self.modules, self.unet):
            remove_hook(module, RECORDER_HOOK)
        hooks_changed(self.unet)

    def _record(self, slot: int, tensors: list[torch.Tensor]) -> None:
        # The same SKETCH_SIZE coordinates of the module's concatenated outputs at every step, gathered
        # tensor by tensor so that no copy of the whole features is made.
        if self._indices[slot] is None:
            sizes = [t[0].numel() for t in tensors]
            g = torch.Generator().manual_seed(self.seed + slot)
            chosen = torch.randperm(sum(sizes), generator=g)[: self.sketch_size].sort().values
            bounds = torch.tensor([0, *sizes]).cumsum(0)
            self._indices[slot] = [
                (chosen[(chosen >= lo) & (chosen < hi)] - lo).to(tensors[0].device) for lo, hi in zip(bounds[:-1], bounds[1:])
            ]
        parts = [t.detach().flatten(1)[:, idx] for t, idx in zip(tensors, self._indices[slot])]
        self.sketches[slot].append(torch.cat(parts, dim=1).float().cpu())

    @property
    def num_steps(self) -> int:
        return len(self.sketches[0])

    def cost_matrix(self) -> np.ndarray:
        """``cost[i, j]`` (i <= j): relative squared L2 distance of step j's features to step i's."""
        n = self.num_steps
        cost = torch.zeros(n, n, dtype=torch.float64)
        for per_step in self.sketches:
            feats = torch.stack(per_step, dim=1).double()  # (rows, steps, D)
            gram = feats @ feats.transpose(1, 2)  # (rows, steps, steps); float64 keeps |a-b|^2 = a.a + b.b - 2a.b exact enough
            norms = gram.diagonal(dim1=1, dim2=2)  # (rows, steps)
            dist = (norms[:, :, None] + norms[:, None, :] - 2 * gram).clamp_min(0)
            cost += (dist / norms[:, None, :].clamp_min(1e-12)).mean(0)
        return torch.triu(cost).numpy()

    def sketch_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for per_step in self.sketches for s in per_step)

    def calibration(self, scheduler: str, info: dict) -> "Calibration":
        if self.num_steps < 1 or len(self.timesteps) != self.num_steps:
            raise RuntimeError(
                f"faster_diffusion: the recorded run has {self.num_steps} encoder passes for {len(self.timesteps)} "
                "steps; calibration needs a stock run that calls the model once per step (or once per guidance branch)"
            )
        info = {**info, "sketch_size": self.sketch_size, "sketch_bytes": self.sketch_bytes()}
        return Calibration(self.cost_matrix(), list(self.timesteps), scheduler, self.latent_size, info)


@dataclass
class Calibration:
    """The reuse costs of one model, scheduler, step count and size; picks key steps from them."""

    cost: np.ndarray  # (steps, steps), upper triangle used
    timesteps: list[float]
    scheduler: str  # scheduler class name
    latent_size: tuple[int, ...]  # (height, width) of the UNet's input; (frames, height, width) for video
    info: dict = field(default_factory=dict)  # what it was calibrated on: model, prompts, date, ...
    refined: dict[int, list[int]] = field(default_factory=dict)  # budget -> key steps refined on outputs
    validated: list[int] | None = None  # key_steps="auto" checked on outputs (``validate``)
    error_model: ErrorModel | None = None  # for plans (``faster_diffusion.plan``); fitted by ``calibrate``
    path: Path | None = field(default=None, compare=False)  # the JSON file it was loaded from, if any
    # (schedules, reuse costs) of every budget, solved once: a calibrated run resolves its schedule from it
    _solved: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def describe(self) -> str:
        return f"{self.scheduler} {self.num_steps} steps at {'x'.join(map(str, self.latent_size))} latents"

    def matches(self, scheduler, timesteps, latent_size) -> bool:
        """Whether this calibration is for exactly a run of ``scheduler`` (class name) over ``timesteps`` at ``latent_size``."""
        return self.for_run(scheduler, timesteps, latent_size) is self

    def for_run(self, scheduler, timesteps, latent_size) -> "Calibration | None":
        """This calibration for a run of ``scheduler`` over ``timesteps`` at ``latent_size``: itself, or
        the part of it for a run whose timesteps are a contiguous slice of its own (img2img's
        ``strength`` keeps the tail, SDXL's ``denoising_end`` the head); None if it does not apply."""
        if self.scheduler != scheduler or tuple(self.latent_size) != tuple(latent_size):
            return None
        run = [float(t) for t in timesteps]
        n = len(run)
        for start in range(self.num_steps - n + 1):
            if self.timesteps[start : start + n] == run:
                if n == self.num_steps:
                    return self
                return Calibration(
                    self.cost[start : start + n, start : start + n], run, self.scheduler, self.latent_size,
                    {**self.info, "slice_of": f"steps {start}-{start + n - 1} of {self.describe()}"},
                    error_model=None if self.error_model is None else self.error_model.sliced(start, n),
                )
        return None

    def reuse_cost(self, key_steps) -> float:
        """Sum over the non-key steps of the cost of reusing the latest key step's features."""
        keys = sorted(set(key_steps))
        if not keys or keys[0] != 0:
            raise ValueError(f"key_steps={keys}: step 0 must be a key step")
        total, last = 0.0, 0
        for j in range(self.num_steps):
            if j in keys:
                last = j
            else:
                total += float(self.cost[last, j])
        return total

    def schedule(self, budget: int | None = None, tolerance: float | None = None) -> list[int]:
        """The key steps of least reuse cost: exactly ``budget`` encoder passes, or (``tolerance``)
        the fewest passes whose mean reuse cost per step is at most ``tolerance``.

        With neither, the schedule ``validate`` stored, else ``DEFAULT_TOLERANCE``'s. A budget with a
        refined schedule (``refine``) returns that one.
        """
        n = self.num_steps
        if budget is not None and tolerance is not None:
            raise ValueError("give a budget or a tolerance, not both")
        if budget is not None:
            if budget in self.refined:
                return list(self.refined[budget])
            return self.least_cost_schedule(budget)
        if tolerance is None and self.validated is not None:
            return list(self.validated)
        tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        if not tolerance >= 0:
            raise ValueError(f"tolerance={tolerance!r} must be a number >= 0")
        schedules, costs = self._solve()
        return next((list(schedules[b]) for b in range(1, n + 1) if costs[b] <= tolerance * n), list(range(n)))

    def least_cost_schedule(self, budget: int) -> list[int]:
        """The ``budget`` key steps of least reuse cost (ignoring any refinement)."""
        n = self.num_steps
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
            raise ValueError(f"budget={budget!r} must be an integer in [1, {n}] (encoder passes of a {n}-step run)")
        return list(self._solve()[0][budget])

    def _solve(self) -> tuple[dict[int, list[int]], dict[int, float]]:
        if self._solved is None:
            self._solved = _least_cost_schedules(self.cost)
        return self._solved

    # -- files -----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_steps,
            "timesteps": [float(t) for t in self.timesteps],
            "latent_size": list(self.latent_size),
            "info": self.info,
            "refined": {str(b): list(k) for b, k in sorted(self.refined.items())},
            **({"validated": list(self.validated)} if self.validated is not None else {}),
            **({"error_model": self.error_model.to_dict()} if self.error_model is not None else {}),
            "cost": [[round(float(c), 7) for c in row] for row in self.cost],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"calibration format {data.get('format')!r} is not {FORMAT_VERSION}")
        return cls(
            cost=np.asarray(data["cost"], dtype=np.float64),
            timesteps=[float(t) for t in data["timesteps"]],
            scheduler=data["scheduler"],
            latent_size=tuple(data["latent_size"]),
            info=data.get("info", {}),
            refined={int(b): [int(k) for k in keys] for b, keys in data.get("refined", {}).items()},
            validated=[int(k) for k in data["validated"]] if data.get("validated") is not None else None,
            error_model=ErrorModel.from_dict(data["error_model"]) if data.get("error_model") is not None else None,
        )

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        calibration = cls.from_dict(json.loads(Path(path).read_text()))
        calibration.path = Path(path)
        return calibration


def _least_cost_schedules(cost: np.ndarray) -> tuple[dict[int, list[int]], dict[int, float]]:
    """For every budget b, the b key steps (0 among them) of least reuse cost, and that cost.

    best[b][e]: least cost of steps [0, e) with b keys, the last segment ending at e; a segment
    starting at key a and ending before e costs sum(cost[a, a+1:e]). O(steps^3), once per calibration.
    """
    n = cost.shape[0]
    row_cum = np.zeros((n, n + 1))
    for a in range(n):
        row_cum[a, a + 2 :] = np.cumsum(cost[a, a + 1 :])  # row_cum[a, e] = sum(cost[a, a+1:e])
    best = np.full((n + 1, n + 1), float("inf"))
    start = np.zeros((n + 1, n + 1), dtype=int)  # start of the last segment
    best[1, 1:] = row_cum[0, 1:]
    for b in range(2, n + 1):
        for e in range(b, n + 1):
            a = np.arange(b - 1, e)  # the last key
            totals = best[b - 1, a] + row_cum[a, e]
            k = int(np.argmin(totals))
            best[b, e], start[b, e] = totals[k], a[k]
    schedules = {}
    for b in range(1, n + 1):
        keys, e = [], n
        for m in range(b, 1, -1):
            e = start[m, e]
            keys.append(int(e))
        schedules[b] = [0] + sorted(keys)
    return schedules, {b: float(best[b, n]) for b in range(1, n + 1)}


def shipped_calibrations(model_dir) -> list[Calibration]:
    """The calibrations a model directory ships in calibration/*.json (each knows its ``path``), read
    once per process and file version; unreadable files are skipped with a warning."""
    found = []
    for path in sorted((Path(model_dir) / CALIBRATION_DIR).glob("*.json")):
        try:
            calibration = _load_cached(path, path.stat().st_mtime_ns)
        except (ValueError, KeyError, TypeError, OSError) as err:
            logger.warning("faster_diffusion: skipping calibration file %s (%s)", path, err)
            continue
        found.append(calibration)
    return found


@functools.lru_cache(maxsize=256)
def _load_cached(path: Path, mtime_ns: int) -> Calibration:
    return Calibration.load(path)


def derive(source: Calibration, timesteps, latent_size, scheduler: str | None = None) -> Calibration:
    """``source``'s calibration carried over to a run over ``timesteps`` at ``latent_size`` (of ``scheduler``,
    a scheduler class name; default ``source``'s).

    With the same timesteps (another size) the costs and schedules are ``source``'s. Otherwise
    ``cost[i, j]`` is ``source``'s reuse cost interpolated (bilinearly, in timestep) at the new
    run's ``(t_i, t_j)``, so ``auto:B`` and the tolerance work on it, and ``auto`` (``validated``)
    is ``source``'s ``auto`` key steps moved to the new run's nearest timesteps: the encoder runs
    at about the same noise levels as in the calibrated run. Another scheduler's calibration is
    used the same way (the encoder sees about the same latents at the same noise level).
    """
    run = [float(t) for t in timesteps]
    described = source.path.name if source.path is not None else source.describe()
    info = {k: v for k, v in source.info.items() if k not in ("validation", "slice_of", "derived_from", "num_inference_steps")}
    info["derived_from"] = described
    scheduler = scheduler or source.scheduler
    if scheduler != source.scheduler:
        derived = derive(source, timesteps, latent_size)
        derived.scheduler = scheduler
        derived.info["source"] = f"derived from {described} (another sampler, timesteps mapped)"
        return derived
    if run == [float(t) for t in source.timesteps]:
        derived = Calibration(
            source.cost.copy(), run, source.scheduler, tuple(latent_size), info,
            dict(source.refined), list(source.validated) if source.validated is not None else None,
            error_model=source.error_model,
        )
        derived.info["source"] = f"derived from {described} (same timesteps, another size)"
        return derived
    src_t = np.asarray(source.timesteps, dtype=np.float64)
    order = np.argsort(src_t)  # np.interp wants increasing abscissae
    position = np.interp(np.asarray(run), src_t[order], order.astype(np.float64))  # fractional index in source
    upper = np.triu(source.cost, 1)
    cost = _bilinear(upper + upper.T, position)
    np.fill_diagonal(cost, 0.0)
    cost = np.triu(cost, 1)
    keys = sorted({0} | {int(np.argmin(np.abs(np.asarray(run) - source.timesteps[k]))) for k in source.schedule()})
    error_model = None if source.error_model is None else source.error_model.resampled(source.timesteps, run)
    derived = Calibration(cost, run, source.scheduler, tuple(latent_size), info, {}, keys, error_model=error_model)
    derived.info["source"] = f"derived from {described} (timesteps mapped)"
    return derived


def _bilinear(matrix: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``matrix`` read at fractional indices ``(position[i], position[j])``."""
    m = matrix.shape[0] - 1
    low = np.clip(np.floor(position).astype(int), 0, max(m - 1, 0))
    high = np.minimum(low + 1, m)
    frac = np.clip(position - low, 0.0, 1.0)
    a = matrix[np.ix_(low, low)] * (1 - frac)[None, :] + matrix[np.ix_(low, high)] * frac[None, :]
    b = matrix[np.ix_(high, low)] * (1 - frac)[None, :] + matrix[np.ix_(high, high)] * frac[None, :]
    return a * (1 - frac)[:, None] + b * frac[:, None]


def nearest(candidates, scheduler: str, timesteps, latent_size):
    """The calibration among ``candidates`` to derive a run of ``scheduler`` (class name) from: the same
    scheduler if any, else another (DDIM first); among those the same timesteps if any (another size),
    else the nearest step count (ratio) among the runs with at least as many steps, else among the
    others; the same size preferred. On the bundled model UniPC-30 derived from UniPC-50 came to
    44.8 dB PSNR to stock against 43.6 dB with its own calibration, and from UniPC-20 to 38.9 dB
    (bench/first_use.py)."""
    run = [float(t) for t in timesteps]
    same = [c for c in candidates if c.scheduler == scheduler]
    pool = same or sorted(candidates, key=lambda c: c.scheduler != "DDIMScheduler")
    if not pool:
        return None

    def distance(c):
        exact = [float(t) for t in c.timesteps] == run
        coarser = c.num_steps < len(run)  # a finer run's keys mapped onto fewer steps stay closer
        return (not exact, coarser, abs(math.log(c.num_steps / len(run))), tuple(c.latent_size) != tuple(latent_size))

    if not same:
        pool = [c for c in pool if c.scheduler == pool[0].scheduler]
    return min(pool, key=distance)


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faster-diffusion")
    except PackageNotFoundError:
        return "unknown"


def run_info(pipe, prompts, num_inference_steps, call_kwargs) -> dict:
    """What a calibration was made on, for its JSON file."""
    return {
        "model": str(getattr(pipe, "name_or_path", None) or type(pipe).__name__),
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "num_inference_steps": num_inference_steps,
        "prompts": list(prompts),
        "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "library_version": _library_version(),
    }


def calibrate(pipe, prompts, num_inference_steps: int = 50, seeds=None, plans: bool = False, compute_budget: float | None = None,
              **call_kwargs) -> Calibration:
    """Runs the stock pipeline once on ``prompts`` (one batch, the pipeline's current scheduler, generator
    seeds ``seeds``, default 0, 1, ..., or the ``generator`` argument) and returns the calibration of its
    encoder features. ``call_kwargs`` go to ``pipe(...)`` (height, width, guidance_scale, ...). An
    accelerator on ``pipe`` is paused meanwhile.

    With ``plans`` (a 2D UNet, or a transformer of at least 3 blocks), it also fits the error model of plans
    (``faster_diffusion.plan``): the stock run's model calls are replayed at every level of reuse, and the
    pipeline runs again with one step's output perturbed at a time, to see how much of each step's error
    reaches the final latent.

    ``compute_budget`` (stock images: one prompt's stock call of this run is 1) caps what the calibration
    computes, and with ``plans`` it returns the error model already scaled on outputs (``validate_plan``
    within the same budget): fewer prompts, teacher-forced errors and sensitivities at a subset of steps,
    interpolated between them, and fewer validation probes (``Spending``). None: the thorough calibration,
    every prompt and step (about 75 stock images a prompt at 50 steps; ``validate_plan`` is then the caller's)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: calibration needs at least one prompt")
    if compute_budget is not None:
        compute_budget = check_compute_budget(compute_budget)
        prompts = prompts[: budget_prompts(compute_budget, len(prompts))]
        seeds = None if seeds is None else list(seeds)[: len(prompts)]
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    generator = call_kwargs.pop("generator", None)
    generators = _generator_factory(seeds, generator)
    found = family_of(pipe)
    if found is None:
        raise TypeError(f"calibrate needs a pipeline with a supported UNet or transformer; got {type(pipe).__name__}")
    family, model = found
    plans = plans and len(family.supported_levels(model)) > 2
    why_not = family.plans_unsupported(pipe) if plans else None
    if why_not:
        raise ValueError(f"plans=True: {why_not}")
    if plans and isinstance(generator, torch.Generator) and len(prompts) > 1:
        raise ValueError("generator: fitting plans reruns the prompts in copies; give one generator a prompt, or seeds")
    accel = getattr(model, "_faster_diffusion", None)
    if accel is not None:
        accel.disable()
    recorder = FeatureRecorder(model, family).attach()
    calls = _StockRun(pipe, family, model) if plans else None
    started = time.perf_counter()
    call_kwargs = {"output_type": "latent", **call_kwargs}
    try:
        final = _sampled(pipe(prompts, num_inference_steps=num_inference_steps, generator=generators(1), **call_kwargs))
        recorder.detach()
        recorder.timesteps = _loop_timesteps(recorder.timesteps, pipe.scheduler.timesteps)
        fit_budget = None if compute_budget is None else FIT_SHARE * (compute_budget - len(prompts))
        error_model = _fit_error_model(pipe, calls.detach(), final, prompts, generators, num_inference_steps, call_kwargs,
                                       fit_budget) if plans else None
    finally:
        recorder.detach()
        if calls is not None:
            calls.detach()
        if accel is not None:
            accel.enable()
    seconds = time.perf_counter() - started
    info = {**run_info(pipe, prompts, num_inference_steps, call_kwargs), "seeds": seeds, "seconds": round(seconds, 3)}
    calibration = recorder.calibration(type(pipe.scheduler).__name__, info)
    calibration.error_model = error_model
    if compute_budget is not None:
        spent = len(prompts) + (error_model.info["spent"] if error_model is not None else 0.0)
        calibration.info["compute_budget"] = compute_budget
        if error_model is not None:
            validate_plan(pipe, calibration, compute_budget=compute_budget - spent, **{k: v for k, v in call_kwargs.items() if k != "output_type"})
            spent += error_model.info["validation"]["spent"]
        calibration.info["spent"] = round(spent, 2)
    logger.info("faster_diffusion: calibrated %s in %.1fs", calibration.describe(), time.perf_counter() - started)
    return calibration


def _sampled(result) -> torch.Tensor:
    """What a pipeline call returned: its images (its latents, with ``output_type="latent"``), or a video pipeline's frames."""
    return result.images if hasattr(result, "images") else result.frames


def _loop_timesteps(recorded, scheduled) -> list[float]:
    """The scheduler's own timesteps where the recorded ones are them up to rounding (FluxPipeline passes t / 1000,
    read back times 1000), so that a run over the same timesteps matches the calibration exactly."""
    scheduled = [float(t) for t in scheduled]
    if len(recorded) == len(scheduled) and all(abs(r - s) <= 1e-4 * max(1.0, abs(s)) for r, s in zip(recorded, scheduled)):
        return scheduled
    return list(recorded)


#: A budgeted calibration (``compute_budget``) spends this share of what the stock run leaves on fitting the error
#: model, the rest on validating it on outputs.
FIT_SHARE = 0.5
#: The least ``compute_budget``: the stock run of one prompt, and a few teacher-forced steps, perturbed runs and probes.
MIN_COMPUTE_BUDGET = 4.0
#: Prompts a budgeted calibration runs: one per this many stock images of budget (at least one).
IMAGES_PER_PROMPT = 12.0


def check_compute_budget(compute_budget) -> float:
    """``compute_budget`` as a float, or the ValueError that names it and the accepted range."""
    if isinstance(compute_budget, bool) or not isinstance(compute_budget, (int, float)) or not math.isfinite(compute_budget) \
            or compute_budget < MIN_COMPUTE_BUDGET:
        raise ValueError(f"compute_budget={compute_budget!r} must be a number >= {MIN_COMPUTE_BUDGET:g} (stock images of "
                         "compute; None for the thorough calibration)")
    return float(compute_budget)


def budget_prompts(compute_budget: float, available: int) -> int:
    """How many of the ``available`` prompts a calibration of ``compute_budget`` stock images runs."""
    return max(1, min(available, int(compute_budget // IMAGES_PER_PROMPT)))


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _generator_factory(seeds, generator=None):
    """``make(copies)``: fresh generators for ``copies`` copies of the prompts, each starting as the run's:
    from ``seeds``, or from the states of a given ``generator`` (one, or one a prompt)."""
    if generator is None:
        return lambda copies: _generators(list(seeds) * copies)
    given = generator if isinstance(generator, list) else [generator]
    states = [(g.device, g.get_state()) for g in given]

    def make(copies):
        fresh = []
        for device, state in states * copies:
            g = torch.Generator(device=device)
            g.set_state(state)
            fresh.append(g)
        return fresh if isinstance(generator, list) or copies > 1 else fresh[0]

    return make


class _StockRun(BranchAwareHook):
    """Keeps every model call of the stock run the error model replays: its arguments, output and guidance branch,
    and how the pipeline guides (read from the pipeline call's own variables at its first model call)."""

    def __init__(self, pipe, family: DenoiserFamily, model):
        super().__init__()
        self.pipe, self.family, self.model = pipe, family, model
        self.calls, self.outputs, self.branches = [], [], []
        self.guidance, self.output_class = None, None
        add_hook(model, self, "faster_diffusion_calls")

    def pre_forward(self, module, *args, **kwargs):
        if not self.calls:
            self.guidance = self.family.guidance(self.pipe, _pipeline_locals(self.pipe))
        self.calls.append(self.family.bind_call(module, args, kwargs))
        self.branches.append(self.branch())
        return args, kwargs

    def post_forward(self, module, output):
        self.output_class = type(output)
        self.outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach())
        return output

    def steps(self) -> list[dict]:
        """The calls of each step: {branch: (call, output)} (one call a step: the branch is "")."""
        found = []
        for call, output, branch in zip(self.calls, self.outputs, self.branches):
            paired = self.guidance is not None and self.guidance.layout == "calls" and branch == self.guidance.second
            if paired and found:
                found[-1][branch] = (call, output)
            else:
                found.append({branch: (call, output)})
        return found

    def detach(self) -> "_StockRun":
        remove_hook(self.model, "faster_diffusion_calls")
        return self


def _pipeline_locals(pipe) -> dict:
    """The variables of ``pipe``'s ``__call__`` on the stack (how it guides: Flux's ``do_true_cfg``), or {}."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


@dataclass(frozen=True)
class Spending:
    """Where an error-model fit spends its compute: the full steps it teacher-forces (``starts``), the distances
    between the full steps its forecasts extrapolate from (``distances``), and the steps whose output it perturbs
    (``perturbed``). What lies between is interpolated (``_fill``): errors and sensitivities move smoothly with
    the step on a log scale, over decades (docs/calibration.md)."""

    starts: tuple[int, ...]
    distances: tuple[int, ...]
    perturbed: tuple[int, ...]

    @classmethod
    def thorough(cls, n: int) -> "Spending":
        return cls(tuple(range(n - 1)), tuple(range(1, MAX_RUN + 1)), tuple(range(1, n)))

    @classmethod
    def within(cls, budget: float, n: int, rows: int, fractions: dict, plain, forecasting) -> "Spending":
        """The most measured steps whose predicted cost fits ``budget`` stock images (``rows`` prompts a call;
        ``fractions``: each level's FLOPs over a full call's). The perturbed steps come first from the run's end,
        where the sensitivity grows fastest and a perturbed run is shortest, at Fibonacci distances; the
        teacher-forced starts are spread evenly, the first and last always among them."""
        perturbed, spent = [], 0.0
        for d in _fibonacci():
            i = n - 1 - d
            price = cls.perturbed_cost(i, n, rows, fractions[plain[-1]])
            if i < 1 or perturbed and spent + price > SENSITIVITY_SHARE * budget:
                break
            perturbed.append(i)
            spent += price
        distances = FORECAST_DISTANCES if forecasting else ()
        starts = (0, n - 2) if n > 2 else (0,)
        for k in range(3, n):
            more = tuple(sorted({int(a) for a in np.rint(np.linspace(0, n - 2, k))}))
            if spent + cls.starts_cost(more, n, rows, fractions, plain, forecasting, distances) > budget:
                break
            starts = more
        return cls(starts, distances, tuple(sorted(perturbed)))

    @staticmethod
    def starts_cost(starts, n: int, rows: int, fractions: dict, plain, forecasting, distances) -> float:
        """Stock images of teacher-forcing ``starts``: each level's full step and cheap steps, and a forecast's
        earlier full steps and cheap steps at each distance."""
        calls = 0.0
        for a in starts:
            cheap = min(MAX_RUN - 1, n - 1 - a)
            calls += len(plain) + cheap * sum(fractions[lv] for lv in plain)
            calls += sum(1 + cheap * sum(fractions[forecasting[lv]] for lv in forecasting) for m in distances if m <= a)
        return calls * rows / n

    @staticmethod
    def perturbed_cost(i: int, n: int, rows: int, fraction: float) -> float:
        """Stock images of one perturbed run from step ``i`` (the earlier steps replay the stock run's outputs),
        with the full step and cheap step that make its perturbation's direction."""
        return rows * ((n - i) + 1 + fraction) / n

    def cost(self, n: int, rows: int, fractions: dict, plain, forecasting) -> float:
        return self.starts_cost(self.starts, n, rows, fractions, plain, forecasting, self.distances) + sum(
            self.perturbed_cost(i, n, rows, fractions[plain[-1]]) for i in self.perturbed)


#: A budgeted fit's share of its budget for the perturbed runs (the rest teacher-forces).
SENSITIVITY_SHARE = 0.4
#: A budgeted fit's forecast distances (m: full steps a - m and a); the others are interpolated.
FORECAST_DISTANCES = (1, 2, 4)


def _fibonacci():
    """0, then 1, 2, 3, 5, 8, 13, ... (distances from the run's last step)."""
    yield 0
    a, b = 1, 2
    while True:
        yield a
        a, b = b, a + b


def _fill(values: np.ndarray, measured, valid: np.ndarray) -> np.ndarray:
    """``values`` along its first axis, the entries of rows not in ``measured`` interpolated between the measured
    rows' finite entries (linearly in log: errors and sensitivities span decades), the nearest measured row's
    past the ends; entries not ``valid`` (beyond the run) are nan."""
    measured = np.asarray(sorted(measured))
    if len(measured) == values.shape[0]:
        return np.where(valid, values, np.nan)
    flat = values.reshape(values.shape[0], -1)
    filled = np.full_like(flat, np.nan)
    floor = 1e-30
    for c in range(flat.shape[1]):
        rows = measured[np.isfinite(flat[measured, c])]
        if rows.size:
            filled[:, c] = np.exp(np.interp(np.arange(len(flat)), rows, np.log(np.maximum(flat[rows, c], floor))))
            filled[rows, c] = flat[rows, c]  # exact where measured (a measured 0 stays 0)
    return np.where(valid, filled.reshape(values.shape), np.nan)


class _ReplayedPrefix(ModelHook):
    """Hands the pipeline the stock run's model outputs for its first ``until`` calls, for ``copies`` copies of the
    prompts: a run perturbed from a later step on computes nothing before it."""

    def __init__(self, stock: _StockRun, copies: int, until: int):
        super().__init__()
        self.stock, self.copies, self.until, self.calls = stock, copies, until, 0
        guidance = stock.guidance
        self.halves = 2 if guidance is not None and guidance.layout == "halves" else 1

    def new_forward(self, module, *args, **kwargs):
        i, self.calls = self.calls, self.calls + 1
        if i >= self.until:
            return self.fn_ref.original_forward(*args, **kwargs)
        parts = self.stock.outputs[i].chunk(self.halves)  # [unconditional, conditional] rows under guidance
        sample = torch.cat([part.repeat(self.copies, *[1] * (part.ndim - 1)) for part in parts])
        return_dict = self.stock.family.bind_call(module, args, kwargs)["return_dict"]
        return self.stock.output_class(sample=sample) if return_dict else (sample,)


@torch.no_grad()
def _fit_error_model(pipe, recorded: _StockRun, final, prompts, generators, num_steps, call_kwargs, budget=None) -> ErrorModel:
    """The error model of plans from the stock run ``recorded``: thorough (every step), or within ``budget`` stock
    images (``Spending.within``)."""
    started = time.perf_counter()
    family, model, guidance = recorded.family, recorded.model, recorded.guidance
    if getattr(pipe, "do_classifier_free_guidance", False) and guidance is None:
        raise ValueError(f"plans=True: {type(pipe).__name__} guides on more than [unconditional, conditional] rows; "
                         "fit the error model of plans with the model's text-to-image pipeline")
    steps_calls = recorded.steps()
    n = len(steps_calls)
    steps = len(pipe.scheduler.timesteps)  # the loop's steps (PNDM's are one more than num_inference_steps)
    if n != steps:
        raise RuntimeError(f"faster_diffusion: the stock run made {n} model steps in {steps} sampler steps; plans need one a step")

    def prediction(outputs: dict) -> torch.Tensor:
        """What the sampler reads from a step's outputs ({branch: output}): the guided prediction."""
        outputs = {branch: family.prediction(model, output) for branch, output in outputs.items()}
        if guidance is None:  # one call a step (its branch is "", or Flux's "cond" without a negative prompt)
            (output,) = outputs.values()
            return output
        return guidance.combine(outputs)

    stock = [prediction({branch: output for branch, (_, output) in step.items()}) for step in steps_calls]
    levels = [lv for lv in family.supported_levels(model, guided=guidance is not None) if lv != FULL]
    plain = [lv for lv in levels if lv not in FORECASTING]
    forecasting = {lv: FORECASTING[lv] for lv in levels if lv in FORECASTING}
    # 1. every level, teacher-forced on the stock run's inputs: step a + 1 + k on full step a's features (and, at a
    # conditional-only level, full step a's guidance difference)
    error = {lv: np.full((n, MAX_RUN - 1), np.nan) for lv in plain}
    # a forecasting level: at weight 0 it is the level it forecasts, at weight 1 a linear extrapolation from full
    # steps a - m and a; its output is nearly linear in the weight, so these moments of the error at weight 0 (e)
    # and of the change to weight 1 (d) give the error at any weight: (mean e^2, mean e.d, mean d^2)
    moments = {lv: np.full((n, MAX_RUN - 1, MAX_RUN, 3), np.nan) for lv in forecasting}
    directions = {}  # step -> the error of the least computed level (deep_cfg where guided) two steps after a full step
    mode = StepMode(keep_decoder=True, guidance=guidance)
    hooks = family.add_hooks(model, mode, RECORDER_HOOK)
    hooks_changed(model)
    forecast = next((hook for _, hook in hooks if hook.forecasts), None)
    kept = {}  # full step -> (the forecast site's kept features, the guidance difference, its outputs)

    def run(level, a, j):
        """The guided prediction of step j at ``level`` after full step a (j == a: the full step itself)."""
        if level == OUTPUT and j > a:  # no model call: full step a's outputs again
            return prediction(kept[a][2])
        conditional = j > a and level in CONDITIONAL_ONLY
        outputs = {}
        for branch, (call, _) in steps_calls[j].items():
            if conditional and guidance.layout == "calls" and branch == guidance.second:
                continue  # the step's unconditional call is not made
            latent = family.latent(call)
            rows = latent.shape[0] * family.rows_inside(model, latent)
            if conditional and guidance.layout == "halves":
                call, rows = guidance.cond_half(call, rows), rows // 2
            mode.active, mode.level, mode.rows, mode.group_size = True, FULL if j == a else level, rows, 1
            mode.step, mode.branch = j, branch
            outputs[branch] = model(**{**call, "return_dict": False})[0]
        if j == a and a not in kept:  # (every level's full step a computes the same)
            difference = guidance.difference_of(outputs) if guidance is not None else None
            kept[a] = (forecast.snapshot() if forecast is not None else None, difference, outputs)
        if conditional:
            difference = kept[a][1]
            if level in FORECASTING:  # extrapolated like the features
                difference = difference + forecast.forecast_coefficient() * (difference - kept[forecast.history[0][0]][1])
            outputs = guidance.with_reused(outputs, difference)
        return prediction(outputs)

    try:
        # each level's FLOPs over a full step's: what a budget buys
        full_flops = count_flops(lambda: run(FULL, 0, 0))
        fractions = {lv: count_flops(lambda lv=lv: run(lv, 0, 1)) / full_flops for lv in plain}
        kept.clear()
        spending = Spending.thorough(n) if budget is None else Spending.within(budget, n, len(prompts), fractions, plain, forecasting)
        for a in spending.starts:
            kept = {s: v for s, v in kept.items() if s >= a - MAX_RUN}
            for m in spending.distances:  # the earlier full steps a forecast extrapolates from
                if m <= a and a - m not in kept:
                    run(FULL, a - m, a - m)
            replayed = {}  # (level, j) -> output, for the forecasting levels
            for level in plain:
                for j in range(a, min(n, a + MAX_RUN)):
                    output = run(level, a, j)
                    if j > a:
                        difference = output - stock[j]
                        error[level][a, j - a - 1] = float(difference.pow(2).mean())
                        replayed[level, j] = output
                        if level == plain[-1] and (j - a == 2 or j == 1):
                            directions[j] = difference
            for level in moments:
                for m in (m for m in spending.distances if m <= min(a, MAX_RUN)):
                    forecast.set_history([(a - m, kept[a - m][0]), (a, kept[a][0])])
                    for j in range(a + 1, min(n, a + MAX_RUN)):
                        before = replayed[forecasting[level], j]
                        e, d = before - stock[j], run(level, a, j) - before
                        moments[level][a, j - a - 1, m - 1] = [float((e * e).mean()), float((e * d).mean()), float((d * d).mean())]
                forecast.set_history([])
        for i in spending.perturbed:  # the direction of a perturbed step the teacher-forcing did not reach
            if i not in directions:
                a = max(0, i - 2)
                run(FULL, a, a)
                directions[i] = run(plain[-1], a, i) - stock[i]
    finally:
        mode.active = False
        for module, _ in hooks:
            remove_hook(module, RECORDER_HOOK)
        hooks_changed(model)
    # what lies beyond the run (a + 1 + k >= n), or before it for a forecast (m > a), stays nan
    a_, k_, m_ = np.ogrid[:n, : MAX_RUN - 1, 1 : MAX_RUN + 1]
    within = a_ + 1 + k_ < n
    forecast_weight = {}
    for level, (ee, ed, dd) in ((lv, np.moveaxis(mo, -1, 0)) for lv, mo in moments.items()):
        # the weight of least error over every full step, per distance m and step k: argmin of ee + 2 w ed + w^2 dd
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = -np.nansum(ed, axis=0) / np.nansum(dd, axis=0)  # (k, m - 1)
        weight = np.clip(np.nan_to_num(weight, nan=1.0, posinf=1.0, neginf=0.0), 0.0, 2.0)
        weight[np.isnan(ee).all(axis=0)] = 0.0  # never measured (a budget's few starts): it replays like its level
        if len(spending.distances) < MAX_RUN:  # the distances not measured take the nearest measured one's weights
            measured = np.asarray(spending.distances) - 1
            nearest_distance = measured[np.abs(np.arange(MAX_RUN)[:, None] - measured[None, :]).argmin(axis=1)]
            weight = weight[:, nearest_distance]
        fitted = np.maximum(ee + 2 * weight * ed + weight**2 * dd, 0.0)  # (a, k, m - 1), at the measured (a, m)
        by_distance = _fill(np.moveaxis(fitted, 2, 0), np.asarray(spending.distances) - 1, np.moveaxis(m_ <= a_, 2, 0))
        error[level] = _fill(np.moveaxis(by_distance, 0, 2), spending.starts, within & (m_ <= a_))
        forecast_weight[level] = weight.T  # [m - 1, k]
    for level in plain:
        error[level] = _fill(error[level], spending.starts, within[..., 0])
    for level, base in forecasting.items():  # what no start measured: the error of the level it then replays like
        unknown = np.isnan(error[level]) & within & (m_ <= a_)
        error[level][unknown] = np.broadcast_to(error[base][..., None], unknown.shape)[unknown]
    # 2. sensitivity: the final latent's squared change per squared change of one step's output, several steps
    # a pipeline call (one copy of the prompts each). The change is a small multiple of a real reuse error:
    # later steps wash random noise out, but not an error shaped like the image.
    sensitivity = np.full(n, np.nan)  # (step 0 is 0: a plan's first step is full)
    copies = max(1, 40 // len(prompts)) if budget is None else 1  # steps far apart are best perturbed one a run
    calls_a_step = len(recorded.calls) // n
    scheduler = pipe.scheduler
    perturbed = list(spending.perturbed)
    for first in range(0, len(perturbed), copies):
        targets = perturbed[first : first + copies]
        count = {"step": 0}
        deltas = {}
        step = scheduler.step

        def perturbed_step(model_output, timestep, sample, *args, **kwargs):
            i = count["step"]
            count["step"] += 1
            if i in targets:
                rows = len(prompts)
                k = targets.index(i)
                direction = directions[i]
                scale = PERTURBATION * stock[i].pow(2).mean().sqrt() / direction.pow(2).mean().sqrt().clamp_min(1e-12)
                delta = (scale * direction).to(model_output)
                deltas[i] = float(delta.float().pow(2).mean())
                model_output = model_output.clone()
                model_output[k * rows : (k + 1) * rows] += delta
            return step(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = perturbed_step
        add_hook(model, _ReplayedPrefix(recorded, len(targets), calls_a_step * min(targets)), RECORDER_HOOK)
        try:
            latents = _sampled(pipe(prompts * len(targets), num_inference_steps=num_steps, generator=generators(len(targets)), **call_kwargs))
        finally:
            del scheduler.step
            remove_hook(model, RECORDER_HOOK)
        for k, i in enumerate(targets):
            change = float((latents[k * len(prompts) : (k + 1) * len(prompts)].float() - final.float()).pow(2).mean())
            sensitivity[i] = change / deltas[i] if deltas.get(i) else 0.0
    sensitivity = _fill(sensitivity, perturbed, np.ones(n, bool))
    sensitivity[0] = 0.0
    info = {"guidance_scale": guidance.scale if guidance is not None else None, "perturbation": PERTURBATION, "seconds": round(time.perf_counter() - started, 1),
            "flop_fractions": {lv: round(f, 4) for lv, f in fractions.items()}}
    if budget is not None:
        info["spending"] = {"starts": list(spending.starts), "distances": list(spending.distances), "perturbed": perturbed}
    # (with the calls that measured the fractions)
    info["spent"] = round(spending.cost(n, len(prompts), fractions, plain, forecasting) + len(prompts) * (1 + sum(fractions.values())) / n, 2)
    error_model = ErrorModel(error, sensitivity, float(final.float().pow(2).mean()), info=info, forecast_weight=forecast_weight)
    return ErrorModel.from_dict(error_model.to_dict())  # what its file will hold: a loaded model picks the same plans


def uniform_probe(level: str, length: int, n: int) -> list[str]:
    """A plan of ``n`` steps: a full step every ``length`` steps, ``level`` between. A forecasting level's starts
    with one more full step, so that every segment of this length has two full steps to extrapolate from."""
    first = 1 if level in FORECASTING else 0
    return [FULL] * first + [FULL if i % length == 0 else level for i in range(n - first)]


def validate_plan(pipe, calibration: Calibration, prompts=None, seeds=None, min_snr_db: float = DEFAULT_PLAN_SNR_DB,
                  iterations: int = 8, compute_budget: float | None = None, **call_kwargs):
    """Scales the error model of plans to what outputs show, and checks ``plan="auto"`` on them.

    First, for each level and each segment length m, a uniform plan (a full step every m steps, the others
    at that level) sets ``level_correction[level][m - 2]`` to its measured / predicted final-latent error.
    Then it runs the plan ``auto`` picks on this device, sets ``correction`` to measured / predicted and
    picks again, until the pick no longer changes and its measured signal-to-error ratio is at least
    ``min_snr_db``; a plan measured below it stays predicted below it (``report["converged"]`` says whether
    the last pick was measured and met it). With forecasting levels, the same first for the plans without
    them at ``min_snr_db - FORECAST_MARGIN_DB``: ``plain_correction``, for a model that drops them.
    ``prompts`` / ``seeds`` default to the calibration's.

    ``compute_budget`` (stock images, as ``calibrate``'s) caps the runs: the probes cover the lengths of
    ``PROBE_LENGTHS`` (the others' corrections interpolated), the picks are costed by the fit's FLOP fractions
    instead of a cost model timed here, and the iterations stop when the next run would not fit.
    Returns ``(plan letters, report)``; ``report["spent"]``: the stock images the runs cost."""
    model = calibration.error_model
    if model is None:
        raise ValueError("calibration has no error model: make it with faster_diffusion.calibrate(..., plans=True)")
    if compute_budget is not None:
        if isinstance(compute_budget, bool) or not isinstance(compute_budget, (int, float)) or not compute_budget >= 0:
            raise ValueError(f"compute_budget={compute_budget!r} must be a number >= 0 (stock images of compute)")
        compute_budget = float(compute_budget)  # (what a budgeted calibrate leaves it may be below MIN_COMPUTE_BUDGET)
        fractions = model.info.get("flop_fractions")
        if not fractions:
            raise ValueError("compute_budget: this error model has no flop_fractions (fitted before budgets); recalibrate it")
    prompts = calibration.info.get("prompts") if prompts is None else prompts
    seeds = calibration.info.get("seeds", list(range(len(prompts)))) if seeds is None else list(seeds)
    model.target_snr_db, model.correction, model.level_correction = min_snr_db, 1.0, {}
    n = calibration.num_steps
    started = time.perf_counter()
    tried, spent = [], 0.0
    budgeted = compute_budget is not None
    cost = _flop_cost_model(fractions) if budgeted else None

    def price(plan) -> float:
        """Stock images of one run of ``plan`` (None: stock) on the prompts (a budgeted validation's)."""
        return len(prompts) * cost.plan_flops([FULL] * n if plan is None else plan) / n

    def affordable(plan) -> bool:
        return not budgeted or spent + price(plan) <= compute_budget

    with _final_latents(pipe, _pipeline_steps(calibration), prompts, seeds, call_kwargs, calibration) as final_latents:
        stock = final_latents(None).float()
        spent += price(None) if budgeted else 0.0

        def measure(plan):
            nonlocal spent
            latents, accel = final_latents(plan, keep=True)
            if budgeted:  # (only explicit plans: a budgeted validation picks with its own cost model)
                spent += price(plan)
            error = float((latents.float() - stock).pow(2).mean())
            return error, accel

        lengths = range(2, model.max_run + 1) if not budgeted else [m for m in PROBE_LENGTHS if m <= model.max_run]
        probed = {level: {} for level in model.error}
        for level in model.error:
            model.level_correction[level] = [1.0] * (model.max_run - 1)
        # length by length (a budget probes the first of PROBE_LENGTHS for every level before the next)
        for length in lengths:
            for level in model.error:
                probe = uniform_probe(level, length, n)
                if budgeted and spent + price(probe) > PROBE_SHARE * compute_budget:
                    continue  # (the rest is for the plans auto picks)
                measured, _ = measure(probe)
                # the probe's segments of this length take what its shorter last segment (corrected) leaves
                errors = [(m == length, model.segment_error(a, m, lv, gap)) for a, m, lv, gap in segment_gaps(probe)]
                of_length = sum(e for same, e in errors if same)
                rest = sum(e for same, e in errors if not same)
                # (where the other segments alone are predicted to err more than the probe measured, the
                # prediction stays uncorrected, and pessimistic)
                corrected = of_length > 0 and measured > rest
                if corrected:
                    model.level_correction[level][length - 2] = probed[level][length] = (measured - rest) / of_length
                predicted = model.predicted_error(probe)
                tried.append({"plan": plan_letters(probe), "snr_db": round(model.snr_db(measured), 2),
                              "predicted_snr_db": round(model.snr_db(predicted), 2), "corrected": corrected})
        for level, by_length in probed.items():
            if budgeted and by_length:  # the lengths not probed: interpolated, the nearest probed one's past the ends
                known = sorted(by_length)
                model.level_correction[level][:] = [
                    float(c) for c in np.interp(np.arange(2, model.max_run + 1), known, [by_length[m] for m in known])]
        if not budgeted:
            _, accel = measure("auto")  # this device's cost model, measured by the planner's first call
            cost = next(iter(accel.cost_models.values()))

        def settle(levels, target: float) -> bool:
            """Scales ``model.correction`` until the plan auto picks among ``levels`` measures at least ``target``
            and is picked again; a plan measured below it stays predicted below it. Returns whether it settled."""
            model.target_snr_db, floor = target, 0.0
            least_error = model.signal / 10 ** (target / 10)  # the error at the target
            for _ in range(iterations):
                pick = choose(AutoPlan(), model, cost, levels=levels).levels
                if not affordable(pick):
                    return False
                measured, _ = measure(pick)
                predicted = model.predicted_error(pick)
                raw = predicted / model.correction
                passed = model.snr_db(measured) >= target
                tried.append({"plan": plan_letters(pick), "snr_db": round(model.snr_db(measured), 2),
                              "predicted_snr_db": round(model.snr_db(predicted), 2)})
                if not passed and raw > 0:  # from now on predicted to miss the target
                    floor = max(floor, 1.0001 * least_error / raw)
                if raw > 0 and measured > 0:
                    # after a miss the correction only rises: a plan one segment from the missed one misses alike,
                    # and lowering the correction again made the picks oscillate between such plans
                    model.correction = max(measured / raw, floor, model.correction if floor else 0.0)
                if passed and choose(AutoPlan(), model, cost, levels=levels).levels == pick:
                    return True
            return False

        plain_converged = None
        if any(level in FORECASTING for level in model.error) and not budgeted:  # what a model without them (resampled) is corrected by
            plain_converged = settle([lv for lv in CHEAP_LEVELS if lv not in FORECASTING], min_snr_db - FORECAST_MARGIN_DB)
            model.plain_correction, model.correction = model.correction, 1.0
        converged = settle(CHEAP_LEVELS, min_snr_db)
        if budgeted and model.plain_correction is None and any(level in FORECASTING for level in model.error):
            model.plain_correction = model.correction  # (not measured apart within a budget)
    plan = plan_letters(choose(AutoPlan(), model, cost).levels)  # what auto picks from now on
    corrections = {level: [round(c, 4) for c in by_length] for level, by_length in model.level_correction.items()}
    report = {"min_snr_db": min_snr_db, "level_correction": corrections, "correction": model.correction,
              "plain_correction": model.plain_correction, "plain_converged": plain_converged, "tried": tried,
              "plan": plan, "converged": converged, "seconds": round(time.perf_counter() - started, 1),
              "prompts": list(prompts), "seeds": seeds}  # fmt: skip
    if budgeted:
        report.update(compute_budget=compute_budget, spent=round(spent, 2))
    model.info["validation"] = report
    return plan, report


#: The segment lengths a budgeted validation probes (each level's uniform plan of that interval), in this order, while
#: the probes have spent at most ``PROBE_SHARE`` of its budget; the rest checks the plans auto picks.
PROBE_LENGTHS = (4, 2)
PROBE_SHARE = 0.6


def _flop_cost_model(fractions: dict) -> CostModel:
    """A cost model in full calls from each level's FLOP fraction (``ErrorModel.info["flop_fractions"]``): a
    compute-bound device's costs, which a budgeted validation plans with instead of timing this device."""
    level = {lv: float(f) for lv, f in fractions.items()}
    level.update({lv: level[base] for lv, base in FORECASTING.items() if base in level})
    groups = {g: 1.0 + (g - 1) * level[ENCODER] for g in (1, 2, 4, 8)} if ENCODER in level else {1: 1.0, 2: 2.0}
    return CostModel(full=groups, level=level, step_overhead=0.0, call_overhead=0.0, flops={FULL: 1.0, **level},
                     info={"predicted": "FLOP fractions of the error model's fit"})


def refine(pipe, calibration: Calibration, budget: int, prompts, seeds=None, sweeps: int = 3, moves=(-2, -1, 1, 2), **call_kwargs):
    """Improves the least-reuse-cost schedule of ``budget`` passes by a local search on the outputs, and
    stores the result in ``calibration.refined[budget]`` (so ``key_steps=f"auto:{budget}"`` uses it).
    An accelerator on ``pipe`` is paused meanwhile.

    Starting from the least-reuse-cost schedule, each sweep tries moving every key but step 0 by each
    of ``moves`` and keeps a move when it lowers the mean squared distance of the final latents to
    the stock run's on ``prompts`` (generator seeds ``seeds``, default 0, 1, ...). Returns
    ``(key_steps, report)``; the report lists the distance before and after.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    started = time.perf_counter()
    with _final_latents(pipe, _pipeline_steps(calibration), prompts, seeds, call_kwargs) as final_latents:
        keys, best, start, evaluations, initial = _local_search(calibration, budget, final_latents, sweeps, moves)
    calibration.refined[budget] = keys
    report = {
        "budget": budget,
        "initial_key_steps": initial,
        "key_steps": keys,
        "latent_mse_before": start,
        "latent_mse_after": best,
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - started, 1),
        "prompts": prompts,
        "seeds": seeds,
    }
    calibration.info.setdefault("refinement", {})[str(budget)] = report
    return keys, report


def validate(pipe, calibration: Calibration, prompts, seeds=None, min_snr_db: float = MIN_OUTPUT_SNR_DB, **call_kwargs):
    """Checks ``key_steps="auto"`` on outputs and adds encoder passes until it keeps them.

    The tolerance picks a schedule from how the encoder features move, but how much the images
    move also depends on the sampler: UniPC's corrector, for one, amplifies what reused features
    change in the last steps. From the tolerance's schedule, this tries each next budget's
    least-reuse-cost schedule until the final latents on ``prompts`` (generator seeds ``seeds``,
    default 0, 1, ...) are within ``min_snr_db`` of the stock run's: 10 log10(|stock|^2 / |run -
    stock|^2). Stores it in ``calibration.validated``, which ``key_steps="auto"`` then uses.
    An accelerator on ``pipe`` is paused meanwhile. Returns ``(key_steps, report)``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    n = calibration.num_steps
    initial = calibration.schedule(tolerance=DEFAULT_TOLERANCE)  # not an earlier validation's
    started = time.perf_counter()
    tried = {}  # budget -> SNR (dB); None: every step a key, the stock run itself
    with _final_latents(pipe, _pipeline_steps(calibration), prompts, seeds, call_kwargs) as final_latents:
        stock = final_latents(None)
        signal = float(stock.pow(2).mean())
        for budget in range(len(initial), n + 1):
            keys = calibration.least_cost_schedule(budget)
            if budget == n:
                tried[budget] = None
                break
            error = float((final_latents(keys) - stock).pow(2).mean())
            tried[budget] = round(float(10 * np.log10(signal / error)), 2) if error > 0 else None
            if tried[budget] is None or tried[budget] >= min_snr_db:
                break
    calibration.validated = keys
    report = {"min_snr_db": min_snr_db, "initial_key_steps": initial, "key_steps": keys, "snr_db": tried,
              "seconds": round(time.perf_counter() - started, 1), "prompts": prompts, "seeds": seeds}  # fmt: skip
    calibration.info["validation"] = report
    return keys, report


def _pipeline_steps(calibration: Calibration) -> int:
    """The ``num_inference_steps`` that gives the calibrated run (PNDM's loop has one step more)."""
    return int(calibration.info.get("num_inference_steps", calibration.num_steps))


@contextlib.contextmanager
def _final_latents(pipe, num_steps: int, prompts, seeds, call_kwargs, calibration=None):
    """Yields ``final_latents(schedule)``: the final latents of ``prompts`` accelerated with those key
    steps (parallel, no noise injection), with ``"auto"``: the plan auto picks from ``calibration``, or
    stock for None. An accelerator on ``pipe`` is paused meanwhile and put back afterwards."""
    from . import disable, enable  # the package's public API; imported here to avoid a cycle

    call_kwargs = {"output_type": "latent", **call_kwargs}
    accel = None

    def final_latents(schedule, keep=False):
        nonlocal accel
        if schedule is None:
            disable(pipe)
        elif isinstance(schedule, str) or schedule and isinstance(schedule[0], str):  # a plan
            # one accelerator for every plan run, so that its cost model is measured once
            accel = accel or enable(pipe, plan="auto", calibration=calibration)
            accel.set_params(plan=schedule)
            accel.enable()
        else:
            enable(pipe, key_steps=schedule, parallel=True, noise_injection=0.0)
        try:
            latents = _sampled(pipe(prompts, num_inference_steps=num_steps, generator=_generators(seeds), **call_kwargs))
            return (latents, accel) if keep else latents
        finally:
            disable(pipe)

    previous = getattr(family_of(pipe)[1], "_faster_diffusion", None)  # put back afterwards
    try:
        yield final_latents
    finally:
        if previous is not None:
            previous.enable()


def _local_search(calibration: Calibration, budget: int, final_latents, sweeps: int, moves):
    """Moves keys while the final latents get closer to the stock run's; returns
    (keys, distance, starting distance, evaluations, starting keys)."""
    n = calibration.num_steps
    stock = final_latents(None)
    keys = initial = calibration.least_cost_schedule(budget)

    def distance(candidate):
        return float((final_latents(candidate) - stock).pow(2).mean())

    best = start = distance(keys)
    evaluations = 1
    for _ in range(sweeps):
        improved = False
        for position in range(1, len(keys)):
            for move in moves:
                moved = keys[position] + move  # may pass a neighbour; the candidate is re-sorted
                if not 0 < moved < n or moved in keys:
                    continue
                candidate = sorted(keys[:position] + [moved] + keys[position + 1 :])
                value = distance(candidate)
                evaluations += 1
                if value < best:
                    keys, best, improved = candidate, value, True
        if not improved:
            break
    return keys, best, start, evaluations, initial
