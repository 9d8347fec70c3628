"""Cog predictor: Stable Diffusion text-to-image, img2img and inpainting, accelerated by faster-diffusion.

setup() loads the pipeline once (COG_WEIGHTS / setup's ``weights``, else
weights/stable-diffusion-v1-5, else the bundled weights/tiny-shapes toy model;
SD1.x/2.x, SDXL or a ControlNet pipeline, as the weights' model_index.json says),
derives the img2img and inpainting pipelines from it (shared modules, no copy)
and builds every scheduler; run() checks what the input schema cannot express,
picks the pipeline, switches the scheduler and the acceleration, seeds a
generator and samples.

Serve it with ``make serve`` (no Docker) or ``cog predict -i prompt="..."``.
After changing an input, regenerate .cog/openapi_schema.json with
``.venv/bin/python script/openapi-schema``.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
import time
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from cog import BaseRunner, Input, Path
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

import faster_diffusion
from faster_diffusion.accelerator import shipped_calibrations
from faster_diffusion.schedules import is_calibrated
from service import calibrations
from service.lora import resolve_lora
from service.schedulers import SCHEDULERS, make_scheduler
from service.weights import load_pipeline, resolve_weights

DEFAULT_SCHEDULER, DEFAULT_STEPS = "DDIM", 50
ACCELERATIONS = ["faster-diffusion", "none"]
OUTPUT_FORMATS = ["png", "webp", "jpg"]
SAVE_OPTIONS = {"png": {}, "webp": {"quality": 95}, "jpg": {"quality": 95}}
PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}

# Largest width x height x num_outputs one request may ask for (four 768x768
# images); FASTER_DIFFUSION_MAX_PIXELS overrides it for bigger or smaller cards.
DEFAULT_MAX_PIXELS = 4 * 768 * 768
LORA_ADAPTER = "request_lora"  # the adapter name of a prediction's lora_weights, unloaded after it


class Predictor(BaseRunner):
    def setup(self, weights: Optional[Path] = None) -> None:
        """Loads the pipeline and the schedulers once."""
        started = time.perf_counter()
        resolved = resolve_weights(weights)
        if resolved.warning:
            print(f"WARNING: {resolved.warning}", flush=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(resolved.path, device=self.device)
        # A ControlNet pipeline takes `image` as its control image; others use it for img2img / inpainting.
        self.is_controlnet = getattr(self.pipe, "controlnet", None) is not None
        self.img2img = self.inpaint = None
        if not self.is_controlnet:
            self.img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            self.inpaint = AutoPipelineForInpainting.from_pipe(self.pipe)
            for pipe in (self.img2img, self.inpaint):
                pipe.set_progress_bar_config(disable=True)
        self.weights = resolved
        self.native_size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.size_multiple = math.lcm(8, self.pipe.vae_scale_factor)
        self.max_pixels = int(os.environ.get("FASTER_DIFFUSION_MAX_PIXELS", DEFAULT_MAX_PIXELS))
        self.base_config = self.pipe.scheduler.config
        self.schedulers = {name: make_scheduler(name, self.base_config) for name in SCHEDULERS}
        self.shipped = shipped_calibrations(resolved.path)  # read once; handed to every accelerator
        self.calibration_prompts = calibrations.calibration_prompts(resolved.path)
        self.calibrations = []  # made by this server: at setup for the defaults, then on first use
        if not self.is_controlnet:  # a ControlNet pipeline needs a control image: its first run calibrates
            self._calibrate(DEFAULT_SCHEDULER, DEFAULT_STEPS, self.native_size, self.native_size, "at setup", validate=True)
        self.out_dir = tempfile.mkdtemp(prefix="faster-diffusion-")  # emptied at each run: no pile-up in /tmp
        dtype = str(self.pipe.unet.dtype).replace("torch.", "")
        print(
            f"setup: loaded {resolved.path} ({type(self.pipe).__name__}, {dtype} on {self.device}, native size {self.native_size}px, "
            f"max {self.max_pixels} px/request) in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

    def _calibrate(self, scheduler: str, steps: int, width: int, height: int, when: str, validate: bool = False) -> None:
        """key_steps="auto" needs a calibration of the sampler, step count and size. The model directory
        may ship it (script/calibrate); otherwise it is made here, once, with fixed prompts and seeds
        (one stock run), so that the same request always gets the same schedule and the same images.
        ``validate`` also checks it on outputs (a few more runs: at setup, not at a request)."""
        timesteps = make_scheduler(scheduler, self.base_config)
        timesteps.set_timesteps(steps)
        name, latent = type(timesteps).__name__, (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        if any(c.matches(name, timesteps.timesteps, latent) for c in self.shipped + self.calibrations):
            return
        started = time.perf_counter()
        calibration = calibrations.calibrate(self.pipe, scheduler, steps, height, width, self.calibration_prompts)
        if validate:
            calibrations.validate(self.pipe, calibration, scheduler, height, width, self.calibration_prompts)
        calibration.info["source"] = f"calibrated {when}"
        self.calibrations.append(calibration)
        print(
            f"calibrated key_steps=auto for {scheduler}-{steps} at {width}x{height} {when} on "
            f"{len(self.calibration_prompts)} prompts in {time.perf_counter() - started:.1f}s: auto={calibration.schedule()}",
            flush=True,
        )

    def run(
        self,
        prompt: str = Input(description="What to draw."),
        negative_prompt: str = Input(description="What not to draw (empty: nothing).", default=""),
        image: Optional[Path] = Input(
            description="Starting image for img2img, or with `mask` for inpainting; resized to width x height "
            "when those are set. With a ControlNet model: the control image (required). Unset: text-to-image.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Inpainting mask, the size of `image`: white is repainted, black kept. Needs `image`.",
            default=None,
        ),
        prompt_strength: float = Input(
            description="img2img / inpainting: how far to move away from `image` (1.0 ignores it); "
            "runs about num_inference_steps x prompt_strength steps.",
            default=0.8,
            ge=0,
            le=1,
        ),
        width: Optional[int] = Input(
            description="Image width in pixels, a multiple of 8. Leave unset for the model's native size "
            "(512 for Stable Diffusion v1.5, 64 for the bundled tiny-shapes model).",
            default=None,
            ge=64,
            le=1024,
        ),
        height: Optional[int] = Input(
            description="Image height in pixels, a multiple of 8. Leave unset for the model's native size.",
            default=None,
            ge=64,
            le=1024,
        ),
        num_outputs: int = Input(description="Number of images to generate.", default=1, ge=1, le=4),
        num_inference_steps: int = Input(description="Number of denoising steps.", default=DEFAULT_STEPS, ge=1, le=150),
        guidance_scale: float = Input(
            description="Classifier-free guidance scale (1 or less turns guidance off).", default=7.5, ge=0, le=20
        ),
        scheduler: str = Input(
            description="Sampler. DPMSolverMultistep is DPM-Solver++ (multistep).",
            default=DEFAULT_SCHEDULER,
            choices=list(SCHEDULERS),
        ),
        acceleration: str = Input(
            description="faster-diffusion: reuse UNet encoder features between key steps (arXiv 2312.09608). "
            "none: the stock pipeline.",
            default="faster-diffusion",
            choices=ACCELERATIONS,
        ),
        key_steps: str = Input(
            description="Steps that run the UNet encoder (faster-diffusion only): 'auto' (calibrated on this model: "
            "the fewest encoder passes that keep its encoder features close to the stock run's), 'auto:B' "
            "(calibrated, B encoder passes), 'paper' (the paper's schedule, tuned for SD1.5), 'all', 'uniform:K' "
            "(every K-th step), or comma-separated step indices starting at 0, e.g. '0,1,2,3,5,10,15,25,35'. "
            "A sampler, step count or size without a shipped calibration is calibrated once, on first use "
            "(one extra stock run of fixed prompts).",
            default="auto",
        ),
        parallel: bool = Input(
            description="faster-diffusion only: run the decoders of the steps between two key steps as one batch.",
            default=True,
        ),
        noise_injection: float = Input(
            description="faster-diffusion only: prior noise injection strength (adds this multiple of the initial "
            "noise to the latent at late steps, t < 500; 0 turns it off).",
            default=0.003,
            ge=0,
            le=0.1,
        ),
        lora_weights: str = Input(
            description="A LoRA to apply to this prediction only: a URL (http, https, file) or a local path of a "
            ".safetensors file in diffusers or kohya format. Each URL is downloaded once and cached. Empty: no LoRA.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of `lora_weights` (0 turns it off, 1 as trained).", default=1.0, ge=0, le=2
        ),
        seed: Optional[int] = Input(
            description="Random seed. Leave unset for a random one (logged).", default=None, ge=0, le=2**32 - 1
        ),
        output_format: str = Input(description="Image file format.", default="png", choices=OUTPUT_FORMATS),
    ) -> list[Path]:
        """Generates num_outputs images for the prompt."""
        mode, pipe, pipe_arguments, width, height, loop_steps = self._pick_pipeline(
            image, mask, prompt_strength, width, height, num_inference_steps
        )
        self._check(width, height, num_outputs, loop_steps, acceleration, key_steps)
        lora_file = resolve_lora(lora_weights) if lora_weights else None  # fails here, naming lora_weights

        if seed is None:
            seed = secrets.randbelow(2**32)
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe.scheduler = self.schedulers[scheduler]
        if acceleration == "faster-diffusion" and is_calibrated(key_steps) and not self.is_controlnet:
            self._calibrate(scheduler, num_inference_steps, width, height, "on first use")  # img2img uses its tail
        # A LoRA is loaded after any calibration (calibrations describe the base model) and unloaded after
        # the prediction, whatever happens: the shared UNet and text encoder go back to the base weights.
        self._load_lora(lora_file, lora_weights, lora_scale)
        try:
            accel = None
            if acceleration == "faster-diffusion":  # the pipelines share one UNet: enabling one disables the others
                accel = faster_diffusion.enable(
                    pipe, key_steps=key_steps, parallel=parallel, noise_injection=noise_injection,
                    calibration=self.shipped + self.calibrations,
                )
            else:
                faster_diffusion.disable(pipe)
            print(
                f"seed={seed} mode={mode} scheduler={scheduler} "
                f"size={width}x{height} num_outputs={num_outputs} "
                f"steps={num_inference_steps} guidance_scale={guidance_scale} acceleration={acceleration}",
                flush=True,
            )
            if lora_file is not None:
                print(f"lora_weights={lora_weights!r} lora_scale={lora_scale} (file {lora_file})", flush=True)

            counter = _EncoderCounter(pipe.unet) if accel is None else None
            started = time.perf_counter()
            try:
                images = pipe(
                    prompt,
                    negative_prompt=negative_prompt or None,
                    **pipe_arguments,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    num_images_per_prompt=num_outputs,
                    generator=generator,
                ).images
            finally:
                if counter is not None:
                    counter.remove()
            elapsed = time.perf_counter() - started
        finally:
            if lora_file is not None:
                self.pipe.unload_lora_weights()

        if accel is not None:
            stats = accel.stats
            if lora_file is None:  # a calibration this run made serves the next ones (not one made with a LoRA)
                self.calibrations += accel.calibrations
            print(
                f"key_steps={stats['key_steps']} ({len(stats['key_steps'])} of {stats['steps']}) "
                f"schedule_source={stats['schedule_source']!r} "
                f"encoder_passes={stats['encoder_passes']} decoder_passes={stats['decoder_passes']} "
                f"unet_calls={stats['unet_calls']} parallel={parallel} noise_injection={noise_injection}",
                flush=True,
            )
        else:
            print(
                f"key_steps=all (stock pipeline) encoder_passes={counter.encoder} "
                f"decoder_passes={counter.decoder} unet_calls={counter.calls}",
                flush=True,
            )
        print(f"wall_time={elapsed:.2f}s ({num_inference_steps / elapsed:.1f} steps/s)", flush=True)

        for old in os.listdir(self.out_dir):  # the previous prediction's files, already sent
            os.remove(os.path.join(self.out_dir, old))
        paths = []
        for i, image in enumerate(images):
            path = os.path.join(self.out_dir, f"out-{i}.{output_format}")
            image.save(path, PIL_FORMAT[output_format], **SAVE_OPTIONS[output_format])
            paths.append(Path(path))
        return paths

    def _load_lora(self, lora_file, source: str, scale: float) -> None:
        """Loads ``lora_file`` into the shared UNet and text encoder at ``scale`` (no-op for None); a file
        diffusers cannot apply fails the prediction, naming lora_weights, with nothing left loaded."""
        if lora_file is None:
            return
        try:
            self.pipe.load_lora_weights(str(lora_file), adapter_name=LORA_ADAPTER)
            self.pipe.set_adapters([LORA_ADAPTER], adapter_weights=[scale])
        except Exception as err:
            self.pipe.unload_lora_weights()
            raise ValueError(
                f"lora_weights: {source!r}: not a LoRA this {type(self.pipe).__name__} can load ({type(err).__name__}: {err})"
            ) from None

    def _pick_pipeline(self, image, mask, prompt_strength, width, height, num_inference_steps):
        """(mode, pipeline, its image/size arguments, width, height, steps the loop runs) for a request."""
        if mask is not None and image is None:
            raise ValueError("mask: inpainting needs an `image` to repaint; set image or leave mask unset")
        if image is None:
            if self.is_controlnet:
                raise ValueError("image: this ControlNet model needs a control image")
            width, height = width or self.native_size, height or self.native_size
            return "text-to-image", self.pipe, {"width": width, "height": height}, width, height, num_inference_steps

        picture = _read_image(image, "image", "RGB")
        original_size = picture.size
        width, height = width or picture.width, height or picture.height
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.LANCZOS)
        if self.is_controlnet:
            if mask is not None:
                raise ValueError("mask: inpainting is not available with a ControlNet model")
            arguments = {"image": picture, "width": width, "height": height}
            return "controlnet", self.pipe, arguments, width, height, num_inference_steps

        # img2img and inpainting run the last int(steps x strength) steps (diffusers' get_timesteps)
        loop_steps = min(int(num_inference_steps * prompt_strength), num_inference_steps)
        if loop_steps < 1:
            raise ValueError(
                f"prompt_strength={prompt_strength} with num_inference_steps={num_inference_steps} leaves no "
                "denoising step; raise prompt_strength or num_inference_steps"
            )
        if mask is None:
            return "img2img", self.img2img, {"image": picture, "strength": prompt_strength}, width, height, loop_steps
        mask_picture = _read_image(mask, "mask", "L")
        if mask_picture.size != original_size:
            raise ValueError(
                f"mask: its size {mask_picture.width}x{mask_picture.height} differs from the image's "
                f"{original_size[0]}x{original_size[1]}"
            )
        if mask_picture.size != (width, height):
            mask_picture = mask_picture.resize((width, height), Image.NEAREST)
        arguments = {"image": picture, "mask_image": mask_picture, "strength": prompt_strength, "width": width, "height": height}
        return "inpainting", self.inpaint, arguments, width, height, loop_steps

    def _check(self, width, height, num_outputs, num_inference_steps, acceleration, key_steps) -> None:
        """Fails early, naming the field, on what the input schema cannot express."""
        m = self.size_multiple
        for name, value in (("width", width), ("height", height)):
            if value % m:
                raise ValueError(f"{name}={value} must be a multiple of {m} (try {value - value % m} or {value - value % m + m})")
        pixels = width * height * num_outputs
        if pixels > self.max_pixels:
            raise ValueError(
                f"width x height x num_outputs = {width}x{height}x{num_outputs} = {pixels} pixels is over this "
                f"server's budget of {self.max_pixels}; lower width, height or num_outputs"
            )
        if acceleration != "faster-diffusion":
            return
        try:
            faster_diffusion.check_key_steps(key_steps, num_inference_steps)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith("key_steps") else f"key_steps: {message}") from None


def _read_image(path, field: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as picture:
            return picture.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{field}: cannot read {os.path.basename(str(path))} as an image ({err})") from None


class _EncoderCounter:
    """Counts UNet calls and encoder / decoder passes of the stock pipeline (forward hooks on the UNet)."""

    def __init__(self, unet):
        self.calls = self.encoder = self.decoder = 0

        def count(attr):
            def hook(module, args):
                setattr(self, attr, getattr(self, attr) + 1)

            return hook

        self._handles = [
            unet.register_forward_pre_hook(count("calls")),
            unet.down_blocks[0].register_forward_pre_hook(count("encoder")),
            unet.up_blocks[-1].register_forward_pre_hook(count("decoder")),
        ]

    def remove(self):
        for handle in self._handles:
            handle.remove()
