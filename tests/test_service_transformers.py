"""The service on flow-matching transformer weights: FluxPipeline and StableDiffusion3Pipeline.

Tiny random models of diffusers' own classes (tests/tiny_transformers.py) saved to a temporary folder and
loaded as the service loads any weights (COG_WEIGHTS / setup's ``weights``): their defaults come from the
weights, the inputs map to the pipeline's arguments, what the weights cannot use fails naming the field,
and a Cog HTTP server (``python -m service.serve``) serves them: weights/tiny-shapes-flux where it is present,
else the tiny random Flux.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from service import calibrations

from conftest import ROOT, entry_point

FLUX_BUNDLED = ROOT / "weights" / "tiny-shapes-flux"
STARTUP_TIMEOUT = 240
PROMPT = "a red square in the center"
FAST = dict(prompt=PROMPT, num_inference_steps=4, seed=3)


def flux_bundled_available() -> bool:
    return (FLUX_BUNDLED / "model_index.json").is_file()


def tiny_flux_pipeline(guidance_embeds: bool = False):
    """tests/tiny_transformers' Flux with a VAE that downsamples 8x, as Flux's does (so sizes are multiples of 16)
    and a ``shift_factor`` (FluxPipeline adds it before decoding); 32 px, 4 image tokens."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from tiny_transformers import HEADS, tiny_flux

    components = tiny_flux().components
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
        shift_factor=0.0,
    ).eval()
    if guidance_embeds:
        components["transformer"] = FluxTransformer2DModel(
            **HEADS, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=(2, 2, 4), guidance_embeds=True,
        ).eval()
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline():
    from tiny_transformers import tiny_sd3

    pipe = tiny_sd3()
    pipe.vae.register_to_config(shift_factor=0.0)
    return pipe


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-flux") / "model"
    tiny_flux_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd3") / "model"
    tiny_sd3_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux(flux_dir):
    """A Predictor set up on the tiny Flux (setup's ``weights`` argument)."""
    from predict import Predictor

    predictor = Predictor()
    predictor.setup(str(flux_dir))
    return predictor


def run(predictor, **inputs) -> list[np.ndarray]:
    """predictor.run with the schema's defaults for the inputs not given."""
    defaults = {name: p.default.default for name, p in inspect.signature(predictor.run).parameters.items()}
    return [np.asarray(Image.open(path)) for path in predictor.run(**{**defaults, **inputs})]


# ---------------------------------------------------------------------------------------------------------------
# loading, defaults, the inputs' mapping


def test_flux_weights_load_from_cog_weights_and_predict_at_their_defaults(flux_dir, monkeypatch, capsys):
    from predict import Predictor

    monkeypatch.setenv("COG_WEIGHTS", str(flux_dir))
    predictor = Predictor()
    predictor.setup()
    setup_log = capsys.readouterr().out
    assert "FluxPipeline with a FluxTransformer2DModel" in setup_log, setup_log
    planner, defaults = predictor.planner, predictor.planner.defaults
    # no UNet parts: no derived img2img / inpainting pipelines, no store of derived calibrations; weights that ship no
    # calibration are calibrated at setup within its budget, as Stable Diffusion weights are
    assert planner.img2img is None and planner.inpaint is None
    assert predictor.store is None and predictor.cost_models.models  # the warm-up's cost model, kept for a restart
    (made,) = predictor.calibrations
    assert made.error_model is not None and made.info["spent"] <= calibrations.SETUP_BUDGET - calibrations.WARM_UP_IMAGES
    assert "calibrated FlowMatchEuler-28 at 32x32 at setup" in setup_log and "from the calibration made at setup" in setup_log
    # defaults from the weights: no guidance embedding, so true CFG; the pipeline's 28 steps; the VAE's size
    assert (defaults.scheduler, defaults.num_inference_steps, defaults.guidance) == ("FlowMatchEuler", 28, "true_cfg_scale")
    assert defaults.guidance_scale == 4.0 and not defaults.distilled
    assert defaults.max_sequence_length == min(512, predictor.pipe.tokenizer_2.model_max_length)
    assert (defaults.native_size, defaults.size_multiple) == (32, 16)
    # FluxPipeline passes mu; this scheduler shifts nothing dynamically, so DPM-Solver++ (which takes mu only with
    # dynamic shifting) is not offered
    assert list(predictor.schedulers) == ["FlowMatchEuler", "FlowUniPC"]

    (image,) = run(predictor, prompt=PROMPT, seed=1)
    assert image.shape == (32, 32, 3)
    log = capsys.readouterr().out
    assert "scheduler=FlowMatchEuler" in log and "steps=28" in log and "guidance_scale=4.0 (true_cfg_scale)" in log, log
    assert "schedule_source='auto from the calibration argument (calibrated at setup" in log, log
    # another step count: derived from the setup's calibration, nothing run stock
    run(predictor, prompt=PROMPT, seed=1, num_inference_steps=20)
    log = capsys.readouterr().out
    assert "schedule_source='auto from a calibration derived from" in log, log
    # key_steps="auto" at a size nothing calibrated: the first run is stock and calibrates, the next one propagates
    run(predictor, prompt=PROMPT, seed=1, key_steps="auto", width=48, height=48)
    assert "schedule_source='calibrating: this run is stock" in capsys.readouterr().out
    run(predictor, prompt=PROMPT, seed=1, key_steps="auto", width=48, height=48)
    assert int(re.search(r"encoder_passes=(\d+) ", capsys.readouterr().out).group(1)) < 28


