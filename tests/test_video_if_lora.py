"""Encoder propagation beyond the SD image UNet: text-to-video (UNet3DConditionModel), AnimateDiff
(UNetMotionModel), DeepFloyd IF stages I and II (pixel-space UNet2DConditionModel with
encoder_hid_proj, learned variance, class_labels), and LoRAs loaded through diffusers/peft.
Tiny random-weights pipelines from tiny_pipelines.py; nothing is downloaded."""

import functools
import importlib.util

import pytest
import torch
from conftest import difference
from tiny_pipelines import tiny_animatediff, tiny_if, tiny_if_superresolution, tiny_sd, tiny_text_to_video, tiny_unet

import faster_diffusion
from faster_diffusion.unet_split import encoder_modules

STEPS = 8
VIDEO = {"num_frames": 4, "height": 32, "width": 32, "output_type": "latent"}  # 4 frames of 16x16 latents
IF_CALL = {"height": 16, "width": 16, "output_type": "pt", "clean_caption": False}
LOW_RES = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # stage II's input image
CASES = {
    "text-to-video": (tiny_text_to_video, VIDEO),
    "animatediff": (tiny_animatediff, VIDEO),
    "if": (tiny_if, IF_CALL),
    "if-superresolution": (tiny_if_superresolution, {**IF_CALL, "image": LOW_RES}),
}
# Parallel and sequential decoders round differently (one batched conv against several); the largest
# gap measured is IF's, about 5e-5 of its [-1, 1] pixel range, after DDPM's dynamic thresholding.
TOLERANCE = 1e-4


@functools.cache
def build(case):
    return CASES[case][0]()


def sample(case, seed=0, **kwargs):
    make, call = CASES[case]
    out = build(case)(
        "a red square in the center", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
        **{**call, **kwargs},
    )
    return out.frames if hasattr(out, "frames") else out.images


def first_layer(module):
    return next(m for m in module.modules() if not list(m.children()))


@pytest.fixture(params=list(CASES))
def case(request):
    yield request.param
    faster_diffusion.disable(build(request.param))


def test_pipelines_have_the_intended_unets(case):
    unet = build(case).unet
    expected = {"text-to-video": "UNet3DConditionModel", "animatediff": "UNetMotionModel"}.get(case, "UNet2DConditionModel")
    assert type(unet).__name__ == expected
    if case == "text-to-video":
        assert encoder_modules(unet)[1] is unet.transformer_in
    if case.startswith("if"):
        assert unet.encoder_hid_proj is not None and unet.config.out_channels == 6  # T5 projection, learned variance
    if case == "if-superresolution":
        assert unet.config.class_embed_type == "timestep"  # the noise level arrives as class_labels


def test_all_keys_equals_stock(case):
    stock = sample(case)
    for parallel in (False, True):
        accel = faster_diffusion.enable(build(case), key_steps="all", parallel=parallel, noise_injection=0)
        assert torch.equal(sample(case), stock)
        assert accel.stats["encoder_passes"] == accel.stats["decoder_passes"] == STEPS


@pytest.mark.parametrize("parallel", [True, False])
def test_sparse_schedule_runs_the_encoder_only_at_key_steps(case, parallel):
    """Counts real executions: a layer inside every encoder module but the leaf conv_in (a hook on a module
    itself fires on replayed calls too), and one inside the first up block."""
    pipe = build(case)
    modules = {f"encoder.{k}": first_layer(m) for k, m in enumerate(encoder_modules(pipe.unet)[1:])}
    modules["up"] = first_layer(pipe.unet.up_blocks[0])
    calls = dict.fromkeys(modules, 0)
    handles = [m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1)) for name, m in modules.items()]
    try:
        accel = faster_diffusion.enable(pipe, key_steps="uniform:3", parallel=parallel)
        sample(case)
    finally:
        for handle in handles:
            handle.remove()
    keys = [0, 3, 6]
    assert accel.stats["key_steps"] == keys
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"]) == (3, STEPS)
    assert accel.stats["unet_calls"] == (3 if parallel else STEPS)
    assert calls == {**dict.fromkeys(modules, 3), "up": 3 if parallel else STEPS}


