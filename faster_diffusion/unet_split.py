"""The UNet split: encoder modules whose outputs are cached at key steps and reused.

The encoder of a ``UNet2DConditionModel`` is ``conv_in`` (its output is the first
skip connection), every down block and the mid block; the decoder is everything
after. The video UNets (``UNet3DConditionModel``, ``UNetMotionModel``) have the
same layout, plus the 3D UNet's ``transformer_in`` after ``conv_in``; they take
``(batch, channels, frames, height, width)`` samples and fold the frames into the
batch, so inside them one step has ``batch x frames`` rows (``frames_per_row``).

Rather than rewriting the UNet's forward, each module that some level of reuse
replays gets a diffusers ``ModelHook`` (``ReplayHook``): when it runs it keeps its
output, at a step whose level reuses it it returns what it kept (``LEVELS`` below). The stock forward then runs the decoder (time
embedding, up blocks, output head) on the cached features and the *current*
timestep, and adds ControlNet residuals exactly as it always does.

When several steps' decoders run as one batch (the "parallel" strategy), the
UNet is called on ``group_size`` copies of the key step's inputs stacked along
the batch; the encoder then computes only the first copy and every module hands
the decoder ``group_size`` stacked copies of its output.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
from diffusers.hooks import ModelHook

from .family import (  # noqa: F401  (the level names and helpers, importable from here as before)
    CONDITIONAL_ONLY,
    DECODER_REPLAYING,
    DEEP,
    DEEP_CFG,
    DEEP_CFG_FORECAST,
    DEEP_FORECAST,
    ENCODER,
    FORECASTING,
    FULL,
    LEVEL_LETTERS,
    LEVELS,
    OUTPUT,
    SHALLOW,
    DenoiserFamily,
    Guidance,
    StepMode,
    add_hook,
    as_float,
    bind_call,
    first_rows,
    forecast_coefficient,
    last_rows,
    map_tensors,
    remove_hook,
    repeat_batch,
)

ENCODER_HOOK = "faster_diffusion_encoder"
# UNets with the conv_in -> down blocks -> mid block -> up blocks layout (skip connections from
# every encoder module to the decoder) that the hooks rely on.
SUPPORTED_UNETS = (UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel)
# These fold the frames of a (batch, channels, frames, height, width) sample into the batch.
VIDEO_UNETS = (UNet3DConditionModel, UNetMotionModel)


#: (the transformers' output level, a step that calls no model, is not measured on UNets yet)
UNET_LEVELS = tuple(level for level in LEVELS if level != OUTPUT)

bind_unet_call = bind_call  # a UNet call's arguments by name, defaults filled in


def frames_per_row(unet, sample: torch.Tensor) -> int:
    """How many rows inside ``unet`` one row of its ``sample`` becomes: the frames for a video UNet, else 1."""
    return sample.shape[2] if isinstance(unet, VIDEO_UNETS) else 1


#: The levels of reuse a sampling step can run at, from most to least computed:
#: ``full``: the whole UNet; every hooked module refreshes its cache.
#: ``encoder``: encoder propagation (the paper's non-key step): the encoder modules replay the latest full
#:     step's output, the decoder runs on them and the current time embedding; batchable across steps.
#: ``shallow``: ``conv_in``, the first down block and the last up block run on the current latent; the deeper
#:     blocks replay the latest output of a step that ran them.
#: ``deep``: DeepCache's branch 0: only ``conv_in``, the last layer of the last up block and the output head
#:     run; every other module replays its latest output (the fresh latent reaches the output through
#:     ``conv_in``'s skip connection).
#: ``deep_cfg``: ``deep`` on the conditional rows only (FasterCache's CFG cache): the unconditional output is
#:     the conditional one less the guidance difference (conditional - unconditional output) of the latest
#:     step that ran both. Half a deep step's work; nearly free in fidelity, because at a deep step the two
#:     rows differ mostly through the replayed features, which carry the full step's difference.
#: ``deep_forecast``, ``deep_cfg_forecast``: ``deep`` and ``deep_cfg`` with the replayed deep features (and the
#:     guidance difference) extrapolated from the latest two full steps, as TaylorSeer forecasts features:
#:     ``f1 + c * (f1 - f0)``, with ``c`` the step's distance past the latest full step over the two full steps'
#:     distance, times a weight fitted per distance by the calibration (``plan.ErrorModel.forecast_weight``).
#:     The same work as the level they forecast; without two full steps' features (the run's first segment, or
#:     after shallow or encoder-propagated steps, which recompute the layer they extrapolate) they replay like it.
#: (the names are in ``family.py``, shared with the transformer family)


class ReplayHook(ModelHook):
    """Runs a module and keeps its output, or replays the kept output at the levels that reuse it.

    An encoder module (``shared``) sees the same input in every step of a decoder group: it runs on the
    first step's rows and hands every step a copy. A decoder module runs on the whole group and keeps
    the latest step's rows, for the shallow or deep steps that follow."""

    _is_stateful = True

    def __init__(self, mode: StepMode, replayed_at: frozenset, shared: bool, forecasts: bool = False):
        super().__init__()
        self.mode, self.replayed_at, self.shared = mode, replayed_at, shared
        # the one module whose replayed output a forecasting step reads (the rest of what it replays goes unread)
        self.forecasts = forecasts
        self.cache = None
        self.history = []  # (step, output) at the latest two full steps, when the run forecasts

    def new_forward(self, module, *args, **kwargs):
        mode = self.mode
        if not mode.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if mode.level in self.replayed_at and self.cache is None:
            raise RuntimeError(f"faster_diffusion: a {mode.level} step ran before any step computed the features it reuses")
        if mode.level in CONDITIONAL_ONLY:  # the conditional half of the rows kept; keeps nothing of its own
            if mode.level in self.replayed_at:
                return last_rows(self._replayed(), mode.rows, 2 * mode.rows)
            return self.fn_ref.original_forward(*args, **kwargs)
        total = mode.rows * mode.group_size
        if mode.level in self.replayed_at:
            return repeat_batch(self.cache, mode.rows, mode.group_size) if self.shared else self._replayed()
        if self.shared:
            args, kwargs = first_rows((args, kwargs), mode.rows, total)
            self.cache = self.fn_ref.original_forward(*args, **kwargs)
            return repeat_batch(self.cache, mode.rows, mode.group_size)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if mode.keep_decoder:
            self.cache = last_rows(output, mode.rows, total)
        if self.forecasts and mode.keep_history:
            # a full step alone is a point to extrapolate from; a decoder group (or an encoder step) keeps other steps' rows
            alone = mode.level == FULL and mode.group_size == 1
            self.history = [*self.history[-1:], (mode.step, self.cache)] if alone else []
        return output

    def forecast_coefficient(self) -> float | None:
        """c in f1 + c * (f1 - f0) at the current step (at a forecasting level); None without two full steps."""
        return forecast_coefficient(self.history, self.mode.step, self.mode.forecast_weights.get(self.mode.level))

    def snapshot(self):
        """What the latest full step kept, for ``set_history`` (a calibration that places forecasts by hand)."""
        return self.cache

    def set_history(self, history) -> None:
        """The full steps a forecast extrapolates from: [(step, snapshot), (step, snapshot)], or []."""
        self.history = list(history)

    def _replayed(self):
        """The kept output, or at a forecasting level its extrapolation from the latest two full steps."""
        if not (self.forecasts and self.mode.level in FORECASTING and self.history):
            return self.cache
        c = self.forecast_coefficient()
        if c is None:
            return self.history[-1][1]
        return map_tensors(lambda f1, f0: f1 + c * (f1 - f0), self.history[1][1], self.history[0][1])

    def reset_state(self, module):
        self.cache, self.history = None, []
        return module


