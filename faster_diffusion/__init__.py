"""faster-diffusion: training-free diffusion acceleration by reusing a UNet's or a transformer's features across steps.

    import faster_diffusion
    accel = faster_diffusion.enable(pipe, plan="auto")   # or key_steps="paper": the paper's encoder propagation
    image = pipe("a photo of a cat", num_inference_steps=50).images[0]   # the ordinary call
    accel.stats                     # the plan, passes, predicted and measured speed-up of the last call
    faster_diffusion.disable(pipe)  # the stock pipeline again
    faster_diffusion.compile_blocks(pipe)   # torch.compile below the hooks (docs/compile.md)

Important args: ``plan`` (``"auto"`` / ``"auto:T"``: the level of reuse of every step, chosen
from the model's calibration and this device's costs; see ``faster_diffusion.plan``), or
``key_steps`` (encoder propagation: which steps run the UNet encoder; ``"auto"`` calibrates
them on the model, see ``faster_diffusion.calibrate``) and ``parallel``
(run the decoders of a key step's group as one batch). Args to tinker with:
``max_parallel`` (steps per decoder batch, bounds memory), ``noise_injection``
and ``noise_injection_timestep`` (prior noise injection: adds
``noise_injection * z_T`` to the latent at steps with t below the threshold).
"""

from .accelerator import AcceleratorConfig, FasterDiffusion, cost_models
from .compile import compile_blocks, uncompile
from .calibration import Calibration, calibrate, refine, validate, validate_plan
from .plan import ErrorModel, CostModel, frontier, parse_plan, plan_letters
from .schedules import PAPER_SCHEDULES, check_key_steps, key_step_indices, parse_key_steps
from .family import family_of
from .transformer_split import SUPPORTED_TRANSFORMERS
from .unet_split import LEVELS, SUPPORTED_UNETS

__all__ = [
    "FasterDiffusion", "AcceleratorConfig", "cost_models", "enable", "disable", "compile_blocks", "uncompile", "calibrate", "refine", "validate", "validate_plan",
    "Calibration", "ErrorModel", "CostModel", "frontier", "parse_plan", "plan_letters", "LEVELS", "SUPPORTED_UNETS", "SUPPORTED_TRANSFORMERS",
    "key_step_indices", "check_key_steps", "parse_key_steps", "PAPER_SCHEDULES",
]


def enable(pipe, calibration=None, **options) -> FasterDiffusion:
    """Accelerates ``pipe`` (a diffusers pipeline whose ``unet`` is a UNet2DConditionModel, UNet3DConditionModel
    or UNetMotionModel, or whose ``transformer`` is a DiT, PixArt, SD3 or Flux transformer; or the model itself).
    ``options`` are ``AcceleratorConfig``'s: ``key_steps``, ``plan``, ``parallel``, ``max_parallel``,
    ``noise_injection``, ``noise_injection_timestep``, ``encoder_depth`` (transformers).

    ``key_steps="auto"`` / ``"auto:B"`` and ``plan="auto"`` / ``"auto:T"`` take the schedule from ``calibration``
    (a ``Calibration``, its JSON path, or a list of them; the first that matches the run's scheduler,
    timesteps and size), else from the model directory's ``calibration/*.json``, else the first run is
    a stock run that calibrates (``accel.calibrations`` keeps the result). Enabling an already
    accelerated pipeline replaces its settings. Returns the accelerator; use it as a context manager to
    disable on exit.
    """
    unknown = sorted(set(options) - set(AcceleratorConfig.options()))
    if unknown:
        raise TypeError(f"faster_diffusion.enable: unknown options {unknown}; accepted: {list(AcceleratorConfig.options())}")
    config = AcceleratorConfig(**options)  # a bad option fails here, before the pipeline is touched
    disable(pipe)
    return FasterDiffusion(pipe, config, calibration).enable()


def disable(pipe) -> None:
    """Removes the acceleration from ``pipe``; a no-op if it has none."""
    found = family_of(pipe)
    accel = getattr(found[1], "_faster_diffusion", None) if found is not None else None
    if accel is not None:
        accel.disable()