def test_a_restarted_server_on_flux_weights_calibrates_and_times_nothing(flux_dir, capsys):
    """Setup's calibration and the warm-up's cost model are kept in the cache directory: the second start on the
    same weights reads both, spends no compute on either, and serves the same plan."""
    from predict import Predictor

    first = Predictor()
    first.setup(str(flux_dir))
    (image,) = run(first, prompt=PROMPT, seed=2)
    first_log = capsys.readouterr().out
    second = Predictor()
    with FlopCounterMode(display=False) as counter:
        second.setup(str(flux_dir))
    setup_log = capsys.readouterr().out
    assert "from the cache" in setup_log and "calibrated FlowMatchEuler" not in setup_log, setup_log
    # what setup computed: the warm-up's one image (28 steps, two calls each), nothing measured or calibrated
    with FlopCounterMode(display=False) as one_image:
        run(second, prompt=PROMPT, seed=2, acceleration="none")
    capsys.readouterr()
    assert counter.get_total_flops() < 1.5 * one_image.get_total_flops()
    (again,) = run(second, prompt=PROMPT, seed=2)
    plan = lambda log: re.search(r"plan=(\w+)", log).group(1)  # noqa: E731
    assert plan(capsys.readouterr().out) == plan(first_log) and np.array_equal(again, image)


def test_the_service_calls_flux_as_its_default_call(flux):
    """acceleration=none draws what FluxPipeline draws with true CFG against an empty negative prompt."""
    (served,) = run(flux, **FAST, acceleration="none", guidance_scale=3.0)
    pipe, defaults = flux.pipe, flux.planner.defaults
    pipe.scheduler = flux.schedulers["FlowMatchEuler"]
    direct = pipe(PROMPT, negative_prompt="", true_cfg_scale=3.0, num_inference_steps=4, height=32, width=32,
                  max_sequence_length=defaults.max_sequence_length, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(served, np.asarray(direct))


def test_flux_takes_its_flow_samplers_and_explicit_plans(flux, capsys):
    (image,) = run(flux, **FAST, scheduler="FlowUniPC", acceleration="none")
    assert image.shape == (32, 32, 3)
    images = run(flux, **{**FAST, "num_inference_steps": 8}, plan="FEEDDFCY", num_outputs=2, width=48, height=64)
    assert [i.shape for i in images] == [(64, 48, 3)] * 2
    log = capsys.readouterr().out
    assert "plan=FEEDDFCY" in log and "transformer_calls=" in log, log
    run(flux, **FAST, key_steps="uniform:2")
    assert "key_steps=[0, 2]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(scheduler="DDIM"), r"scheduler='DDIM' \(a sampler for Stable Diffusion's .*\): these FluxPipeline weights take FlowMatchEuler, FlowUniPC"),
        (dict(scheduler="FlowDPMSolverMultistep"), r"scheduler='FlowDPMSolverMultistep' \(its set_timesteps .*\): these FluxPipeline weights take"),
        (dict(image="IMAGE"), r"^image: these FluxPipeline weights take text-to-image only"),
        (dict(mask="IMAGE"), r"^mask: these FluxPipeline weights take text-to-image only"),
        (dict(lora_weights="https://example.com/lora.safetensors"), r"^lora_weights: LoRAs are served for Stable Diffusion weights only"),
        (dict(width=72), r"^width=72 must be a multiple of 16 \(try 64 or 80\)"),
        (dict(height=40), r"^height=40 must be a multiple of 16"),
        (dict(plan="auto:0.5"), r"^plan='auto:0.5'"),
        (dict(plan="FSSS"), r"^plan: levels \['shallow'\]"),
        (dict(plan="FEEF", key_steps="paper"), r"^plan='FEEF' and key_steps='paper': set one of them"),
    ],
)
def test_what_flux_weights_cannot_use_fails_naming_the_field(flux, tmp_path, inputs, message):
    if "image" in inputs or "mask" in inputs:
        Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
        inputs = {k: (tmp_path / "in.png" if v == "IMAGE" else v) for k, v in inputs.items()}
    with pytest.raises(ValueError, match=message):
        run(flux, **{**FAST, **inputs})


