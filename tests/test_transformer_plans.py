"""plan="auto" and key_steps="auto" on transformers: the calibration of tiny PixArt, SD3 and Flux pipelines (one guided
call a step, or a call per guidance branch), the plan auto picks from it, and the cost model of a step."""

import pytest
import torch
from tiny_transformers import CALLS_PER_BRANCH, PIPELINES
from torch.utils.flop_counter import FlopCounterMode

import faster_diffusion
from faster_diffusion import cost_models
from faster_diffusion.family import DEEP, DEEP_CFG, FULL

STEPS = 8
PROMPTS = ["a red square", "a blue circle"]
BUDGET = 12.0


def call_kwargs(name):
    return {k: v for k, v in PIPELINES[name][1].items() if k not in ("prompt", "output_type")}


def run(pipe, name, prompt="a red square", **overrides):
    kwargs = {**call_kwargs(name), **overrides}
    result = pipe(prompt, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    return result.images if hasattr(result, "images") else result.frames


@pytest.fixture(scope="module", params=["pixart_alpha", "sd3", "flux", "wan"])
def calibrated(request):
    name = request.param
    pipe = PIPELINES[name][0]()
    with FlopCounterMode(display=False) as counter:
        calibration = faster_diffusion.calibrate(pipe, PROMPTS, STEPS, plans=True, compute_budget=BUDGET, **call_kwargs(name))
    yield name, pipe, calibration, counter.get_total_flops()
    faster_diffusion.disable(pipe)


def stock_image_flops(pipe, name) -> int:
    with FlopCounterMode(display=False) as counter:
        run(pipe, name)
    return counter.get_total_flops()


def test_calibration_fits_every_level_within_its_budget(calibrated):
    name, pipe, calibration, flops = calibrated
    model = calibration.error_model
    assert set(model.error) == {"encoder", "output", "deep", "deep_forecast", "deep_cfg", "deep_cfg_forecast"}
    # (within 10%: the replayed-prefix runs still encode their prompts, a large share of a tiny model's call)
    assert flops <= 1.1 * BUDGET * stock_image_flops(pipe, name)
    assert calibration.info["spent"] <= BUDGET
    # its own count of what it spent agrees with FlopCounterMode's (the stock image: one prompt's call)
    assert calibration.info["spent"] == pytest.approx(flops / stock_image_flops(pipe, name), rel=0.1)
    report = model.info["validation"]
    assert report["tried"] and report["plan"][0] == "F"
    # a run over the scheduler's own timesteps matches it exactly (Flux passes t / 1000)
    run(pipe, name)
    assert calibration.timesteps == [float(t) for t in pipe.scheduler.timesteps]


@pytest.mark.parametrize("letter, level", [("E", "encoder"), ("D", "deep"), ("C", "deep_cfg"), ("O", "output")])
def test_the_fitted_error_of_a_step_is_what_the_pipeline_samples(calibrated, letter, level):
    """The error model's teacher-forced error of step 1 after full step 0 equals the one a pipeline run of that plan
    hands its sampler (the guided prediction's mean squared distance to stock's), whatever the guidance layout."""
    name, pipe, calibration, _ = calibrated
    predictions = {}
    step = pipe.scheduler.step

    def recorded(plan):
        kept = predictions[plan] = []
        pipe.scheduler.step = lambda output, *args, **kw: (kept.append(output.float().clone()), step(output, *args, **kw))[1]
        try:
            faster_diffusion.enable(pipe, plan=plan) if plan != "stock" else faster_diffusion.disable(pipe)
            run(pipe, name, prompt=calibration.info["prompts"][0])
        finally:
            del pipe.scheduler.step
            faster_diffusion.disable(pipe)
        return kept

    stock, planned = recorded("stock"), recorded("F" + letter + "F" * (STEPS - 2))
    measured = float((planned[1] - stock[1]).pow(2).mean())
    assert calibration.error_model.error[level][0][0] == pytest.approx(measured, rel=1e-3)


def test_auto_runs_the_plan_it_picks_from_the_calibration(calibrated):
    name, pipe, calibration, _ = calibrated
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    auto = run(pipe, name)
    plan, source = accel.stats["plan"], accel.stats["schedule_source"]
    assert "from the calibration argument" in source and "derived" not in source
    assert plan[0] == "F" and set(plan) != {"F"}
    accel.set_params(plan=plan)
    assert torch.equal(run(pipe, name), auto)  # the same levels, run explicitly
    faster_diffusion.disable(pipe)


def test_cost_model_costs_a_step(calibrated):
    """With a call per guidance branch a step at deep_cfg makes one call and a deep step two; with one guided call a
    step, deep_cfg runs half the rows of deep."""
    name, pipe, calibration, _ = calibrated
    cost_models(pipe.transformer).clear()
    faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    run(pipe, name)
    faster_diffusion.disable(pipe)
    (cost,) = cost_models(pipe.transformer).values()
    ratio = cost.flops[DEEP] / cost.flops[DEEP_CFG]
    assert ratio == pytest.approx(2.0, rel=0.02 if name not in CALLS_PER_BRANCH else 1e-9)
    assert cost.flops[FULL] > cost.flops[DEEP]


def test_another_size_is_predicted_from_the_flop_curve(calibrated):
    """A second size's cost model is predicted, nothing timed; its FLOPs are the ones counted at that size."""
    name, pipe, calibration, _ = calibrated
    if name.startswith("pixart"):
        pytest.skip("the tiny PixArt pipeline samples its one size")
    store = cost_models(pipe.transformer)
    store.clear()
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    run(pipe, name)
    size = dict(height=48, width=48)
    run(pipe, name, **size)
    predicted = [c for c in store.values() if "predicted_from" in c.info]
    assert len(predicted) == 1
    store.clear()
    accel.set_params(plan="auto")
    run(pipe, name, **size)  # measured at that size now
    (measured,) = store.values()
    for level in (FULL, DEEP, DEEP_CFG):
        assert predicted[0].flops[level] == pytest.approx(measured.flops[level], rel=1e-6)
    faster_diffusion.disable(pipe)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_unguided_runs_calibrate_and_plan(name):
    """Without guidance (Flux without a negative prompt: one call a step, still in cache_context("cond")) the error
    model has no conditional-only level and auto plans from it."""
    pipe = PIPELINES[name][0]()
    unguided = {**call_kwargs(name), **({"negative_prompt": None} if name == "flux" else {"guidance_scale": 1.0})}
    calibration = faster_diffusion.calibrate(pipe, PROMPTS, STEPS, plans=True, compute_budget=BUDGET, **unguided)
    assert set(calibration.error_model.error) == {"encoder", "output", "deep", "deep_forecast"}
    accel = faster_diffusion.enable(pipe, plan="auto:1.5", calibration=calibration)
    pipe("a red square", num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0), **unguided)
    assert set(accel.stats["plan"]) - {"F"} and not set(accel.stats["plan"]) & {"C", "Y"}
    faster_diffusion.disable(pipe)


def test_key_steps_auto_calibrates_on_the_first_run():
    name = "flux"
    pipe = PIPELINES[name][0]()
    stock = run(pipe, name)
    accel = faster_diffusion.enable(pipe, key_steps="auto")
    assert torch.equal(run(pipe, name), stock)  # the first run is stock and records the encoder features
    assert len(accel.calibrations) == 1 and accel.calibrations[0].num_steps == STEPS
    accelerated = run(pipe, name)
    keys = accel.stats["key_steps"]
    assert keys[0] == 0 and len(keys) < STEPS
    assert not torch.equal(accelerated, stock)
    faster_diffusion.disable(pipe)


def test_dit_plans_are_not_fitted():
    build, _ = PIPELINES["dit"]
    with pytest.raises(ValueError, match="plans=True: DiTPipeline"):
        faster_diffusion.calibrate(build(), "a", STEPS, plans=True, class_labels=[3], guidance_scale=4.0)