def test_parallel_equals_sequential(case):
    faster_diffusion.enable(build(case), key_steps=[0, 2, 5], parallel=False, noise_injection=0.003)
    sequential = sample(case)
    for max_parallel in (None, 2):
        accel = faster_diffusion.enable(build(case), key_steps=[0, 2, 5], parallel=True, max_parallel=max_parallel, noise_injection=0.003)
        assert difference(sample(case), sequential) <= TOLERANCE
        assert accel.stats["decoder_passes"] == STEPS and accel.stats["encoder_passes"] == 3
    faster_diffusion.disable(build(case))
    assert difference(sample(case), sequential) > 1e-3  # the acceleration did change the computation


def test_disable_restores_stock_bit_for_bit(case):
    pipe = build(case)
    stock = sample(case)
    attributes = (set(pipe.__dict__), {n: set(m.__dict__) for n, m in pipe.unet.named_modules()})
    faster_diffusion.enable(pipe, key_steps="uniform:3")
    assert not torch.equal(sample(case), stock)
    faster_diffusion.disable(pipe)
    assert torch.equal(sample(case), stock)
    assert (set(pipe.__dict__), {n: set(m.__dict__) for n, m in pipe.unet.named_modules()}) == attributes


def test_auto_on_text_to_video_calibrates_on_its_first_run():
    case = "text-to-video"
    stock = sample(case)
    accel = faster_diffusion.enable(build(case), key_steps="auto")
    try:
        assert torch.equal(sample(case), stock)  # the calibrating run is a stock run
        assert accel.stats["schedule_source"].startswith("calibrating")
        (calibration,) = accel.calibrations
        assert calibration.latent_size == (4, 16, 16) and calibration.num_steps == STEPS  # frames are part of the size
        sample(case)
        assert "earlier run" in accel.stats["schedule_source"]
        assert accel.stats["key_steps"] == calibration.schedule()
        assert accel.stats["encoder_passes"] == len(calibration.schedule()) and accel.stats["decoder_passes"] == STEPS
        sample(case, num_frames=2)  # another frame count is another size: it calibrates again
        assert accel.stats["schedule_source"].startswith("calibrating") and len(accel.calibrations) == 2
    finally:
        faster_diffusion.disable(build(case))


# -- LoRA through diffusers' load_lora_weights (peft) ------------------------------------------------------------------

LORA_SIZE = 32
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="load_lora_weights needs peft")


