#!/usr/bin/env python
"""FLOPs of one UNet call at each level of reuse (full, encoder, shallow, deep, deep_cfg and the forecasting
ones), relative to a full call.

The levels are the planner's (``faster_diffusion.LEVELS``; ``unet_split.replayed_modules`` says what
each replays): ``encoder`` is encoder propagation (the decoder on cached encoder features),
``shallow`` runs ``conv_in``, the first down block and the last up block, ``deep`` is DeepCache's
branch 0 (``conv_in``, the last layer of the last up block and the output head), ``deep_cfg`` is
``deep`` on the conditional row alone (the unconditional output comes from the guidance difference).

Counted through the accelerator itself, on a bare UNet built from its config on PyTorch's meta
device (bench/configs/: no weights, no arithmetic): ``faster_diffusion.enable(unet,
plan="FESD", parallel=False)`` and one ``accel.denoising_run`` of 4 steps, with
``torch.utils.flop_counter.FlopCounterMode`` around each UNet call, so step k is counted at the
k-th level of the plan (a multiply-add = 2 FLOPs; norms, activations and softmax are not counted).
Each call has 2 rows (one image with classifier-free guidance). The stock forward is counted too:
the full level must equal it. A bare UNet has no guidance to reuse, so ``deep_cfg`` is counted as
what it runs: a deep call on one row (plan ``FD`` on a 1-row sample). ``deep_forecast`` and
``deep_cfg_forecast`` are counted after two full steps (plan ``FFX`` on 2 rows and on 1), where they
extrapolate: the same multiply-adds as the level they forecast (the extrapolation is elementwise).

    python bench/flops_levels.py                         # sd15 512², sdxl 1024², tiny-shapes 64² -> bench/results/flops_levels.json
    python bench/flops_levels.py --models toy --resolution 64 --device cpu --json /tmp/levels.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402

from faster_diffusion.unet_split import UNET_LEVELS as LEVELS  # noqa: E402  (the UNet's levels)

TINY_SHAPES = common.ROOT / "weights" / "tiny-shapes" / "unet" / "config.json"
DEFAULT_MODELS = "sd15,sdxl,tiny-shapes"
PLAN = "FESD"  # one step at each level, in an order where every level finds the features it replays


def level_flops(unet, rows: int, resolution: int) -> dict:
    """FLOPs of one call at each level (``PLAN``'s order), of ``deep_cfg`` (a deep call on the conditional
    half of the rows) and of a stock forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import faster_diffusion

    timesteps = [999, 749, 499, 249]  # python numbers: meta tensors hold no values to compare timesteps with

    def per_call(plan: str, call_rows: int) -> list[int]:
        sample, kwargs = flops.unet_inputs(unet, call_rows, resolution, device=unet.device)
        counted = []
        accel = faster_diffusion.enable(unet, plan=plan, parallel=False)
        try:
            with accel.denoising_run(timesteps[: len(plan)]):
                for t in timesteps[: len(plan)]:
                    with FlopCounterMode(display=False) as counter:
                        unet(sample, t, **kwargs)
                    counted.append(counter.get_total_flops())
            stats = dict(accel.stats)
        finally:
            faster_diffusion.disable(unet)
        if stats.get("plan") != plan or stats.get("unet_calls") != len(plan):
            raise RuntimeError(f"the accelerator ran {stats.get('plan')} in {stats.get('unet_calls')} calls, not {plan}")
        return counted

    sample, kwargs = flops.unet_inputs(unet, rows, resolution, device=unet.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(sample, timesteps[0], **kwargs)
        out = {"stock": counter.get_total_flops()}
        out.update(zip(faster_diffusion.parse_plan(PLAN), per_call(PLAN, rows)))
        out["deep_cfg"] = per_call("FD", rows // 2)[1]
        # the forecasting levels after two full steps, so that they extrapolate (the same work as what they forecast)
        out["deep_forecast"] = per_call("FFX", rows)[2]
        out["deep_cfg_forecast"] = per_call("FFX", rows // 2)[2]
    return out


def count_model(name: str, config: dict, resolution: int, device: str) -> dict:
    t0 = time.time()
    with flops.one_thread():
        unet = flops.build_meta_unet(config, device)
        counted = level_flops(unet, 2, resolution)
    full = counted["full"]
    if full != counted["stock"]:
        raise RuntimeError(f"{name}: a full-level call counts {full} FLOPs, a stock forward {counted['stock']}")
    row = {
        "model": name, "resolution": resolution, "latent": resolution // 8, "rows_per_call": 2,
        "gflops_per_call": {level: counted[level] / 1e9 for level in LEVELS},
        "fraction_of_full": {level: counted[level] / full for level in LEVELS},
        "count_seconds": round(time.time() - t0, 1),
    }
    fr = row["fraction_of_full"]
    print(f"[{name} {resolution}²] full {full / 1e9:,.1f} GFLOPs a call (2 rows); encoder {fr['encoder']:.3f}, "
          f"shallow {fr['shallow']:.3f}, deep {fr['deep']:.3f}, deep_cfg {fr['deep_cfg']:.3f}, deep_forecast "
          f"{fr['deep_forecast']:.3f}, deep_cfg_forecast {fr['deep_cfg_forecast']:.3f} of full ({row['count_seconds']}s)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    headers = ["model", "size", "full (GFLOPs / call, 2 rows)", *LEVELS[1:]]
    out = []
    for r in rows:
        fr = r["fraction_of_full"]
        out.append([r["model"], f"{r['resolution']}²", f"{r['gflops_per_call']['full']:,.1f}",
                    *(f"{fr[level]:.3f}" for level in LEVELS[1:])])
    return common.markdown_table(headers, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma list of sd15, sd21, sdxl, toy, tiny-shapes (the bundled model's config) (default {DEFAULT_MODELS})")
    ap.add_argument("--resolution", type=int, help="image size in pixels (default: each model's native size)")
    ap.add_argument("--device", default="meta", choices=["meta", "cpu"], help="meta (default) or cpu (toy-sized configs only)")
    ap.add_argument("--json", default=str(common.BENCH / "results" / "flops_levels.json"))
    args = ap.parse_args(argv)

    result = {"environment": common.environment("cpu"), "plan": PLAN,
              "convention": "FLOPs = 2 x multiply-adds (torch.utils.flop_counter); one UNet call of 2 rows (an image with "
                            "classifier-free guidance); fraction = the level's FLOPs over a full call's", "rows": []}
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        if name == "tiny-shapes":
            config, native = common.load_unet_config(str(TINY_SHAPES)), 64
        else:
            config, native = common.load_unet_config(name), common.MODELS.get(name, ("", 64))[1]
        result["rows"].append(count_model(name, config, args.resolution or native, args.device))
        common.write_json(args.json, result)
    print()
    print(table(result["rows"]))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
