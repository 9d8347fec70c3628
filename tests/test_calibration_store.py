"""The service's calibrations: the cache directory, derived calibrations, and the store that keeps them bounded."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from diffusers import DDIMScheduler

import faster_diffusion
from service import cache as cache_module
from service.cache import JsonCache, cache_dir, weights_identity
from faster_diffusion.calibration import derive, nearest
from faster_diffusion.plan import DEEP, ENCODER, ErrorModel
from service.calibrations import CalibrationStore

BASE = DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing").config


def timesteps(steps: int) -> list[float]:
    scheduler = DDIMScheduler.from_config(BASE)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def calibration(steps: int, latent=(8, 8), seed=0, plans=False) -> faster_diffusion.Calibration:
    rng = np.random.default_rng(seed)
    gaps = np.abs(np.subtract.outer(np.arange(steps), np.arange(steps)))
    cost = np.triu(gaps * rng.uniform(0.005, 0.02, (steps, steps)))
    made = faster_diffusion.Calibration(cost, timesteps(steps), "DDIMScheduler", latent, {"source": "test"})
    made.validated = made.schedule(tolerance=0.025)
    if plans:  # an error model of plans: errors growing with the distance to the full step
        growth = np.arange(1, 8)[None, :] ** 2
        made.error_model = ErrorModel({lv: rng.uniform(0.5, 2, (steps, 7)) * growth * scale for lv, scale in ((ENCODER, 1e-4), (DEEP, 2e-4))},
                                      rng.uniform(0.1, 1, steps), signal=1.0)  # fmt: skip
    return made


# -- the cache directory -------------------------------------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTER_DIFFUSION_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FASTER_DIFFUSION_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "faster-diffusion"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "faster-diffusion"


def test_weights_identity_follows_the_weights_not_the_folder(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert weights_identity(copy) == weights_identity(model_dir)
    (copy / "README.md").write_text("another card")  # describes the weights: same identity
    assert weights_identity(copy) == weights_identity(model_dir)
    weights = next(p for p in sorted((copy / "unet").iterdir()) if p.suffix in (".safetensors", ".bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte at the end of the UNet's weights
    weights.write_bytes(bytes(data))
    assert weights_identity(copy) != weights_identity(model_dir)


def test_bad_cache_files_are_skipped_with_a_log_line(tmp_path, caplog):
    store = JsonCache("calibrations", "abc", tmp_path)
    store.put("good", {"x": 1})
    (store.folder / "corrupt.json").write_text('{"format": "faster-diffu')
    (store.folder / "foreign.json").write_text(json.dumps({"format": cache_module.FORMAT, "identity": "other",
                                                           "kind": "calibrations", "data": {"x": 2}}))  # fmt: skip
    (store.folder / "stranger.json").write_text(json.dumps({"hello": "world"}))
    (store.folder / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="faster_diffusion.service"):
        entries = store.load_all()
    assert [(p.name, d) for p, d in entries] == [("good.json", {"x": 1})]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for name, why in (("corrupt", "not readable JSON"), ("foreign", "made for other weights"),
                      ("stranger", "not a calibrations entry"), ("binary", "not readable JSON")):  # fmt: skip
        assert f"skipping {store.folder / name}.json: {why}" in messages, messages


def test_the_cache_is_bounded_and_drops_the_oldest_first(tmp_path):
    store = JsonCache("calibrations", "abc", tmp_path, limit=3300)  # three entries of ~1 KB
    for k in range(6):
        path = store.put(f"entry{k}", {"payload": "x" * 900})
        os.utime(path, (1000 + k, 1000 + k))  # distinct ages, in writing order
    store.put("entry6", {"payload": "x" * 900})
    names = sorted(p.stem for p in store.folder.glob("*.json"))
    assert names == ["entry4", "entry5", "entry6"], names
    assert sum(p.stat().st_size for p in store.folder.glob("*.json")) <= 3300


def test_an_unwritable_cache_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    store = JsonCache("calibrations", "abc", tmp_path / "file")
    with caplog.at_level(logging.WARNING, logger="faster_diffusion.service"):
        assert store.put("entry", {"x": 1}) is None
    assert "could not write" in caplog.text


# -- derived calibrations ------------------------------------------------------------------------------------------


def test_same_timesteps_at_another_size_share_the_schedule():
    source = calibration(30)
    derived = derive(source, source.timesteps, (12, 10))
    assert derived.latent_size == (12, 10) and derived.matches("DDIMScheduler", source.timesteps, (12, 10))
    assert derived.schedule() == source.schedule() and derived.schedule(budget=7) == source.schedule(budget=7)
    assert "same timesteps, another size" in derived.info["source"]


def test_another_step_count_is_mapped_by_timestep():
    source = calibration(50)
    half = timesteps(25)  # trailing spacing: every other timestep of the 50-step run
    assert half == source.timesteps[::2]
    derived = derive(source, half, (8, 8))
    np.testing.assert_allclose(derived.cost, np.triu(source.cost[::2, ::2], 1))  # the costs where both are known
    expected = sorted({0} | {int(np.argmin(np.abs(np.asarray(half) - source.timesteps[k]))) for k in source.schedule()})
    assert derived.schedule() == expected  # "auto": the calibrated keys at the nearest timesteps
    assert "timesteps mapped" in derived.info["source"]
    # and in between: 37 steps, none of them calibrated
    odd = derive(source, timesteps(37), (8, 8))
    assert odd.num_steps == 37 and odd.schedule()[0] == 0 and odd.cost.shape == (37, 37)
    assert np.all(np.tril(odd.cost) == 0) and np.all(odd.cost[np.triu_indices(37, 1)] > 0)


def test_nearest_prefers_the_same_sampler_and_timesteps_then_the_nearest_step_count():
    c20, c50, c50_big = calibration(20), calibration(50), calibration(50, (16, 16))
    assert nearest([c20, c50], "DDIMScheduler", timesteps(50), (16, 16)) is c50
    assert nearest([c20, c50], "DDIMScheduler", timesteps(25), (8, 8)) is c50  # the nearest with as many steps or more
    assert nearest([c20, c50], "DDIMScheduler", timesteps(15), (8, 8)) is c20
    assert nearest([c20, c50], "DDIMScheduler", timesteps(60), (8, 8)) is c50  # none finer: the nearest
    assert nearest([c20, c50, c50_big], "DDIMScheduler", timesteps(45), (16, 16)) is c50_big
    # no calibration of the sampler: another's (DDIM's first), the nearest step count
    euler = faster_diffusion.Calibration(c50.cost, c50.timesteps, "EulerDiscreteScheduler", (8, 8))
    assert nearest([euler, c20, c50], "UniPCMultistepScheduler", timesteps(25), (8, 8)) is c50
    assert nearest([euler], "UniPCMultistepScheduler", timesteps(25), (8, 8)) is euler
    assert nearest([], "UniPCMultistepScheduler", timesteps(25), (8, 8)) is None


# -- the store -----------------------------------------------------------------------------------------------------


@pytest.fixture
def store_dir(model_dir, tmp_path):
    """A model directory that ships one calibration, DDIM-20 at 8x8 latents."""
    model = tmp_path / "model"
    (model / "calibration").mkdir(parents=True)
    calibration(20).save(model / "calibration" / "DDIM-20steps-8x8.json")
    return model


def scheduler(steps):
    made = DDIMScheduler.from_config(BASE)
    made.set_timesteps(steps)
    return made


def test_a_new_setting_is_derived_cached_and_found_after_a_restart(store_dir, tmp_path):
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    found, how = store.for_run("DDIM", scheduler(20), (8, 8))
    assert how == "exact" and found.path == store_dir / "calibration" / "DDIM-20steps-8x8.json"
    derived, how = store.for_run("DDIM", scheduler(33), (12, 12))
    assert how.startswith("derived in ") and derived.info["derived_from"] == "DDIM-20steps-8x8.json"
    assert store.for_run("DDIM", scheduler(33), (12, 12)) == (derived, "exact")
    restarted = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    again, how = restarted.for_run("DDIM", scheduler(33), (12, 12))
    assert how == "exact" and again.schedule() == derived.schedule() and again.info["source"].startswith("cached (")
    other_weights = CalibrationStore(store_dir, "def", tmp_path / "cache")
    assert other_weights.for_run("DDIM", scheduler(33), (12, 12))[1].startswith("derived")


def test_a_corrupt_cache_entry_is_skipped_and_the_run_still_gets_a_schedule(store_dir, tmp_path, caplog):
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    store.for_run("DDIM", scheduler(33), (12, 12))
    (entry,) = store.cache.folder.glob("*.json")
    data = json.loads(entry.read_text())
    data["data"]["cost"] = "not a matrix"
    entry.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="faster_diffusion.service"):
        restarted = CalibrationStore(store_dir, "abc", tmp_path / "cache")
        found, how = restarted.for_run("DDIM", scheduler(33), (12, 12))
    assert f"skipping {entry}: not a calibration" in caplog.text
    assert how.startswith("derived") and found.num_steps == 33


def test_memory_holds_a_bounded_number_of_derived_calibrations(store_dir, tmp_path):
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache", max_in_memory=5)
    for steps in range(21, 41):
        store.for_run("DDIM", scheduler(steps), (8, 8))
    assert len(store.recent) == 5 and len(store) == 1 + 5  # the shipped one, the 5 latest
    assert [c.num_steps for c in store.recent.values()] == [36, 37, 38, 39, 40]
    assert len(list(store.cache.folder.glob("*.json"))) == 20  # the disk keeps them (within its size limit)
    assert store.for_run("DDIM", scheduler(21), (8, 8))[1] == "exact"  # read back from disk


def test_derived_calibrations_are_derived_from_measured_ones_only(store_dir, tmp_path):
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    store.for_run("DDIM", scheduler(48), (8, 8))
    derived, _ = store.for_run("DDIM", scheduler(47), (8, 8))  # 48 steps is nearer, but derived itself
    assert derived.info["derived_from"] == "DDIM-20steps-8x8.json"


def test_a_plan_is_derived_from_an_error_model_where_its_own_calibration_has_none(store_dir, tmp_path):
    """DDIM-20 ships without an error model, DDIM-30 with one: plan="auto" at 20 steps plans from DDIM-30's
    (resampled), kept beside DDIM-20's own, which key_steps="auto" still gets, also after a restart."""
    calibration(30, plans=True).save(store_dir / "calibration" / "DDIM-30steps-8x8.json")
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    own, how = store.for_run("DDIM", scheduler(20), (8, 8))
    assert how == "exact" and own.error_model is None and own.path.name == "DDIM-20steps-8x8.json"
    planned, how = store.for_run("DDIM", scheduler(20), (8, 8), plans=True)
    assert how.startswith("derived in ") and planned.info["derived_from"] == "DDIM-30steps-8x8.json"
    assert planned.error_model is not None and planned.error_model.num_steps == 20
    assert store.for_run("DDIM", scheduler(20), (8, 8), plans=True) == (planned, "exact")  # kept: planned once
    assert store.for_run("DDIM", scheduler(20), (8, 8)) == (own, "exact")
    restarted = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    again, how = restarted.for_run("DDIM", scheduler(20), (8, 8), plans=True)
    assert how == "exact" and again.error_model is not None and again.info["derived_from"] == "DDIM-30steps-8x8.json"
    # a new setting: derived from the calibration with an error model, not from the nearer DDIM-20
    derived, _ = store.for_run("DDIM", scheduler(18), (8, 8), plans=True)
    assert derived.info["derived_from"] == "DDIM-30steps-8x8.json" and derived.error_model.num_steps == 18
    assert store.for_run("DDIM", scheduler(17), (8, 8))[0].info["derived_from"] == "DDIM-20steps-8x8.json"


def test_without_any_error_model_a_plan_gets_the_calibration_key_steps_use(store_dir, tmp_path):
    store = CalibrationStore(store_dir, "abc", tmp_path / "cache")
    own, _ = store.for_run("DDIM", scheduler(20), (8, 8))
    assert store.for_run("DDIM", scheduler(20), (8, 8), plans=True) == (own, "exact")
    derived, how = store.for_run("DDIM", scheduler(33), (8, 8), plans=True)
    assert how.startswith("derived in ") and derived.error_model is None