def replayed_modules(unet) -> dict[torch.nn.Module, tuple[frozenset, bool]]:
    """Every module some level replays: module -> (the levels that replay it, whether it is an encoder
    module), in call order. Shallow and deep steps need the 2D UNet's layout (video UNets: encoder only)."""
    encoder = encoder_modules(unet)
    found = {module: ({ENCODER}, True) for module in encoder}
    if isinstance(unet, VIDEO_UNETS):
        return {m: (frozenset(levels), shared) for m, (levels, shared) in found.items()}
    deep = (DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST)
    for module in encoder:
        if module is not unet.conv_in:
            found[module][0].update(deep)
    for module in encoder[2:]:  # past conv_in and the first down block
        found[module][0].add(SHALLOW)
    for block in unet.up_blocks[:-1]:
        found[block] = ({SHALLOW, *deep}, False)
    for layer in _deep_layers(unet):
        found[layer] = (set(deep), False)
    return {m: (frozenset(levels), shared) for m, (levels, shared) in found.items()}


def _deep_layers(unet) -> list[torch.nn.Module]:
    """The last up block's layers but its last resnet (and attention), in call order: a deep step replays them."""
    last = unet.up_blocks[-1]
    resnets, attentions = list(last.resnets)[:-1], list(getattr(last, "attentions", None) or [])[:-1]
    if not attentions:
        return resnets
    return [layer for pair in zip(resnets, attentions) for layer in pair]


