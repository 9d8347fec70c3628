"""Plans: a level of reuse per step; the planner's search; its API and errors."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import BUNDLED, SIZE, difference, features_forecast_at, guidance_reused_at, sample
from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPAGPipeline
from PIL import Image
from tiny_pipelines import tiny_sd

import faster_diffusion
from faster_diffusion.plan import CHEAP_LEVELS, DEFAULT_PLAN_SNR_DB, FORECAST_MARGIN_DB, AutoPlan, CostModel, ErrorModel, choose, decoder_groups, frontier, parse_plan, plan_letters, segment_gaps, segments
from faster_diffusion.calibration import uniform_probe
from faster_diffusion.unet_split import forecast_module
from faster_diffusion.unet_split import CONDITIONAL_ONLY, DEEP, DEEP_CFG, DEEP_CFG_FORECAST, DEEP_FORECAST, ENCODER, FULL, SHALLOW

STEPS = 12


@pytest.fixture(autouse=True)
def stock_afterwards(pipe):
    yield
    faster_diffusion.disable(pipe)


def test_an_all_full_plan_is_stock_bit_for_bit(pipe):
    stock = sample(pipe, steps=STEPS)
    accel = faster_diffusion.enable(pipe, plan="F" * STEPS)
    assert torch.equal(sample(pipe, steps=STEPS), stock)
    assert accel.stats["plan"] == "F" * STEPS and accel.stats["encoder_passes"] == STEPS


@pytest.mark.parametrize("plan", ["FEEFDDFSSFED", "FDDDDDFEEEEE", "FSEDFEESDDFE", "FEECCDFSCFEC", "FEEFXXFFYYFX", "FFXXFEEFYYFY"])
def test_parallel_equals_sequential(pipe, plan):
    faster_diffusion.enable(pipe, plan=plan, parallel=False)
    sequential = sample(pipe, steps=STEPS)
    accel = faster_diffusion.enable(pipe, plan=plan, parallel=True)
    parallel = sample(pipe, steps=STEPS)
    assert difference(parallel, sequential) < 1e-4
    assert accel.stats["unet_calls"] == len(decoder_groups(parse_plan(plan), parallel=True)) < STEPS


def test_disable_restores_the_stock_pipeline(pipe):
    modules = {name: dict(m.__dict__) for name, m in pipe.unet.named_modules()}
    stock = sample(pipe, steps=STEPS)
    bar, step = pipe.__dict__.get("progress_bar"), pipe.scheduler.__dict__.get("step")
    with faster_diffusion.enable(pipe, plan="FDDFEEFSSFCC", noise_injection=0.01):
        sample(pipe, steps=STEPS)
    assert torch.equal(sample(pipe, steps=STEPS), stock)
    assert pipe.__dict__.get("progress_bar") is bar and pipe.scheduler.__dict__.get("step") is step
    for name, module in pipe.unet.named_modules():
        assert module.__dict__.keys() == modules[name].keys(), name


def test_levels_in_stats_agree_with_what_the_unet_ran(pipe):
    """Sequentially, each level computes exactly its modules. A replayed module's own computation is not
    called, so it is counted inside: a child's forward hook, or conv_in's _conv_forward."""
    unet = pipe.unet
    last = unet.up_blocks[-1]
    inside = {
        "down0": unet.down_blocks[0].resnets[0], "down1": unet.down_blocks[1].resnets[0], "mid": unet.mid_block.resnets[0],
        "up0": unet.up_blocks[0].resnets[0], "last_first_resnet": last.resnets[0].conv1,
        "last_last_resnet": last.resnets[-1].conv1, "conv_out": unet.conv_out,
    }
    runs_at = {  # which counted modules compute at each level
        FULL: {"conv_in", *inside}, ENCODER: {"up0", "last_first_resnet", "last_last_resnet", "conv_out"},
        SHALLOW: {"conv_in", "down0", "last_first_resnet", "last_last_resnet", "conv_out"},
        DEEP: {"conv_in", "last_last_resnet", "conv_out"}, DEEP_CFG: {"conv_in", "last_last_resnet", "conv_out"},
    }
    counts = dict.fromkeys(runs_at[FULL], 0)

    def count(name):
        def hook(module, args):
            counts[name] += 1

        return hook

    plan = "FEEDCSFDSEFC"
    accel = faster_diffusion.enable(pipe, plan=plan, parallel=False)
    handles = [module.register_forward_pre_hook(count(name)) for name, module in inside.items()]
    conv = unet.conv_in._conv_forward
    unet.conv_in._conv_forward = lambda *args: (count("conv_in")(None, args), conv(*args))[1]
    try:
        sample(pipe, steps=STEPS)
    finally:
        del unet.conv_in._conv_forward
        for handle in handles:
            handle.remove()
    levels = parse_plan(accel.stats["plan"])
    assert accel.stats["plan"] == plan
    assert accel.stats["levels"] == {level: levels.count(level) for level in dict.fromkeys(levels)}
    for name, counted in counts.items():
        assert counted == sum(name in runs_at[level] for level in levels), name


def test_a_deepcache_uniform_plan_draws_deepcache_s_own_images(pipe):
    DeepCache = pytest.importorskip("DeepCache")
    for interval in (2, 3, 5):
        helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        try:
            theirs = sample(pipe, steps=STEPS)
        finally:
            helper.disable()
        for module in pipe.unet.modules():  # DeepCache leaves bound forwards behind
            module.__dict__.pop("forward", None)
        plan = "".join("F" if i % interval == 0 else "D" for i in range(STEPS))
        faster_diffusion.enable(pipe, plan=plan)
        ours = sample(pipe, steps=STEPS)
        faster_diffusion.disable(pipe)
        assert difference(ours, theirs) < 1e-5, interval
        assert difference(ours, sample(pipe, steps=STEPS)) > 1e-3  # and it is not stock


def guided_cost_model(accel, pipe):
    """The cost model of a guided run of ``sample`` (two rows)."""
    latent = SIZE // pipe.vae_scale_factor
    return accel.cost_models[((2, pipe.unet.config.in_channels, latent, latent), "torch.float32", "cpu", True)]


def test_a_deep_cfg_step_is_a_deep_step_with_the_full_step_s_guidance_difference(pipe):
    """deep_cfg runs the conditional rows of a deep step; the unconditional output is the conditional one less
    the guidance difference of the latest full step (here with a forward hook on a deep plan)."""
    plan = "FDDDFDDFDDDD"
    faster_diffusion.enable(pipe, plan=plan)
    deep = sample(pipe, steps=STEPS, guidance_scale=7.5)
    handle = pipe.unet.register_forward_hook(guidance_reused_at(plan.replace("D", "C")), with_kwargs=True)
    try:
        expected = sample(pipe, steps=STEPS, guidance_scale=7.5)
    finally:
        handle.remove()
    accel = faster_diffusion.enable(pipe, plan=plan.replace("D", "C"))
    ours = sample(pipe, steps=STEPS, guidance_scale=7.5)
    assert difference(ours, expected) < 1e-4 and difference(ours, deep) > 1e-3
    assert accel.stats["levels"] == {FULL: 3, DEEP_CFG: 9}
    accel.disable()
    # half the rows, half the work (the cost model counts each level's call)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=faster_diffusion.calibrate(
        pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE))
    sample(pipe, steps=STEPS)
    flops = guided_cost_model(accel, pipe).flops
    assert flops[DEEP_CFG] == pytest.approx(flops[DEEP] / 2, rel=0.01)


def test_a_forecast_step_extrapolates_the_latest_two_full_steps(pipe):
    """deep_forecast is a deep step whose replayed deep features are extrapolated from the latest two full steps
    (here with a forward hook on a deep plan); without two (the first segment, after shallow steps) it is deep.
    deep_cfg_forecast extrapolates the guidance difference too."""
    plan = "FFXXXFXXFSXX"  # m = 1, then 4; a shallow step recomputes what a forecast extrapolates
    deep = plan.replace("X", "D")
    module = forecast_module(pipe.unet)
    faster_diffusion.enable(pipe, plan=deep)
    replayed = sample(pipe, steps=STEPS)
    handle = module.register_forward_hook(features_forecast_at(plan))
    try:
        expected = sample(pipe, steps=STEPS)
    finally:
        handle.remove()
    accel = faster_diffusion.enable(pipe, plan=plan)
    ours = sample(pipe, steps=STEPS)
    assert difference(ours, expected) < 1e-5 and difference(ours, replayed) > 1e-3
    assert accel.stats["levels"] == {FULL: 4, DEEP_FORECAST: 7, SHALLOW: 1}
    conditional = plan.replace("X", "Y")
    hooks = [module.register_forward_hook(features_forecast_at(conditional)),
             pipe.unet.register_forward_hook(guidance_reused_at(conditional), with_kwargs=True)]
    faster_diffusion.enable(pipe, plan=deep)
    try:
        expected = sample(pipe, steps=STEPS)
    finally:
        for handle in hooks:
            handle.remove()
    faster_diffusion.enable(pipe, plan=conditional)
    assert difference(sample(pipe, steps=STEPS), expected) < 1e-4


def test_forecasts_use_their_calibration_s_weights(pipe):
    """A forecast's weight at distance m and step k comes from the run's calibration, fitted to the stock
    outputs: a zero weight replays like the level it forecasts, a larger one moves further."""
    calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    weights = calibration.error_model.forecast_weight
    assert all(((0 <= w) & (w <= 2)).all() for w in weights.values()) and len({float(w.std()) for w in weights.values()}) == 2
    plan = "FFXXXFXXFXXX"
    runs = {}
    for scale in (0.0, 1.0, 2.0):
        calibration.error_model.forecast_weight = {level: w * scale for level, w in weights.items()}
        faster_diffusion.enable(pipe, plan=plan, calibration=calibration)
        runs[scale] = sample(pipe, steps=STEPS)
    faster_diffusion.enable(pipe, plan=plan.replace("X", "D"))
    assert torch.equal(runs[0.0], sample(pipe, steps=STEPS))
    assert 1e-4 < difference(runs[1.0], runs[0.0]) < difference(runs[2.0], runs[0.0])


def test_deep_cfg_needs_classifier_free_guidance(pipe):
    faster_diffusion.enable(pipe, plan="FCCCFCCCFCCC")
    with pytest.raises(ValueError, match=r"levels \['deep_cfg'\] reuse the guidance difference and need classifier-free guidance"):
        sample(pipe, steps=STEPS, guidance_scale=1.0)
    pix2pix = tiny_sd(StableDiffusionInstructPix2PixPipeline, in_channels=8)  # guides on three kinds of rows
    pix2pix.set_progress_bar_config(disable=True)
    faster_diffusion.enable(pix2pix, plan="FCCCFCCC")
    with pytest.raises(ValueError, match=r"on \[unconditional, conditional\] rows"):
        pix2pix("x", image=Image.new("RGB", (SIZE, SIZE)), num_inference_steps=8, output_type="latent")
    faster_diffusion.disable(pix2pix)
    with pytest.raises(ValueError, match=r"plans=True: StableDiffusionInstructPix2PixPipeline guides on more than"):
        faster_diffusion.calibrate(pix2pix, ["x"], 8, plans=True, image=Image.new("RGB", (SIZE, SIZE)))
    pag = tiny_sd(StableDiffusionPAGPipeline)  # perturbed-attention guidance adds rows of its own
    pag.set_progress_bar_config(disable=True)
    faster_diffusion.enable(pag, plan="FCCCFCCC")
    with pytest.raises(ValueError, match=r"on \[unconditional, conditional\] rows"):
        pag("x", num_inference_steps=8, height=SIZE, width=SIZE, pag_scale=3.0, output_type="latent")


def test_guided_and_unguided_runs_of_one_shape_measure_their_own_cost_models(pipe):
    """Two unguided images and one guided image give the UNet the same 2-row batch; only the guided run can
    take deep_cfg steps (and its call encodes a negative prompt), so each gets its own cost model."""
    calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS, guidance_scale=1.0, num_images_per_prompt=2)  # auto leaves deep_cfg out unguided
    assert not set(CONDITIONAL_ONLY) & set(accel.stats["levels"])
    sample(pipe, steps=STEPS)
    assert set(CONDITIONAL_ONLY) & set(accel.stats["levels"])
    shape = (2, pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    unguided, guided = (accel.cost_models[(shape, "torch.float32", "cpu", g)] for g in (False, True))
    assert set(CONDITIONAL_ONLY) <= set(guided.level) and not set(CONDITIONAL_ONLY) & set(unguided.level)


def test_a_cost_model_without_a_level_the_run_can_take_is_measured_again(pipe):
    """A cost model kept from before a level existed (a service's cache) would hide that level from the planner."""
    calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS)
    cost = guided_cost_model(accel, pipe)
    key = next(k for k, v in accel.cost_models.items() if v is cost)
    older = replace(cost, level={lv: t for lv, t in cost.level.items() if lv not in (DEEP_FORECAST, DEEP_CFG_FORECAST)})
    accel.cost_models[key] = older
    sample(pipe, steps=STEPS)
    assert accel.cost_models[key] is not older and {DEEP_FORECAST, DEEP_CFG_FORECAST} <= set(accel.cost_models[key].level)