def test_distilled_flux_guidance_maps_to_guidance_scale_and_takes_no_negative_prompt():
    from service.request import Acceleration, Planner

    planner = Planner(tiny_flux_pipeline(guidance_embeds=True), schedulers=("FlowMatchEuler",))
    assert planner.defaults.distilled and planner.defaults.guidance_scale == 3.5  # FluxPipeline's own default
    plan = dict(image=None, mask=None, prompt_strength=0.8, width=None, height=None, num_outputs=1,
                num_inference_steps=4, acceleration=Acceleration(plan="FDDC"))
    with pytest.raises(ValueError, match=r"^plan: .*guid"):  # one call a step: nothing for C levels to reuse
        planner.plan(**plan, guidance_scale=None)
    request = planner.plan(**{**plan, "acceleration": Acceleration(plan="FDDX")}, guidance_scale=None)
    length = planner.defaults.max_sequence_length
    assert request.arguments == {"width": 32, "height": 32, "guidance_scale": 3.5, "max_sequence_length": length}
    with pytest.raises(ValueError, match=r"^negative_prompt: these FluxPipeline weights guide through their transformer's"):
        planner.plan(**plan, guidance_scale=None, negative_prompt="blurry")


def test_stable_diffusion_weights_refuse_flow_samplers():
    from service.request import Acceleration, Planner
    from tiny_pipelines import tiny_sd

    planner = Planner(tiny_sd())
    with pytest.raises(ValueError, match=r"^scheduler='FlowMatchEuler' \(a flow-matching sampler, for Flux and SD3 weights\): "
                                         r"these StableDiffusionPipeline weights take DDIM, DPMSolverMultistep"):
        planner.plan(image=None, mask=None, prompt_strength=0.8, width=None, height=None, num_outputs=1,
                     num_inference_steps=None, acceleration=Acceleration(), guidance_scale=None, scheduler="FlowMatchEuler")
    request = planner.plan(image=None, mask=None, prompt_strength=0.8, width=None, height=None, num_outputs=1,
                           num_inference_steps=None, acceleration=Acceleration(), guidance_scale=None)
    assert (request.scheduler, request.steps, request.guidance_scale) == ("DDIM", 50, 7.5)  # as before
    size = planner.native_size
    assert request.arguments == {"width": size, "height": size, "negative_prompt": None, "guidance_scale": 7.5}


def test_sd3_weights_load_and_predict_with_every_flow_sampler(sd3_dir, capsys):
    from predict import Predictor

    predictor = Predictor()
    predictor.setup(str(sd3_dir))  # saved without its T5 encoder: model_index.json's nulls load as None
    defaults = predictor.planner.defaults
    assert (defaults.scheduler, defaults.num_inference_steps, defaults.guidance, defaults.guidance_scale) == (
        "FlowMatchEuler", 28, "guidance_scale", 7.0)
    assert (defaults.native_size, defaults.size_multiple, defaults.max_sequence_length) == (16, 8, 256)
    assert list(predictor.schedulers) == ["FlowMatchEuler", "FlowUniPC", "FlowDPMSolverMultistep"]
    (image,) = run(predictor, prompt=PROMPT, seed=0)  # the defaults: FlowMatchEuler-28, guidance 7, plan auto
    assert image.shape == (16, 16, 3)
    for name in ("FlowUniPC", "FlowDPMSolverMultistep"):
        (image,) = run(predictor, **FAST, scheduler=name, negative_prompt="blurry", key_steps="paper")
        assert image.shape == (16, 16, 3)
    log = capsys.readouterr().out
    assert "StableDiffusion3Pipeline with a SD3Transformer2DModel" in log and "guidance_scale=7.0 (guidance_scale)" in log, log
    with pytest.raises(ValueError, match=r"^scheduler='EulerDiscrete' .*: these StableDiffusion3Pipeline weights take FlowMatchEuler"):
        run(predictor, **FAST, scheduler="EulerDiscrete")