def forecast_module(unet) -> torch.nn.Module | None:
    """The module whose replayed output a deep step's fresh layers read: the last of the deep layers (the last
    resnet reads it and conv_in's skip connection). None for a UNet without deep levels."""
    layers = [] if isinstance(unet, VIDEO_UNETS) else _deep_layers(unet)
    return layers[-1] if layers else None


def add_replay_hooks(unet, mode: StepMode, name: str) -> list[tuple[torch.nn.Module, ReplayHook]]:
    """A ``ReplayHook`` named ``name`` on every module some level replays; returns (module, hook) pairs."""
    hooks = []
    forecast = forecast_module(unet)
    for module, (replayed_at, shared) in replayed_modules(unet).items():
        hook = ReplayHook(mode, replayed_at, shared, forecasts=module is forecast)
        add_hook(module, hook, name)
        hooks.append((module, hook))
    return hooks


def supported_levels(unet, guided: bool = True) -> tuple[str, ...]:
    """The levels ``unet`` can run; the conditional-only ones need a guided batch of [unconditional, conditional] rows."""
    if isinstance(unet, VIDEO_UNETS):
        return (FULL, ENCODER)
    return UNET_LEVELS if guided else tuple(lv for lv in UNET_LEVELS if lv not in CONDITIONAL_ONLY)


def guides_on_two_halves(pipe) -> bool:
    """Whether ``pipe``'s UNet batch in its current call is [unconditional, conditional] rows: classifier-free
    guidance (``do_classifier_free_guidance``, set by SD-family pipelines in a call), not InstructPix2Pix's three
    kinds of rows nor perturbed-attention guidance's extra ones. False outside a pipeline."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline

    if pipe is None or isinstance(pipe, (StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline)):
        return False
    if getattr(pipe, "do_perturbed_attention_guidance", False):
        return False
    return bool(getattr(pipe, "do_classifier_free_guidance", False))


def conditional_rows(call: dict, rows: int) -> dict:
    """A guided UNet call's arguments for its conditional rows only (the second half of every batch of ``rows``)."""
    return last_rows(call, rows // 2, rows)


def with_reused_guidance(conditional: torch.Tensor, guidance_difference: torch.Tensor) -> torch.Tensor:
    """The [unconditional, conditional] output of a conditional-only step: the unconditional rows estimated as
    the conditional ones less the guidance difference of the latest step that ran both."""
    return torch.cat([conditional - guidance_difference, conditional])


def guidance_difference(output: torch.Tensor) -> torch.Tensor:
    """Conditional less unconditional rows of a guided UNet output."""
    unconditional, conditional = output.chunk(2)
    return conditional - unconditional


def encoder_modules(unet) -> list[torch.nn.Module]:
    """conv_in, the 3D UNet's transformer_in, the down blocks and the mid block, in call order.

    transformer_in is hooked too: its output, not conv_in's, is the 3D UNet's first skip connection."""
    modules = [unet.conv_in]
    if getattr(unet, "transformer_in", None) is not None:
        modules.append(unet.transformer_in)
    modules.extend(unet.down_blocks)
    if unet.mid_block is not None:
        modules.append(unet.mid_block)
    return modules


class UNetFamily(DenoiserFamily):
    """The UNets: an encoder (conv_in, down blocks, mid block) and a decoder, replayed module by module."""

    models = SUPPORTED_UNETS
    latent_name = "sample"
    cheap_levels_need = "a UNet2DConditionModel"

    def rows_inside(self, model, latent):
        return frames_per_row(model, latent)

    def hooked_modules(self, model):
        return list(replayed_modules(model))

    def add_hooks(self, model, mode, name):
        return add_replay_hooks(model, mode, name)

    def supported_levels(self, model, guided=True):
        return supported_levels(model, guided)

    def guidance(self, pipe, loop_locals):
        return Guidance("halves", scale=float(pipe.guidance_scale)) if guides_on_two_halves(pipe) else None

    def feature_modules(self, model):
        return encoder_modules(model)

    def resized(self, model, call, k):
        sample = call["sample"]
        residuals = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")
        if sample.ndim != 4 or any(call.get(name) is not None for name in residuals):
            return None  # a ControlNet's residuals (or a video's frames) have the sample's size too
        step = k * 2 ** (len(model.config.block_out_channels) - 1)  # the UNet's downsampling
        return {**call, "sample": sample.new_zeros(*sample.shape[:2], sample.shape[2] + step, sample.shape[3] + step)}