def test_auto_plans_a_setting_nobody_calibrated_from_the_nearest_error_model(pipe):
    """Another size keeps the calibration's error model (its forecasts too); another step count resamples it
    (forecasts left out). No stock run calibrates, and the plan is the one the error model gives with this
    run's cost model. An exact calibration without an error model does not stop the plan."""
    calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
    bigger = 2 * SIZE
    keys_only = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], height=bigger, width=bigger)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=[keys_only, calibration])
    sample(pipe, steps=STEPS, size=bigger)
    assert accel.stats["schedule_source"].startswith("auto from a calibration derived from ") and "(same timesteps, another size)" in accel.stats["schedule_source"]
    assert not accel.calibrations  # no stock run calibrated
    latent = bigger // pipe.vae_scale_factor
    cost = accel.cost_models[((2, pipe.unet.config.in_channels, latent, latent), "torch.float32", "cpu", True)]
    assert accel.stats["plan"] == plan_letters(choose(AutoPlan(), calibration.error_model, cost).levels) != "F" * STEPS
    (derived,) = [c for _, c in accel._derived.values()]
    assert derived.error_model is calibration.error_model  # forecasts and all
    sample(pipe, steps=STEPS, size=bigger)
    assert [c for _, c in accel._derived.values()] == [derived]  # derived once
    # another step count: resampled, without the forecasting levels
    sample(pipe, steps=STEPS - 3)
    assert "(timesteps mapped)" in accel.stats["schedule_source"] and not accel.calibrations
    resampled = next(c for _, c in accel._derived.values() if c.num_steps == STEPS - 3).error_model
    assert resampled.num_steps == STEPS - 3 and not {DEEP_FORECAST, DEEP_CFG_FORECAST} & set(resampled.error)
    assert accel.stats["plan"] != "F" * (STEPS - 3)
    accel.disable()
    # with no error model anywhere: encoder propagation at auto's key steps, as before
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=keys_only)
    sample(pipe, steps=STEPS, size=bigger)
    assert "it has no error model for plans" in accel.stats["schedule_source"] and set(accel.stats["plan"]) == {"F", "E"}
    accel.disable()


