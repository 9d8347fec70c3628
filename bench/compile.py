#!/usr/bin/env python
"""Eager against ``faster_diffusion.compile_blocks`` (torch.compile, inductor) for the same plans.

One process, two pipelines that share everything but the UNet: ``eager`` keeps its UNet as loaded,
``compiled`` gets a copy of it through ``faster_diffusion.compile_blocks`` (called after ``enable``;
the other order gives the same compiled regions). Both run the same plan (``--plans``, explicit plans
of ``faster_diffusion.enable(pipe, plan=...)``; the default: all full = stock, DeepCache-like interval 3,
and a mixed plan with encoder groups of 1 to 5 steps, shallow and deep steps), the same captions
(``faster_diffusion.quality.evaluate.prompt_set``) and seeds, DDIM, guidance 7.5, batch 1, one torch
thread (``--threads``).

Warm-up: every plan once on each pipeline, untimed (the compiled pipeline compiles here: the seconds
are reported). Then ``torch._dynamo``'s counters are cleared and, per round and per image, every plan
runs on both pipelines in turn, the order rotating by one each image. A timed call is
``pipe(prompt, ..., output_type="latent")``: text encoding and the denoising loop. Reported per plan:
the median seconds of each pipeline, the speed-up (eager's median over compiled's), the largest
difference of the compiled latents from the eager ones, and, for the timed calls, the recompiles and
graph breaks dynamo counted (both must be 0) and the graphs it compiled (0 after warm-up).

    .venv/bin/python bench/compile.py                       # the bundled model, 6 images, 2 rounds
    .venv/bin/python bench/compile.py --json bench/results/compile.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, environment, make_scheduler, markdown_table, write_json  # noqa: E402

#: name -> plan at 50 steps (other step counts cut or repeat it)
PLANS = {
    "full": "F" * 50,  # stock
    "deepcache3": "FDD",  # DeepCache-like: interval 3, branch 0
    "mixed": "FEEEFSSDFEEEEFDDDFEEFSDDFEEEEFDDDDFEFSSSFEEEFDDFEE",  # encoder groups of 1 to 4 steps, shallow, deep
}


def plan_for(plan: str, steps: int) -> str:
    return (plan * (steps // len(plan) + 1))[:steps]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "weights" / "tiny-shapes"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=6, help="captions x seeds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plans", default=",".join(PLANS), help="comma list of names of PLANS or explicit plans")
    parser.add_argument("--dynamic", choices=["none", "false", "true"], default="none", help="torch.compile's dynamic")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline
    from torch._dynamo.utils import counters

    import faster_diffusion
    from faster_diffusion.quality.evaluate import prompt_set

    torch.set_num_threads(args.threads)
    eager = StableDiffusionPipeline.from_pretrained(args.model)
    eager.scheduler = make_scheduler("ddim", eager.scheduler.config)
    compiled = StableDiffusionPipeline(**{**eager.components, "unet": copy.deepcopy(eager.unet)}, requires_safety_checker=False)
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    plans = {name: plan_for(PLANS.get(name, name), args.steps) for name in args.plans.split(",")}
    prompts = prompt_set(args.images, 1)
    pipes = {"eager": eager, "compiled": compiled}

    def call(which: str, plan: str, prompt: str, seed: int):
        pipe = pipes[which]
        faster_diffusion.enable(pipe, plan=plan)
        generator = torch.Generator().manual_seed(seed)
        begin = time.perf_counter()
        with torch.no_grad():
            latents = pipe(prompt, num_inference_steps=args.steps, guidance_scale=7.5, generator=generator, output_type="latent").images
        return time.perf_counter() - begin, latents

    faster_diffusion.enable(compiled, plan=next(iter(plans.values())))
    regions = faster_diffusion.compile_blocks(compiled, dynamic={"none": None, "false": False, "true": True}[args.dynamic])
    warmup = {}
    for name, plan in plans.items():
        call("eager", plan, *prompts[0])
        warmup[name] = round(call("compiled", plan, *prompts[0])[0], 1)
        print(f"warm-up {name}: {warmup[name]} s (compiling)", flush=True)

    counters.clear()
    seconds = {(name, which): [] for name in plans for which in pipes}
    diff = {name: 0.0 for name in plans}
    for r in range(args.rounds):
        for i, (prompt, seed) in enumerate(prompts):
            order = [(name, which) for name in plans for which in pipes]
            k = (i + r) % len(order)
            latents = {}
            for name, which in order[k:] + order[:k]:
                s, latents[name, which] = call(which, plans[name], prompt, seed)
                seconds[name, which].append(s)
            for name in plans:
                diff[name] = max(diff[name], float((latents[name, "compiled"] - latents[name, "eager"]).abs().max()))
    recompiles = counters["frames"]["total"]  # frames dynamo was asked to compile: 0 when every call found its graph
    graph_breaks = sum(counters["graph_break"].values())
    new_graphs = counters["stats"]["unique_graphs"]

    rows, results = [], []
    for name, plan in plans.items():
        e, c = statistics.median(seconds[name, "eager"]), statistics.median(seconds[name, "compiled"])
        results.append({
            "plan_name": name, "plan": plan, "eager_s": round(e, 4), "compiled_s": round(c, 4),
            "speedup": round(e / c, 3), "max_abs_diff": diff[name], "warmup_s": warmup[name],
        })
        rows.append([name, f"{e:.3f}", f"{c:.3f}", f"{e / c:.2f}x", f"{diff[name]:.1e}", warmup[name]])
    print(markdown_table(["plan", "eager s/image", "compiled s/image", "speed-up", "max |diff| latents", "warm-up s"], rows))
    print(f"timed calls: {new_graphs} graphs compiled, {recompiles} recompiles, {graph_breaks} graph breaks; "
          f"{len(regions)} regions, dynamic={args.dynamic}")
    out = {
        "environment": environment(), "args": vars(args), "regions": regions, "results": results,
        "timed_calls": {"graphs_compiled": new_graphs, "recompiles": recompiles, "graph_breaks": graph_breaks},
    }
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
