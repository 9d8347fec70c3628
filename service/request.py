"""Planning a prediction: which pipeline runs, at what size and step count, with what acceleration.

``Planner.plan`` turns the inputs into a ``Request`` or fails early with a ``ValueError`` that
names the field, on what the input schema cannot express (sizes that are not a multiple of the
VAE's, a pixel budget, a mask without an image, a key-step schedule the step count cannot take,
a sampler or an input the loaded weights cannot use). Inputs left unset take the weights' defaults
(``service.weights.call_defaults``), and ``guidance_scale`` becomes the argument the pipeline guides
with: Stable Diffusion's and SD3's ``guidance_scale``, Flux's ``true_cfg_scale`` (weights without a
guidance embedding) or Flux's distilled ``guidance_scale`` (with one).

Transformer weights (Flux, SD3) take text-to-image only. Their acceleration is what the library
offers on transformers: where it cannot calibrate them, ``plan="auto"`` (the plan predicted to keep the
images) runs the stock pipeline, the one plan known to keep them, and the request's ``notes`` say so in the
log (encoder propagation at the paper's key steps did not keep them on weights/tiny-shapes-flux: 18.8 dB,
31% of images right against 100% stock); ``plan="auto:T"`` and ``key_steps="auto"`` fail, naming the field.
``Acceleration`` holds the acceleration inputs: one more input is one more field, read by
``check`` and ``enable_kwargs``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

import faster_diffusion
from faster_diffusion.plan import AutoPlan, check_levels
from faster_diffusion.schedules import is_calibrated

from .schedulers import FLOW_SCHEDULERS, SCHEDULERS
from .weights import call_defaults

ACCELERATIONS = ["faster-diffusion", "none"]
# Largest width x height x num_outputs one request may ask for (four 768x768 images);
# FASTER_DIFFUSION_MAX_PIXELS overrides it for bigger or smaller cards.
DEFAULT_MAX_PIXELS = 4 * 768 * 768


@dataclass(frozen=True)
class Acceleration:
    """The acceleration inputs of one prediction."""

    mode: str = "faster-diffusion"  # ACCELERATIONS
    plan: str = "auto"
    key_steps: str = ""  # set: encoder propagation at these key steps instead of the plan
    parallel: bool = True
    noise_injection: float | None = None  # None: the library's default for a plan or key steps

    @property
    def on(self) -> bool:
        return self.mode == "faster-diffusion"

    @property
    def needs_calibration(self) -> bool:
        """Whether the schedule comes from a calibration of the run's sampler, steps and size."""
        if not self.on:
            return False
        if self.key_steps:
            return is_calibrated(self.key_steps)
        return isinstance(faster_diffusion.parse_plan(self.plan), AutoPlan)

    def check(self, loop_steps: int, guided: bool) -> None:
        """Fails, naming the field, on a schedule the run's step count (or its lack of guidance) cannot take."""
        if not self.on:
            return
        if not self.key_steps:
            levels = faster_diffusion.parse_plan(self.plan)  # its errors name `plan`
            if not isinstance(levels, AutoPlan):
                check_levels(levels, loop_steps, guided)  # before sampling: the accelerator checks the same
            return
        if self.plan.strip().lower() != "auto":  # "auto" is the default: the one value that does not conflict
            raise ValueError(f"plan={self.plan!r} and key_steps={self.key_steps!r}: set one of them (key_steps gives "
                             "encoder propagation, plan the planner's levels)")
        try:
            faster_diffusion.check_key_steps(self.key_steps, loop_steps)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith("key_steps") else f"key_steps: {message}") from None

    def enable_kwargs(self) -> dict:
        """The arguments of ``faster_diffusion.enable`` these inputs stand for."""
        schedule = {"key_steps": self.key_steps} if self.key_steps else {"plan": self.plan}
        return {**schedule, "parallel": self.parallel, "noise_injection": self.noise_injection}