def test_pndm_plans_its_own_loop_of_one_step_more(pipe):
    """PNDM's loop runs num_inference_steps + 1 steps: its error model has one a loop step, and validation runs the
    same num_inference_steps the calibration did (not one more)."""
    from diffusers import PNDMScheduler

    original = pipe.scheduler
    pipe.scheduler = PNDMScheduler.from_config(original.config, skip_prk_steps=True)
    try:
        calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[0], plans=True, height=SIZE, width=SIZE)
        assert calibration.num_steps == calibration.error_model.num_steps == STEPS + 1
        plan, report = faster_diffusion.validate_plan(pipe, calibration, height=SIZE, width=SIZE, iterations=2)
        assert len(plan) == STEPS + 1 and all(len(tried["plan"]) == STEPS + 1 for tried in report["tried"])
        accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
        sample(pipe, steps=STEPS)
        assert accel.stats["schedule_source"].startswith("auto from the calibration argument (predicted")
        assert len(accel.stats["plan"]) == STEPS + 1
    finally:
        faster_diffusion.disable(pipe)
        pipe.scheduler = original


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(plan="auto:0.5"), r"plan='auto:0.5': T in 'auto:T' must be a number > 1"),
        (dict(plan="auto:x"), r"plan='auto:x': T in 'auto:T' must be a number > 1"),
        (dict(plan="auto:1"), r"must be a number > 1"),
        (dict(plan="FDZD"), r"plan='FDZD' is not a plan; accepted: 'auto'.*F/E/S/D/X/C/Y/O letters"),
        (dict(plan="DDFF"), r"step 0 must be a full step"),
        (dict(plan=["full", "warp"]), r"unknown levels \['warp'\]"),
        (dict(plan="auto", key_steps="paper"), r"plan='auto' and key_steps='paper': give one of them, not both"),
        (dict(plan="auto", key_steps=[0, 2]), r"give one of them, not both"),
    ],
)
def test_bad_plans_raise_value_errors_naming_the_field(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        faster_diffusion.enable(pipe, **options)
    assert getattr(pipe.unet, "_faster_diffusion", None) is None  # nothing left behind


def test_a_plan_of_the_wrong_length_fails_before_any_step(pipe):
    faster_diffusion.enable(pipe, plan="FDD")
    with pytest.raises(ValueError, match=r"plan='FDD' has 3 levels; the run has 12 steps"):
        sample(pipe, steps=STEPS)


def random_models(n, seed, forecast=False):
    rng = np.random.default_rng(seed)
    growth = np.arange(1, 8)[None, :] ** 2
    error = {lv: rng.uniform(0.5, 2, (n, 7)) * growth * scale for lv, scale in ((ENCODER, 0.5), (SHALLOW, 0.8), (DEEP, 1.0))}
    level = {ENCODER: 0.7, SHALLOW: 0.4, DEEP: 0.15}
    if forecast:  # better or worse than deep by distance to the full step before; none before step 1
        error[DEEP_FORECAST] = error[DEEP][:, :, None] * rng.uniform(0.05, 3, (n, 7, 8))
        np.moveaxis(error[DEEP_FORECAST], 2, 1)[np.arange(n)[:, None] < np.arange(1, 9)[None, :]] = np.nan  # [a, m - 1]
        level[DEEP_FORECAST] = 0.16
    model = ErrorModel(error, rng.uniform(0.1, 1, n), signal=100.0)
    cost = CostModel(full={1: 1.0, 2: 1.3, 4: 1.9, 8: 3.1}, level=level, step_overhead=0.05)
    return model, cost


@pytest.mark.parametrize("seed", range(3))
def test_the_frontier_is_the_exact_least_error_plan_for_each_time(seed):
    """Exact also with a forecasting level, whose error depends on the segment before (here, half the seeds)."""
    n = 7
    model, cost = random_models(n, seed, forecast=seed > 0)
    plans = [(FULL,) + rest for rest in itertools.product((FULL, *model.error), repeat=n - 1)]
    homogeneous = [p for p in plans if all(len({lv for lv in p[s : s + m] if lv != FULL} - {FULL}) <= 1
                                           for s, m, _ in segments(p))]
    scored = [(cost.plan_seconds(p), model.predicted_error(p), p) for p in homogeneous]
    found = frontier(model, cost, bins=1000)
    assert found and all(a.cost < b.cost and a.error > b.error for a, b in zip(found, found[1:]))
    assert any(DEEP_FORECAST in choice.levels for choice in found) == (DEEP_FORECAST in model.error)
    for choice in found:
        best = min(e for s, e, _ in scored if s <= choice.seconds + 1e-9)
        assert choice.error == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_auto_t_is_the_most_faithful_plan_predicted_t_times_faster():
    model, cost = random_models(12, 0)
    for target in (1.5, 2.0, 3.0):
        choice = choose(AutoPlan(target), model, cost)
        assert choice.speedup(cost) >= target
        faster = [c for c in frontier(model, cost) if c.speedup(cost) >= target]
        assert choice.error == min(c.error for c in faster)
    fastest = choose(AutoPlan(50.0), model, cost)  # out of reach: the fastest plan
    assert fastest.seconds == min(c.seconds for c in frontier(model, cost))
    model.target_snr_db = -np.inf  # anything goes: auto is the fastest plan
    assert choose(AutoPlan(), model, cost).seconds == fastest.seconds


def test_t_times_faster_means_here_and_on_a_compute_bound_device():
    """Batched encoder decoders time cheap on an idle device; with FLOPs known, a plan counts as T times
    faster only if its FLOPs are T times fewer too, and the frontier is exact for that cost."""
    n = 7
    model, cost = random_models(n, 1)
    cost.full = {1: 1.0, 2: 1.05, 4: 1.15, 8: 1.35}  # decoders nearly free in a batch: encoder plans time well
    cost.flops = {FULL: 10.0, ENCODER: 7.0, SHALLOW: 4.0, DEEP: 1.5}
    plans = [(FULL,) + rest for rest in itertools.product((FULL, ENCODER, SHALLOW, DEEP), repeat=n - 1)]
    homogeneous = [p for p in plans if all(len(set(p[s + 1 : s + m])) <= 1 for s, m, _ in segments(p))]
    stock = cost.stock_seconds(n)
    for target in (1.5, 2.0, 2.5):
        choice = choose(AutoPlan(target), model, cost)
        assert stock / choice.seconds >= target and stock / cost.busy_seconds(choice.levels) >= target
        assert choice.cost == pytest.approx(max(choice.seconds, cost.busy_seconds(choice.levels)))
        # no plan whose segments cost at most T times less is more faithful
        fast = [p for p in homogeneous if stock / sum(cost.plan_cost(p[s : s + m]) for s, m, _ in segments(p)) >= target]
        assert choice.error == pytest.approx(min(model.predicted_error(p) for p in fast), rel=1e-9)
    time_only = CostModel(cost.full, cost.level, cost.step_overhead)  # without FLOPs: time alone
    assert ENCODER in choose(AutoPlan(2.5), model, time_only).levels
    assert ENCODER not in choose(AutoPlan(2.5), model, cost).levels


def test_the_calls_work_outside_the_loop_is_part_of_every_speedup():
    """Prompt encoding and the VAE decode cost every plan the same: they leave the frontier's plans as they
    are, and a plan picked for "T times faster" is that much faster as a whole call."""
    model, cost = random_models(12, 2)
    cost.flops = {FULL: 10.0, ENCODER: 7.0, SHALLOW: 4.0, DEEP: 1.5}
    loop_only = [c.levels for c in frontier(model, cost)]
    cost.call_overhead = 3.0
    whole_call = frontier(model, cost)
    assert [c.levels for c in whole_call] == loop_only
    stock = cost.stock_seconds(12)
    assert stock == pytest.approx(12 * (cost.full[1] + cost.step_overhead) + 3.0)
    for target in (1.5, 2.0):
        choice = choose(AutoPlan(target), model, cost)
        assert stock / choice.seconds >= target and stock / cost.busy_seconds(choice.levels) >= target
        assert choice.seconds == pytest.approx(cost.plan_seconds(choice.levels)) and choice.seconds > 3.0
        cost.call_overhead = 0.0  # T counted on the loop alone: a slower, more faithful plan would do
        loop_choice = choose(AutoPlan(target), model, cost)
        cost.call_overhead = 3.0
        assert choice.cost - 3.0 <= loop_choice.cost and choice.error >= loop_choice.error
    assert choose(AutoPlan(2.0), model, cost).levels != choose(AutoPlan(2.0), model, replace(cost, call_overhead=0.0)).levels


def test_the_cost_model_times_the_pipeline_call_outside_the_loop(pipe):
    calibration = faster_diffusion.calibrate(pipe, ["a red square"], STEPS, seeds=[3], plans=True, height=SIZE, width=SIZE)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=calibration)
    sample(pipe, steps=STEPS)
    cost = guided_cost_model(accel, pipe)
    assert 0 < cost.call_overhead < cost.stock_seconds(STEPS)
    assert accel.stats["predicted_speedup"] == round(cost.stock_seconds(STEPS) / cost.plan_seconds(parse_plan(accel.stats["plan"])), 3)


