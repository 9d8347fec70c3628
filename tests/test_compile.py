"""faster_diffusion.compile_blocks: torch.compile below the replay hooks, composed with plans.

The dynamo checks (no graph break inside a region, no recompile after warm-up, either order with
``enable``) run with the ``eager`` backend, which captures graphs as inductor would but compiles
nothing; one test runs inductor itself (it needs a C++ compiler) and compares with eager to 1e-4.
Every test starts from an empty dynamo cache, so that regions compiled by another test (same code
objects, other UNets) do not count against dynamo's recompile limit.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import sample
from diffusers.hooks import HookRegistry
from tiny_pipelines import tiny_sd
from torch._dynamo.utils import counters

import faster_diffusion
from faster_diffusion.compile import _NO_FORWARD, COMPILED, compile_regions
from faster_diffusion.unet_split import ENCODER_HOOK, replayed_modules

STEPS = 10
#: encoder groups of 3 and 2 steps (decoder batches of two sizes), shallow and deep steps
MIXED = "FEEFSDFEDD"
DEEPCACHE = "FDDFDDFDDF"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def dynamo_activity() -> dict:
    """What dynamo did since the counters were last cleared: frames it was asked to compile (a compile or a
    recompile; a call that finds its compiled graph asks nothing), graphs compiled, graph breaks."""
    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


NOTHING = {"frames": 0, "graphs": 0, "graph_breaks": 0}


def run(pipe, plan, seed=0):
    faster_diffusion.enable(pipe, plan=plan)
    return sample(pipe, steps=STEPS, seed=seed, guidance_scale=7.5)


def test_compiled_unet_before_enable_names_the_recipe():
    pipe = tiny_sd()
    pipe.unet = torch.compile(pipe.unet)
    for target in (pipe, pipe.unet):
        with pytest.raises(TypeError, match=r"faster_diffusion\.compile_blocks"):
            faster_diffusion.enable(target, plan=MIXED)


def test_regions_hold_no_replayed_module():
    unet = tiny_sd().unet
    regions = dict(compile_regions(unet))
    replayed = set(replayed_modules(unet))
    assert {"conv_in", "time_embedding", "mid_block", "conv_out", "down_blocks.0", "up_blocks.0"} <= set(regions)
    inside = [sub for module in regions.values() for sub in module.modules()]
    assert len(inside) == len(set(inside)), "regions overlap"
    for name, module in regions.items():
        assert not any(sub in replayed for sub in module.modules() if sub is not module), name
    # every replayed module is a region or made of regions (its own code outside them stays eager)
    for module in replayed:
        assert module in regions.values() or any(sub in regions.values() for sub in module.modules())


@pytest.mark.parametrize("order", ["compile, then enable", "enable, then compile"])
def test_plans_run_without_graph_breaks_or_recompiles(order):
    pipe = tiny_sd()
    eager = {plan: run(pipe, plan) for plan in (MIXED, DEEPCACHE)}
    faster_diffusion.disable(pipe)
    if order == "compile, then enable":
        faster_diffusion.compile_blocks(pipe, backend="eager")
        faster_diffusion.enable(pipe, plan=MIXED)
    else:
        faster_diffusion.enable(pipe, plan=MIXED)
        faster_diffusion.compile_blocks(pipe, backend="eager")
    # the replay hooks call the compiled forwards
    compiled_replayed = [module for module in replayed_modules(pipe.unet) if hasattr(module, COMPILED)]
    assert len(compiled_replayed) > 5
    for module in compiled_replayed:
        forward = HookRegistry.check_if_exists_or_initialize(module).get_hook(ENCODER_HOOK).fn_ref.original_forward
        assert hasattr(forward, "_torchdynamo_orig_callable")
    warm = {plan: run(pipe, plan) for plan in (MIXED, DEEPCACHE)}  # warm-up: compiles
    assert dynamo_activity()["graphs"] > 0 and dynamo_activity()["graph_breaks"] == 0
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = {plan: run(pipe, plan) for plan in (DEEPCACHE, MIXED)}
    assert dynamo_activity() == NOTHING
    for plan in eager:
        assert torch.allclose(warm[plan], eager[plan], atol=1e-4, rtol=0)
        assert torch.equal(again[plan], warm[plan])
    assert pipe.unet._faster_diffusion.stats["plan"] == MIXED


def test_uncompile_and_disable():
    pipe = tiny_sd()
    regions = faster_diffusion.compile_blocks(pipe, backend="eager")
    faster_diffusion.compile_blocks(pipe, backend="eager")  # again: replaces, does not nest
    modules = dict(pipe.unet.named_modules())
    for name in regions:
        assert hasattr(modules[name].forward, "_torchdynamo_orig_callable")
        assert getattr(modules[name], COMPILED) is _NO_FORWARD  # it compiled the class's forward, not a compiled one
    faster_diffusion.enable(pipe, plan=DEEPCACHE)
    faster_diffusion.disable(pipe)  # leaves the blocks compiled
    assert all(hasattr(modules[name].forward, "_torchdynamo_orig_callable") for name in regions)
    faster_diffusion.enable(pipe, plan=DEEPCACHE)
    faster_diffusion.uncompile(pipe)  # under the hooks: the accelerator stays enabled
    assert pipe.unet._faster_diffusion is not None
    faster_diffusion.disable(pipe)
    for module in pipe.unet.modules():
        assert "forward" not in module.__dict__ and not hasattr(module, COMPILED)
        assert not hasattr(module, "_diffusers_hook")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler (g++)")
def test_inductor_matches_eager_after_warmup():
    pipe = tiny_sd()
    eager = {plan: run(pipe, plan) for plan in (MIXED, DEEPCACHE)}
    faster_diffusion.compile_blocks(pipe)  # inductor, the default backend
    run(pipe, MIXED)  # warm-up: every region at a single step's batch and at a dynamic decoder-group batch
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = {plan: run(pipe, plan) for plan in (MIXED, DEEPCACHE)}
    assert dynamo_activity() == NOTHING
    for plan in eager:
        assert (compiled[plan] - eager[plan]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_transformer_blocks_compile_under_the_hooks(name):
    """On a transformer every block is a region: plans of every level run compiled without graph breaks, and
    without recompiles after a warm-up, as eager does (Flux: a call per guidance branch, and O steps)."""
    from tiny_transformers import PIPELINES

    from faster_diffusion.transformer_split import transformer_blocks

    build, kwargs = PIPELINES[name]
    pipe = build()
    plans = ("FEEFDDFXYC", "FOOFCCFYOO")

    def run_plan(plan):
        faster_diffusion.enable(pipe, plan=plan)
        return pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images

    eager = {plan: run_plan(plan) for plan in plans}
    faster_diffusion.compile_blocks(pipe, backend="eager")
    regions = dict(compile_regions(pipe.transformer))
    assert all(block in regions.values() for block in transformer_blocks(pipe.transformer))
    warm = {plan: run_plan(plan) for plan in plans}  # warm-up: compiles
    assert dynamo_activity()["graphs"] > 0 and dynamo_activity()["graph_breaks"] == 0
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = {plan: run_plan(plan) for plan in plans[::-1]}
    assert dynamo_activity() == NOTHING
    for plan in plans:
        assert torch.allclose(warm[plan], eager[plan], atol=1e-5, rtol=0)
        assert torch.equal(again[plan], warm[plan])
    faster_diffusion.uncompile(pipe)
    faster_diffusion.disable(pipe)
    assert not any(hasattr(module, COMPILED) or "forward" in module.__dict__ for module in pipe.transformer.modules())
