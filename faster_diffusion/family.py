"""What the accelerator asks of a denoiser family (UNets, transformers), and the helpers both families share.

The accelerator (``accelerator.py``) drives one denoising run: which level each step runs at, which calls
are answered from a batched group, and where the guidance difference comes from. Everything that depends
on the denoiser's layout sits behind ``DenoiserFamily``: finding the denoiser in a pipeline, reading a
call (its latent, its timestep in the scheduler's units, the image's latent size), the hooks that keep
and replay features, the levels the model supports and how the pipeline batches classifier-free guidance.
``unet_split.UNetFamily`` and ``transformer_split.TransformerFamily`` implement it; ``family_of`` picks one.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

#: The levels of reuse a sampling step can run at, from most to least computed. What each one replays is the
#: family's (``unet_split.LEVELS``' comments for the UNet, ``transformer_split`` for transformers).
FULL, ENCODER, SHALLOW, DEEP, DEEP_CFG = "full", "encoder", "shallow", "deep", "deep_cfg"
DEEP_FORECAST, DEEP_CFG_FORECAST = "deep_forecast", "deep_cfg_forecast"
#: the model is not called: the step takes its segment's full step's output (every guidance branch) again; for an
#: Euler sampler two steps become one longer step (TeaCache's and MagCache's skipped step, with nothing computed)
OUTPUT = "output"
LEVELS = (FULL, ENCODER, SHALLOW, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST, OUTPUT)
LEVEL_LETTERS = {"F": FULL, "E": ENCODER, "S": SHALLOW, "D": DEEP, "X": DEEP_FORECAST, "C": DEEP_CFG, "Y": DEEP_CFG_FORECAST,
                 "O": OUTPUT}
#: Levels whose step reads the current latent only through the shallow path: they replay decoder modules.
DECODER_REPLAYING = (SHALLOW, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST)
#: Levels that run the conditional rows (or the conditional call) of a guided step only.
CONDITIONAL_ONLY = (DEEP_CFG, DEEP_CFG_FORECAST)
#: Levels that extrapolate from the latest two full steps, and the level whose work each does.
FORECASTING = {DEEP_FORECAST: DEEP, DEEP_CFG_FORECAST: DEEP_CFG}
#: The ``cache_context`` of a step's second call where a pipeline calls the model once per guidance branch (Flux).
SECOND_BRANCH = "uncond"


@dataclass
class StepMode:
    """What the replay hooks do on the current model call; owned by the accelerator."""

    active: bool = False  # outside a denoising run the hooks pass through
    level: str = FULL  # the level of the step(s) of this call
    rows: int = 1  # rows of one step inside the model (2x the images with guidance; x frames for video); half at a conditional-only level
    group_size: int = 1  # steps whose decoders run in this call
    keep_decoder: bool = False  # whether decoder modules keep their outputs (the run has shallow or deep steps)
    keep_history: bool = False  # whether the forecast module keeps its outputs of the latest two full steps
    step: int = 0  # the index of the (first) step of this call
    # forecasting level -> weight[m - 1, k] of step k + 1 past a full step m steps after the one before (default 1)
    forecast_weights: dict = field(default_factory=dict)
    branch: str = ""  # the call's guidance branch where a pipeline calls once per branch ("cond", "uncond")
    guidance: "Guidance | None" = None  # how this run guides, for the conditional-only levels


@dataclass(frozen=True)
class Guidance:
    """How a pipeline batches classifier-free guidance, and at which scale it combines the two predictions.

    ``layout="halves"``: one call a step on [unconditional, conditional] rows (``cond_first``: [conditional,
    unconditional], DiT's order). ``layout="calls"``: a call per branch, each inside the model's
    ``cache_context(name)``; the call in ``second`` (Flux's "uncond") belongs to the step of the call before.
    A step's outputs, for the methods that take them, are ``{branch: output}`` (the halves layout: ``{"": output}``)."""

    layout: str = "halves"
    cond_first: bool = False
    second: str = SECOND_BRANCH
    scale: float = 1.0  # the guidance scale (Flux's true_cfg_scale)
    renormalised: bool = False  # the guided prediction rescaled to the conditional one's norm (Qwen-Image)

    def cond_half(self, obj, rows: int):
        """The conditional rows of every tensor whose batch is ``rows`` (the halves layout)."""
        return (first_rows if self.cond_first else last_rows)(obj, rows // 2, rows)

    def difference(self, output: torch.Tensor) -> torch.Tensor:
        """Conditional less unconditional rows of a guided output (the halves layout)."""
        first, second = output.chunk(2)
        return first - second if self.cond_first else second - first

    def with_unconditional(self, conditional: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
        """A whole guided output from its conditional rows: the unconditional ones estimated as the conditional
        ones less ``difference``, the guidance difference of the latest step that ran both (the halves layout)."""
        parts = [conditional, conditional - difference]
        return torch.cat(parts if self.cond_first else parts[::-1])

    def calls(self, level: str) -> int:
        """Model calls a step at ``level`` makes: two with a call per branch, but one at a conditional-only level."""
        return 2 if self.layout == "calls" and level not in CONDITIONAL_ONLY else 1

    def _pair(self, outputs: dict):
        if self.layout == "calls":
            first = next(branch for branch in outputs if branch != self.second)
            return outputs[first], outputs[self.second]
        first, second = outputs[""].chunk(2)
        return (first, second) if self.cond_first else (second, first)

    def combine(self, outputs: dict) -> torch.Tensor:
        """The guided prediction of a step from its outputs (in float32): uncond + scale (cond - uncond)."""
        cond, uncond = (x.float() for x in self._pair(outputs))
        guided = uncond + self.scale * (cond - uncond)
        if self.renormalised:  # QwenImagePipeline's: each token's prediction keeps the conditional one's norm
            guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return guided

    def difference_of(self, outputs: dict) -> torch.Tensor:
        """Conditional less unconditional output of a step that ran both."""
        cond, uncond = self._pair(outputs)
        return cond - uncond

    def with_reused(self, outputs: dict, difference: torch.Tensor) -> dict:
        """A conditional-only step's outputs made whole with the guidance difference ``difference``."""
        if self.layout == "calls":
            (branch, cond), = outputs.items()
            return {branch: cond, self.second: cond - difference}
        return {"": self.with_unconditional(outputs[""], difference)}


class _Branch(BaseState):
    def reset(self):
        pass


class BranchAwareHook(ModelHook):
    """A hook that knows the guidance branch of the call it sees: stateful, with a ``StateManager``, so that a
    pipeline's ``cache_context(name)`` reaches it (diffusers hands the context only to such hooks)."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.context = StateManager(_Branch)

    def branch(self) -> str:
        """The name of the ``cache_context`` the call is in ("cond", "uncond"), or "" outside one."""
        context = self.context._context
        return "" if context is None else context.name

    def reset_state(self, module):
        return module


class DenoiserFamily:
    """A family of denoisers: what the accelerator asks of a model it drives (see the module docstring)."""

    models: tuple[type, ...] = ()  # the model classes of the family
    latent_name = "sample"  # the forward's argument holding the noisy latent
    cheap_levels_need = ""  # what a model needs for the levels below encoder propagation (for errors)

    def find(self, pipe_or_model):
        """The family's denoiser: ``pipe_or_model`` itself, or the pipeline's component; None if neither is."""
        if isinstance(pipe_or_model, self.models):
            return pipe_or_model
        for name in ("unet", "transformer"):
            model = getattr(pipe_or_model, name, None)
            if isinstance(model, self.models):
                return model
        return None

    def bind_call(self, model, args, kwargs) -> dict:
        return bind_call(model, args, kwargs)

    def latent(self, call: dict) -> torch.Tensor:
        return call[self.latent_name]

    def timestep_scale(self, model) -> float:
        """Scheduler timesteps per unit of the model's ``timestep`` argument (FluxPipeline passes t / 1000)."""
        return 1.0

    def latent_size(self, call: dict) -> tuple[int, ...]:
        """The image's latent size, (height, width) or (frames, height, width): what a calibration is made for."""
        return tuple(self.latent(call).shape[2:])

    def runs_stock(self, call: dict) -> bool:
        """Whether a call is outside the steps' plan and runs as it is (SD3's skip-layer guidance call)."""
        return False

    def rows_inside(self, model, latent: torch.Tensor) -> int:
        """How many rows inside ``model`` one row of its latent becomes (a video UNet's frames), else 1."""
        return 1

    def hooked_modules(self, model) -> list[torch.nn.Module]:
        """Every module the family's hooks sit on, in call order (hooked again when this changes: a LoRA)."""
        raise NotImplementedError

    def add_hooks(self, model, mode: StepMode, name: str) -> list[tuple[torch.nn.Module, ModelHook]]:
        """Hooks named ``name`` that keep and replay features as ``mode`` says; returns (module, hook) pairs."""
        raise NotImplementedError

    def supported_levels(self, model, guided: bool = True) -> tuple[str, ...]:
        raise NotImplementedError

    def guidance(self, pipe, loop_locals: dict) -> Guidance | None:
        """How ``pipe`` guides in its current call (``loop_locals``: the locals of the call that opened the loop),
        or None without guidance."""
        raise NotImplementedError

    def feature_modules(self, model) -> list[torch.nn.Module]:
        """The modules whose outputs the feature recorder samples: what encoder propagation replays."""
        raise NotImplementedError

    def prediction(self, model, output: torch.Tensor) -> torch.Tensor:
        """The part of a model output the sampler reads (without a learned variance's channels)."""
        return output

    def resized(self, model, call: dict, k: int) -> dict | None:
        """``call`` on a latent ``k`` downsampling steps wider and taller (zeros), to count FLOPs at another size;
        None where the family cannot make one."""
        return None

    def plans_unsupported(self, pipe) -> str | None:
        """Why an error model of plans cannot be fitted on ``pipe``'s sampling loop, or None if it can."""
        return None


def bind_call(model, args, kwargs) -> dict:
    """A call's arguments by name, defaults filled in (the signature of the model's own class)."""
    bound = _signature(type(model)).bind(None, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    call.pop("self")
    return call


@functools.cache
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def family_of(pipe_or_model) -> tuple[DenoiserFamily, torch.nn.Module] | None:
    """(family, denoiser) for a pipeline or a bare denoiser, or None."""
    from .transformer_split import TransformerFamily
    from .unet_split import UNetFamily

    for family in (UNetFamily(), TransformerFamily()):
        model = family.find(pipe_or_model)
        if model is not None:
            return family, model
    return None


def forecast_coefficient(history, step: int, weights) -> float | None:
    """c in f1 + c * (f1 - f0) at ``step``, from ``history`` = [(s0, f0), (s1, f1)], the latest two full steps:
    the distance past s1 over s1 - s0, times the fitted weight of that distance (``weights[m - 1, k]``; 1 without
    one). None without two full steps."""
    if len(history) < 2:
        return None
    (s0, _), (s1, _) = history
    m, k = s1 - s0, step - s1 - 1
    known = weights is not None and m <= weights.shape[0] and k < weights.shape[1]
    return (float(weights[m - 1, k]) if known else 1.0) * (k + 1) / m


def as_float(timestep) -> float:
    """A loop's timestep as a number (pipelines pass a scalar, a 0-d or a batch-expanded tensor)."""
    return float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


def map_tensors(fn, obj, *others):
    """Applies ``fn`` to every tensor in nested tuples, lists and dicts (with the tensors at the same place in
    ``others``, of the same structure, as further arguments)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, *others)
    if isinstance(obj, (tuple, list)):
        items = [map_tensors(fn, *items) for items in zip(obj, *others)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a namedtuple takes its fields
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v, *(o[k] for o in others)) for k, v in obj.items()}
    return obj


def repeat_batch(obj, rows, times: int):
    """Stacks ``times`` copies of every tensor whose batch is ``rows`` (step-major order).

    ``rows`` may be a collection of batch sizes: a video pipeline passes the UNet some tensors per
    video and some per frame (AnimateDiff's prompt embeddings); each is repeated once."""
    if times == 1:
        return obj
    sizes = {rows} if isinstance(rows, int) else set(rows)
    return map_tensors(lambda t: t.repeat(times, *[1] * (t.dim() - 1)) if t.dim() and t.shape[0] in sizes else t, obj)


def first_rows(obj, rows: int, total: int):
    """Keeps the first ``rows`` rows of every tensor whose batch is ``total``."""
    if rows == total:
        return obj
    return map_tensors(lambda t: t[:rows] if t.dim() and t.shape[0] == total else t, obj)


def last_rows(obj, rows: int, total: int):
    """Keeps the last ``rows`` rows of every tensor whose batch is ``total`` (the latest step of a group)."""
    if rows == total:
        return obj
    return map_tensors(lambda t: t[-rows:] if t.dim() and t.shape[0] == total else t, obj)


def add_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)


def hooks_changed(model: torch.nn.Module) -> None:
    """After hooks were added to or removed from ``model``'s submodules: diffusers caches which of them a
    ``cache_context`` reaches (``HookRegistry._get_child_registries``), so that list is made again."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Removes our hook; if it was the last one, also the registry, so the module is stock again."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        # The registry leaves the bound method behind as an instance attribute; drop it only if
        # it is the class's own forward (another wrapper, e.g. accelerate's offload hook, stays).
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
            del module.forward
