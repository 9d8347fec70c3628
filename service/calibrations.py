"""Calibrations for the service's ``plan="auto"`` and ``key_steps="auto"``: the prompts, making one, and the store.

A model directory may ship ``calibration/*.json`` (``script/calibrate --weights DIR`` writes
them) and ``calibration/prompts.txt``, one prompt a line, the prompts to calibrate that model
on. Without that file the generic prompts below are used.

``CalibrationStore`` is where a prediction's calibration comes from, in this order:

1. an exact one: shipped with the weights, made by this server at setup, or read back from the
   cache directory (``service.cache``: calibrations this server made, or derived, before a restart);
2. else one derived from the nearest calibration (``faster_diffusion.calibration.nearest`` and
   ``derive``): of the same scheduler when there is one, else of another (the setup calibrates only
   the default sampler, DDIM-50 at the native size, where the weights ship none); at another size
   the same timesteps share their schedule; at another step count the reuse costs are interpolated
   by timestep and the ``auto`` key steps of the nearest run with at least as many steps are moved
   to the new run's nearest timesteps. No stock run on the request path: deriving takes
   milliseconds. It is written to the cache, so after a restart the setting is found at once.

A plan needs an error model: for ``plan="auto"`` both steps look at the calibrations that have one
first, so that a setting whose own calibration has none is planned from the nearest that has one
(the error model resampled, ``ErrorModel.resampled``) rather than falling back to encoder propagation.

Memory stays bounded: the store keeps the shipped and setup calibrations, plus at most
``MAX_IN_MEMORY`` derived or made ones (least recently used dropped; the cache keeps them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

import faster_diffusion
from faster_diffusion.calibration import CALIBRATION_DIR, derive, nearest, shipped_calibrations

from .cache import JsonCache
from .schedulers import make_scheduler

logger = logging.getLogger("faster_diffusion.service")

#: for models without calibration/prompts.txt: varied subjects, as SD users write them
GENERIC_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old fisherman, detailed skin, 85mm",
    "a cozy living room with a fireplace, interior design magazine",
)
#: What setup may spend calibrating weights that ship no calibration, in stock images of the default sampler at the
#: native size, the warm-up included (``FASTER_DIFFUSION_SETUP_BUDGET``: a number >= 8, or "thorough").
SETUP_BUDGET = 30.0
#: Of it, what the warm-up takes (one planned image and the cost model timed at the default batch; measured
#: 1.9 stock images on the bundled model, docs/operations.md): the calibration gets the rest.
WARM_UP_IMAGES = 3.0
CALIBRATION_SEED = 10_000  # prompt k uses seed CALIBRATION_SEED + k, apart from users' usual small seeds
GUIDANCE_SCALE = 7.5
MAX_IN_MEMORY = 64  # derived / first-use calibrations kept in memory (each at most 150x150 costs, ~180 KB)


def setup_budget() -> float | None:
    """The stock images setup may spend calibrating (``FASTER_DIFFUSION_SETUP_BUDGET``), None for "thorough"."""
    value = os.environ.get("FASTER_DIFFUSION_SETUP_BUDGET", "").strip()
    if not value:
        return SETUP_BUDGET
    if value.lower() == "thorough":
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = math.nan
    least = WARM_UP_IMAGES + faster_diffusion.calibration.MIN_COMPUTE_BUDGET + 1
    if not budget >= least or not math.isfinite(budget):
        raise ValueError(f"FASTER_DIFFUSION_SETUP_BUDGET={value!r} must be a number >= {least:g} (stock images) or 'thorough'")
    return budget


def calibration_prompts(model_dir) -> list[str]:
    path = Path(model_dir) / CALIBRATION_DIR / "prompts.txt"
    if path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if prompts:
            return prompts
    return list(GENERIC_PROMPTS)


def file_name(scheduler_name: str, calibration: faster_diffusion.Calibration) -> str:
    return f"{scheduler_name}-{calibration.num_steps}steps-{'x'.join(map(str, calibration.latent_size))}.json"


def seeds(prompts) -> list[int]:
    return [CALIBRATION_SEED + k for k in range(len(prompts))]


@contextlib.contextmanager
def service_scheduler(pipe, scheduler_name: str, base_config=None):
    """The pipeline with the service's scheduler ``scheduler_name``, built on ``base_config`` (the model's
    own scheduler config; default: the pipeline's current scheduler's); its own is put back afterwards."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler_name, original.config if base_config is None else base_config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def calibrate(pipe, scheduler_name: str, steps: int, height: int, width: int, prompts, base_config=None,
              plans: bool = False, compute_budget: float | None = None, arguments: dict | None = None) -> faster_diffusion.Calibration:
    """One stock run of ``prompts`` with the service's scheduler ``scheduler_name``, seeds from CALIBRATION_SEED;
    with ``plans``, also the error model of plans, scaled on outputs (``faster_diffusion.validate_plan``):
    thorough, or within ``compute_budget`` stock images (``faster_diffusion.calibrate``). ``arguments``: the
    pipeline call's guidance arguments (``Planner.guidance_arguments``; default Stable Diffusion's guidance 7.5)."""
    kwargs = dict(height=height, width=width, **_guidance(arguments))
    with service_scheduler(pipe, scheduler_name, base_config):
        calibration = faster_diffusion.calibrate(pipe, prompts, steps, seeds=seeds(prompts), plans=plans,
                                                 compute_budget=compute_budget, **kwargs)
        if plans and compute_budget is None:
            faster_diffusion.validate_plan(pipe, calibration, **kwargs)
    calibration.info["service_scheduler"] = scheduler_name
    calibration.info["seeds"] = seeds(prompts)
    return calibration


