"""Calibrated key steps: the cost matrix, the exact schedules, files, refinement and key_steps="auto"."""

import itertools

import numpy as np
import pytest
import torch
from conftest import SIZE, sample

import faster_diffusion
from faster_diffusion import Calibration
from faster_diffusion.calibration import FeatureRecorder, _feature_tensors
from faster_diffusion.unet_split import encoder_modules

STEPS = 12  # conftest.sample's default


@pytest.fixture(autouse=True)
def stock_afterwards(pipe):
    yield
    faster_diffusion.disable(pipe)


def random_calibration(n, seed):
    rng = np.random.default_rng(seed)
    # costs that grow with the distance between steps, as encoder features do, plus noise
    gaps = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    cost = np.triu(gaps * rng.uniform(0.01, 0.1, (n, n)) + rng.uniform(0, 0.05, (n, n)) * (gaps > 0))
    return Calibration(cost, [float(999 - 50 * i) for i in range(n)], "DDIMScheduler", (8, 8))


def brute_force(calibration, budget):
    n = calibration.num_steps
    candidates = ([0, *rest] for rest in itertools.combinations(range(1, n), budget - 1))
    return min(calibration.reuse_cost(keys) for keys in candidates)


@pytest.mark.parametrize("seed", range(4))
def test_budget_schedule_is_the_least_reuse_cost_one(seed):
    calibration = random_calibration(9, seed)
    for budget in range(1, 10):
        keys = calibration.schedule(budget=budget)
        assert len(keys) == budget and keys[0] == 0 and keys == sorted(set(keys))
        assert calibration.reuse_cost(keys) == pytest.approx(brute_force(calibration, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("tolerance", [0.0, 0.005, 0.02, 0.05, 1.0])
def test_tolerance_gives_the_fewest_passes_under_it(tolerance):
    calibration = random_calibration(8, 7)
    keys = calibration.schedule(tolerance=tolerance)
    fewest = next(b for b in range(1, 9) if brute_force(calibration, b) <= tolerance * 8)
    assert len(keys) == fewest
    assert calibration.reuse_cost(keys) <= tolerance * 8


def test_schedule_arguments_are_checked():
    calibration = random_calibration(6, 0)
    with pytest.raises(ValueError, match=r"budget=7 must be an integer in \[1, 6\]"):
        calibration.schedule(budget=7)
    with pytest.raises(ValueError, match="budget=0"):
        calibration.schedule(budget=0)
    with pytest.raises(ValueError, match="not both"):
        calibration.schedule(budget=2, tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance=-1"):
        calibration.schedule(tolerance=-1)


def test_a_calibration_serves_runs_over_a_slice_of_its_timesteps():
    calibration = random_calibration(8, 2)
    t = calibration.timesteps
    assert calibration.for_run("DDIMScheduler", t, (8, 8)) is calibration
    tail = calibration.for_run("DDIMScheduler", t[3:], (8, 8))  # img2img with strength: the last steps
    assert tail.timesteps == t[3:] and np.array_equal(tail.cost, calibration.cost[3:, 3:])
    assert "steps 3-7 of DDIMScheduler 8 steps" in tail.info["slice_of"]
    assert calibration.for_run("DDIMScheduler", t[:5], (8, 8)).num_steps == 5  # SDXL's denoising_end: the first steps
    assert calibration.for_run("DDIMScheduler", [t[0], t[2]], (8, 8)) is None  # not contiguous
    assert calibration.for_run("DDIMScheduler", t, (16, 16)) is None
    assert calibration.for_run("EulerDiscreteScheduler", t, (8, 8)) is None
    assert not calibration.matches("DDIMScheduler", t[3:], (8, 8))


def test_img2img_uses_the_slice_of_a_text_to_image_calibration(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    calibration = faster_diffusion.calibrate(pipe, "a red square", STEPS, height=SIZE, width=SIZE)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    accel = faster_diffusion.enable(img2img, key_steps="auto:3", calibration=calibration)
    img2img("a red square", image=torch.rand(1, 3, SIZE, SIZE), strength=0.5, num_inference_steps=STEPS,
            output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert accel.stats["steps"] == 6 and accel.stats["encoder_passes"] == 3
    assert accel.stats["schedule_source"] == f"auto:3 from the calibration argument, steps 6-11 of {calibration.describe()}"
    assert accel.stats["key_steps"] == calibration.for_run("DDIMScheduler", calibration.timesteps[6:], (16, 16)).schedule(budget=3)
    faster_diffusion.disable(img2img)


def test_json_round_trip(tmp_path):
    calibration = random_calibration(7, 3)
    calibration.refined[3] = [0, 2, 5]
    calibration.info = {"model": "tiny", "prompts": ["a", "b"]}
    path = calibration.save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert np.allclose(loaded.cost, calibration.cost, atol=1e-7)
    assert (loaded.timesteps, loaded.scheduler, loaded.latent_size) == (calibration.timesteps, "DDIMScheduler", (8, 8))
    assert loaded.info == calibration.info and loaded.refined == {3: [0, 2, 5]}
    assert loaded.schedule(budget=3) == [0, 2, 5]  # the refined one
    assert loaded.schedule(budget=4) == calibration.schedule(budget=4)
    assert loaded.schedule() == calibration.schedule()
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="calibration format 99"):
        Calibration.load(tmp_path / "bad.json")


def test_calibrate_records_the_stock_run(pipe):
    stock = sample(pipe)
    calibration = faster_diffusion.calibrate(
        pipe, ["a red square", "a blue circle"], STEPS, height=SIZE, width=SIZE,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    )
    assert calibration.cost.shape == (STEPS, STEPS)
    assert np.allclose(np.diag(calibration.cost), 0) and (calibration.cost >= 0).all()
    assert np.all(np.triu(calibration.cost, 1)[np.triu_indices(STEPS, 1)] > 0)
    assert calibration.timesteps == [float(t) for t in pipe.scheduler.timesteps]
    assert calibration.matches("DDIMScheduler", pipe.scheduler.timesteps, (SIZE // 2, SIZE // 2))
    assert not calibration.matches("DDIMScheduler", pipe.scheduler.timesteps, (8, 8))
    assert calibration.info["prompts"] == ["a red square", "a blue circle"]
    assert calibration.info["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert calibration.info["sketch_bytes"] > 0
    assert torch.equal(sample(pipe), stock)  # the recorder's hooks are gone


def test_sketched_costs_track_the_exact_ones(pipe):
    """The cost from a random sample of coordinates against the cost from the whole features."""
    full = {id(m): [] for m in encoder_modules(pipe.unet)}
    handles = [
        m.register_forward_hook(lambda mod, a, out: full[id(mod)].append(torch.cat([t.flatten(1) for t in _feature_tensors(out)], 1)))
        for m in encoder_modules(pipe.unet)
    ]
    recorder = FeatureRecorder(pipe.unet, sketch_size=1024).attach()
    try:
        sample(pipe)
    finally:
        recorder.detach()
        for h in handles:
            h.remove()
    exact = np.zeros((STEPS, STEPS))
    for feats in full.values():
        f = torch.stack(feats).double()
        for i in range(STEPS):
            exact[i, i:] += ((f[i:] - f[i]).pow(2).sum(-1) / f[i:].pow(2).sum(-1)).mean(-1).numpy()
    sketched = recorder.cost_matrix()
    upper = np.triu_indices(STEPS, 1)
    assert np.allclose(sketched[upper], exact[upper], rtol=0.15)
    assert np.corrcoef(sketched[upper], exact[upper])[0, 1] > 0.99


def test_auto_calibrates_on_the_first_run_then_accelerates(pipe):
    stock = sample(pipe)
    accel = faster_diffusion.enable(pipe, key_steps="auto:4", noise_injection=0.003)
    first = sample(pipe)
    assert torch.equal(first, stock)  # the calibrating run is the stock run, noise injection off
    assert accel.stats["encoder_passes"] == STEPS and accel.stats["schedule_source"].startswith("calibrating")
    assert len(accel.calibrations) == 1
    calibration = accel.calibrations[0]
    sample(pipe)
    assert accel.stats["key_steps"] == calibration.schedule(budget=4)
    assert accel.stats["encoder_passes"] == 4 and "made by an earlier run" in accel.stats["schedule_source"]
    sample(pipe, steps=STEPS + 1)  # another step count: calibrates again
    assert accel.stats["encoder_passes"] == STEPS + 1 and len(accel.calibrations) == 2


def test_auto_parallel_equals_sequential(pipe):
    calibration = faster_diffusion.calibrate(pipe, "a green triangle", STEPS, height=SIZE, width=SIZE)
    runs = {}
    for parallel in (False, True):
        accel = faster_diffusion.enable(pipe, key_steps="auto:5", parallel=parallel, calibration=calibration)
        runs[parallel] = sample(pipe)
        assert accel.stats["encoder_passes"] == 5 and accel.stats["schedule_source"] == "auto:5 from the calibration argument"
        assert accel.stats["unet_calls"] == (5 if parallel else STEPS)
    assert ((runs[True] - runs[False]).abs().max() / runs[False].abs().max()).item() <= 1e-5
    faster_diffusion.disable(pipe)
    assert (sample(pipe) - runs[False]).abs().max() > 1e-3


def test_shipped_calibration_file_is_found_in_the_model_directory(tmp_path, pipe):
    from diffusers import StableDiffusionPipeline

    pipe.save_pretrained(tmp_path / "model")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    calibration = faster_diffusion.calibrate(loaded, "a cyan circle", STEPS, height=SIZE, width=SIZE)
    path = calibration.save(tmp_path / "model" / "calibration" / "DDIM-12.json")
    (tmp_path / "model" / "calibration" / "broken.json").write_text("{")
    accel = faster_diffusion.enable(loaded, key_steps="auto")
    sample(loaded)
    assert accel.stats["schedule_source"] == f"auto from file {path}"
    assert accel.stats["key_steps"] == calibration.schedule() and not accel.calibrations


@pytest.mark.parametrize(
    "spec, message",
    [("auto:0", "B must be an integer >= 1"), ("auto:x", "B must be an integer >= 1"), ("auto:", "B must be an integer >= 1")],
)
def test_bad_auto_specs_raise(pipe, spec, message):
    with pytest.raises(ValueError, match=f"key_steps={spec!r}: {message}"):
        faster_diffusion.enable(pipe, key_steps=spec)


def test_budget_above_the_step_count_raises_before_any_step(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        faster_diffusion.enable(pipe, key_steps="auto:13")
        with pytest.raises(ValueError, match=r"key_steps='auto:13': a budget of 13 encoder passes is more than the 12 steps"):
            sample(pipe)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match=r"B must lie in \[1, 12\]"):
        faster_diffusion.check_key_steps("auto:13", 12)


def test_calibration_argument_must_be_a_calibration(pipe):
    with pytest.raises(TypeError, match="calibration: expected a Calibration"):
        faster_diffusion.enable(pipe, key_steps="auto", calibration=[3])


def test_refine_lowers_the_distance_to_stock_and_serves_auto_b(pipe):
    prompts = ["a red circle", "a blue square"]
    calibration = faster_diffusion.calibrate(
        pipe, prompts, STEPS, height=SIZE, width=SIZE, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]
    )
    start = calibration.least_cost_schedule(3)
    previous = faster_diffusion.enable(pipe, key_steps="uniform:4")
    keys, report = faster_diffusion.refine(pipe, calibration, 3, prompts, seeds=[0, 1], height=SIZE, width=SIZE)
    assert pipe.unet._faster_diffusion is previous and previous.key_steps == "uniform:4"  # put back
    assert len(keys) == 3 and keys[0] == 0 and report["initial_key_steps"] == start
    assert report["latent_mse_after"] <= report["latent_mse_before"]
    assert calibration.refined[3] == keys and calibration.least_cost_schedule(3) == start
    # the reported distance is the real one
    faster_diffusion.disable(pipe)
    stock = pipe(prompts, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
    accel = faster_diffusion.enable(pipe, key_steps="auto:3", calibration=calibration, noise_injection=0)
    out = pipe(prompts, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
    assert accel.stats["key_steps"] == keys
    assert (out - stock).pow(2).mean().item() == pytest.approx(report["latent_mse_after"], rel=1e-4)


def test_local_search_never_moves_a_key_past_the_last_step():
    """A +2 move of the second-to-last key passes the last one: the candidate must stay in range
    (a 20-step DPM-Solver refinement once asked for step 20)."""
    from types import SimpleNamespace

    from faster_diffusion.calibration import _local_search

    start = [0, 4, 5, 10, 11, 18, 19]
    calibration = SimpleNamespace(num_steps=20, least_cost_schedule=lambda budget: list(start))
    seen = []

    def final_latents(keys):  # closer to "stock" the later the keys sit
        if keys is None:
            return torch.zeros(1)
        seen.append(list(keys))
        assert all(0 <= k < 20 for k in keys) and keys == sorted(set(keys)) and len(keys) == len(start), keys
        return torch.tensor([60.0 - sum(keys) / 10])

    keys, best, first, evaluations, initial = _local_search(calibration, len(start), final_latents, 3, (-2, -1, 1, 2))
    assert initial == start and keys[0] == 0 and max(keys) == 19 and best < first
    assert evaluations == len(seen) and any(k[-2] == 18 and k[-1] == 19 for k in seen)


def test_validate_adds_passes_until_the_outputs_are_close_and_serves_auto(pipe, tmp_path):
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    generators = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    call = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    calibration = faster_diffusion.calibrate(pipe, prompts, STEPS, height=SIZE, width=SIZE, generator=generators())
    initial = calibration.schedule()
    stock = pipe(prompts, generator=generators(), **call).images

    def snr_db(keys):
        accel = faster_diffusion.enable(pipe, key_steps=keys, noise_injection=0)
        try:
            out = pipe(prompts, generator=generators(), **call).images
        finally:
            faster_diffusion.disable(pipe)
        assert accel.stats["key_steps"] == keys
        return 10 * np.log10(stock.pow(2).mean().item() / (out - stock).pow(2).mean().item())

    # a bar between the tolerance's schedule and the next budget's, measured here
    below, above = snr_db(initial), snr_db(calibration.least_cost_schedule(len(initial) + 1))
    assert below < above  # the premise: one more pass brings this model's outputs closer
    bar = (below + above) / 2
    previous = faster_diffusion.enable(pipe, key_steps="uniform:4")
    keys, report = faster_diffusion.validate(pipe, calibration, prompts, seeds=seeds, min_snr_db=bar, height=SIZE, width=SIZE)
    assert pipe.unet._faster_diffusion is previous and previous.key_steps == "uniform:4"  # put back
    faster_diffusion.disable(pipe)

    budgets = sorted(report["snr_db"])
    assert report["initial_key_steps"] == initial and budgets[0] == len(initial) and len(keys) == budgets[-1]
    assert all(report["snr_db"][b] < bar for b in budgets[:-1]) and report["snr_db"][budgets[-1]] >= bar
    assert report["snr_db"][len(keys)] == pytest.approx(snr_db(keys), abs=1e-2)  # the reported SNR is the real one
    # "auto" now resolves to it, also from the file; an explicit tolerance still gets the feature schedule
    assert calibration.schedule() == keys and calibration.schedule(tolerance=0.025) == initial
    loaded = Calibration.load(calibration.save(tmp_path / "c.json"))
    assert loaded.validated == keys and loaded.schedule() == keys
    accel = faster_diffusion.enable(pipe, key_steps="auto", calibration=loaded, noise_injection=0)
    pipe(prompts, generator=generators(), **call)
    assert accel.stats["key_steps"] == keys


def test_validate_with_an_unreachable_bar_ends_at_the_stock_schedule(pipe):
    prompts = ["a red circle"]
    calibration = faster_diffusion.calibrate(pipe, prompts, STEPS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0))
    before = sample(pipe)
    keys, report = faster_diffusion.validate(pipe, calibration, prompts, min_snr_db=float("inf"), height=SIZE, width=SIZE)
    assert keys == list(range(STEPS)) and report["snr_db"][STEPS] is None
    assert len(report["snr_db"]) == STEPS - len(report["initial_key_steps"]) + 1  # every budget tried
    torch.testing.assert_close(sample(pipe), before, rtol=0, atol=0)  # the pipeline is left stock
