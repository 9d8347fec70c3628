"""Cog predictor: Stable Diffusion text-to-image, img2img and inpainting, and Flux / SD3 text-to-image, accelerated by faster-diffusion.

setup() loads the pipeline once (COG_WEIGHTS / setup's ``weights``, else
weights/stable-diffusion-v1-5, else the bundled weights/tiny-shapes toy model;
SD1.x/2.x, SDXL or a ControlNet pipeline, as the weights' model_index.json says,
with the weights' safety checker when they ship one), derives the img2img and
inpainting pipelines from it (shared modules, no copy), builds every scheduler and
makes sure the default sampler has a calibration at the native size (with the error model of
plans) and warms up the planner's cost model (kept on disk by service.plans). Flow-matching
transformer weights (FluxPipeline, StableDiffusion3Pipeline) are loaded with their flow samplers and
the call defaults they imply (service.weights.call_defaults), text-to-image only; none of the UNet's
setup (derived pipelines, calibration, cost model) runs on them. run() holds the
inputs and the sequence of steps; the concerns live in service/: planning and
checking a request (service.request), the calibrations (service.calibrations, cached
on disk by service.cache), the LoRA (service.lora), the safety checker
(service.safety) and the run's log line (service.report).

Serve it with ``make serve`` (no Docker) or ``cog predict -i prompt="..."``.
After changing an input, regenerate .cog/openapi_schema.json with
``.venv/bin/python script/openapi-schema``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from typing import Optional

import torch
from cog import BaseRunner, Input, Path
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

from faster_diffusion.calibration import shipped_calibrations
from service import calibrations, safety
from service.memory import bound_thread_caches, release_freed_memory
from service.plans import CostModelStore
from service.cache import weights_identity
from service.lora import applied_lora, resolve_lora
from service.report import counted, passes_line
from service.request import ACCELERATIONS, Acceleration, Planner, accelerated
from service.schedulers import FLOW_SCHEDULERS, SCHEDULERS, flow_schedulers, make_scheduler
from service.weights import SD_GUIDANCE, SD_SCHEDULER, SD_STEPS, load_pipeline, resolve_weights

DEFAULT_SCHEDULER, DEFAULT_STEPS = SD_SCHEDULER, SD_STEPS  # Stable Diffusion weights' (transformers': their own)
MAX_MADE_CALIBRATIONS = 16  # transformer weights: calibrations made by first runs, kept in memory (newest)
OUTPUT_FORMATS = ["png", "webp", "jpg"]
SAVE_OPTIONS = {"png": {}, "webp": {"quality": 95}, "jpg": {"quality": 95}}
PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}


class Predictor(BaseRunner):
    def setup(self, weights: Optional[Path] = None) -> None:
        """Loads the pipeline, the schedulers and the calibrations once."""
        started = time.perf_counter()
        self.setup_budget = calibrations.setup_budget()  # a bad FASTER_DIFFUSION_SETUP_BUDGET fails before loading
        memory = bound_thread_caches()  # before the first convolution: flat memory across image sizes
        resolved = resolve_weights(weights)
        if resolved.warning:
            print(f"WARNING: {resolved.warning}", flush=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(resolved.path, device=self.device)
        self.weights = resolved
        self.base_config = self.pipe.scheduler.config  # every scheduler, also a calibration's, is built on it
        self.out_dir = tempfile.mkdtemp(prefix="faster-diffusion-")  # emptied at each run: no pile-up in /tmp
        transformer = getattr(self.pipe, "transformer", None)
        if transformer is not None:
            self._setup_transformer(transformer, resolved, memory, started)
            return
        self.denoiser = self.pipe.unet
        img2img = inpaint = None
        if getattr(self.pipe, "controlnet", None) is None:
            img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            inpaint = AutoPipelineForInpainting.from_pipe(self.pipe)
            for pipe in (img2img, inpaint):
                pipe.set_progress_bar_config(disable=True)
        self.planner = Planner(self.pipe, img2img, inpaint)
        self.schedulers = {name: make_scheduler(name, self.base_config) for name in SCHEDULERS}
        self.calibration_prompts = calibrations.calibration_prompts(resolved.path)
        self.store = calibrations.CalibrationStore(resolved.path, weights_identity(resolved.path))
        self.cost_models = CostModelStore(self.pipe.unet, weights_identity(resolved.path), self.device)
        if not self.planner.is_controlnet:  # a ControlNet pipeline needs a control image: its first run calibrates
            self._calibrate_at_setup(DEFAULT_SCHEDULER, DEFAULT_STEPS, self.planner.native_size)
            self._warm_up()
            self.cost_models.save_new()
        dtype = str(self.pipe.unet.dtype).replace("torch.", "")
        checker = "on by default" if safety.has_checker(self.pipe) else "none in these weights"
        print(
            f"setup: loaded {resolved.path} ({type(self.pipe).__name__}, {dtype} on {self.device}, native size "
            f"{self.planner.native_size}px, max {self.planner.max_pixels} px/request, safety checker {checker}, "
            f"calibration cache {self.store.cache.folder}, {memory}) in "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )

    def _setup_transformer(self, transformer, resolved, memory: str, started: float) -> None:
        """Flux / SD3 weights: the flow samplers their pipeline can drive and the call defaults the weights imply;
        text-to-image only, so no derived pipelines; plan="auto" plans from the calibrations the weights ship
        (script/calibrate), which the library finds in the model directory itself."""
        self.denoiser = transformer
        self.schedulers = flow_schedulers(self.pipe)
        self.planner = Planner(self.pipe, schedulers=self.schedulers)
        self.store = None
        self.cost_models = CostModelStore(transformer, weights_identity(resolved.path), self.device)  # a restart times nothing
        self.made_calibrations = []  # made at setup or by a first run, newest last (the shipped ones the library reads)
        defaults = self.planner.defaults
        guidance = defaults.guidance + (" (distilled)" if defaults.distilled else "")
        shipped = self._calibrate_transformer_at_setup(resolved.path)
        self._warm_up()
        self.cost_models.save_new()
        acceleration = f"plan='auto' from {shipped} (derived for other samplers, steps and sizes)"
        dtype = str(transformer.dtype).replace("torch.", "")
        print(
            f"setup: loaded {resolved.path} ({type(self.pipe).__name__} with a {type(transformer).__name__}, {dtype} on "
            f"{self.device}, native size {defaults.native_size}px, sizes multiples of {defaults.size_multiple}, max "
            f"{self.planner.max_pixels} px/request; defaults {defaults.scheduler}-{defaults.num_inference_steps}, "
            f"guidance_scale {defaults.guidance_scale:g} as {guidance}, max_sequence_length {defaults.max_sequence_length}; "
            f"samplers {', '.join(self.schedulers)}; {acceleration}; {memory}) in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

    def _calibrate_transformer_at_setup(self, model_dir) -> str:
        """Transformer weights: what they ship for the default call (script/calibrate), else a calibration made here
        within the setup budget, as for Stable Diffusion weights, kept in the cache for the next start; returns which."""
        defaults = self.planner.defaults
        size, steps, scheduler = defaults.native_size, defaults.num_inference_steps, defaults.scheduler
        shipped = [c for c in shipped_calibrations(model_dir) if c.error_model is not None]
        if any(c.info.get("service_scheduler") == scheduler and c.num_steps == steps for c in shipped):
            return f"the weights' {len(shipped)} shipped calibrations"
        budget = self.setup_budget
        # the service's calibration cache, under a name (a flow sampler's timesteps depend on the pipeline's shift)
        store = calibrations.CalibrationStore(model_dir, weights_identity(model_dir))
        name = f"setup-{scheduler}-{steps}steps-{size}px-" + ("thorough" if budget is None else f"budget{budget:g}")
        kept = store.named(name)
        if kept is not None:  # made by an earlier start of this server on these weights
            self.made_calibrations.append(kept)
            print(f"calibration of {scheduler}-{steps} at {size}x{size} from the cache ({store.cache.folder})", flush=True)
            return "the calibration an earlier start made (cache)"
        started = time.perf_counter()
        spend = None if budget is None else budget - calibrations.WARM_UP_IMAGES
        arguments = self.planner.guidance_arguments("", defaults.guidance_scale)
        calibration = calibrations.calibrate(self.pipe, scheduler, steps, size, size, calibrations.calibration_prompts(model_dir),
                                             self.base_config, plans=True, compute_budget=spend, arguments=arguments)
        calibration.info["source"] = "calibrated at setup" + ("" if budget is None else f" within {spend:g} stock images")
        self.made_calibrations.append(calibration)
        store.add(scheduler, calibration, setup=True, key=name)
        cost = "thorough" if budget is None else f"{calibration.info['spent']:g} of {spend:g} stock images"
        print(f"calibrated {scheduler}-{steps} at {size}x{size} at setup ({cost}) in {time.perf_counter() - started:.1f}s: "
              f"plan auto={calibration.error_model.info['validation']['plan']}", flush=True)
        return "the calibration made at setup"

    def _warm_up(self) -> None:
        """One untimed run of the defaults: the planner measures this device's cost model for one image at
        the native size (once per process) and chooses the default plan, so the first request does not."""
        acceleration = Acceleration()
        request = self.planner.plan(image=None, mask=None, prompt_strength=1.0, width=None, height=None, num_outputs=1,
                                    num_inference_steps=None, acceleration=acceleration, guidance_scale=None)
        request.pipe.scheduler = self.schedulers[request.scheduler]
        with accelerated(request.pipe, request.acceleration, self._calibrations_for(request, request.scheduler)):
            request.pipe("", **request.arguments, num_inference_steps=request.steps, output_type="latent",
                         generator=torch.Generator("cpu").manual_seed(0))

    @property
    def calibrations(self) -> list:
        """The calibrations this server made at setup (the shipped and cached ones are in ``self.store``)."""
        if self.store is None:
            return [c for c in self.made_calibrations if c.info.get("source", "").startswith("calibrated at setup")]
        return [c for c in self.store.setup]

    def _calibrate_at_setup(self, scheduler: str, steps: int, size: int) -> None:
        """key_steps="auto" needs a calibration; the settings without one of their own are derived from
        the nearest (service.calibrations). The model directory may ship it (script/calibrate) or the cache hold it from an earlier
        start; otherwise it is made here, once, with fixed prompts and seeds (one stock run) and checked
        on outputs (a few more runs), so the same request always gets the same schedule and images."""
        timesteps = make_scheduler(scheduler, self.base_config)
        timesteps.set_timesteps(steps)
        latent = (size // self.pipe.vae_scale_factor,) * 2
        key = self.store.key(scheduler, timesteps.timesteps, latent)
        if self.store.exact(type(timesteps).__name__, timesteps.timesteps, latent, key) is not None:
            return
        started = time.perf_counter()
        prompts = self.calibration_prompts
        budget = self.setup_budget
        spend = None if budget is None else budget - calibrations.WARM_UP_IMAGES
        calibration = calibrations.calibrate(self.pipe, scheduler, steps, size, size, prompts, self.base_config, plans=True,
                                             compute_budget=spend)
        if budget is None:  # (within a budget, key_steps="auto" keeps the feature tolerance's schedule unchecked)
            calibrations.validate(self.pipe, calibration, scheduler, size, size, prompts, self.base_config)
        calibration.info["source"] = "calibrated at setup" + ("" if budget is None else f" within {spend:g} stock images")
        self.store.add(scheduler, calibration, setup=True)
        plan = calibration.error_model.info["validation"]["plan"]
        cost = "thorough" if budget is None else f"{calibration.info['spent']:g} of {spend:g} stock images"
        print(
            f"calibrated {scheduler}-{steps} at {size}x{size} at setup ({cost}, {len(calibration.info['prompts'])} prompts) "
            f"in {time.perf_counter() - started:.1f}s: plan auto={plan}, key_steps auto={calibration.schedule()}",
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
            description="Image width in pixels, a multiple of 8 (Flux: of 16). Leave unset for the model's native size "
            "(512 for Stable Diffusion v1.5, 64 for the bundled tiny-shapes models).",
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
        num_inference_steps: Optional[int] = Input(
            description=f"Number of denoising steps. Unset: the weights' default ({DEFAULT_STEPS} for Stable Diffusion, "
            "the pipeline's own for Flux and SD3: 28).",
            default=None, ge=1, le=150,
        ),
        guidance_scale: Optional[float] = Input(
            description=f"Guidance scale (1 or less turns guidance off). Classifier-free guidance for Stable Diffusion "
            f"and SD3; for Flux, true classifier-free guidance against negative_prompt (true_cfg_scale) where the "
            f"transformer has no guidance embedding, else its distilled guidance. Unset: the weights' default "
            f"({SD_GUIDANCE:g} for Stable Diffusion, 7 for SD3, 4 for Flux with true guidance, 3.5 distilled).",
            default=None, ge=0, le=20,
        ),
        scheduler: Optional[str] = Input(
            description=f"Sampler. Stable Diffusion weights take {', '.join(SCHEDULERS)} (DPMSolverMultistep is "
            f"DPM-Solver++, multistep); flow-matching weights (Flux, SD3) take {', '.join(FLOW_SCHEDULERS)} (UniPC "
            f"and DPM-Solver++ configured for flow). Unset: the weights' default ({DEFAULT_SCHEDULER} for Stable "
            f"Diffusion, {FLOW_SCHEDULERS[0]} for flow-matching weights).",
            default=None,
            choices=[*SCHEDULERS, *FLOW_SCHEDULERS],
        ),
        acceleration: str = Input(
            description="faster-diffusion: reuse UNet (or transformer) features between steps, as `plan` (or "
            "`key_steps`) says. none: the stock pipeline.",
            default="faster-diffusion",
            choices=ACCELERATIONS,
        ),
        plan: str = Input(
            description="What each step recomputes (faster-diffusion only): 'auto' (the fastest plan this model's "
            "calibration predicts keeps the images, on this device at this batch size) or 'auto:T' (the most "
            "faithful plan predicted at least T times faster than stock, T > 1). Each step runs the whole UNet, "
            "the decoder on reused encoder features, a shallow path, DeepCache's shallowest one, or that one on the "
            "prompt's half of the guidance batch alone (the guidance difference reused); the last two also with the "
            "reused features extrapolated from the latest two full steps. Ignored when key_steps is set. Flux and SD3 "
            "weights: 'auto' and 'auto:T' plan from the calibrations the weights ship (their first run calibrates key "
            "steps where they ship none); explicit levels F, E, D, X, C, Y.",
            default="auto",
        ),
        key_steps: str = Input(
            description="Encoder propagation instead of a plan (the paper's method, arXiv 2312.09608): the steps "
            "that run the UNet encoder: 'auto' (calibrated on this model), 'auto:B' (calibrated, B encoder "
            "passes), 'paper' (the paper's schedule, tuned for SD1.5), 'all', 'uniform:K' (every K-th step), or "
            "comma-separated step indices starting at 0, e.g. '0,1,2,3,5,10,15,25,35'. Empty: use `plan`.",
            default="",
        ),
        parallel: bool = Input(
            description="faster-diffusion only: run the decoders of steps that reuse encoder features as one batch.",
            default=True,
        ),
        noise_injection: Optional[float] = Input(
            description="faster-diffusion only: prior noise injection strength (adds this multiple of the initial "
            "noise to the latent at late steps, t < 500; 0 turns it off). Unset: 0.003 with key_steps (the "
            "paper's), 0 with a plan.",
            default=None,
            ge=0,
            le=0.1,
        ),
        lora_weights: str = Input(
            description="A LoRA to apply to this prediction only: an http(s) URL of a .safetensors file in diffusers or "
            "kohya format, downloaded once and cached (public hosts only, up to the server's size and time limits). "
            "Local paths only where the server's operator opens a directory. Empty: no LoRA.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of `lora_weights` (0 turns it off, 1 as trained).", default=1.0, ge=0, le=2
        ),
        seed: Optional[int] = Input(
            description="Random seed. Leave unset for a random one (logged).", default=None, ge=0, le=2**32 - 1
        ),
        output_format: str = Input(description="Image file format.", default="png", choices=OUTPUT_FORMATS),
        disable_safety_checker: bool = Input(
            description="Turn off the weights' safety checker (where they ship one, e.g. Stable Diffusion v1.5: it "
            "runs by default, flagged images are not returned, and a prediction whose every image is flagged fails).",
            default=False,
        ),
    ) -> list[Path]:
        """Generates num_outputs images for the prompt."""
        acceleration = Acceleration(acceleration, plan, key_steps, parallel, noise_injection)
        request = self.planner.plan(
            image=image, mask=mask, prompt_strength=prompt_strength, width=width, height=height,
            num_outputs=num_outputs, num_inference_steps=num_inference_steps, acceleration=acceleration,
            guidance_scale=guidance_scale, scheduler=scheduler, negative_prompt=negative_prompt, lora=bool(lora_weights),
        )  # unset inputs take the weights' defaults; what these weights cannot use fails here, naming the field
        scheduler, num_inference_steps, guidance_scale = request.scheduler, request.steps, request.guidance_scale
        lora_file = resolve_lora(lora_weights) if lora_weights else None  # fails here, naming lora_weights
        if seed is None:
            seed = secrets.randbelow(2**32)
        pipe = request.pipe
        pipe.scheduler = self.schedulers[scheduler]
        found = self._calibrations_for(request, scheduler)
        guidance = "" if self.planner.transformer is None else f" ({self.planner.defaults.guidance}) max_sequence_length=" \
            f"{self.planner.defaults.max_sequence_length}"
        print(f"seed={seed} scheduler={scheduler} {request.describe()} guidance_scale={guidance_scale}{guidance}", flush=True)
        for note in request.notes:
            print(f"acceleration: {note}", flush=True)
        if lora_file is not None:
            print(f"lora_weights={lora_weights!r} lora_scale={lora_scale} (file {lora_file})", flush=True)

        # A LoRA applies to this prediction only: the shared UNet and text encoder get the base weights back.
        with applied_lora(self.pipe, lora_file, lora_weights, lora_scale), \
                accelerated(pipe, request.acceleration, found) as accel, counted(self.denoiser, accel) as counter, \
                safety.checker_disabled(pipe, disable_safety_checker):  # fmt: skip
            started = time.perf_counter()
            result = pipe(
                prompt,
                **request.arguments,  # with the negative prompt and the guidance, as the weights take them
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_outputs,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
            elapsed = time.perf_counter() - started
        print(passes_line(accel, counter, request.notes), flush=True)
        if accel is not None and self.store is not None:
            self._keep_made_calibrations(accel, scheduler, made_with_lora=lora_file is not None)
            self.cost_models.save_new()
        elif accel is not None:  # transformers: a first run's key-step calibration serves the next runs
            self.made_calibrations = [*self.made_calibrations, *accel.calibrations][-MAX_MADE_CALIBRATIONS:]
            accel.calibrations.clear()
            self.cost_models.save_new()
        print(f"wall_time={elapsed:.2f}s ({num_inference_steps / elapsed:.1f} steps/s)", flush=True)
        release_freed_memory()  # a new size's freed buffers back to the system: memory does not creep
        flags = getattr(result, "nsfw_content_detected", None)
        images = safety.kept_images(result.images, flags)
        if len(images) < len(result.images):
            print(f"safety checker: {len(result.images) - len(images)} of {len(result.images)} images flagged, not returned", flush=True)
        return self._save(images, output_format)

    def _calibrations_for(self, request, scheduler: str) -> list:
        """The calibration of this run for plan="auto" or key_steps="auto": exact, else derived from the nearest
        one (no stock run); for a plan, one with an error model where any has one. Empty when nothing of the
        sampler is calibrated: the library's first run calibrates."""
        if self.store is None:  # transformer weights: the library reads the shipped ones itself
            return list(self.made_calibrations) if request.acceleration.needs_calibration else []
        if not request.acceleration.needs_calibration:
            return []
        timesteps = make_scheduler(scheduler, self.base_config)
        timesteps.set_timesteps(request.steps)  # img2img runs its tail: the accelerator takes the slice
        latent = (request.height // self.pipe.vae_scale_factor, request.width // self.pipe.vae_scale_factor)
        calibration, how = self.store.for_run(scheduler, timesteps, latent, plans=not request.acceleration.key_steps)
        if calibration is not None and how != "exact":
            print(f"calibration: {calibration.info['source']}, {how}", flush=True)
        return [] if calibration is None else [calibration]

    def _keep_made_calibrations(self, accel, scheduler: str, made_with_lora: bool) -> None:
        """A calibration the library made in this run (a ControlNet's first run) serves the next ones,
        unless made with a LoRA; the accelerator's own list is emptied either way (memory stays bounded)."""
        if not made_with_lora:
            for calibration in accel.calibrations:
                calibration.info["source"] = "calibrated by a stock first run"
                self.store.add(scheduler, calibration)
        accel.calibrations.clear()

    def _save(self, images, output_format: str) -> list[Path]:
        for old in os.listdir(self.out_dir):  # the previous prediction's files, already sent
            os.remove(os.path.join(self.out_dir, old))
        paths = []
        for i, image in enumerate(images):
            path = os.path.join(self.out_dir, f"out-{i}.{output_format}")
            image.save(path, PIL_FORMAT[output_format], **SAVE_OPTIONS[output_format])
            paths.append(Path(path))
        return paths
