"""The transformer split on the ordinary pipe(...) call of tiny DiT, PixArt-alpha/-sigma, SD3 and Flux pipelines."""

import pytest
import torch
from tiny_transformers import CALLS_PER_BRANCH, PIPELINES, UNGUIDED

import faster_diffusion
from faster_diffusion.transformer_split import sites, transformer_blocks

STEPS = 6
PLANS = ["FEEFEE", "FDDFDD", "FCCFCC", "FEDFCE", "FDFXXY", "FFEFYX"]


@pytest.fixture(scope="module", params=list(PIPELINES))
def case(request):
    build, kwargs = PIPELINES[request.param]
    pipe = build()
    yield request.param, pipe, kwargs
    faster_diffusion.disable(pipe)


def run(pipe, kwargs, steps=STEPS, **overrides):
    result = pipe(**{**kwargs, **overrides}, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return result.images if hasattr(result, "images") else result[0]


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_all_full_equals_stock(case):
    _, pipe, kwargs = case
    stock = run(pipe, kwargs)
    for options in (dict(plan="F" * STEPS), dict(key_steps="all", noise_injection=0)):
        accel = faster_diffusion.enable(pipe, **options)
        assert torch.equal(run(pipe, kwargs), stock)
        assert accel.stats["encoder_passes"] == STEPS
    faster_diffusion.disable(pipe)


@pytest.mark.parametrize("plan", PLANS)
def test_parallel_equals_sequential(case, plan):
    _, pipe, kwargs = case
    faster_diffusion.enable(pipe, plan=plan, parallel=False)
    sequential = run(pipe, kwargs)
    accel = faster_diffusion.enable(pipe, plan=plan, parallel=True)
    parallel = run(pipe, kwargs)
    assert relative(parallel, sequential) <= 1e-5
    faster_diffusion.disable(pipe)
    assert relative(run(pipe, kwargs), sequential) > 1e-4  # the plan did change the computation
    assert accel.stats["plan"] == plan and accel.stats["steps"] == STEPS


def test_paper_key_steps_batch_decoders(case):
    """The paper's DiT method: encoder steps run as one call with their key step, each at its own timestep."""
    _, pipe, kwargs = case
    faster_diffusion.enable(pipe, key_steps=[0, 3], parallel=False, noise_injection=0)
    sequential = run(pipe, kwargs)
    accel = faster_diffusion.enable(pipe, key_steps=[0, 3], parallel=True, noise_injection=0)
    parallel = run(pipe, kwargs)
    assert relative(parallel, sequential) <= 1e-5
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"], accel.stats["unet_calls"]) == (2, STEPS, 2)
    faster_diffusion.disable(pipe)


@pytest.mark.parametrize("parallel", [False, True])
def test_stats_agree_with_block_calls(case, parallel):
    """Each block computes exactly at the calls whose level does not replay it (forward hooks on its attention)."""
    name, pipe, kwargs = case
    blocks = transformer_blocks(pipe.transformer)
    counts = [0] * len(blocks)
    handles = [_attention(block).register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, block in enumerate(blocks)]
    try:
        plan = "FEEDCF"
        accel = faster_diffusion.enable(pipe, plan=plan, parallel=parallel)
        run(pipe, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert accel.stats["levels"] == {"full": 2, "encoder": 2, "deep": 1, "deep_cfg": 1}
    branches = 2 if name in CALLS_PER_BRANCH else 1  # true CFG: a transformer call per branch; a deep_cfg step skips the second
    calls = ["full", "encoder", "encoder", "deep", "deep_cfg", "full"]
    if parallel:
        calls = ["full", "deep", "deep_cfg", "full"]  # the encoder steps' decoders run in step 0's call
    assert accel.stats["unet_calls"] == len(calls)
    replayed = sites(len(blocks))
    expected = [sum((1 if level == "deep_cfg" else branches) for level in calls
                    if not any(s.start <= i < s.stop and level in s.replayed_at for s in replayed)) for i in range(len(blocks))]
    assert counts == expected
    faster_diffusion.disable(pipe)


def test_cfg_reuse_estimates_the_unconditional_branch(case):
    """At a deep_cfg step the conditional branch is the deep step's, the unconditional one the conditional less the
    guidance difference of the step before (DiT's rows are [conditional, unconditional]; Flux's are two calls)."""
    name, pipe, kwargs = case
    outputs = {}
    for plan in ("FDFFFF", "FCFFFF"):
        calls = outputs[plan] = []
        handle = pipe.transformer.register_forward_hook(lambda _, __, out, calls=calls: calls.append(out[0]))
        faster_diffusion.enable(pipe, plan=plan)
        run(pipe, kwargs)
        handle.remove()
    if name in CALLS_PER_BRANCH:  # [step 0 cond, step 0 uncond, step 1 cond, step 1 uncond, ...]
        (cond0, uncond0, deep_cond, _), (_, _, cond, uncond) = outputs["FDFFFF"][:4], outputs["FCFFFF"][:4]
    else:
        halves = lambda out: out.chunk(2) if name == "dit" else out.chunk(2)[::-1]  # noqa: E731  (conditional first)
        (cond0, uncond0), (deep_cond, _), (cond, uncond) = halves(outputs["FDFFFF"][0]), halves(outputs["FDFFFF"][1]), halves(outputs["FCFFFF"][1])
    assert relative(cond, deep_cond) <= 1e-5
    assert relative(uncond, cond - (cond0 - uncond0)) <= 1e-5
    faster_diffusion.disable(pipe)


def test_output_steps_call_no_model_and_take_the_full_steps_output(case):
    """An O step runs no block of the transformer; the sampler gets the output of its segment's full step again."""
    name, pipe, kwargs = case
    calls, predictions = [], []
    handle = transformer_blocks(pipe.transformer)[-1].register_forward_hook(lambda *_: calls.append(1))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, *args, **kw: (predictions.append(model_output.clone()), step(model_output, *args, **kw))[1]
    try:
        accel = faster_diffusion.enable(pipe, plan="FOOFOD")
        run(pipe, kwargs)
    finally:
        handle.remove()
        del pipe.scheduler.step
    per_step = 2 if name in CALLS_PER_BRANCH else 1
    assert len(calls) == 3 * per_step and accel.stats["levels"] == {"full": 2, "output": 3, "deep": 1}
    assert torch.equal(predictions[1], predictions[0]) and torch.equal(predictions[2], predictions[0])
    assert torch.equal(predictions[4], predictions[3]) and not torch.equal(predictions[5], predictions[3])
    faster_diffusion.disable(pipe)


def test_forecasts_extrapolate_from_two_lone_full_steps(case):
    """X and Y extrapolate the residual (and Y the guidance difference) from the latest two full steps; with one
    full step since an encoder step they replay like D and C."""
    _, pipe, kwargs = case
    outputs = {}
    for plan in ("FFDDCC", "FFXXYY", "FEFDDC", "FEFXXY"):
        faster_diffusion.enable(pipe, plan=plan, parallel=False)
        outputs[plan] = run(pipe, kwargs)
    assert relative(outputs["FFXXYY"], outputs["FFDDCC"]) > 1e-4
    assert torch.equal(outputs["FEFXXY"], outputs["FEFDDC"])
    faster_diffusion.disable(pipe)


def test_disable_restores_stock(case):
    _, pipe, kwargs = case
    stock = run(pipe, kwargs)
    faster_diffusion.enable(pipe, plan="FEDCEF")
    run(pipe, kwargs)
    faster_diffusion.disable(pipe)
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not any(name.startswith("faster_diffusion") for name in registry.hooks)
        assert "forward" not in module.__dict__ or registry is not None
    assert not hasattr(pipe.transformer, "_faster_diffusion")
    assert torch.equal(run(pipe, kwargs), stock)


def test_a_loop_left_by_an_exception_ends_its_run(case):
    """DiT's loop is `for t in self.progress_bar(timesteps)`: its run must not outlive a loop an exception left."""
    _, pipe, kwargs = case
    stock = run(pipe, kwargs)
    accel = faster_diffusion.enable(pipe, plan="FEDFED")
    planned = run(pipe, kwargs)
    calls = []

    def fail_at_step_two(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = pipe.transformer.register_forward_pre_hook(fail_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, kwargs)
    handle.remove()
    assert torch.equal(run(pipe, kwargs), planned)
    assert accel.stats["unet_calls"] == 4 and accel.stats["plan"] == "FEDFED"  # F+E, D, F+E, D
    faster_diffusion.disable(pipe)
    assert torch.equal(run(pipe, kwargs), stock) and relative(planned, stock) > 1e-4


def test_encoder_depth(case):
    _, pipe, kwargs = case
    n = len(transformer_blocks(pipe.transformer))
    assert sites(n)[0].stop == 3  # the paper's 18 of 28 blocks, of 4
    outputs = []
    for depth in (1, n - 1):
        faster_diffusion.enable(pipe, plan="FEEFEE", encoder_depth=depth)
        outputs.append(run(pipe, kwargs))
    assert relative(outputs[0], outputs[1]) > 1e-4
    with pytest.raises(ValueError, match="encoder_depth"):
        faster_diffusion.enable(pipe, plan="FEEFEE", encoder_depth=n)
        run(pipe, kwargs)
    faster_diffusion.disable(pipe)


def test_bad_plans_name_the_field(case):
    name, pipe, kwargs = case
    bad = [
        (dict(plan="FEQ"), "plan", "F/E/S/D/X/C/Y/O"),
        (dict(plan="auto:0.5"), "plan", "auto:T"),
        (dict(key_steps=[0, 3, 2]), "key_steps", "strictly increasing"),
    ]
    for options, field, accepted in bad:
        with pytest.raises(ValueError, match=field) as error:
            faster_diffusion.enable(pipe, **options)
        assert accepted in str(error.value)
    for plan, field, accepted in [("FEE", "plan", "the run has 6 steps"), ("FSSFSS", "plan", "supports ['full', 'encoder', 'output', 'deep', 'deep_forecast', 'deep_cfg', 'deep_cfg_forecast']")]:
        faster_diffusion.enable(pipe, plan=plan)
        with pytest.raises(ValueError, match=field) as error:
            run(pipe, kwargs)
        assert accepted in str(error.value)
    unguided = UNGUIDED.get(name, dict(guidance_scale=1.0))
    faster_diffusion.enable(pipe, plan="FCCFCC")
    with pytest.raises(ValueError, match="plan: levels \\['deep_cfg'\\]"):
        run(pipe, kwargs, **unguided)
    faster_diffusion.disable(pipe)


def test_unguided_runs(case):
    """Without guidance the other levels run, one call a step (Flux without a negative prompt, guidance_scale=1)."""
    name, pipe, kwargs = case
    unguided = UNGUIDED.get(name, dict(guidance_scale=1.0))
    stock = run(pipe, kwargs, **unguided)
    accel = faster_diffusion.enable(pipe, plan="FEDFED")
    assert relative(run(pipe, kwargs, **unguided), stock) > 1e-4
    assert accel.stats["levels"] == {"full": 2, "encoder": 2, "deep": 2}
    faster_diffusion.disable(pipe)


def _attention(block):
    return getattr(block, "attn", None) or block.attn1


def test_sd3_skip_layer_guidance_calls_run_stock():
    """SD3's skip-layer guidance calls the transformer a third time at some steps, with skip_layers: that call runs
    as it is, outside the plan."""
    build, kwargs = PIPELINES["sd3"]
    pipe = build()
    kwargs = {**kwargs, "skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0}
    stock = run(pipe, kwargs)
    accel = faster_diffusion.enable(pipe, plan="F" * STEPS)
    assert torch.equal(run(pipe, kwargs), stock)
    accel = faster_diffusion.enable(pipe, plan="FEDFCX")
    assert relative(run(pipe, kwargs), stock) > 1e-4 and accel.stats["unet_calls"] == 5
    faster_diffusion.disable(pipe)


def test_a_bare_transformer_in_a_hand_written_loop():
    """enable(transformer) and accel.denoising_run(timesteps), as on a bare UNet; the model is stock again after."""
    pipe = PIPELINES["dit"][0]()
    model = pipe.transformer
    torch.manual_seed(0)
    latent, labels, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([3, 1000]), [900, 700, 500, 300]

    def loop(accel=None):
        outputs = []
        with accel.denoising_run(timesteps) if accel is not None else torch.no_grad():
            for t in timesteps:
                outputs.append(model(latent, timestep=torch.tensor([t, t]), class_labels=labels).sample)
        return torch.stack(outputs)

    with torch.no_grad():
        stock = loop()
        sequential = loop(faster_diffusion.enable(model, plan="FEEF", parallel=False))
        accel = faster_diffusion.enable(model, plan="FEEF", parallel=True)
        parallel = loop(accel)
        assert relative(parallel, sequential) <= 1e-5 and relative(parallel, stock) > 1e-4
        assert accel.stats["unet_calls"] == 2
        with pytest.raises(ValueError, match=r"plan: levels \['deep_cfg'\]"):  # no pipeline: no guidance to reuse
            loop(faster_diffusion.enable(model, plan="FCCC"))
        faster_diffusion.disable(model)
        assert torch.equal(loop(), stock)


def test_encoder_depth_is_a_transformer_option():
    from tiny_pipelines import tiny_sd

    with pytest.raises(ValueError, match="encoder_depth=3 applies to transformers"):
        faster_diffusion.enable(tiny_sd(), encoder_depth=3)
    build, kwargs = PIPELINES["dit"]
    pipe = build()
    accel = faster_diffusion.enable(pipe, plan="FEEFEE", encoder_depth=1)
    shallow = run(pipe, kwargs)
    accel.set_params(plan="FEEFEE", encoder_depth=3)  # the next run hooks the new split
    assert relative(run(pipe, kwargs), shallow) > 1e-4
    accel.set_params(plan="FEEFEE", encoder_depth=1)
    assert torch.equal(run(pipe, kwargs), shallow)
    faster_diffusion.disable(pipe)