def test_plan_calibration_fits_saves_and_drives_auto(pipe, tmp_path):
    prompts = ["a red square", "a blue circle"]
    calibration = faster_diffusion.calibrate(pipe, prompts, STEPS, seeds=[3, 4], plans=True, height=SIZE, width=SIZE)
    model = calibration.error_model
    cheap = {ENCODER, SHALLOW, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST}
    assert set(model.error) == cheap and model.error[DEEP].shape == (STEPS, 7)
    assert np.isnan(model.error[DEEP][STEPS - 1]).all() and (model.error[DEEP][0] > 0).all()
    # a forecast's error per distance m to the full step before: none from step 0, which has no full step before it
    assert model.error[DEEP_FORECAST].shape == (STEPS, 7, 8) and np.isnan(model.error[DEEP_FORECAST][0]).all()
    assert (model.error[DEEP_FORECAST][3, :, :3] >= 0).all() and np.isnan(model.error[DEEP_FORECAST][3, :, 3:]).all()
    assert set(model.forecast_weight) == {DEEP_FORECAST, DEEP_CFG_FORECAST} and model.forecast_weight[DEEP_FORECAST].shape == (8, 7)
    assert (model.sensitivity[1:] > 0).all() and model.signal > 0
    plan, report = faster_diffusion.validate_plan(pipe, calibration, height=SIZE, width=SIZE)
    assert set(report["level_correction"]) == cheap and report["correction"] > 0
    # a correction per segment length: each uniform probe's prediction (before the overall correction) is what
    # its outputs measured
    for level in cheap:
        for length in range(2, model.max_run + 1):
            probe = plan_letters(uniform_probe(level, length, STEPS))
            assert probe.startswith("FF" if level in (DEEP_FORECAST, DEEP_CFG_FORECAST) else "F" + plan_letters([level]))
            tried = next(t for t in report["tried"] if t["plan"] == probe)  # the probe's, first
            assert tried["corrected"]
            assert model.snr_db(model.predicted_error(probe) / model.correction) == pytest.approx(tried["snr_db"], abs=0.02)
    path = calibration.save(tmp_path / "DDIM.json")
    loaded = faster_diffusion.Calibration.load(path)
    np.testing.assert_allclose(loaded.error_model.sensitivity, model.sensitivity, rtol=1e-5)
    np.testing.assert_allclose(loaded.error_model.error[DEEP], model.error[DEEP], rtol=1e-5)
    np.testing.assert_allclose(loaded.error_model.error[DEEP_CFG_FORECAST], model.error[DEEP_CFG_FORECAST], rtol=1e-5)
    for level, weight in model.forecast_weight.items():
        np.testing.assert_allclose(loaded.error_model.forecast_weight[level], weight, atol=1e-4)
    for level, corrections in model.level_correction.items():
        np.testing.assert_allclose(loaded.error_model.level_correction[level], corrections, rtol=1e-9)
    accel = faster_diffusion.enable(pipe, plan="auto", calibration=path)
    # the batch the validation ran: the same cost model, so the plan it picked
    pipe(prompts, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
         generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    assert accel.stats["plan"] == plan and accel.stats["schedule_source"].startswith(f"auto from file {path}")
    assert accel.stats["unet_flops"] < accel.stats["stock_unet_flops"]
    assert accel.stats["predicted_speedup"] > 1 and accel.stats["measured_speedup"] > 0
    # a run over the tail of the timesteps (img2img's strength) gets the slice of the error model
    part = loaded.for_run("DDIMScheduler", loaded.timesteps[4:], loaded.latent_size)
    assert part.error_model.num_steps == STEPS - 4
    np.testing.assert_array_equal(part.error_model.error[DEEP], loaded.error_model.error[DEEP][4:])


@pytest.mark.parametrize("name", sorted(p.stem for p in (BUNDLED / "calibration").glob("*.json")))
def test_the_bundled_error_models_were_validated_for_auto(name):
    """Every shipped calibration has an error model with every level, and its validation ended on a pick that met
    the default target on the calibration prompts and that the corrected model picks again (converged)."""
    model = faster_diffusion.Calibration.load(BUNDLED / "calibration" / f"{name}.json").error_model
    report = model.info["validation"]
    assert set(model.error) == set(CHEAP_LEVELS) - {"output"} and model.target_snr_db == DEFAULT_PLAN_SNR_DB  # (transformers' own)
    assert report["converged"] and report["tried"][-1]["plan"] == report["plan"]
    assert report["tried"][-1]["snr_db"] >= DEFAULT_PLAN_SNR_DB
    # and for the plans without the forecasting levels that a resampled model keeps
    assert report["plain_converged"] and model.plain_correction == report["plain_correction"] > 0


def test_a_segment_after_a_shallow_or_encoder_step_has_nothing_to_forecast_from():
    """A shallow or encoder step recomputes the layer a forecast extrapolates, even inside a segment labelled by
    its cheapest level: the next segment's gap is 0 and it is predicted as the level it forecasts."""
    assert [gap for *_, gap in segment_gaps("FDDFXXFXX")] == [0, 3, 3]
    assert [gap for *_, gap in segment_gaps("FSXXFXXFEEFXX")] == [0, 0, 3, 0]
    model, _ = random_models(13, 1, forecast=True)
    assert model.predicted_error("FSXXFXXFEEFXX") == model.predicted_error("FSXXFDDFEEFDD") != model.predicted_error("FSXXFXXFDDFXX")


def test_a_resampled_model_leaves_the_forecasts_out_and_keeps_the_plain_plans_validation():
    """Another step count has no fitted forecast weights: the resampled model plans without the forecasting levels,
    with the correction and the target validation found for plans without them."""
    model, _ = random_models(12, 2, forecast=True)
    model.correction, model.plain_correction, model.target_snr_db = 5.0, 2.0, DEFAULT_PLAN_SNR_DB
    model.level_correction = {lv: [1.5] * 7 for lv in model.error}
    resampled = model.resampled(np.linspace(999, 0, 12), np.linspace(999, 0, 20))
    assert set(resampled.error) == {ENCODER, SHALLOW, DEEP} and resampled.forecast_weight == {}
    assert (resampled.correction, resampled.target_snr_db) == (2.0, DEFAULT_PLAN_SNR_DB - FORECAST_MARGIN_DB)
    assert set(resampled.level_correction) == {ENCODER, SHALLOW, DEEP} and resampled.plain_correction is None
    plan = "F" + "XXF" * 6 + "X"  # an explicit plan with forecasts is predicted as replays
    assert resampled.predicted_error(plan) == resampled.predicted_error(plan.replace("X", "D"))
    plain, _ = random_models(12, 2)  # a model that never had them keeps its own
    plain.correction = 3.0
    assert plain.resampled(np.linspace(999, 0, 12), np.linspace(999, 0, 20)).correction == 3.0
