"""The transformer split: spans of a transformer's block stack that some level replays.

A diffusion transformer (DiT, PixArt, SD3's MMDiT, Flux) is an input embedding, a stack of blocks that all
see the step's conditioning (the time embedding, the prompt), and an output head. Its blocks are
``transformer_blocks`` (Flux: then ``single_transformer_blocks``), called in that order, each on the
previous one's hidden states (and, in the dual-stream models, encoder hidden states). Where a block's
output holds which stream is diffusers' own data (``hooks._helpers.TransformerBlockRegistry``).

What each level replays is data (``sites``): a *site* is a span of consecutive blocks, replayed either as
the span's output (the encoder) or as its residual, output less input, added to the current input (the
stack's middle). Inside a replayed span every block hands its input on unchanged; the span's last block
returns the replay. Nothing else of the model's forward changes: the embeddings, the output head and the
blocks outside the span run on the current step's latent, timestep and prompt.

Levels (letters as in ``plan``):

- ``full`` (F): every block; sites keep what later steps replay.
- ``encoder`` (E): the paper's DiT method (FasterDiffusion, NeurIPS 2024): the first K blocks' output of the
  latest full step is replayed; the later blocks and the output head run at the current step's conditioning.
  K defaults to the paper's 18 of DiT-XL/2's 28 blocks, as a fraction of the stack (``encoder_depth``). The
  encoder does not read the current latent, so a full step's call can also run the decoders of the encoder
  steps after it, each with its own timestep (``parallel``).
- ``output`` (O): the model is not called; the step takes its segment's full step's output again (the family's
  blocks are not involved: the accelerator answers the call).
- ``deep`` (D): residual reuse (Delta-DiT, FirstBlockCache): the first block and the last run on the current
  latent, the residual of the blocks between them is the latest full step's.
- ``deep_cfg`` (C): ``deep`` on the conditional rows (or the conditional call) only; the unconditional output
  is the conditional one less the guidance difference of the latest step that ran both.
- ``deep_forecast`` (X), ``deep_cfg_forecast`` (Y): ``deep`` and ``deep_cfg`` with the residual (and the guidance
  difference) extrapolated from the latest two full steps, as TaylorSeer forecasts features: ``r1 + c (r1 - r0)``,
  ``c`` the step's distance past the latest full step over the two full steps' distance. A full step counts when
  it ran alone; an encoder step or a batched group starts the history again (so parallel equals sequential).
  Without two full steps they replay like the level they forecast.

State lives in the hooks for one run (``reset_state``), per guidance branch where the pipeline calls the model
once per branch inside ``cache_context``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry

from .family import (
    CONDITIONAL_ONLY,
    DEEP,
    DEEP_CFG,
    DEEP_CFG_FORECAST,
    DEEP_FORECAST,
    ENCODER,
    FORECASTING,
    FULL,
    OUTPUT,
    DenoiserFamily,
    Guidance,
    StepMode,
    add_hook,
    first_rows,
    forecast_coefficient,
    map_tensors,
    repeat_batch,
)

SUPPORTED_TRANSFORMERS = (DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel,
                          QwenImageTransformer2DModel, WanTransformer3DModel)
#: Models whose guided batch is [conditional, unconditional] rows (DiTPipeline: class labels, then the null class).
CONDITIONAL_FIRST = (DiTTransformer2DModel,)
#: Models that take the timestep in thousandths of the scheduler's (FluxPipeline and QwenImagePipeline pass t / 1000).
TIMESTEP_IN_THOUSANDTHS = (FluxTransformer2DModel, QwenImageTransformer2DModel)
#: Models whose pipelines guide by a call per branch at ``guidance_scale`` (WanPipeline); Flux and Qwen-Image say so
#: in their loop's ``do_true_cfg``.
GUIDED_BY_CALLS = (WanTransformer3DModel,)
#: Models whose pipelines rescale the guided prediction to the conditional one's norm (QwenImagePipeline).
RENORMALISED_GUIDANCE = (QwenImageTransformer2DModel,)
#: The paper's DiT-XL/2 split: the first 18 of its 28 blocks are the encoder.
PAPER_ENCODER_FRACTION = 18 / 28
TRANSFORMER_LEVELS = (FULL, ENCODER, OUTPUT, DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST)


@dataclass(frozen=True)
class Site:
    """A span of consecutive blocks, ``blocks[start:stop]``, that the levels in ``replayed_at`` replay."""

    start: int
    stop: int
    replayed_at: frozenset
    shared: bool  # the encoder: the same input at every step of a decoder group (runs on the key step's rows)
    residual: bool  # replays output - input added to the current input, else the output itself


def default_encoder_depth(num_blocks: int) -> int:
    """The paper's encoder as a share of the stack: 18 of 28 blocks (at least one block, and one left after)."""
    return min(max(1, round(num_blocks * PAPER_ENCODER_FRACTION)), num_blocks - 1)


