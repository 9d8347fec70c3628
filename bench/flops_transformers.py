#!/usr/bin/env python
"""FLOPs of one transformer call at each level of reuse, relative to a full call, and of encoder propagation
over a whole run: DiT-XL/2 256² (250 steps, against the paper's 34%), PixArt-Sigma 1024², SD3.5-medium 1024²
(28 steps), FLUX.1-dev 1024² (28 steps), Qwen-Image 1328² (50 steps) and Wan2.1-T2V-14B 832x480, 81 frames (50 steps).

The levels are ``faster_diffusion.transformer_split``'s: ``encoder`` replays the first K blocks (the paper's
18 of 28, as a share of the stack), ``deep`` replays every block but the first and the last (residual reuse),
``deep_cfg`` is ``deep`` on the conditional half of a guided step (the forecasting levels do the work of the
level they forecast: their extrapolation is elementwise). Each model is built from its public config
(bench/configs/*_transformer.json) on PyTorch's meta device (no weights, no arithmetic) and one stock forward
is counted by ``torch.utils.flop_counter.FlopCounterMode`` per module (a multiply-add = 2 FLOPs; norms,
activations and softmax are not counted). A level's FLOPs are the full call's less those of the blocks it
replays (``transformer_split.sites``); adding a replayed residual is elementwise, not counted. ``--check``
counts a toy DiT's calls through the accelerator itself and compares.

Calls have 2 rows (an image with classifier-free guidance), FLUX.1-dev, Qwen-Image and Wan 1 (guidance-distilled,
or a call per guidance branch; ``deep_cfg`` is then half a step of two calls). ``output`` calls no model (0).
Text lengths are the pipelines' defaults: PixArt-Sigma 300 T5 tokens, SD3 77 CLIP + 256 T5, FLUX.1-dev 512 T5,
Wan 512 UMT5; Qwen-Image's prompt is counted at 64 tokens (its length is the prompt's).

    python bench/flops_transformers.py            # -> bench/results/flops_transformers.json
    python bench/flops_transformers.py --check    # the toy DiT through the accelerator, then the table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from faster_diffusion.family import CONDITIONAL_ONLY, OUTPUT  # noqa: E402
from faster_diffusion.schedules import key_step_indices  # noqa: E402
from faster_diffusion.transformer_split import TRANSFORMER_LEVELS, sites, transformer_blocks  # noqa: E402

#: The key steps of the paper's DiT code for 250 steps (sen-mao/FasterDiffusion-DiT, sample_fasterdiffusion.py;
#: its list ends with 250, the end of the last group): 166 full steps, 84 encoder-propagated, and 166 model calls.
PAPER_DIT_KEY_STEPS = [
    0, 1, 2, 3, 4, 5, 6, 10, 12, 13, 14, 16, 17, 18, 19, 20, 22, 25, 27, 29, 30, 31, 32, 33, 34, 35, 36, 37, 45, 49,
    51, 52, 53, 54, 58, 59, 60, 62, 64, 67, 68, 70, 72, 73, 75, 77, 78, 81, 82, 83, 84, 85, 86, 87, 88, 90, 91, 92,
    95, 97, 99, 101, 102, 103, 104, 106, 107, 109, 110, 111, 112, 115, 116, 117, 118, 119, 120, 121, 123, 125, 128,
    130, 131, 132, 134, 137, 138, 139, 141, 142, 143, 144, 145, 147, 150, 152, 155, 157, 158, 160, 161, 162, 163,
    164, 166, 168, 169, 170, 172, 173, 174, 175, 178, 180, 181, 182, 184, 187, 188, 189, 190, 191, 193, 194, 195,
    196, 198, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 212, 213, 214, 216, 217, 218, 219, 221, 223,
    224, 225, 226, 227, 228, 229, 231, 232, 233, 234, 237, 239, 241, 242, 243, 245, 246, 247, 249,
]
PAPER_DIT_CUT = 0.34  # the NeurIPS 2024 abstract: "DiT model sampling by 34%" (5.13 -> 3.26 s an image, 250 steps)

#: name -> (config file, resolution, steps, rows a call, text tokens)
MODELS = {
    "dit-xl-2": ("dit_xl_2_256_transformer.json", 256, 250, 2, 0),
    "pixart-sigma": ("pixart_sigma_1024_transformer.json", 1024, 20, 2, 300),
    "sd3.5-medium": ("sd35_medium_transformer.json", 1024, 28, 2, 77 + 256),
    "flux.1-dev": ("flux1_dev_transformer.json", 1024, 28, 1, 512),
    "qwen-image": ("qwen_image_transformer.json", 1328, 50, 1, 64),
    "wan2.1-t2v-14b": ("wan21_t2v_14b_transformer.json", (480, 832, 81), 50, 1, 512),
}


def build(config: dict, device: str):
    import diffusers
    import torch

    cls = getattr(diffusers, config["_class_name"])
    with torch.device(device):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()


def inputs(model, rows: int, resolution: int, text: int, device: str) -> dict:
    """A stock call's arguments, as the model's pipeline passes them."""
    import torch

    c = model.config
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    name = type(model).__name__
    if name == "WanTransformer3DModel":  # (height, width, frames): 8x spatial, 4x temporal VAE
        height, width, frames = resolution
        return dict(hidden_states=zeros(rows, c.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8), timestep=zeros(rows),
                    encoder_hidden_states=zeros(rows, text, c.text_dim))
    latent = resolution // 8
    if name == "QwenImageTransformer2DModel":  # packed 2x2 latent patches, their grid in img_shapes
        side = latent // 2
        return dict(hidden_states=zeros(rows, side * side, c.in_channels), encoder_hidden_states=zeros(rows, text, c.joint_attention_dim),
                    encoder_hidden_states_mask=torch.ones(rows, text, dtype=torch.long, device=device), timestep=zeros(rows),
                    img_shapes=[[(1, side, side)]] * rows)
    if name == "FluxTransformer2DModel":  # packed 2x2 latent patches of 16 channels
        tokens = (latent // 2) ** 2
        call = dict(hidden_states=zeros(rows, tokens, c.in_channels), encoder_hidden_states=zeros(rows, text, c.joint_attention_dim),
                    pooled_projections=zeros(rows, c.pooled_projection_dim), timestep=zeros(rows),
                    img_ids=zeros(tokens, 3), txt_ids=zeros(text, 3))
        if c.guidance_embeds:
            call["guidance"] = zeros(rows)
        return call
    call = dict(hidden_states=zeros(rows, c.in_channels, latent, latent), timestep=zeros(rows, dtype=torch.long))
    if name == "DiTTransformer2DModel":
        call["class_labels"] = zeros(rows, dtype=torch.long)
    elif name == "PixArtTransformer2DModel":
        call.update(encoder_hidden_states=zeros(rows, text, c.caption_channels), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:  # SD3
        call.update(encoder_hidden_states=zeros(rows, text, c.joint_attention_dim), pooled_projections=zeros(rows, c.pooled_projection_dim))
    return call


def block_flops(model, call: dict) -> tuple[float, list[float]]:
    """FLOPs of a stock call and of each block in it (``transformer_split.transformer_blocks``' order)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**call)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    prefix = type(model).__name__
    names = {module: name for name, module in model.named_modules()}
    return float(counter.get_total_flops()), [float(counts.get(f"{prefix}.{names[block]}", 0)) for block in transformer_blocks(model)]


def level_fractions(full: float, blocks: list[float]) -> dict[str, float]:
    """Each level's FLOPs over a full call's: the full call less the blocks the level replays."""
    fractions = {}
    for level in TRANSFORMER_LEVELS:
        if level == OUTPUT:  # no model call
            fractions[level] = 0.0
            continue
        replayed = {i for s in sites(len(blocks)) if level in s.replayed_at for i in range(s.start, s.stop)}
        fractions[level] = (full - sum(blocks[i] for i in replayed)) / full
        if level in CONDITIONAL_ONLY:  # the conditional half of the rows (or one of true CFG's two calls)
            fractions[level] /= 2
    return fractions


def size_label(resolution) -> str:
    """1024² for an image size; 832x480, 81 frames for a video's (height, width, frames)."""
    if isinstance(resolution, (tuple, list)):
        height, width, frames = resolution
        return f"{width}x{height}, {frames} frames"
    return f"{resolution}²"


def run_fraction(keys: list[int], steps: int, encoder: float) -> float:
    """A run's FLOPs over stock's: full key steps, encoder-propagated others (batching decoders adds none)."""
    k = len([i for i in keys if i < steps])
    return (k + (steps - k) * encoder) / steps


def count_model(name: str) -> dict:
    file, resolution, steps, rows, text = MODELS[name]
    config = json.loads((common.CONFIGS / file).read_text())
    t0 = time.time()
    model = build(config, "meta")
    full, blocks = block_flops(model, inputs(model, rows, resolution, text, "meta"))
    fractions = level_fractions(full, blocks)
    encoder_depth = sites(len(blocks))[0].stop
    schedules = {"paper": key_step_indices("paper", steps)}
    if name == "dit-xl-2":
        schedules["paper's DiT code"] = PAPER_DIT_KEY_STEPS
    runs = {label: {"full_steps": len([i for i in keys if i < steps]), "fraction_of_stock": run_fraction(keys, steps, fractions["encoder"])}
            for label, keys in schedules.items()}
    row = {"model": name, "config": file, "resolution": resolution, "steps": steps, "rows_per_call": rows, "text_tokens": text,
           "blocks": len(blocks), "encoder_blocks": encoder_depth, "gflops_full_call": full / 1e9,
           "blocks_share_of_call": sum(blocks) / full, "fraction_of_full": fractions, "encoder_propagation": runs,
           "count_seconds": round(time.time() - t0, 1)}
    described = ", ".join(f"{label} ({r['full_steps']} full steps): {r['fraction_of_stock']:.3f} of stock" for label, r in runs.items())
    print(f"[{name} {size_label(resolution)}, {len(blocks)} blocks, encoder {encoder_depth}] full {full / 1e9:,.1f} GFLOPs a call ({rows} rows); "
          + ", ".join(f"{lv} {f:.3f}" for lv, f in fractions.items() if lv != "full") + f"; {steps} steps, {described}", flush=True)
    return row


def check_through_accelerator() -> None:
    """A toy DiT on the CPU: each level's FLOPs counted through the accelerator equal ``level_fractions``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import faster_diffusion

    config = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
              "out_channels": 8, "num_layers": 8, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000}
    torch.manual_seed(0)
    model = build(config, "cpu")
    call = {k: (v.normal_() if v.is_floating_point() else v) for k, v in inputs(model, 2, 64, 0, "cpu").items()}
    full, blocks = block_flops(model, call)
    expected = level_fractions(full, blocks)
    counted = []
    plan, timesteps = "FEFD", [900, 700, 500, 300]
    accel = faster_diffusion.enable(model, plan=plan, parallel=False)
    with torch.no_grad(), accel.denoising_run(timesteps):
        for t in timesteps:
            with FlopCounterMode(display=False) as counter:
                model(**{**call, "timestep": torch.full((2,), t)})
            counted.append(counter.get_total_flops() / full)
    faster_diffusion.disable(model)
    measured = {"full": counted[0], "encoder": counted[1], "deep": counted[3]}
    for level, fraction in measured.items():
        if abs(fraction - expected[level]) > 1e-9:
            raise RuntimeError(f"{level}: {fraction} of full through the accelerator, {expected[level]} from the block counts")
    print(f"check: a toy DiT's levels through the accelerator match the block counts ({measured})")


def table(rows: list[dict]) -> str:
    headers = ["model", "size", "blocks (encoder)", "full (GFLOPs / call)", "encoder", "deep", "deep_cfg", "encoder propagation, run / stock"]
    out = []
    for r in rows:
        fr = r["fraction_of_full"]
        runs = "; ".join(f"{label} ({x['full_steps']}/{r['steps']} full): {x['fraction_of_stock']:.3f} (-{100 * (1 - x['fraction_of_stock']):.1f}%)"
                         for label, x in r["encoder_propagation"].items())
        out.append([r["model"], size_label(r["resolution"]), f"{r['blocks']} ({r['encoder_blocks']})", f"{r['gflops_full_call']:,.1f}",
                    f"{fr['encoder']:.3f}", f"{fr['deep']:.3f}", f"{fr['deep_cfg']:.3f}", runs])
    return common.markdown_table(headers, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--check", action="store_true", help="first count a toy DiT's levels through the accelerator")
    ap.add_argument("--json", default=str(common.BENCH / "results" / "flops_transformers.json"))
    args = ap.parse_args(argv)
    if args.check:
        check_through_accelerator()
    result = {"environment": common.environment("cpu"), "paper_dit_cut": PAPER_DIT_CUT,
              "convention": "FLOPs = 2 x multiply-adds (torch.utils.flop_counter) of one transformer call; fraction = the "
                            "level's FLOPs over a full call's; a run's fraction counts its full and encoder-propagated steps",
              "rows": []}
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        result["rows"].append(count_model(name))
        common.write_json(args.json, result)
    print()
    print(table(result["rows"]))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
