"""torch.compile for an accelerated UNet or transformer: compile the blocks, keep the plan's dispatch in Python.

    import faster_diffusion
    faster_diffusion.enable(pipe, plan="FDDFDD...")   # before or after compile_blocks, either order
    faster_diffusion.compile_blocks(pipe)             # torch.compile each block's own forward
    pipe(prompt, num_inference_steps=50)              # the first call of a plan warms up (compiles)
    faster_diffusion.uncompile(pipe)                  # the eager blocks again

``torch.compile(pipe.unet)`` does not compose with the accelerator: the accelerator's hooks are Python
that decides per step what runs (``unet_split.ReplayHook``), so a compiled UNet forward traces them,
breaks its graph at every decision and recompiles for every level. ``compile_blocks`` compiles below
the hooks instead. Its *regions* are the largest modules of the UNet that contain no module a level of
reuse replays: every down block, the mid block, the up blocks but the last, the last up block's
resnets and attentions one by one (and its upsampler, if any), ``conv_in``, the time embedding and the output head's
norm and convolution (modules without parameters stay eager). On a transformer (``transformer_split``) every
block is hooked, so the regions are the blocks themselves, one by one, and the embeddings and output head
around them: diffusers' regional compilation, below the hooks. A replayed module is a region too; its
compiled forward is the ``forward`` the replay hook calls when that module runs. So a region is the
same code whatever the level of the step, and the hooks, the UNet's own forward and the sampling loop
stay eager.

- **Order:** the hooks call whatever ``forward`` a module had when they were registered (diffusers'
  ``HookRegistry`` keeps ``module.forward``). Compiling an accelerated UNet therefore lifts the
  accelerator's hooks, compiles, and puts them back; enabling a compiled UNet wraps the compiled forwards.
- **Shapes:** ``dynamic=None`` (torch's default): a region compiles for the shapes of its first call,
  and once more, with a dynamic batch, when its batch changes. Decoder groups of the parallel strategy
  run the decoder regions at ``group size x rows`` rows, so a plan with groups of several sizes costs
  one extra compile per decoder region, not one per size. ``dynamic=False`` compiles every size
  (static shapes; bound the sizes with ``max_parallel``).
- **Graph breaks:** ``fullgraph=True`` by default: a region that cannot be captured whole fails at its
  first call instead of silently running in pieces.
- **Undo:** ``uncompile`` puts the eager forwards back (lifting the hooks in the same way).
  ``disable`` leaves the blocks compiled; compiled and eager blocks agree to float rounding.
"""

from __future__ import annotations

import contextlib

import torch

from .family import family_of

#: the attribute that marks a compiled region: it holds what ``module.__dict__["forward"]`` was before
COMPILED = "_faster_diffusion_compiled"
_NO_FORWARD = object()  # the module used its class's forward


def compile_blocks(pipe_or_unet, **compile_kwargs) -> list[str]:
    """Compiles every region of ``pipe_or_unet``'s UNet (a pipeline, or the UNet itself) with
    ``torch.compile(region.forward, **compile_kwargs)``; returns the regions' names.

    Important args: ``dynamic`` (default None: a region recompiles once with a dynamic batch when a
    decoder group first changes its batch; False: static shapes, one compile per batch size),
    ``fullgraph`` (default True). Args to tinker with: ``mode``, ``backend``, ``options``.

    Works before or after ``faster_diffusion.enable``; compiling again replaces the earlier compile.
    The first run of each batch size and plan compiles; time it after a warm-up run.
    """
    family, unet = _denoiser(pipe_or_unet)
    options = {"fullgraph": True, **compile_kwargs}
    with _hooks_lifted(unet):
        _uncompile(unet)
        regions = compile_regions(unet, family)
        for name, module in regions:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.hooks:
                raise RuntimeError(
                    f"faster_diffusion.compile_blocks: {name} has diffusers hooks {list(registry.hooks)} from elsewhere; "
                    "remove them first (the compiled region would trace them)"
                )
        for name, module in regions:
            setattr(module, COMPILED, module.__dict__.get("forward", _NO_FORWARD))
            module.forward = torch.compile(module.forward, **options)
    return [name for name, _ in regions]


def uncompile(pipe_or_unet) -> None:
    """Puts back the eager forward of every region ``compile_blocks`` compiled; a no-op if none."""
    _, unet = _denoiser(pipe_or_unet)
    if not any(hasattr(module, COMPILED) for module in unet.modules()):
        return
    with _hooks_lifted(unet):
        _uncompile(unet)


def compile_regions(unet, family=None) -> list[tuple[str, torch.nn.Module]]:
    """The modules ``compile_blocks`` compiles, by name, in the model's order: every module with
    parameters whose descendants include no module the family's hooks sit on, and that lies in no
    other region."""
    replayed = set((family or family_of(unet)[0]).hooked_modules(unet))
    regions = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) or any(
                sub in replayed for sub in child.modules() if sub is not child
            ):
                visit(f"{prefix}{name}.", child)
            elif next(child.parameters(), None) is not None:
                regions.append((f"{prefix}{name}", child))

    visit("", unet)
    return regions


def _uncompile(unet) -> None:
    for module in unet.modules():
        saved = module.__dict__.pop(COMPILED, None)
        if saved is None:
            continue
        module.__dict__.pop("forward", None)
        if saved is not _NO_FORWARD:
            module.forward = saved


@contextlib.contextmanager
def _hooks_lifted(unet):
    """Removes the accelerator's hooks for the block, so that forwards can be swapped under them, then
    puts them back (``enable`` registers them on the forwards the modules have by then)."""
    accel = getattr(unet, "_faster_diffusion", None)
    if accel is None:
        yield
        return
    if accel._run is not None:
        raise RuntimeError("faster_diffusion: compile_blocks / uncompile inside a denoising run")
    accel.disable()
    try:
        yield
    finally:
        accel.enable()


def _denoiser(pipe_or_unet):
    found = family_of(pipe_or_unet)
    if found is None:
        raise TypeError("faster_diffusion.compile_blocks needs a pipeline whose `unet` or `transformer` faster_diffusion "
                        f"supports, or the model itself; got {type(pipe_or_unet).__name__}")
    return found
