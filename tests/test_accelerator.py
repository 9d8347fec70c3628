"""Encoder propagation on the ordinary pipe(...) call of tiny SD-shaped pipelines."""


import pytest
import torch
from conftest import SIZE, difference, sample
from tiny_pipelines import tiny_sd

import faster_diffusion
from faster_diffusion.samplers import make_scheduler

SCHEDULERS = ["ddim", "dpmsolver++", "dpmsolver", "euler", "euler_ancestral", "unipc", "pndm", "lms"]  # samplers.py aliases


def use_scheduler(pipe, name):
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


@pytest.fixture(autouse=True)
def stock_afterwards(pipe):
    yield
    faster_diffusion.disable(pipe)
    use_scheduler(pipe, "ddim")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_all_keys_equals_stock(pipe, scheduler):
    use_scheduler(pipe, scheduler)
    stock = sample(pipe)
    for parallel in (False, True):
        accel = faster_diffusion.enable(pipe, key_steps="all", parallel=parallel, noise_injection=0)
        out = sample(pipe)
        assert difference(out, stock) <= 1e-6
        assert accel.stats["encoder_passes"] == accel.stats["decoder_passes"] == 12


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_parallel_equals_sequential(pipe, scheduler):
    use_scheduler(pipe, scheduler)
    faster_diffusion.enable(pipe, key_steps="paper", parallel=False, noise_injection=0.003)
    sequential = sample(pipe, steps=20)
    for max_parallel in (None, 3):
        accel = faster_diffusion.enable(pipe, key_steps="paper", parallel=True, max_parallel=max_parallel, noise_injection=0.003)
        parallel = sample(pipe, steps=20)
        assert difference(parallel, sequential) <= 1e-5
        assert accel.stats["decoder_passes"] == accel.stats["steps"]
        assert accel.stats["encoder_passes"] == 7
    faster_diffusion.disable(pipe)
    assert difference(sample(pipe, steps=20), sequential) > 1e-3  # acceleration did change the computation


def test_paper_schedule_pass_counts_at_50_steps(pipe):
    accel = faster_diffusion.enable(pipe, key_steps="paper", parallel=True)
    sample(pipe, steps=50)
    assert accel.stats["key_steps"] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"], accel.stats["unet_calls"]) == (9, 50, 9)
    faster_diffusion.enable(pipe, key_steps="paper", parallel=True, max_parallel=4)
    sample(pipe, steps=50)
    stats = pipe.unet._faster_diffusion.stats
    # groups 5-9, 10-14, 15-24 (3 calls), 25-34 (3), 35-49 (4) split into batches of <= 4 steps
    assert (stats["encoder_passes"], stats["decoder_passes"], stats["unet_calls"]) == (9, 50, 4 + 2 + 2 + 3 + 3 + 4)
    accel = faster_diffusion.enable(pipe, key_steps="paper", parallel=False)
    sample(pipe, steps=50)
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"], accel.stats["unet_calls"]) == (9, 50, 50)


def test_encoder_counts_follow_unet_module_calls(pipe):
    """Count real module executions, not the accelerator's own bookkeeping."""
    calls = {"down": 0, "up": 0}
    hooks = [
        pipe.unet.down_blocks[0].register_forward_hook(lambda *a: calls.__setitem__("down", calls["down"] + 1)),
        pipe.unet.up_blocks[0].register_forward_hook(lambda *a: calls.__setitem__("up", calls["up"] + 1)),
    ]
    try:
        faster_diffusion.enable(pipe, key_steps="uniform:5", parallel=True)
        sample(pipe, steps=20)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"down": 4, "up": 4}  # 4 key steps, each with one batched decoder call


def test_disable_restores_the_stock_pipeline(pipe):
    stock = sample(pipe)
    attributes = (set(pipe.__dict__), {n: set(m.__dict__) for n, m in pipe.unet.named_modules()})
    accel = faster_diffusion.enable(pipe, key_steps="uniform:3")
    assert not torch.equal(sample(pipe), stock)
    accel.disable()
    assert torch.equal(sample(pipe), stock)
    assert (set(pipe.__dict__), {n: set(m.__dict__) for n, m in pipe.unet.named_modules()}) == attributes
    with faster_diffusion.enable(pipe, key_steps="uniform:3"):
        pass
    assert torch.equal(sample(pipe), stock)