def test_flux_weights_without_a_vae_shift_factor_fail_setup_saying_so(tmp_path):
    from service.weights import WeightsError, load_pipeline

    pipe = tiny_flux_pipeline()
    pipe.vae.register_to_config(shift_factor=None)
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(WeightsError, match=r"vae/config.json has no shift_factor"):
        load_pipeline(tmp_path / "model")


@pytest.mark.skipif(not flux_bundled_available(), reason="weights/tiny-shapes-flux is not exported yet")
def test_the_bundled_flux_defaults_are_its_default_call():
    from diffusers import FluxPipeline

    from faster_diffusion.quality.evaluate import FLUX_CALL
    from service.request import Planner

    pipe = FluxPipeline.from_pretrained(FLUX_BUNDLED)
    defaults = Planner(pipe).defaults
    assert (defaults.num_inference_steps, defaults.guidance, defaults.guidance_scale) == (28, "true_cfg_scale", FLUX_CALL["true_cfg_scale"])
    assert defaults.native_size == FLUX_CALL["height"] == FLUX_CALL["width"] and defaults.size_multiple == 16
    assert defaults.max_sequence_length == min(512, pipe.tokenizer_2.model_max_length)


# ---------------------------------------------------------------------------------------------------------------
# the Cog HTTP server on transformer weights


@pytest.fixture(scope="module")
def served_flux(flux_dir, tmp_path_factory):
    """`python -m service.serve` (what `make serve` and the image run) on weights/tiny-shapes-flux, or the tiny Flux."""
    weights = FLUX_BUNDLED if flux_bundled_available() else flux_dir
    log_path = tmp_path_factory.mktemp("serve-flux") / "serve.log"
    environ = dict(os.environ, COG_WEIGHTS=str(weights), FASTER_DIFFUSION_CACHE=str(log_path.parent / "cache"),
                   OMP_NUM_THREADS="1")  # fmt: skip
    with entry_point(ROOT, log_path, environ, STARTUP_TIMEOUT) as server:
        yield server


def post(server, **inputs) -> dict:
    server.wait_ready(30)
    response = requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_cog_http_serves_transformer_weights_at_their_defaults(served_flux):
    body = post(served_flux, prompt=PROMPT, seed=5)
    assert body["status"] == "succeeded", body.get("error") or body
    (uri,) = body["output"]
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    native = 64 if flux_bundled_available() else 32
    assert image.size == (native, native)
    log = served_flux.log()
    assert "scheduler=FlowMatchEuler" in log and "steps=28" in log and "(true_cfg_scale)" in log, log[-3000:]
    if flux_bundled_available():  # the plan auto picks from the calibration the weights ship
        assert "schedule_source='auto from file " in log and "FlowMatchEuler-28steps-8x8.json" in log, log[-3000:]


def test_cog_http_fails_a_request_the_transformer_weights_cannot_use_naming_the_field(served_flux):
    body = post(served_flux, prompt=PROMPT, num_inference_steps=2, scheduler="DDIM")
    assert body["status"] == "failed", body
    assert "scheduler='DDIM'" in body["error"] and "FlowMatchEuler" in body["error"], body["error"]
    body = post(served_flux, prompt=PROMPT, num_inference_steps=2, width=72)
    assert body["status"] == "failed" and "width=72 must be a multiple of 16" in body["error"], body
    body = post(served_flux, prompt=PROMPT, num_inference_steps=2, scheduler="FlowUniPC", acceleration="none")
    assert body["status"] == "succeeded", body.get("error") or body
