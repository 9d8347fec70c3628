"""Calibrations for the service's ``key_steps="auto"``: the prompts, making one, deriving one, and the store.

A model directory may ship ``calibration/*.json`` (``script/calibrate --weights DIR`` writes
them) and ``calibration/prompts.txt``, one prompt a line, the prompts to calibrate that model
on. Without that file the generic prompts below are used.

``CalibrationStore`` is where a prediction's calibration comes from, in this order:

1. an exact one: shipped with the weights, made by this server at setup, or read back from the
   cache directory (``service.cache``: calibrations this server made, or derived, before a restart);
2. else one derived from the nearest calibration (``nearest``, ``derive``): of the same scheduler
   when there is one, else of another (the setup calibrates only the default sampler, DDIM-50 at
   the native size, where the weights ship none); at another size the same timesteps share their
   schedule; at another step count the reuse costs are interpolated by timestep and the ``auto``
   key steps of the nearest run with at least as many steps are moved to the new run's nearest
   timesteps. No stock run on the request path: deriving takes milliseconds. It is written to
   the cache, so after a restart the setting is found at once.

Memory stays bounded: the store keeps the shipped and setup calibrations, plus at most
``MAX_IN_MEMORY`` derived or made ones (least recently used dropped; the cache keeps them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

import faster_diffusion
from faster_diffusion.calibration import CALIBRATION_DIR, shipped_calibrations

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
CALIBRATION_SEED = 10_000  # prompt k uses seed CALIBRATION_SEED + k, apart from users' usual small seeds
GUIDANCE_SCALE = 7.5
MAX_IN_MEMORY = 64  # derived / first-use calibrations kept in memory (each at most 150x150 costs, ~180 KB)


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
              plans: bool = False) -> faster_diffusion.Calibration:
    """One stock run of ``prompts`` with the service's scheduler ``scheduler_name``, seeds from CALIBRATION_SEED;
    with ``plans``, also the error model of plans, scaled on outputs (``faster_diffusion.validate_plan``)."""
    kwargs = dict(height=height, width=width, guidance_scale=GUIDANCE_SCALE)
    with service_scheduler(pipe, scheduler_name, base_config):
        calibration = faster_diffusion.calibrate(pipe, prompts, steps, seeds=seeds(prompts), plans=plans, **kwargs)
        if plans:
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


def validate_plan(pipe, calibration, scheduler_name: str, height: int, width: int, base_config=None):
    """``faster_diffusion.validate_plan`` on the calibration's own prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name, base_config):
        return faster_diffusion.validate_plan(pipe, calibration, height=height, width=width, guidance_scale=GUIDANCE_SCALE)


def validate(pipe, calibration, scheduler_name: str, height: int, width: int, prompts, base_config=None):
    """``faster_diffusion.validate`` on the calibration prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name, base_config):
        return faster_diffusion.validate(
            pipe, calibration, prompts, seeds=seeds(prompts), height=height, width=width, guidance_scale=GUIDANCE_SCALE
        )


# -- deriving a calibration for a run nobody calibrated ------------------------------------------------------------


def derive(source: faster_diffusion.Calibration, timesteps, latent_size, scheduler: str | None = None) -> faster_diffusion.Calibration:
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
    info = {k: v for k, v in source.info.items() if k not in ("validation", "slice_of", "derived_from")}
    info["derived_from"] = described
    scheduler = scheduler or source.scheduler
    if scheduler != source.scheduler:
        derived = derive(source, timesteps, latent_size)
        derived.scheduler = scheduler
        derived.info["source"] = f"derived from {described} (another sampler, timesteps mapped)"
        return derived
    if run == [float(t) for t in source.timesteps]:
        derived = faster_diffusion.Calibration(
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
    derived = faster_diffusion.Calibration(cost, run, source.scheduler, tuple(latent_size), info, {}, keys, error_model=error_model)
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
        if key is not None and key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        if key is not None and key in self.cached:
            calibration = self._read(key)
            if calibration is not None and calibration.matches(scheduler_class, timesteps, latent_size):
                calibration.info["source"] = f"cached ({calibration.info.get('source', 'made by this service')})"
                self._remember(key, calibration)
                return calibration
        return None

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

    def add(self, scheduler_name: str, calibration, setup: bool = False) -> None:
        """Keeps ``calibration`` (made by this server, or derived) and writes it to the cache."""
        key = self.key(scheduler_name, calibration.timesteps, calibration.latent_size)
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

    def for_run(self, scheduler_name: str, scheduler, latent_size):
        """(calibration, how it was found) for a run of ``scheduler`` (timesteps set) at ``latent_size``,
        or (None, reason) when nothing of this scheduler is calibrated (the library then calibrates)."""
        started = time.perf_counter()
        cls, timesteps = type(scheduler).__name__, [float(t) for t in scheduler.timesteps]
        key = self.key(scheduler_name, timesteps, latent_size)
        found = self.exact(cls, timesteps, latent_size, key)
        if found is not None:
            return found, "exact"
        measured = [c for c in self.recent.values() if "derived_from" not in c.info]  # derive from measurements only
        source = nearest([*self.shipped, *self.setup, *measured], cls, timesteps, latent_size)
        if source is None:
            return None, "no calibration to derive from"
        derived = derive(source, timesteps, latent_size, cls)
        self.add(scheduler_name, derived)
        return derived, f"derived in {1000 * (time.perf_counter() - started):.0f} ms"
