"""Plans: the level of reuse of every sampling step, chosen per model, sampler, size, batch and device.

A plan gives each step one of ``unet_split.LEVELS`` (full, encoder, shallow, deep, deep_cfg). ``plan="auto"``
and ``plan="auto:T"`` are chosen here from two models:

- ``ErrorModel`` (fitted by ``faster_diffusion.calibrate`` on a stock run, stored in the calibration
  JSON): ``error[level][a, k]`` is the mean squared error of the guided model output at step
  ``a + 1 + k`` when that step runs at ``level`` on the features of a full step ``a`` (teacher-forced:
  the stock run's own inputs), and ``sensitivity[j]`` how much of an error in step ``j``'s output
  reaches the final latent (measured by perturbing that output in real runs of the pipeline). So the
  reuse error is measured where it lands, on the output, not where the features move most.
- ``CostModel`` (measured on this device at the run's batch and size, by the accelerator): seconds
  and FLOPs of a UNet call at each level, of a full step batched with ``g`` encoder-propagated
  decoders, of a step's work outside the UNet, and of the call's work outside the loop (prompt
  encoding, VAE decode): a speed-up is of the whole call, as a user times it.

A plan is a sequence of *segments*: a full step followed by steps of one cheaper level, which reuse
that full step's features. A segment's predicted final-latent error adds its steps' errors
coherently (they share one stale cache), segments add independently; ``correction`` scales it to
what validation on outputs measured. ``frontier`` finds, by dynamic programming over the segments,
the least-error plan for every predicted cost, exactly for this model.

A plan's *cost* is the larger of two predictions: its time on this device, and its time on a
compute-bound device, where each call takes its share of a full call's FLOPs. "T times faster" means
both. An idle device runs small batched decoder calls almost for free, so encoder-propagated groups
time well at batch 1; once the device is busy (larger batches or images, other requests) a call costs
its FLOPs, and a plan chosen on idle timings loses (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .family import OUTPUT
from .unet_split import (
    CONDITIONAL_ONLY,
    DEEP,
    DEEP_CFG,
    DEEP_CFG_FORECAST,
    DEEP_FORECAST,
    ENCODER,
    FORECASTING,
    FULL,
    LEVEL_LETTERS,
    LEVELS,
    SHALLOW,
)

#: ``plan="auto"``: the cheapest plan (``CostModel.plan_cost``) whose predicted final-latent
#: signal-to-error ratio is at least this (dB, after validation's correction). Chosen on the bundled
#: model (docs/benchmarks.md): at this bar DDIM-50's images stay above 42 dB PSNR from stock's (bench/peers.py:
#: 42.4 dB on 24 images, 42.6 on 200; the quality harness: 42.3 on its 200; at 33 dB, 43.7 dB at 5% less speed).
DEFAULT_PLAN_SNR_DB = 36.0
#: Plans without the forecasting levels keep this much less final-latent SNR for the same images (forecast errors
#: cost more image PSNR per dB): 31.5 dB kept DDIM-50's plans of full, deep and deep_cfg steps at 42.1-42.6 dB
#: (8b2c1b9). A model that drops the forecasting levels (``ErrorModel.resampled``) targets it.
FORECAST_MARGIN_DB = 4.5
#: The longest segment the error model covers (a full step and up to MAX_RUN - 1 cheaper ones).
MAX_RUN = 8
CHEAP_LEVELS = (ENCODER, SHALLOW, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST, OUTPUT)  # from most to least computed
#: Levels after whose segment a forecasting level has two full steps to extrapolate from (a full step alone, or
#: followed by steps that leave the forecast module's kept outputs alone); shallow and encoder steps recompute it.
KEEPS_FORECAST_HISTORY = (FULL, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST, OUTPUT)
ACCEPTED_PLANS = (
    "'auto', 'auto:T' with T a number > 1 (the most faithful plan predicted to be at least T times faster "
    "than stock, in time on this device and in FLOPs), or one level a step: a string of F/E/S/D/X/C/Y/O letters "
    "(full, encoder, shallow, deep, deep_forecast, deep_cfg, deep_cfg_forecast, output) or a list of level names, "
    "starting with a full step"
)


_LETTERS = {level: letter for letter, level in LEVEL_LETTERS.items()}


@dataclass(frozen=True)
class AutoPlan:
    """``plan="auto"`` (``speedup`` None) or ``"auto:T"``."""

    speedup: float | None = None

    def __str__(self) -> str:
        return "auto" if self.speedup is None else f"auto:{self.speedup:g}"


def parse_plan(spec) -> AutoPlan | tuple[str, ...]:
    """Checks a plan spec: returns ``AutoPlan`` or the tuple of per-step levels. Raises ``ValueError``
    naming the field and the accepted forms."""
    if isinstance(spec, str) and spec.strip().lower().startswith("auto"):
        text = spec.strip().lower()
        if text == "auto":
            return AutoPlan()
        head, _, value = text.partition(":")
        try:
            speedup = float(value) if head == "auto" else float("nan")
        except ValueError:
            speedup = float("nan")
        if not speedup > 1 or not np.isfinite(speedup):
            raise ValueError(f"plan={spec!r}: T in 'auto:T' must be a number > 1; accepted: {ACCEPTED_PLANS}")
        return AutoPlan(speedup)
    if isinstance(spec, str):
        letters = spec.strip().upper()
        if not letters or any(c not in LEVEL_LETTERS for c in letters):
            raise ValueError(f"plan={spec!r} is not a plan; accepted: {ACCEPTED_PLANS}")
        levels = tuple(LEVEL_LETTERS[c] for c in letters)
    elif isinstance(spec, Sequence) and spec and all(isinstance(x, str) for x in spec):
        levels = tuple(LEVEL_LETTERS.get(x.upper(), x.lower()) if len(x) == 1 else x.lower() for x in spec)
        unknown = sorted({x for x in levels if x not in LEVELS})
        if unknown:
            raise ValueError(f"plan={list(spec)!r}: unknown levels {unknown}; accepted: {ACCEPTED_PLANS}")
    else:
        raise ValueError(f"plan={spec!r} is not a plan; accepted: {ACCEPTED_PLANS}")
    if levels[0] != FULL:
        raise ValueError(f"plan={spec!r}: step 0 must be a full step (every other level reuses an earlier step's features)")
    return levels


def check_levels(levels, num_steps: int, guided: bool) -> None:
    """Fails, naming ``plan``, on explicit levels a run of ``num_steps`` steps cannot take: one level a loop step,
    and conditional-only levels only with guidance on [unconditional, conditional] rows."""
    if len(levels) != num_steps:
        raise ValueError(f"plan={plan_letters(levels)!r} has {len(levels)} levels; the run has {num_steps} steps (one level a "
                         "loop step: img2img and inpainting run int(num_inference_steps x strength) of them)")
    unguided = sorted(set(levels) & set(CONDITIONAL_ONLY))
    if unguided and not guided:
        raise ValueError(f"plan: levels {unguided} reuse the guidance difference and need classifier-free guidance on "
                         "[unconditional, conditional] rows (a text-to-image, img2img, inpainting or ControlNet pipeline "
                         "called with guidance_scale > 1), or in a call per branch (FluxPipeline with true_cfg_scale > 1 "
                         "and a negative prompt)")


def plan_letters(levels) -> str:
    """A plan as a string of level letters, e.g. ``FDDFCC``."""
    return "".join(_LETTERS[level] for level in levels)


def decoder_groups(levels, parallel: bool = True, max_parallel: int | None = None) -> list[list[int]]:
    """The UNet calls of a plan: each a list of steps whose decoders run together. A full or encoder step
    opens a group that takes the encoder-propagated steps after it (they do not read the current latent);
    shallow and deep steps read it, so they run alone."""
    groups, n, i = [], len(levels), 0
    while i < n:
        steps = [i]
        if parallel and levels[i] in (FULL, ENCODER):
            limit = n if max_parallel is None else min(n, i + max_parallel)
            while steps[-1] + 1 < limit and levels[steps[-1] + 1] == ENCODER:
                steps.append(steps[-1] + 1)
        groups.append(steps)
        i = steps[-1] + 1
    return groups


@dataclass
class ErrorModel:
    """Predicted final-latent error of a plan, from a stock run (see the module docstring)."""

    # level -> (steps, MAX_RUN - 1): error of step a + 1 + k on full step a's features; a forecasting level's has a
    # third axis, m - 1: extrapolated from full steps a - m and a
    error: dict[str, np.ndarray]
    sensitivity: np.ndarray  # (steps,): final-latent squared change per squared change of a step's output
    signal: float  # mean square of the stock final latent
    # measured / predicted final-latent error on outputs (``validate_plan``): per level and segment length
    # (item ``length - 2``), from uniform plans of that level and interval, and overall, from the plans
    # "auto" picked. Errors compound over a segment more than the teacher-forced errors show (encoder steps
    # ignore the current latent; long deep segments drift), so a length's correction keeps the search from
    # favouring segments whose error the model underrates.
    level_correction: dict[str, list[float]] = field(default_factory=dict)
    correction: float = 1.0
    target_snr_db: float = DEFAULT_PLAN_SNR_DB  # what plan="auto" keeps
    info: dict = field(default_factory=dict)
    # forecasting level -> (MAX_RUN, MAX_RUN - 1): the weight of the extrapolation at step k + 1 past a full step
    # m steps after the one before (item [m - 1, k]), fitted by the calibration to the stock outputs
    forecast_weight: dict[str, np.ndarray] = field(default_factory=dict)
    # the overall correction that validation found for plans without the forecasting levels (at target_snr_db -
    # FORECAST_MARGIN_DB); None: the same as ``correction``
    plain_correction: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sensitivity)

    @property
    def max_run(self) -> int:
        return next(iter(self.error.values())).shape[1] + 1

    def segment_error(self, start: int, length: int, level: str, gap: int = 0) -> float:
        """Error of a full step at ``start`` followed by ``length - 1`` steps at ``level``; a forecasting level
        extrapolates from the full step ``gap`` steps before (0: none, it replays like the level it forecasts)."""
        if length == 1:
            return 0.0
        if level in FORECASTING and (level not in self.error or not 0 < gap <= self.max_run):
            level = FORECASTING[level]  # it replays like the level it forecasts (a model without it: the same guess)
        steps = np.arange(start + 1, start + length)
        error = self.error[level][start, : length - 1]
        if error.ndim == 2:
            error = error[:, gap - 1]
        amplitude = np.sqrt(self.sensitivity[steps] * error).sum()
        corrections = self.level_correction.get(level)
        return float(amplitude**2) * (1.0 if corrections is None else corrections[length - 2])

    def predicted_error(self, levels) -> float:
        """The plan's predicted mean squared final-latent error (``correction`` applied)."""
        total = 0.0
        for start, length, level, gap in segment_gaps(levels):
            if length > self.max_run:
                return float("inf")
            total += self.segment_error(start, length, level, gap)
        return self.correction * total

    def snr_db(self, error: float) -> float:
        return float("inf") if error <= 0 else float(10 * np.log10(self.signal / error))

    def to_dict(self) -> dict:
        return {
            "error": {level: _significant(e) for level, e in self.error.items()},
            "sensitivity": _significant(self.sensitivity),
            "signal": self.signal,
            "level_correction": self.level_correction,
            "correction": self.correction,
            "target_snr_db": self.target_snr_db,
            "forecast_weight": {level: np.round(w, 4).tolist() for level, w in self.forecast_weight.items()},
            "plain_correction": self.plain_correction,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ErrorModel":
        error = {level: np.asarray(e, dtype=np.float64) for level, e in data["error"].items()}  # None -> nan
        lengths = next(iter(error.values())).shape[1]  # segment lengths 2 .. MAX_RUN
        return cls(
            error=error,
            sensitivity=np.asarray(data["sensitivity"], dtype=np.float64),
            signal=float(data["signal"]),
            level_correction={k: _per_length(v, lengths) for k, v in data.get("level_correction", {}).items()},
            correction=float(data.get("correction", 1.0)),
            target_snr_db=float(data.get("target_snr_db", DEFAULT_PLAN_SNR_DB)),
            info=data.get("info", {}),
            forecast_weight={k: np.asarray(w, dtype=np.float64) for k, w in data.get("forecast_weight", {}).items()},
            plain_correction=data.get("plain_correction"),
        )

    def resampled(self, source_timesteps, timesteps) -> "ErrorModel":
        """This model carried over to a run over other ``timesteps`` of the same sampler (another step count):
        each step reads the source step at its noise level, offsets are mapped by timestep, and a step's
        sensitivity scales with the square of its length in source steps (its output moves the latent that
        much more). An approximation for a setting nobody calibrated; ``info["resampled_from"]`` says so.
        Forecasting levels are left out: their fitted weights hold for the calibrated step lengths only; the
        model then keeps what validation found for plans without them (``plain_correction`` and a target
        ``FORECAST_MARGIN_DB`` lower)."""
        src = np.asarray(source_timesteps, dtype=np.float64)
        order = np.argsort(src)
        position = np.interp(np.asarray(timesteps, dtype=np.float64), src[order], order.astype(np.float64))
        n, last = len(position), len(src) - 1
        row = np.clip(np.rint(position).astype(int), 0, last)
        length = np.diff(position, append=position[-1] + (position[-1] - position[-2] if n > 1 else 1.0))
        error = {}
        for level, e in self.error.items():
            if level in FORECASTING:
                continue
            mapped = np.full((n, self.max_run - 1), np.nan)
            for i in range(n):
                for k in range(self.max_run - 1):
                    if i + 1 + k >= n:
                        break
                    offset = position[i + 1 + k] - position[i] - 1  # in source steps past the first
                    valid = np.flatnonzero(np.isfinite(e[row[i]]))
                    if valid.size:
                        mapped[i, k] = np.interp(offset, valid, e[row[i], valid])
            error[level] = mapped
        sensitivity = np.interp(position, np.arange(len(src)), self.sensitivity) * np.maximum(length, 1e-3) ** 2
        info = {**self.info, "resampled_from": f"{len(src)} steps"}
        corrections = {level: c for level, c in self._corrections().items() if level not in FORECASTING}
        plain = {"forecast_weight": {}, "plain_correction": None}
        if any(level in FORECASTING for level in self.error):
            plain.update(target_snr_db=self.target_snr_db - FORECAST_MARGIN_DB,
                         correction=self.correction if self.plain_correction is None else self.plain_correction)
        return replace(self, error=error, sensitivity=sensitivity, level_correction=corrections, info=info, **plain)

    def sliced(self, start: int, n: int) -> "ErrorModel":
        """The model of steps ``start .. start + n - 1`` (a run over a contiguous slice of the timesteps)."""
        return replace(self, error={level: e[start : start + n] for level, e in self.error.items()},
                       sensitivity=self.sensitivity[start : start + n], level_correction=self._corrections())

    def _corrections(self) -> dict[str, list[float]]:
        """A copy of ``level_correction`` for a derived model (validation rewrites its lists in place)."""
        return {level: list(c) for level, c in self.level_correction.items()}


def _per_length(correction, lengths: int) -> list[float]:
    """A level's corrections, one a segment length; a single figure (files before per-length corrections)
    serves every length."""
    if isinstance(correction, (int, float)):
        return [float(correction)] * lengths
    return [float(c) for c in correction]


def _significant(x):
    """Six significant digits for the JSON file (nested lists of an array); None for a step beyond the run."""
    if np.ndim(x):
        return [_significant(item) for item in x]
    return None if not np.isfinite(x) else float(f"{x:.6g}")


def segments(levels) -> list[tuple[int, int, str]]:
    """(start, length, level) of each full step and the cheaper steps after it. A plan that mixes cheaper
    levels after one full step is predicted as if all were the cheapest (least computed) of them."""
    found = []
    for i, level in enumerate(parse_plan(levels) if isinstance(levels, str) else levels):
        if level == FULL:
            found.append([i, 1, FULL])
        else:
            segment = found[-1]
            segment[1] += 1
            if segment[2] == FULL or CHEAP_LEVELS.index(level) > CHEAP_LEVELS.index(segment[2]):
                segment[2] = level
    return [tuple(s) for s in found]


def segment_gaps(levels) -> list[tuple[int, int, str, int]]:
    """(start, length, level, gap) of each of ``segments(levels)``: ``gap`` is how many steps before it the full
    step that a forecasting level extrapolates from ran (the previous segment's length; 0 where it has none:
    the first segment, or one after a segment with a shallow or encoder step, which recomputes what is kept)."""
    levels = parse_plan(levels) if isinstance(levels, str) else levels
    gaps, gap = [], 0
    for start, length, level in segments(levels):
        gaps.append((start, length, level, gap))
        gap = length if all(lv in KEEPS_FORECAST_HISTORY for lv in levels[start : start + length]) else 0
    return gaps


def sample_positions(sample_shape) -> int:
    """Positions of one row of a model's latent: its pixels, (rows, channels, [frames,] height, width), or its
    tokens, Flux's packed (rows, tokens, channels)."""
    return int(np.prod(sample_shape[1:2] if len(sample_shape) == 3 else sample_shape[2:]))


def sample_channels(sample_shape) -> int:
    return int(sample_shape[2] if len(sample_shape) == 3 else sample_shape[1])


@dataclass
class CostModel:
    """Seconds (and FLOPs) of UNet calls on one device at one batch and size (measured by the accelerator)."""

    full: dict[int, float]  # g -> a full step whose call also runs g - 1 encoder-propagated decoders
    level: dict[str, float]  # every cheaper level measured (encoder: one encoder-propagated decoder alone)
    step_overhead: float  # the sampler step and the loop's own work, per step
    # the pipeline call's work outside the loop, the same for every plan: setting the timesteps, prompt encoding
    # and the VAE decode (a call with output_type="latent" skips the decode: its speed-up is a little lower)
    call_overhead: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)  # level -> FLOPs of one call
    info: dict = field(default_factory=dict)
    # level -> (c, a, b): a call's FLOPs per row of the sample at T latent pixels (tokens: ``sample_positions``), c + a T + b T^2 (convolutions and
    # projections grow with T, self-attention with T^2), fitted exactly on three sizes; what ``predicted`` scales by
    flop_curve: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"full": {str(g): t for g, t in self.full.items()}, "level": dict(self.level), "step_overhead": self.step_overhead,
                "call_overhead": self.call_overhead, "flops": dict(self.flops), "info": self.info,
                "flop_curve": {level: list(c) for level, c in self.flop_curve.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        """Raises KeyError for a file without ``call_overhead``: it was measured before speed-ups were of the
        whole call, and would predict differently from a fresh measurement."""
        return cls(full={int(g): float(t) for g, t in data["full"].items()}, level={k: float(v) for k, v in data["level"].items()},
                   step_overhead=float(data["step_overhead"]), call_overhead=float(data["call_overhead"]),
                   flops={k: float(v) for k, v in data.get("flops", {}).items()}, info=data.get("info", {}),
                   flop_curve={k: [float(x) for x in v] for k, v in data.get("flop_curve", {}).items()})

    def call_flops(self, level: str, sample_shape) -> float:
        """FLOPs of one call at ``level`` on a sample of ``sample_shape`` (``sample_positions``), from the curve."""
        c, a, b = self.flop_curve[level]
        pixels = float(sample_positions(sample_shape))
        return sample_shape[0] * (c + a * pixels + b * pixels**2)

    def predicted(self, sample_shape) -> "CostModel":
        """This cost model carried to another batch or size without timing anything: each call's seconds times its
        FLOPs there over here (this device's throughput at this shape, level by level), FLOPs from ``flop_curve``.
        The step's work outside the UNet is kept; the call's (prompt encoding, VAE decode) scales with the images'
        pixels. A compute-bound device is predicted exactly; an idle one runs small calls faster than their FLOPs
        say, so a prediction from a larger shape is pessimistic and one from a smaller shape optimistic."""
        here = self.info["sample_shape"]
        # (a level that calls no model, output, has no FLOPs here or there)
        scale = {level: self.call_flops(level, sample_shape) / self.call_flops(level, here) if self.call_flops(level, here) else 0.0
                 for level in self.flop_curve}
        decoder = self.flops.get(ENCODER, 0.0)  # a full group's other decoders

        def group(g: int) -> float:
            before = self.flops[FULL] + (g - 1) * decoder
            after = self.flops[FULL] * scale[FULL] + (g - 1) * decoder * scale.get(ENCODER, 0.0)
            return after / before

        pixels = float(sample_shape[0] * sample_positions(sample_shape)) / float(here[0] * sample_positions(here))
        return CostModel(
            full={g: t * group(g) for g, t in self.full.items()},
            level={level: t * scale[level] for level, t in self.level.items()},
            step_overhead=self.step_overhead,
            call_overhead=self.call_overhead * pixels,
            flops={level: f * scale[level] for level, f in self.flops.items()},
            info={**self.info, "sample_shape": list(sample_shape), "predicted_from": list(here)},
            flop_curve=self.flop_curve,
        )

    def full_group(self, g: int) -> float:
        """A full step with g decoders: the measured sizes, linear between them and past the largest."""
        sizes = sorted(self.full)
        if g <= sizes[-1]:
            return float(np.interp(g, sizes, [self.full[s] for s in sizes]))
        last, before = sizes[-1], sizes[-2]
        return self.full[last] + (g - last) * (self.full[last] - self.full[before]) / (last - before)

    def call_seconds(self, level: str, g: int) -> float:
        if level == FULL:
            return self.full_group(g)
        if level == ENCODER:  # a group opened by an encoder step: the full group less the encoder
            return self.full_group(g) - self.full[1] + self.level[ENCODER]
        return self.level[level]

    def plan_seconds(self, levels, parallel=True, max_parallel=None) -> float:
        """The plan's time here: its UNet calls, its steps' work outside the UNet, the call's work outside the loop."""
        calls = decoder_groups(levels, parallel, max_parallel)
        return sum(self.call_seconds(levels[g[0]], len(g)) for g in calls) + len(levels) * self.step_overhead + self.call_overhead

    def stock_seconds(self, n: int) -> float:
        return n * (self.full[1] + self.step_overhead) + self.call_overhead

    def busy_seconds(self, levels) -> float:
        """The plan's time on a compute-bound device: every UNet call its FLOPs' share of a full call."""
        if not self.flops:
            return 0.0
        return sum(self.full[1] * self.flops[level] / self.flops[FULL] + self.step_overhead for level in levels) + self.call_overhead

    def plan_cost(self, levels, parallel=True, max_parallel=None) -> float:
        """What the planner minimises: the larger of the plan's time here and on a compute-bound device."""
        return max(self.plan_seconds(levels, parallel, max_parallel), self.busy_seconds(levels))

    def plan_flops(self, levels) -> float | None:
        """UNet FLOPs of a plan (grouped decoders do the same work as separate ones)."""
        if not self.flops:
            return None
        return float(sum(self.flops[level] for level in levels))


def count_flops(fn) -> float:
    """FLOPs of ``fn()``, by torch's own counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@dataclass
class Choice:
    levels: tuple[str, ...]
    seconds: float  # predicted time on this device
    error: float
    cost: float  # ``CostModel.plan_cost``: seconds, or the compute-bound time if larger

    def speedup(self, cost: CostModel) -> float:
        """Predicted speed-up on this device and on a compute-bound one, whichever is less."""
        return cost.stock_seconds(len(self.levels)) / self.cost

    def time_speedup(self, cost: CostModel) -> float:
        """Predicted speed-up in time on this device."""
        return cost.stock_seconds(len(self.levels)) / self.seconds


def frontier(model: ErrorModel, cost: CostModel, parallel=True, max_parallel=None, levels=CHEAP_LEVELS, bins: int = 40) -> list[Choice]:
    """The least-error plan for every predicted cost (its Pareto front: cheaper plans have more error).

    Dynamic programming over segment boundaries with cost in ``1 / bins`` of a full step, and the length of the
    latest segment as state (a forecasting level's error depends on it: ``segment_gaps``): exact for the error
    model up to that rounding, with a plan's cost taken as the sum of its segments' ``plan_cost`` (never less
    than the plan's own); each plan's time and cost are then recomputed exactly. The call's work outside the
    loop is the same for every plan: segments are costed without it."""
    n, gaps = model.num_steps, model.max_run + 1
    unit = cost.full[1] / bins

    def loop_cost(plan) -> float:
        return cost.plan_cost(plan, parallel, max_parallel) - cost.call_overhead

    horizon = int(np.ceil(loop_cost((FULL,) * n) / unit)) + n + 1
    levels = [lv for lv in levels if lv in model.error and lv in cost.level]  # what the calibration and device measured
    options = [(1, FULL)] + [(m, lv) for lv in levels for m in range(2, model.max_run + 1)]
    spans = [int(round(loop_cost((FULL,) + (lv,) * (m - 1)) / unit)) for m, lv in options]
    forecasts = any(lv in FORECASTING for lv in levels)  # else the gap is not worth tracking (one state)
    # best[end, gap, cost]: the least error of plans of steps 0 .. end - 1 whose last segment is gap steps long
    # and leaves a forecast history (gap 0: it does not, or there is none yet)
    best = np.full((n + 1, gaps, horizon + 1), np.inf)
    best[0, 0, 0] = 0.0
    back = np.full((n + 1, gaps, horizon + 1, 2), -1, dtype=np.int16)  # (option, gap before) of the last segment
    for start in range(n):
        reached = np.flatnonzero(np.isfinite(best[start]).any(axis=1))  # the gaps plans reach this start with
        for o, ((length, level), span) in enumerate(zip(options, spans)):
            end = start + length
            # a segment's error depends on the gap only at a forecasting level, which without a history (gap 0)
            # is the level it forecasts
            gaps_from = reached[reached > 0] if level in FORECASTING else reached
            if end > n or not gaps_from.size:
                continue
            if level in FORECASTING:
                errors = np.array([model.segment_error(start, length, level, int(g)) for g in gaps_from])
            else:
                errors = np.full(len(gaps_from), model.segment_error(start, length, level))
            # every gap leads to the same state after this segment: keep the best of them at each cost
            totals = best[start, gaps_from, : horizon + 1 - span] + errors[:, None]
            which = totals.argmin(axis=0)
            least = totals[which, np.arange(totals.shape[1])]
            after = length if forecasts and level in KEEPS_FORECAST_HISTORY else 0
            better = np.flatnonzero(least < best[end, after, span:])
            best[end, after, better + span] = least[better]
            back[end, after, better + span] = np.stack([np.full(len(better), o), gaps_from[which[better]]], axis=1)
    choices, least = [], np.inf
    final = best[n].min(axis=0)
    for t in np.flatnonzero(np.isfinite(final)):
        if final[t] < least:
            least = final[t]
            plan, end, tb, gap = [], n, int(t), int(np.argmin(best[n, :, t]))
            while end > 0:
                o, before = (int(x) for x in back[end, gap, tb])
                length, level = options[o]
                plan[:0] = [FULL] + [level] * (length - 1)
                end, tb, gap = end - length, tb - spans[o], before
            plan = tuple(plan)
            choices.append(Choice(plan, cost.plan_seconds(plan, parallel, max_parallel), model.predicted_error(plan),
                                  cost.plan_cost(plan, parallel, max_parallel)))
    return sorted(choices, key=lambda c: c.cost)


def choose(spec: AutoPlan, model: ErrorModel, cost: CostModel, parallel=True, max_parallel=None, levels=CHEAP_LEVELS) -> Choice:
    """``auto``: the cheapest plan predicted within the model's ``target_snr_db``; ``auto:T``: the most
    faithful plan predicted at least T times faster than stock, here and on a compute-bound device (the
    cheapest plan if none is)."""
    min_snr_db = model.target_snr_db
    choices = frontier(model, cost, parallel, max_parallel, levels)
    if spec.speedup is None:
        good = [c for c in choices if model.snr_db(c.error) >= min_snr_db]
        return min(good, key=lambda c: c.cost) if good else max(choices, key=lambda c: c.cost)
    fast = [c for c in choices if c.speedup(cost) >= spec.speedup]
    return min(fast, key=lambda c: c.error) if fast else min(choices, key=lambda c: c.cost)
