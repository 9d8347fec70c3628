#!/usr/bin/env python
"""UNet FLOPs per sample, stock vs faster-diffusion, for DeepFloyd IF and the video UNets (meta device).

Models (configs in bench/configs/, see their "_source" notes):
  - DeepFloyd IF stage I (IF-I-XL, 64² pixels) and stage II (IF-II-L, 256² pixels; 6 input
    channels = noisy image + upscaled stage-I image, noise level as class_labels);
  - ModelScope text-to-video (UNet3DConditionModel) at 256², 16 frames;
  - AnimateDiff: SD1.5's UNet + the v1-5-2 motion adapter (UNetMotionModel.from_unet2d) at 512², 16 frames.

Same counter and conventions as bench/flops.py (whose functions this reuses): FLOPs = 2 x
multiply-adds of convolutions, linear layers and attention matmuls; one sample = one image or one
video with classifier-free guidance (2 UNet rows); DDIM-50 timesteps (FLOPs do not depend on them).
Stock = 50 x one forward; faster-diffusion = the whole loop through the engine in parallel mode.

    python bench/flops_video_if.py            # table + bench/results/flops_video_if.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402

SCHEDULES = ("paper", "uniform:2", "uniform:5")
# name -> how to build the UNet and the sample it runs on
MODELS = {
    "if_i_xl": dict(label="DeepFloyd IF-I-XL", kind="unet2d", config="if_i_xl_unet.json", resolution=64, frames=None, vae_scale=1),
    "if_ii_l": dict(label="DeepFloyd IF-II-L", kind="unet2d", config="if_ii_l_unet.json", resolution=256, frames=None, vae_scale=1),
    "ms_t2v": dict(label="ModelScope T2V", kind="unet3d", config="ms_t2v_unet.json", resolution=256, frames=16, vae_scale=8),
    "animatediff": dict(label="AnimateDiff (SD1.5 + v1-5-2)", kind="motion", config="sd15_unet.json",
                        adapter="animatediff_motion_adapter.json", resolution=512, frames=16, vae_scale=8),
}


def load_config(name_or_dict) -> dict:
    """A config dict, or a file in bench/configs/ (keys starting with '_' dropped)."""
    if isinstance(name_or_dict, dict):
        return dict(name_or_dict)
    return common.load_unet_config(str(common.CONFIGS / name_or_dict))


def build_unet(kind: str, config, adapter=None, device: str = "meta"):
    """The UNet of ``kind`` (unet2d, unet3d, motion) on ``device``; motion = UNetMotionModel.from_unet2d(
    UNet2DConditionModel(config), MotionAdapter(adapter))."""
    import torch
    from diffusers import MotionAdapter, UNet3DConditionModel, UNetMotionModel

    if kind == "unet2d":
        return flops.build_meta_unet(load_config(config), device)
    with torch.device(device):
        if kind == "unet3d":
            unet = UNet3DConditionModel.from_config(load_config(config))
        elif kind == "motion":
            base = flops.build_meta_unet(load_config(config), device)
            unet = UNetMotionModel.from_unet2d(base, MotionAdapter.from_config(load_config(adapter)))
        else:
            raise ValueError(f"unknown UNet kind {kind!r}")
    return unet.eval()


def count_model(name: str, unet, resolution: int, frames=None, vae_scale: int = 8, schedules=SCHEDULES,
                sampler: str = "ddim", steps: int = 50, cfg: bool = True) -> list[dict]:
    """Stock and faster-diffusion FLOPs per sample (one image/video, both CFG rows) for each schedule."""
    with flops.one_thread():
        t0 = time.time()
        rows = 2 if cfg else 1
        input_kw = dict(frames=frames, vae_scale=vae_scale)
        one = flops.count_stock_forward(unet, rows, resolution, **input_kw)
        stock = steps * one["total"]
        timesteps = flops.sampler_timesteps(sampler, steps)
        out = []
        for spec in schedules:
            keys = common.key_step_indices(spec, steps)
            res = flops.count_run(unet, rows, resolution, timesteps, "parallel", spec, **input_kw)
            predicted = len(keys) * one["total"] + (steps - len(keys)) * one["decoder"]
            out.append({
                "model": name, "unet_class": type(unet).__name__, "resolution": resolution, "frames": frames,
                "sampler": sampler, "steps": steps, "schedule": spec, "key_steps": keys, "cfg": cfg,
                "unet_rows_per_step": rows * (frames or 1),
                "stock_gflops_per_sample": stock / 1e9, "faster_gflops_per_sample": res["total"] / 1e9,
                "reduction": 1 - res["total"] / stock, "cut": stock / res["total"],
                "predicted_reduction": 1 - predicted / stock,
                "encoder_share": one["encoder"] / one["total"],
                "gflops_per_forward": one["total"] / 1e9,
                "module_gflops_per_forward": {k: v / 1e9 for k, v in one["modules"].items()},
                "params": sum(p.numel() for p in unet.parameters()),
                "engine_stats": res["stats"],
            })
        print(f"[{name}] encoder share {one['encoder'] / one['total']:.2%}, {one['total'] / 1e9:,.0f} GFLOPs per CFG forward; "
              f"counted in {time.time() - t0:.1f}s", flush=True)
    return out


def table(rows: list[dict]) -> str:
    headers = ["model", "size", "frames", "schedule", "key steps", "GFLOPs/sample", "cut"]
    out = []
    for r in rows:
        size = f"{r['resolution']}²"
        frames = r["frames"] or "–"
        if r["schedule"] == "paper":  # the stock row once per model, before its first schedule
            out.append([r["model"], size, frames, "stock (DDIM-50)", r["steps"], f"{r['stock_gflops_per_sample']:,.0f}", "1.00x"])
        out.append([r["model"], size, frames, r["schedule"], len(r["key_steps"]), f"{r['faster_gflops_per_sample']:,.0f}",
                    f"{r['cut']:.2f}x (−{100 * r['reduction']:.1f}%)"])
    return common.markdown_table(headers, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--json", default=str(common.BENCH / "results" / "flops_video_if.json"))
    args = ap.parse_args(argv)

    result = {"environment": common.environment("cpu"),
              "convention": "FLOPs = 2 x multiply-adds (torch.utils.flop_counter); per sample = one image or video, "
                            "both classifier-free-guidance rows; DDIM-50; faster = engine in parallel mode",
              "rows": []}
    for name in args.models.split(","):
        spec = MODELS[name.strip()]
        unet = build_unet(spec["kind"], spec["config"], spec.get("adapter"))
        result["rows"] += count_model(name.strip(), unet, spec["resolution"], spec["frames"], spec["vae_scale"])
        common.write_json(Path(args.json), result)  # incremental
    print()
    print(table(result["rows"]))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
