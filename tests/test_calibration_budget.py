"""A calibration within a compute budget, and cost models predicted for new shapes instead of timed."""

import math

import numpy as np
import pytest
import torch
from conftest import SIZE, sample
from torch.utils.flop_counter import FlopCounterMode

import faster_diffusion
from faster_diffusion import accelerator
from faster_diffusion.calibration import Spending, _fill
from faster_diffusion.unet_split import FULL

STEPS = 12
PROMPTS = ["a red square", "a blue circle on the left", "a green triangle at the top"]


@pytest.fixture(autouse=True)
def stock_pipeline_after(pipe):
    yield
    faster_diffusion.disable(pipe)
    faster_diffusion.cost_models(pipe).clear()


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def stock_image_flops(pipe) -> float:
    return flops(lambda: sample(pipe, steps=STEPS, guidance_scale=7.5))


@pytest.mark.parametrize("budget", [6.0, 12.0])
def test_a_budgeted_calibration_spends_at_most_its_budget_and_plans(pipe, budget):
    """FLOPs of the whole calibrate() (stock run, error model, validation on outputs) <= budget stock images."""
    made = []
    spent = flops(lambda: made.append(faster_diffusion.calibrate(
        pipe, PROMPTS, STEPS, plans=True, compute_budget=budget, height=SIZE, width=SIZE, guidance_scale=7.5)))
    (calibration,) = made
    assert spent <= budget * stock_image_flops(pipe)
    assert calibration.info["spent"] == pytest.approx(spent / stock_image_flops(pipe), rel=0.02)  # its own count agrees
    assert len(calibration.info["prompts"]) == 1  # one prompt per 12 stock images, at least one
    model = calibration.error_model
    assert model.info["validation"]["compute_budget"] == pytest.approx(budget - len(calibration.info["prompts"]) - model.info["spent"])
    # every step of the model is filled in, between and beyond the measured ones, and auto plans from it
    assert np.isfinite(model.sensitivity).all() and model.sensitivity[0] == 0
    for level, error in model.error.items():
        within = np.arange(STEPS)[:, None] + 1 + np.arange(error.shape[1])[None, :] < STEPS
        plain = error if error.ndim == 2 else error[:, :, 0]  # (a forecast from the full step before: m = 1 <= a)
        assert np.isfinite(plain[within if error.ndim == 2 else within & (np.arange(STEPS) >= 1)[:, None]]).all(), level
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS, guidance_scale=7.5)
    assert accel.stats["plan"][0] == "F" and accel.stats["schedule_source"].startswith("auto from the calibration argument")


def test_the_thorough_calibration_measures_every_step(pipe):
    calibration = faster_diffusion.calibrate(pipe, PROMPTS[:1], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    assert "spending" not in calibration.error_model.info and "compute_budget" not in calibration.info
    assert Spending.thorough(STEPS).perturbed == tuple(range(1, STEPS))


@pytest.mark.parametrize("bad", [0, -1, 3.9, math.nan, math.inf, "30", True])
def test_bad_budgets_are_value_errors_naming_the_argument(pipe, bad):
    with pytest.raises(ValueError, match=r"compute_budget=.* must be a number >= 4 \(stock images"):
        faster_diffusion.calibrate(pipe, PROMPTS, STEPS, plans=True, compute_budget=bad, height=SIZE, width=SIZE)


def test_a_budgeted_validation_needs_the_fit_s_flop_fractions(pipe):
    calibration = faster_diffusion.calibrate(pipe, PROMPTS[:1], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    calibration.error_model.info.pop("flop_fractions")
    with pytest.raises(ValueError, match="compute_budget: this error model has no flop_fractions"):
        faster_diffusion.validate_plan(pipe, calibration, compute_budget=10, height=SIZE, width=SIZE)


def test_fill_interpolates_between_measured_rows_on_a_log_scale():
    values = np.full((5, 2), np.nan)
    values[0], values[4] = [1e-4, 1.0], [1e-2, 1.0]
    valid = np.array([[True, True]] * 4 + [[True, False]])
    filled = _fill(values, [0, 4], valid)
    assert filled[2, 0] == pytest.approx(1e-3) and filled[1, 1] == 1.0 and np.isnan(filled[4, 1])


def test_a_new_shape_gets_a_predicted_cost_model_and_nothing_timed(pipe, monkeypatch):
    """The first planned run measures the cost model (and the FLOP curve of its levels); a run at another size or
    batch predicts its cost model from it: exact FLOPs, no timing on its path."""
    calibration = faster_diffusion.calibrate(pipe, PROMPTS[:1], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS, guidance_scale=7.5)
    models = faster_diffusion.cost_models(pipe)
    measured = dict(models)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed on the request path")

    monkeypatch.setattr(accelerator, "_seconds", no_timing)
    sample(pipe, steps=STEPS, guidance_scale=7.5, size=SIZE + 16, num_images_per_prompt=2)
    (key,) = set(models) - set(measured)
    predicted = models[key]
    assert predicted.info["predicted_from"] == next(iter(measured.values())).info["sample_shape"]
    assert accel.stats["predicted_speedup"] > 1
    monkeypatch.undo()
    # its FLOPs are what the counter counts at that shape
    models.clear()
    sample(pipe, steps=STEPS, guidance_scale=7.5, size=SIZE + 16, num_images_per_prompt=2)
    counted = models[key]
    for level, f in counted.flops.items():
        assert predicted.flops[level] == pytest.approx(f, rel=1e-6), level
    assert predicted.full.keys() == counted.full.keys() and predicted.level.keys() == counted.level.keys()


def test_a_cost_model_round_trips_with_its_flop_curve(pipe):
    calibration = faster_diffusion.calibrate(pipe, PROMPTS[:1], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS, guidance_scale=7.5)
    model = next(iter(faster_diffusion.cost_models(pipe).values()))
    again = faster_diffusion.CostModel.from_dict(model.to_dict())
    assert again.flop_curve == model.flop_curve and FULL in again.flop_curve
    shape = (4, 4, 12, 12)
    assert again.predicted(shape).flops == model.predicted(shape).flops