@contextlib.contextmanager
def accelerated(pipe, acceleration: Acceleration, calibrations=()):
    """``pipe`` accelerated as ``acceleration`` says (stock for "none") inside the block, stock after it.
    Yields the accelerator, or None. The pipelines share one UNet: enabling one disables the others."""
    if not acceleration.on:
        faster_diffusion.disable(pipe)
        yield None
        return
    accel = faster_diffusion.enable(pipe, calibration=list(calibrations), **acceleration.enable_kwargs())
    try:
        yield accel
    finally:
        accel.disable()


@dataclass
class Request:
    """What one prediction runs."""

    mode: str  # text-to-image, img2img, inpainting, controlnet
    pipe: object
    arguments: dict  # the pipeline call's image / size / strength arguments
    width: int
    height: int
    steps: int  # num_inference_steps
    loop_steps: int  # the steps the denoising loop runs (img2img and inpainting run a tail)
    num_outputs: int
    acceleration: Acceleration = field(default_factory=Acceleration)
    scheduler: str = ""  # the `scheduler` input, or the weights' default
    guidance_scale: float = 0.0  # the `guidance_scale` input, or the weights' default
    notes: list = field(default_factory=list)  # what the service chose instead of an input, and why (logged)

    def describe(self) -> str:
        return (f"mode={self.mode} size={self.width}x{self.height} num_outputs={self.num_outputs} "
                f"steps={self.steps} acceleration={self.acceleration.mode}")  # fmt: skip


