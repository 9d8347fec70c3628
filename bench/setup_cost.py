#!/usr/bin/env python
"""What ``Predictor.setup`` costs on weights that ship no calibration: FLOPs and seconds, in stock images.

Copies a pipeline directory (default the bundled weights/tiny-shapes) without its ``calibration/*.json``
(its ``calibration/prompts.txt`` stays: the prompts setup calibrates on), points the service's cache at an
empty folder, and runs ``Predictor().setup(weights=copy)`` under ``torch.utils.flop_counter.FlopCounterMode``
(one run) and again without the counter, for seconds (another empty cache). The unit is one stock image of
the service's default (DDIM-50, guidance 7.5, the native size, ``output_type="latent"``): its FLOPs and its
seconds, measured after the setups. ``--budget`` sets ``FASTER_DIFFUSION_SETUP_BUDGET`` (a number, or
"thorough"). ``--model sd15`` saves SD1.5's architecture with random weights (bench/speed.py's) and sets it up
on the GPU (fp16) instead: the generic prompts, as for any weights without ``calibration/prompts.txt``.

    python bench/setup_cost.py                      # the default budget, the bundled model, this CPU
    python bench/setup_cost.py --budget thorough    # the thorough calibration
    python bench/setup_cost.py --model sd15 --no-count   # on a GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)

import torch
from torch.utils.flop_counter import FlopCounterMode


def stock_image(pipe) -> tuple[float, float]:
    """(FLOPs, seconds) of one stock image of the service's default request."""
    from predict import DEFAULT_SCHEDULER, DEFAULT_STEPS
    from service.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(DEFAULT_SCHEDULER, pipe.scheduler.config)
    call = lambda: pipe("a red square in the center", num_inference_steps=DEFAULT_STEPS, guidance_scale=7.5,  # noqa: E731
                        output_type="latent", generator=torch.Generator().manual_seed(0))
    if pipe.device.type == "cuda":  # the queue drained around each timed call
        timed = call
        call = lambda: (timed(), torch.cuda.synchronize())  # noqa: E731
    call()  # warm-up
    seconds = []
    for _ in range(3):
        begin = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - begin)
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops()), min(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--model", default=None, choices=["sd15"], help="random weights of this architecture instead of --weights")
    ap.add_argument("--no-count", dest="count", action="store_false", help="skip the FLOP-counted setup")
    ap.add_argument("--budget", default=None, help="FASTER_DIFFUSION_SETUP_BUDGET (default: the service's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-time", dest="time", action="store_false", help="skip the second, uncounted setup")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.budget is not None:
        os.environ["FASTER_DIFFUSION_SETUP_BUDGET"] = args.budget
    work = Path(tempfile.mkdtemp(prefix="setup-cost-"))
    weights = work / "weights"
    if args.model == "sd15":
        from speed import build_pipeline

        pipe, described = build_pipeline("sd15", "cpu", torch.float32)
        pipe.save_pretrained(weights)
        del pipe
    else:
        shutil.copytree(args.weights, weights)
        described = str(args.weights)
    for f in (weights / "calibration").glob("*.json"):
        f.unlink()
    from predict import Predictor

    results = {"weights": described, "budget": os.environ.get("FASTER_DIFFUSION_SETUP_BUDGET", "default"),
               "threads": args.threads, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    predictor = None
    if args.count:
        os.environ["FASTER_DIFFUSION_CACHE"] = str(work / "cache-counted")
        predictor = Predictor()
        with FlopCounterMode(display=False) as counter:
            predictor.setup(weights=weights)
        results["setup_flops"] = float(counter.get_total_flops())
    if args.time:
        os.environ["FASTER_DIFFUSION_CACHE"] = str(work / "cache-timed")
        predictor = Predictor()
        begin = time.perf_counter()
        predictor.setup(weights=weights)
        results["setup_seconds"] = time.perf_counter() - begin
    image_flops, image_seconds = stock_image(predictor.pipe)
    results.update(stock_image_flops=image_flops, stock_image_seconds=image_seconds,
                   calibration_spent=predictor.calibrations[0].info.get("spent") if predictor.calibrations else None)
    if "setup_flops" in results:
        results["setup_in_stock_images_flops"] = results["setup_flops"] / image_flops
    if "setup_seconds" in results:
        results["setup_in_stock_images_time"] = results["setup_seconds"] / image_seconds
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