def test_enable_twice_replaces_settings(pipe):
    faster_diffusion.enable(pipe, key_steps="uniform:2")
    accel = faster_diffusion.enable(pipe, key_steps="uniform:4", parallel=False)
    sample(pipe, steps=12)
    assert accel.stats["encoder_passes"] == 3
    assert len(pipe.unet.conv_in._diffusers_hook.hooks) == 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_noise_injection_matches_its_definition(pipe, scheduler):
    """z <- z + alpha * z_T before every step whose t is below the threshold, checked against a stock
    run that injects through callback_on_step_end. Euler's latent is sqrt(sigma^2 + 1) times the
    variance-preserving one, and starts from z_T * init_noise_sigma: the injection scales with it."""
    use_scheduler(pipe, scheduler)
    alpha, threshold = 0.05, 500
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))  # unit z_T

    def inject(p, i, t, kwargs):
        timesteps = p.scheduler.timesteps
        if i + 1 < len(timesteps) and timesteps[i + 1] < threshold:
            sigmas = getattr(p.scheduler, "sigmas", None)
            scale = 1.0 if sigmas is None else float((sigmas[i + 1] ** 2 + 1) ** 0.5)
            return {"latents": kwargs["latents"] + alpha * scale * latents}
        return {}

    expected = sample(pipe, latents=latents, callback_on_step_end=inject)
    faster_diffusion.enable(pipe, key_steps="all", noise_injection=alpha, noise_injection_timestep=threshold)
    out = sample(pipe, latents=latents)
    assert difference(out, expected) <= 1e-6
    assert difference(out, sample(pipe, latents=latents, callback_on_step_end=inject)) > 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 1.0},  # no classifier-free guidance: batch of one
        {"guidance_scale": 5.0, "guidance_rescale": 0.7},
        {"negative_prompt": "blurry", "num_images_per_prompt": 2},
    ],
)
def test_pipeline_options_parallel_equals_sequential(pipe, kwargs):
    faster_diffusion.enable(pipe, key_steps="uniform:4", parallel=False)
    sequential = sample(pipe, **kwargs)
    faster_diffusion.enable(pipe, key_steps="uniform:4", parallel=True)
    parallel = sample(pipe, **kwargs)
    assert parallel.shape[0] == kwargs.get("num_images_per_prompt", 1)
    assert difference(parallel, sequential) <= 1e-5


def test_batch_of_prompts_matches_single_prompts(pipe):
    accel = faster_diffusion.enable(pipe, key_steps="uniform:4")
    prompts = ["a red square in the center", "a blue circle at the top"]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = pipe(prompts, num_inference_steps=12, height=SIZE, width=SIZE, generator=generators, output_type="latent").images
    for k, (prompt, seed) in enumerate(zip(prompts, (1, 2))):
        single = sample(pipe, prompt, seed=seed)
        assert difference(batch[k], single[0]) <= 1e-5
    assert accel.stats["encoder_passes"] == 3


def test_callbacks_and_output_types(pipe):
    faster_diffusion.enable(pipe, key_steps="paper")
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        return {}

    images = sample(pipe, output_type="pil", callback_on_step_end=callback)
    assert len(images) == 1 and images[0].size == (SIZE, SIZE)
    assert seen == list(range(12))
    arrays = sample(pipe, output_type="np")
    assert arrays.shape == (1, SIZE, SIZE, 3)
    tensors = sample(pipe, output_type="pt")
    assert tensors.shape == (1, 3, SIZE, SIZE)


def test_progress_bar_still_shows(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        faster_diffusion.enable(pipe, key_steps="paper")
        sample(pipe, steps=5)
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "5/5" in capsys.readouterr().err


def test_bad_schedule_fails_before_sampling(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="key_steps='0,1,x'"):
            faster_diffusion.enable(pipe, key_steps="0,1,x")
        faster_diffusion.enable(pipe, key_steps=[0, 5, 30])
        with pytest.raises(ValueError, match=r"index 30 is out of range for 12 steps"):
            sample(pipe)
    finally:
        handle.remove()
    assert calls == []
    sample(pipe, steps=31)
    assert pipe.unet._faster_diffusion.stats["encoder_passes"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_parallel": 0}, "max_parallel=0"),
        ({"noise_injection": -0.1}, "noise_injection=-0.1"),
        ({"key_steps": "uniform:0"}, "key_steps='uniform:0'"),
    ],
)
def test_bad_parameters_raise(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        faster_diffusion.enable(pipe, **kwargs)
    assert not hasattr(pipe.unet, "_faster_diffusion")


def test_non_unet_pipelines_get_a_type_error():
    class TransformerPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        faster_diffusion.enable(TransformerPipeline())
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        faster_diffusion.enable(torch.nn.Linear(2, 2))


def test_bare_unet_with_a_custom_loop():
    pipe = tiny_sd()
    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(10)
    text = torch.randn(2, 8, 32)

    def loop():
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, encoder_hidden_states=text).sample, t, x).prev_sample
        return x

    stock = loop()
    accel = faster_diffusion.enable(unet, key_steps="all")
    with accel.denoising_run(scheduler.timesteps):
        assert torch.allclose(loop(), stock, atol=1e-6)
    accel.set_params(key_steps="uniform:5")
    with accel.denoising_run(scheduler.timesteps):
        loop()
    assert accel.stats["encoder_passes"] == 2 and accel.stats["unet_calls"] == 2
    faster_diffusion.disable(unet)
    assert torch.equal(loop(), stock)


def test_disable_keeps_other_forward_wrappers(pipe):
    """An offload hook (accelerate) wraps forward as an instance attribute; disable must leave it."""
    stock_forward = pipe.unet.forward

    def wrapper(*args, **kwargs):
        return stock_forward(*args, **kwargs)

    pipe.unet.forward = wrapper
    try:
        faster_diffusion.enable(pipe, key_steps="uniform:4")
        sample(pipe, steps=8)
        faster_diffusion.disable(pipe)
        assert pipe.unet.forward is wrapper
    finally:
        del pipe.unet.forward
