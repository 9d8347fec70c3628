"""UNet + ControlNet FLOPs per image, stock vs faster-diffusion, for SD1.5 at 512² (meta device).

With encoder propagation the ControlNet runs only at key steps (its residuals are
replayed, as in the paper), so per image:
    stock  = N x (UNet forward + ControlNet forward)
    faster = K x (UNet encoder + ControlNet forward) + N x UNet decoder
with the per-module counts of one forward from bench/flops.py's counter
(tests/test_pipelines.py checks that the ControlNet runs exactly K times).

    python bench/flops_controlnet.py
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402

import faster_diffusion  # noqa: E402


def main() -> None:
    config = json.loads((Path(__file__).parent / "configs" / "sd15_unet.json").read_text())
    unet = flops.build_meta_unet(config)
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(unet).eval()
    rows, resolution = 2, 512  # one image with classifier-free guidance
    sample, kwargs = flops.unet_inputs(unet, rows, resolution)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        controlnet(sample, 999, controlnet_cond=torch.randn(rows, 3, resolution, resolution, device="meta"),
                   encoder_hidden_states=kwargs["encoder_hidden_states"], return_dict=False)
    controlnet_flops = counter.get_total_flops()
    unet_flops = flops.count_stock_forward(unet, rows, resolution)
    print("| model | res | sampler | steps | key steps | stock GFLOPs/img | faster GFLOPs/img | reduction |")
    print("|---|---|---|---|---|---|---|---|")
    for sampler, steps in (("DDIM", 50), ("DPM-Solver++", 20)):
        keys = len(faster_diffusion.key_step_indices("paper", steps))
        stock = steps * (unet_flops["total"] + controlnet_flops)
        faster = keys * (unet_flops["encoder"] + controlnet_flops) + steps * unet_flops["decoder"]
        print(f"| sd15+controlnet | 512² | {sampler} | {steps} | {keys} | {stock / 1e9:,.0f} | {faster / 1e9:,.0f} | "
              f"{100 * (faster / stock - 1):+.1f}% |")


if __name__ == "__main__":
    main()