def sites(num_blocks: int, encoder_depth: int | None = None) -> list[Site]:
    """What each level replays, for a stack of ``num_blocks`` blocks (see the module docstring)."""
    depth = default_encoder_depth(num_blocks) if encoder_depth is None else encoder_depth
    if not 1 <= depth < num_blocks:
        raise ValueError(f"encoder_depth={encoder_depth!r}: the encoder is 1 to {num_blocks - 1} of this model's {num_blocks} blocks")
    found = [Site(0, depth, frozenset({ENCODER}), shared=True, residual=False)]
    if num_blocks >= 3:  # a first and a last block around what is replayed
        found.append(Site(1, num_blocks - 1, frozenset({DEEP, DEEP_FORECAST, DEEP_CFG, DEEP_CFG_FORECAST}), shared=False, residual=True))
    return found


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The block stack in call order (Wan's is ``blocks``)."""
    stack = model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks
    return [*stack, *getattr(model, "single_transformer_blocks", ())]


class SpanState:
    """What one site keeps for one guidance branch: the output, or the span's input and then its residual (and
    the residuals of the latest two lone full steps, when the run forecasts)."""

    def __init__(self):
        self.output = None
        self.input = None
        self.residual = None
        self.history = []  # (step, residual)


class Span:
    """A site's state during a run, shared by the hooks of its blocks (as FirstBlockCache's head and tail hooks)."""

    def __init__(self, site: Site):
        self.site = site
        self.states: dict[str, SpanState] = {}

    def state(self, branch: str) -> SpanState:
        return self.states.setdefault(branch, SpanState())

    def reset(self) -> None:
        self.states = {}


class BlockHook(ModelHook):
    """Runs a block, keeping what its sites replay at a full step, or hands on a replay at the levels that reuse it."""

    _is_stateful = True

    def __init__(self, mode: StepMode, metadata, spans: list[tuple[Span, bool, bool]]):
        super().__init__()
        self.mode, self.metadata = mode, metadata
        self.spans = spans  # (span, whether this block opens it, whether it closes it)
        # the block that closes the residual site: the accelerator reads its history for the guidance's forecast
        self.forecasts = any(closes and span.site.residual for span, _, closes in spans)

    def new_forward(self, module, *args, **kwargs):
        mode = self.mode
        if not mode.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.forecasts and mode.keep_history and (mode.level == ENCODER or mode.group_size > 1):
            self._residual_state().history = []  # the next forecast extrapolates from full steps after this one
        for span, _, last in self.spans:
            if mode.level in span.site.replayed_at:
                streams = self._streams_in(args, kwargs)
                return self._as_output(*(self._replayed(span, streams) if last else streams))
        shared = any(span.site.shared for span, _, _ in self.spans)
        total = mode.rows * mode.group_size
        if shared:  # an encoder block: the key step's rows, copied to every step of the group
            args, kwargs = first_rows((args, kwargs), mode.rows, total)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if mode.level == FULL:
            self._keep(self._streams_in(args, kwargs), output, total)
        return repeat_batch(output, mode.rows, mode.group_size) if shared else output

    def _keep(self, inputs, output, total: int) -> None:
        """At a full step, the key step's rows of what the sites this block opens or closes replay."""
        rows = self.mode.rows
        inputs, outputs = first_rows((inputs, self._streams_out(output)), rows, total)
        for span, opens, closes in self.spans:
            state = span.state(self.mode.branch)
            if opens:
                state.input = inputs
            if closes and span.site.residual:
                state.residual = map_tensors(torch.sub, outputs, state.input)
                if self.mode.keep_history and self.mode.group_size == 1:
                    state.history = [*state.history[-1:], (self.mode.step, state.residual)]
            elif closes:
                state.output = outputs

    def _replayed(self, span: Span, streams):
        mode = self.mode
        state = span.states.get(mode.branch)
        kept = None if state is None else (state.residual if span.site.residual else state.output)
        forecast = self._forecast(state.history) if kept is not None and mode.level in FORECASTING else None
        kept = kept if forecast is None else forecast
        if kept is None:
            raise RuntimeError(f"faster_diffusion: a {mode.level} step ran before any full step computed the blocks it reuses")
        if mode.level in CONDITIONAL_ONLY and mode.guidance.layout == "halves":
            kept = mode.guidance.cond_half(kept, 2 * mode.rows)
        if not span.site.residual:
            return repeat_batch(kept, mode.rows, mode.group_size)
        return tuple(x if r is None else x + r for x, r in zip(streams, kept))

    def _forecast(self, history):
        """The residual extrapolated from the latest two full steps; None without them."""
        c = forecast_coefficient(history, self.mode.step, self.mode.forecast_weights.get(self.mode.level))
        if c is None:
            return None
        (_, r0), (_, r1) = history
        return map_tensors(lambda a, b: a + c * (a - b), r1, r0)

    @property
    def history(self) -> list:
        """The closing block's history for the current branch (what ``forecast_coefficient`` reads)."""
        return self._residual_state().history

    def forecast_coefficient(self) -> float | None:
        return forecast_coefficient(self.history, self.mode.step, self.mode.forecast_weights.get(self.mode.level))

    def snapshot(self) -> dict:
        """What the latest full step kept, per guidance branch, for ``set_history`` (a calibration that places
        forecasts by hand)."""
        span = self._residual_span()
        return {branch: state.residual for branch, state in span.states.items()}

    def set_history(self, history) -> None:
        """The full steps a forecast extrapolates from: [(step, snapshot), (step, snapshot)], or []."""
        span = self._residual_span()
        if not history:
            for state in span.states.values():
                state.history = []
            return
        (s0, f0), (s1, f1) = history
        for branch in f1:
            span.state(branch).history = [(s0, f0[branch]), (s1, f1[branch])]

    def _residual_span(self) -> Span:
        return next(span for span, _, closes in self.spans if closes and span.site.residual)

    def _residual_state(self) -> SpanState:
        return next(span for span, _, closes in self.spans if closes and span.site.residual).state(self.mode.branch)

    def _streams_in(self, args, kwargs):
        """(hidden states, encoder hidden states or None) a block was called with."""
        m = self.metadata
        hidden = m._get_parameter_from_args_kwargs(m.hidden_states_argument_name, args, kwargs)
        if m.return_encoder_hidden_states_index is None:
            return hidden, None
        return hidden, m._get_parameter_from_args_kwargs(m.encoder_hidden_states_argument_name, args, kwargs)

    def _streams_out(self, output):
        m = self.metadata
        if m.return_encoder_hidden_states_index is None:
            return output, None
        return output[m.return_hidden_states_index], output[m.return_encoder_hidden_states_index]

    def _as_output(self, hidden, encoder):
        """The streams in the block's own return format."""
        m = self.metadata
        if m.return_encoder_hidden_states_index is None:
            return hidden
        output = [None, None]
        output[m.return_hidden_states_index], output[m.return_encoder_hidden_states_index] = hidden, encoder
        return tuple(output)

    def reset_state(self, module):
        for span, _, _ in self.spans:
            span.reset()
        return module


class TransformerFamily(DenoiserFamily):
    """DiT, PixArt, SD3 and Flux transformers: spans of the block stack (``sites``)."""

    models = SUPPORTED_TRANSFORMERS
    latent_name = "hidden_states"
    cheap_levels_need = "a stack of at least 3 blocks"

    def __init__(self, encoder_depth: int | None = None):
        self.encoder_depth = encoder_depth

    def timestep_scale(self, model):
        return 1000.0 if isinstance(model, TIMESTEP_IN_THOUSANDTHS) else 1.0

    def latent_size(self, call):
        if self.latent(call).ndim != 3:
            return tuple(self.latent(call).shape[2:])
        # packed (batch, tokens, channels) latents, each token 2x2 latent pixels: the token grid is in Flux's
        # img_ids, and in Qwen-Image's img_shapes, [[(frames, rows, columns)], ...] a row
        if call.get("img_shapes") is not None:
            _, rows, columns = call["img_shapes"][0][0]
            return (2 * rows, 2 * columns)
        ids = call["img_ids"]
        return tuple(2 * (int(ids[..., axis].max()) + 1) for axis in (1, 2))

    def runs_stock(self, call):
        return call.get("skip_layers") is not None  # SD3's skip-layer guidance: a third call at some steps

    def hooked_modules(self, model):
        return transformer_blocks(model)

    def add_hooks(self, model, mode, name):
        blocks = transformer_blocks(model)
        spans = [Span(site) for site in sites(len(blocks), self.encoder_depth)]
        hooks = []
        for i, block in enumerate(blocks):
            member = [(span, i == span.site.start, i == span.site.stop - 1) for span in spans if span.site.start <= i < span.site.stop]
            hook = BlockHook(mode, TransformerBlockRegistry.get(type(block)), member)
            add_hook(block, hook, name)
            hooks.append((block, hook))
        return hooks

    def supported_levels(self, model, guided=True):
        levels = TRANSFORMER_LEVELS if len(transformer_blocks(model)) >= 3 else (FULL, ENCODER, OUTPUT)
        return levels if guided else tuple(lv for lv in levels if lv not in CONDITIONAL_ONLY)

    def guidance(self, pipe, loop_locals):
        """From the loop's own variables where the pipeline keeps them there: Flux's ``do_true_cfg`` (a call per
        branch), ``do_classifier_free_guidance`` (SD3's property, PixArt's local), DiT's ``guidance_scale``."""
        model = self.find(pipe)
        if "do_true_cfg" in loop_locals:
            renormalised = isinstance(model, RENORMALISED_GUIDANCE)
            return Guidance("calls", scale=float(loop_locals["true_cfg_scale"]), renormalised=renormalised) if loop_locals["do_true_cfg"] else None
        guided = getattr(pipe, "do_classifier_free_guidance", loop_locals.get("do_classifier_free_guidance"))
        scale = loop_locals.get("guidance_scale", getattr(pipe, "guidance_scale", 1.0))
        if guided is None and "guidance_scale" in loop_locals:
            guided = scale > 1
        if not guided:
            return None
        if isinstance(model, GUIDED_BY_CALLS):
            return Guidance("calls", scale=float(scale))
        return Guidance("halves", cond_first=isinstance(model, CONDITIONAL_FIRST), scale=float(scale))

    def feature_modules(self, model):
        """The encoder's last block: its output is what encoder propagation replays."""
        blocks = transformer_blocks(model)
        return [blocks[sites(len(blocks), self.encoder_depth)[0].stop - 1]]

    def prediction(self, model, output):
        """Without the learned variance's channels (PixArt's and DiT's second half), which the samplers drop."""
        latent_channels = model.config.in_channels
        return output.chunk(2, dim=1)[0] if output.ndim == 4 and output.shape[1] == 2 * latent_channels else output

    def resized(self, model, call, k):
        latent = self.latent(call)
        if latent.ndim in (4, 5):  # (batch, channels, [frames,] height, width), patchified inside
            patch = model.config.patch_size
            step = k * (patch[-1] if isinstance(patch, (tuple, list)) else patch)
            return {**call, self.latent_name: latent.new_zeros(*latent.shape[:-2], latent.shape[-2] + step, latent.shape[-1] + step)}
        if call.get("img_shapes") is not None:  # Qwen-Image: k tokens wider and taller
            frames, rows, columns = call["img_shapes"][0][0]
            rows, columns = rows + k, columns + k
            shapes = [[(frames, rows, columns)]] * latent.shape[0]
            return {**call, self.latent_name: latent.new_zeros(latent.shape[0], rows * columns, latent.shape[2]), "img_shapes": shapes}
        ids = call.get("img_ids")
        if ids is None or ids.ndim != 2:
            return None
        # Flux's packed latents: a token grid k tokens wider and taller, with its position ids
        rows, cols = (int(ids[:, axis].max()) + 1 + k for axis in (1, 2))
        grid = torch.zeros(rows, cols, 3, dtype=ids.dtype, device=ids.device)
        grid[..., 1] += torch.arange(rows, device=ids.device, dtype=ids.dtype)[:, None]
        grid[..., 2] += torch.arange(cols, device=ids.device, dtype=ids.dtype)[None, :]
        return {**call, self.latent_name: latent.new_zeros(latent.shape[0], rows * cols, latent.shape[2]), "img_ids": grid.reshape(-1, 3)}

    def plans_unsupported(self, pipe):
        if isinstance(self.find(pipe), CONDITIONAL_FIRST):
            return (f"{type(pipe).__name__} steps its guided rows together and guides part of their channels; its error model "
                    "of plans is not fitted (give plan letters or key_steps)")
        return None