def refine(pipe, calibration, scheduler_name: str, budget: int, height: int, width: int, prompts, base_config=None):
    """``faster_diffusion.refine`` on the calibration prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name, base_config):
        return faster_diffusion.refine(
            pipe, calibration, budget, prompts, seeds=seeds(prompts), height=height, width=width, guidance_scale=GUIDANCE_SCALE
        )


def validate_plan(pipe, calibration, scheduler_name: str, height: int, width: int, base_config=None, arguments: dict | None = None):
    """``faster_diffusion.validate_plan`` on the calibration's own prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name, base_config):
        return faster_diffusion.validate_plan(pipe, calibration, height=height, width=width, **_guidance(arguments))


def _guidance(arguments: dict | None) -> dict:
    return {"guidance_scale": GUIDANCE_SCALE} if arguments is None else dict(arguments)


def validate(pipe, calibration, scheduler_name: str, height: int, width: int, prompts, base_config=None):
    """``faster_diffusion.validate`` on the calibration prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name, base_config):
        return faster_diffusion.validate(
            pipe, calibration, prompts, seeds=seeds(prompts), height=height, width=width, guidance_scale=GUIDANCE_SCALE
        )


# -- the store -----------------------------------------------------------------------------------------------------


class CalibrationStore:
    """The calibrations a server uses: shipped, made at setup, and derived or made later (cached on disk)."""

    def __init__(self, model_dir, identity: str, cache_root=None, max_in_memory: int = MAX_IN_MEMORY):
        self.shipped = shipped_calibrations(model_dir)  # read once
        self.setup: list[faster_diffusion.Calibration] = []  # made at setup (also cached)
        self.recent: OrderedDict[str, faster_diffusion.Calibration] = OrderedDict()  # LRU, bounded
        self.max_in_memory = max_in_memory
        self.cache = JsonCache("calibrations", identity, cache_root)
        self.cached: dict[str, Path] = {}  # entry name -> file, for what is on disk but not in memory
        for path, data in self.cache.load_all():
            try:
                faster_diffusion.Calibration.from_dict(data)
            except Exception as err:  # a hand-edited or older entry
                logger.warning("cache: skipping %s: not a calibration (%s: %s)", path, type(err).__name__, err)
                continue
            self.cached[path.stem] = path

    def __len__(self) -> int:
        return len(self.shipped) + len(self.setup) + len(self.recent)

    @staticmethod
    def key(scheduler_name: str, timesteps, latent_size) -> str:
        """An entry name: sampler, step count, latent size and a hash of the exact timesteps."""
        import hashlib

        digest = hashlib.sha256(",".join(f"{float(t):g}" for t in timesteps).encode()).hexdigest()[:8]
        return f"{scheduler_name}-{len(timesteps)}steps-{'x'.join(map(str, latent_size))}-{digest}"

    def exact(self, scheduler_class: str, timesteps, latent_size, key: str | None = None):
        """A calibration of exactly this run held in memory or on disk, or None."""
        for c in (*self.shipped, *self.setup):
            if c.matches(scheduler_class, timesteps, latent_size):
                return c
        return None if key is None else self._kept(key, scheduler_class, timesteps, latent_size)

    def _kept(self, key: str, scheduler_class: str, timesteps, latent_size):
        """The calibration this server made or derived under ``key``, in memory or on disk, or None."""
        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        if key in self.cached:
            calibration = self._read(key)
            if calibration is not None and calibration.matches(scheduler_class, timesteps, latent_size):
                calibration.info["source"] = f"cached ({calibration.info.get('source', 'made by this service')})"
                self._remember(key, calibration)
                return calibration
        return None

    def named(self, key: str):
        """The calibration kept on disk under ``key`` (``add(..., key=key)``), or None."""
        return self._read(key) if key in self.cached else None

    def _read(self, key: str):
        data = self.cache.load(self.cached[key])
        try:
            return None if data is None else faster_diffusion.Calibration.from_dict(data)
        except Exception as err:  # a hand-edited or older entry
            logger.warning("cache: skipping %s: not a calibration (%s: %s)", self.cached[key], type(err).__name__, err)
            return None

    def _remember(self, key: str, calibration) -> None:
        self.recent[key] = calibration
        self.recent.move_to_end(key)
        while len(self.recent) > self.max_in_memory:
            self.recent.popitem(last=False)

    def add(self, scheduler_name: str, calibration, setup: bool = False, key: str | None = None) -> None:
        """Keeps ``calibration`` (made by this server, or derived) and writes it to the cache."""
        key = key or self.key(scheduler_name, calibration.timesteps, calibration.latent_size)
        if setup:
            self.setup.append(calibration)
        else:
            self._remember(key, calibration)
        data = calibration.to_dict()
        data["info"] = {**data["info"], "service_scheduler": scheduler_name}
        path = self.cache.put(key, data)
        if path is not None:
            self.cached[key] = path
            self.cached = {k: p for k, p in self.cached.items() if p.exists()}  # the cache may have dropped some

    def for_run(self, scheduler_name: str, scheduler, latent_size, plans: bool = False):
        """(calibration, how it was found) for a run of ``scheduler`` (timesteps set) at ``latent_size``,
        or (None, reason) when nothing of this scheduler is calibrated (the library then calibrates).
        With ``plans``, one with an error model whenever some calibration has one."""
        started = time.perf_counter()
        cls, timesteps = type(scheduler).__name__, [float(t) for t in scheduler.timesteps]
        key = self.key(scheduler_name, timesteps, latent_size)
        own = self.exact(cls, timesteps, latent_size, key)
        if own is not None and (own.error_model is not None or not plans):
            return own, "exact"
        if own is not None:  # the run's own calibration has no error model: one derived for plans, kept beside it
            key += "-plans"
            kept = self._kept(key, cls, timesteps, latent_size)
            if kept is not None:
                return kept, "exact"
        measured = [c for c in self.recent.values() if "derived_from" not in c.info]  # derive from measurements only
        candidates = [*self.shipped, *self.setup, *measured]
        source = nearest([c for c in candidates if c.error_model is not None], cls, timesteps, latent_size) if plans else None
        if source is None and own is None:
            source = nearest(candidates, cls, timesteps, latent_size)
        if source is None:
            return (own, "exact") if own is not None else (None, "no calibration to derive from")
        derived = derive(source, timesteps, latent_size, cls)
        self.add(scheduler_name, derived, key=key)
        return derived, f"derived in {1000 * (time.perf_counter() - started):.0f} ms"