class Planner:
    """The server's pipelines and limits; ``plan`` checks a prediction's inputs against them.

    ``schedulers``: the samplers these weights take (the `scheduler` input's choices they can run)."""

    def __init__(self, pipe, img2img=None, inpaint=None, max_pixels: int | None = None, schedulers=SCHEDULERS):
        self.pipe, self.img2img, self.inpaint = pipe, img2img, inpaint
        # A ControlNet pipeline takes `image` as its control image; others use it for img2img / inpainting.
        self.is_controlnet = getattr(pipe, "controlnet", None) is not None
        self.transformer = getattr(pipe, "transformer", None)  # Flux, SD3: text-to-image only
        self.defaults = call_defaults(pipe)
        self.native_size = self.defaults.native_size
        self.size_multiple = self.defaults.size_multiple
        self.schedulers = tuple(schedulers)
        if max_pixels is None:
            max_pixels = int(os.environ.get("FASTER_DIFFUSION_MAX_PIXELS", DEFAULT_MAX_PIXELS))
        self.max_pixels = max_pixels

    @property
    def weights_name(self) -> str:
        return type(self.pipe).__name__

    def plan(self, *, image, mask, prompt_strength, width, height, num_outputs, num_inference_steps,
             acceleration: Acceleration, guidance_scale: float | None, scheduler: str | None = None,
             negative_prompt: str = "", lora: bool = False) -> Request:  # fmt: skip
        defaults = self.defaults
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = self._check_scheduler(defaults.scheduler if scheduler is None else scheduler)
        if self.transformer is not None:
            self._check_transformer_inputs(image, mask, lora, negative_prompt)
        request = self._pick_pipeline(image, mask, prompt_strength, width, height, steps)
        request.num_outputs, request.scheduler, request.guidance_scale = num_outputs, scheduler, guidance_scale
        request.acceleration = acceleration
        self._check_size(request.width, request.height, num_outputs)
        guided = guidance_scale > 1 and not defaults.distilled  # distilled guidance: one transformer call a step
        request.acceleration.check(request.loop_steps, guided=guided)
        request.arguments.update(self.guidance_arguments(negative_prompt, guidance_scale))
        return request

    def _check_scheduler(self, name: str) -> str:
        if name in self.schedulers:
            return name
        if self.transformer is None:
            why = " (a flow-matching sampler, for Flux and SD3 weights)" if name in FLOW_SCHEDULERS else ""
        elif name in FLOW_SCHEDULERS:
            why = " (its set_timesteps cannot take the shift this pipeline passes: the weights' scheduler does not shift dynamically)"
        else:
            why = " (a sampler for Stable Diffusion's noise-prediction weights; these are a flow-matching model)"
        raise ValueError(f"scheduler={name!r}{why}: these {self.weights_name} weights take {', '.join(self.schedulers)}")

    def _check_transformer_inputs(self, image, mask, lora: bool, negative_prompt: str) -> None:
        """Transformer weights run text-to-image, without a LoRA; distilled guidance has no negative prompt."""
        for name, value in (("image", image), ("mask", mask)):
            if value is not None:
                raise ValueError(f"{name}: these {self.weights_name} weights take text-to-image only (img2img, inpainting "
                                 "and ControlNet are served for Stable Diffusion weights); leave image and mask unset")
        if lora:
            raise ValueError(f"lora_weights: LoRAs are served for Stable Diffusion weights only; these {self.weights_name} "
                             "weights take none (leave lora_weights empty)")
        if negative_prompt and self.defaults.distilled:
            raise ValueError(f"negative_prompt: these {self.weights_name} weights guide through their transformer's guidance "
                             "embedding (distilled guidance, guidance_scale), which takes no negative prompt; leave it empty")

    def guidance_arguments(self, negative_prompt: str, guidance_scale: float) -> dict:
        """The pipeline call's prompt-side arguments: the negative prompt, the guidance and the T5 length."""
        defaults = self.defaults
        if self.transformer is None:
            return {"negative_prompt": negative_prompt or None, "guidance_scale": guidance_scale}
        length = {"max_sequence_length": defaults.max_sequence_length}
        if defaults.distilled:
            return {"guidance_scale": guidance_scale, **length}
        if defaults.guidance == "true_cfg_scale":  # FluxPipeline guides only with a negative prompt, "" included
            return {"negative_prompt": negative_prompt, "true_cfg_scale": guidance_scale, **length}
        return {"negative_prompt": negative_prompt or None, "guidance_scale": guidance_scale, **length}

    def _pick_pipeline(self, image, mask, prompt_strength, width, height, steps) -> Request:
        if mask is not None and image is None:
            raise ValueError("mask: inpainting needs an `image` to repaint; set image or leave mask unset")
        if image is None:
            if self.is_controlnet:
                raise ValueError("image: this ControlNet model needs a control image")
            width, height = width or self.native_size, height or self.native_size
            return Request("text-to-image", self.pipe, {"width": width, "height": height}, width, height, steps, steps, 1)

        picture = read_image(image, "image", "RGB")
        original_size = picture.size
        width, height = width or picture.width, height or picture.height
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.LANCZOS)
        if self.is_controlnet:
            if mask is not None:
                raise ValueError("mask: inpainting is not available with a ControlNet model")
            arguments = {"image": picture, "width": width, "height": height}
            return Request("controlnet", self.pipe, arguments, width, height, steps, steps, 1)

        # img2img and inpainting run the last int(steps x strength) steps (diffusers' get_timesteps)
        loop_steps = min(int(steps * prompt_strength), steps)
        if loop_steps < 1:
            raise ValueError(
                f"prompt_strength={prompt_strength} with num_inference_steps={steps} leaves no "
                "denoising step; raise prompt_strength or num_inference_steps"
            )
        if mask is None:
            arguments = {"image": picture, "strength": prompt_strength}
            return Request("img2img", self.img2img, arguments, width, height, steps, loop_steps, 1)
        mask_picture = read_image(mask, "mask", "L")
        if mask_picture.size != original_size:
            raise ValueError(
                f"mask: its size {mask_picture.width}x{mask_picture.height} differs from the image's "
                f"{original_size[0]}x{original_size[1]}"
            )
        if mask_picture.size != (width, height):
            mask_picture = mask_picture.resize((width, height), Image.NEAREST)
        arguments = {"image": picture, "mask_image": mask_picture, "strength": prompt_strength, "width": width, "height": height}
        return Request("inpainting", self.inpaint, arguments, width, height, steps, loop_steps, 1)

    def _check_size(self, width: int, height: int, num_outputs: int) -> None:
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


def read_image(path, field: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as picture:
            return picture.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{field}: cannot read {os.path.basename(str(path))} as an image ({err})") from None