def make_lora(path, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random LoRA for the tiny SD UNet, saved the way diffusers saves trained ones."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def conv_in_lora(tmp_path_factory):
    """A LoRA on conv_in too: peft then wraps an encoder module itself in a new module."""
    return make_lora(tmp_path_factory.mktemp("lora-conv-in"), ("to_q", "conv_in", "conv1"))


@pytest.fixture
def sd():
    pipe = tiny_sd()
    yield pipe
    faster_diffusion.disable(pipe)


def run(pipe):
    return pipe(
        "a red square in the center", num_inference_steps=STEPS, height=LORA_SIZE, width=LORA_SIZE,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images


def weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def assert_no_hooks(pipe):
    assert not [name for name, m in pipe.unet.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


@pytest.mark.parametrize("order", ["lora-then-enable", "enable-then-lora"])
@needs_peft
def test_lora_all_keys_equals_stock_with_lora(sd, lora, order):
    stock = run(sd)
    sd.load_lora_weights(lora)
    stock_lora = run(sd)
    assert difference(stock_lora, stock) > 1e-2  # the LoRA matters
    sd.unload_lora_weights()
    if order == "lora-then-enable":
        sd.load_lora_weights(lora)
        accel = faster_diffusion.enable(sd, key_steps="all", noise_injection=0)
    else:
        accel = faster_diffusion.enable(sd, key_steps="all", noise_injection=0)
        sd.load_lora_weights(lora)
    assert torch.equal(run(sd), stock_lora)
    assert accel.stats["encoder_passes"] == STEPS


@needs_peft
def test_lora_load_and_unload_leave_the_base_bit_identical(sd, lora):
    base, stock = weights(sd), run(sd)
    faster_diffusion.enable(sd, key_steps="uniform:3")
    accelerated = run(sd)
    sd.load_lora_weights(lora, adapter_name="style")
    with_lora = run(sd)
    assert difference(with_lora, accelerated) > 1e-2
    sd.unload_lora_weights()
    assert torch.equal(run(sd), accelerated)
    faster_diffusion.disable(sd)
    assert torch.equal(run(sd), stock)
    after = weights(sd)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert_no_hooks(sd)
    # and the LoRA loaded before enabling gives the same accelerated images as loaded after
    sd.load_lora_weights(lora, adapter_name="style")
    faster_diffusion.enable(sd, key_steps="uniform:3")
    assert torch.equal(run(sd), with_lora)


@needs_peft
def test_lora_wrapping_conv_in_after_enable(sd, conv_in_lora):
    """peft replaces a targeted conv_in by a wrapper; the accelerator hooks the wrapper at the next run."""
    stock = run(sd)
    sd.load_lora_weights(conv_in_lora)
    assert type(sd.unet.conv_in).__module__.startswith("peft")
    stock_lora = run(sd)
    faster_diffusion.enable(sd, key_steps="uniform:3", parallel=False)
    loaded_first = run(sd)
    faster_diffusion.disable(sd)
    sd.unload_lora_weights()

    faster_diffusion.enable(sd, key_steps="uniform:3", parallel=False)
    run(sd)
    sd.load_lora_weights(conv_in_lora)
    assert torch.equal(run(sd), loaded_first)
    faster_diffusion.enable(sd, key_steps="uniform:3", parallel=True)
    assert difference(run(sd), loaded_first) <= TOLERANCE
    faster_diffusion.enable(sd, key_steps="all", noise_injection=0)
    assert torch.equal(run(sd), stock_lora)
    sd.unload_lora_weights()
    faster_diffusion.disable(sd)
    assert torch.equal(run(sd), stock)
    assert_no_hooks(sd)


@needs_peft
def test_fused_lora(sd, lora):
    """fuse_lora merges the LoRA into the weights; unfuse_lora subtracts it again, which peft does in
    float arithmetic (W + dW - dW), so the base comes back within rounding, the same with or without
    the accelerator."""
    base = weights(sd)
    reference = tiny_sd()  # the same pipeline, fused and unfused without the accelerator
    for pipe in (sd, reference):
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
    stock_fused = run(reference)
    accel = faster_diffusion.enable(sd, key_steps="all", noise_injection=0)
    assert torch.equal(run(sd), stock_fused)
    accel.set_params(key_steps="uniform:3", parallel=False)
    sequential = run(sd)
    accel.set_params(key_steps="uniform:3", parallel=True)
    assert difference(run(sd), sequential) <= TOLERANCE
    for pipe in (sd, reference):
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    faster_diffusion.disable(sd)
    after, unfused = weights(sd), weights(reference)
    assert all(torch.equal(after[k], unfused[k]) for k in base)
    assert max((after[k] - base[k]).abs().max().item() for k in base) <= 1e-6
    assert_no_hooks(sd)


@needs_peft
def test_kohya_format_lora_loads_like_the_diffusers_one(sd, lora, tmp_path):
    """The same LoRA saved in kohya's key format (what most LoRA files on the web use) gives the same images."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(load_file(str(lora / "pytorch_lora_weights.safetensors")))
    assert all(key.startswith("lora_unet_") for key in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    faster_diffusion.enable(sd, key_steps="uniform:3", noise_injection=0)
    sd.load_lora_weights(lora)
    with_diffusers_file = run(sd)
    sd.unload_lora_weights()
    sd.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    assert difference(run(sd), with_diffusers_file) <= 1e-6
    sd.unload_lora_weights()


def test_textual_inversion_embedding_under_the_accelerator(sd):
    """A textual-inversion token only changes the prompt embeddings: all keys equal stock with the token,
    and a sparse schedule uses it (the images differ from the prompt without it)."""
    stock = run(sd)
    hidden = sd.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = torch.randn(hidden, generator=torch.Generator().manual_seed(5)) * 3
    sd.load_textual_inversion({"<shape-style>": embedding}, token="<shape-style>")

    def run_with_token():
        return sd("a red square in the center <shape-style>", num_inference_steps=STEPS, height=LORA_SIZE,
                  width=LORA_SIZE, generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip

    stock_token = run_with_token()
    assert difference(stock_token, stock) > 1e-3  # the token matters
    faster_diffusion.enable(sd, key_steps="all", noise_injection=0)
    assert torch.equal(run_with_token(), stock_token)
    faster_diffusion.enable(sd, key_steps="uniform:3", noise_injection=0, parallel=False)
    sequential = run_with_token()
    faster_diffusion.enable(sd, key_steps="uniform:3", noise_injection=0, parallel=True)
    assert difference(run_with_token(), sequential) <= TOLERANCE
    sd.unload_textual_inversion()
    faster_diffusion.disable(sd)
    assert torch.equal(run(sd), stock)
