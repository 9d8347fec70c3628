#!/usr/bin/env python
"""Cost models predicted for new shapes against the speed-ups they predict, measured.

One process, the bundled model, DDIM-50, guidance 7.5, ``plan="auto:T"``. The first planned call, at the
native 64 px and batch 1, measures the cost model (the warm-up a server does at setup); every other size
and batch gets its cost model predicted from it (``CostModel.predicted``: each level's time scaled by its
FLOPs, nothing timed). For each shape: the plan's predicted whole-call speed-up (``accel.stats``) and the
measured one: stock and the plan timed interleaved, the same prompts and seeds, ``--repeats`` rounds
(median seconds per call, the VAE decode included: ``output_type="np"``).

    python bench/predicted_costs.py --out bench/results/predicted_costs_cpu_tiny_shapes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import common

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--plan", default="auto:2")
    ap.add_argument("--shapes", default="64x1,96x1,128x1,64x4,96x4", help="SIZExBATCH, the first measured, the rest predicted")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    import faster_diffusion
    from faster_diffusion.quality.evaluate import prompt_set

    pipe = StableDiffusionPipeline.from_pretrained(args.weights)
    pipe.set_progress_bar_config(disable=True)
    items = prompt_set(args.prompts, 1)
    rows = []
    accel = faster_diffusion.enable(pipe, plan=args.plan)
    for shape in args.shapes.split(","):
        size, batch = (int(x) for x in shape.split("x"))

        def call(prompt, seed):
            return pipe(prompt, num_inference_steps=50, guidance_scale=7.5, height=size, width=size, num_images_per_prompt=batch,
                        generator=torch.Generator().manual_seed(seed), output_type="np")

        accel.enable()
        call(*items[0])  # the plan's first call here: its cost model measured (the first shape) or predicted
        stats = dict(accel.stats)
        model = faster_diffusion.cost_models(pipe)[next(k for k in faster_diffusion.cost_models(pipe) if k[0][0] == 2 * batch
                                                         and k[0][2] * pipe.vae_scale_factor == size)]
        seconds = {"stock": [], "plan": []}
        for r in range(args.repeats):
            for k, (prompt, seed) in enumerate(items):
                for method in (("stock", "plan") if (r + k) % 2 == 0 else ("plan", "stock")):  # alternating order
                    accel.enable() if method == "plan" else accel.disable()
                    begin = time.perf_counter()
                    call(prompt, seed)
                    seconds[method].append(time.perf_counter() - begin)
        measured = statistics.median(seconds["stock"]) / statistics.median(seconds["plan"])
        row = {"size": size, "batch": batch, "cost_model": "predicted" if "predicted_from" in model.info else "measured",
               "plan": stats["plan"], "predicted_speedup": stats["predicted_speedup"], "measured_speedup": round(measured, 3),
               "prediction_error": round(stats["predicted_speedup"] / measured - 1, 3),
               "stock_s": round(statistics.median(seconds["stock"]), 4), "plan_s": round(statistics.median(seconds["plan"]), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    accel.disable()
    result = {"weights": str(args.weights), "plan": args.plan, "threads": args.threads, "prompts": args.prompts,
              "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": common.environment()
              if hasattr(common, "environment") else None, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
