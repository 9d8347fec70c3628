"""The figures of docs/calibration.md: quality-speed frontier, cost-matrix heatmap, image grid.

    python -m faster_diffusion.quality.figures                  # all three into docs/figures/
    python -m faster_diffusion.quality.figures --only frontier  # from docs/quality.json, no sampling

* frontier: PSNR to stock and all-three adherence against encoder passes, one line per
  schedule family (paper, uniform:K, auto:B, the least-reuse-cost schedule, refined), for
  each sampler of the quality report (``python -m faster_diffusion.quality.evaluate``);
* heatmap: a shipped calibration's cost matrix, with the paper's and auto's key steps;
* grid: stock, paper and auto images of the same prompts and seeds on the bundled model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "weights" / "tiny-shapes"
OUT = ROOT / "docs" / "figures"
GRID_PROMPTS = ("a blue circle on the left", "a red square in the center", "a green triangle at the top", "a yellow circle on the right")
GRID_SETTINGS = (("stock", None), ("paper", "paper"), ("auto", "auto"), ("auto:9", "auto:9"))


def family(row: dict) -> str | None:
    """Which line of the frontier a quality-report row belongs to."""
    key_steps = str(row["key_steps"])
    if not row["accelerated"] or row.get("parallel") is False or (row.get("noise_injection") or 0) == 0:
        return None  # one line per family: the parallel, noise-injection variant
    if key_steps == "paper":
        return "paper"
    if key_steps.startswith("uniform:"):
        return "uniform:K"
    if key_steps.startswith("cost:"):
        return "least reuse cost (no refinement)"
    if key_steps.startswith("auto:") and row.get("refined"):
        return "auto:B refined"
    if key_steps.startswith("auto"):
        return "auto / auto:B"
    return None


def frontier(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one column per sampler with a curve to draw (a sampler evaluated only stock and at auto has none)
    accelerated = [(r["sampler"], r["steps"]) for r in report["settings"] if family(r)]
    samplers = [s for s in dict.fromkeys(accelerated) if accelerated.count(s) >= 2]
    fig, axes = plt.subplots(2, len(samplers), figsize=(5.5 * len(samplers), 7), squeeze=False)
    markers = {"paper": "s", "uniform:K": "o", "auto / auto:B": "D", "least reuse cost (no refinement)": "v", "auto:B refined": "*"}
    for col, (sampler, steps) in enumerate(samplers):
        rows = [r for r in report["settings"] if (r["sampler"], r["steps"]) == (sampler, steps)]
        stock = next(r for r in rows if not r["accelerated"])
        for name, marker in markers.items():
            points = sorted((r["stats"]["encoder_passes"], r) for r in rows if family(r) == name)
            if not points:
                continue
            x = [p for p, _ in points]
            axes[0, col].plot(x, [min(r["psnr"], 60) for _, r in points], marker=marker, label=name)
            axes[1, col].plot(x, [100 * r["adherence"]["all"] for _, r in points], marker=marker, label=name)
            for passes, r in points:
                if r["key_steps"] == "auto":
                    axes[0, col].annotate("auto", (passes, r["psnr"]), textcoords="offset points", xytext=(4, -10))
        axes[1, col].axhline(100 * stock["adherence"]["all"], color="grey", ls="--", label="stock")
        axes[0, col].set_title(f"{sampler}-{steps}, {report['num_images']} images")
        axes[0, col].set_ylabel("PSNR to stock (dB)")
        axes[1, col].set_ylabel("colour, shape and position right (%)")
        axes[1, col].set_xlabel(f"encoder passes of {steps}")
        for ax in axes[:, col]:
            ax.set_xlim(0, steps + 1)
            ax.grid(alpha=0.3)
    axes[1, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"faster-diffusion on the bundled tiny-shapes model ({report['hardware']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(calibration_path: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import faster_diffusion

    calibration = faster_diffusion.Calibration.load(calibration_path)
    n = calibration.num_steps
    cost = np.where(np.triu(np.ones((n, n)), 1) > 0, calibration.cost, np.nan)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    image = ax.imshow(np.log10(cost), cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="log10 relative squared distance of encoder features")
    for label, keys, colour in (
        ("paper", faster_diffusion.key_step_indices("paper", n), "red"),
        ("auto", calibration.schedule(), "white"),
    ):
        ax.scatter(keys, keys, s=18, c=colour, label=f"{label} keys ({len(keys)})", edgecolors="black", linewidths=0.4)
    ax.set_xlabel("step j (features needed)")
    ax.set_ylabel("step i (features reused)")
    ax.set_title(f"Reuse cost, {calibration.describe()}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid(path: Path, seeds=range(6), steps: int = 50) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image, ImageDraw

    import faster_diffusion

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cell, label_width = 64, 150
    rows = [(prompt, name, spec) for prompt in GRID_PROMPTS for name, spec in GRID_SETTINGS]
    canvas = Image.new("RGB", (label_width + cell * len(seeds), cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, name, spec) in enumerate(rows):
        if spec is None:
            faster_diffusion.disable(pipe)
        else:
            faster_diffusion.enable(pipe, key_steps=spec)
        images = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=7.5,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # fmt: skip
        passes = steps if spec is None else pipe.unet._faster_diffusion.stats["encoder_passes"]
        for c, image in enumerate(images):
            canvas.paste(image, (label_width + c * cell, r * cell))
        draw.text((4, r * cell + 18), f"{prompt[2:]}\n{name} ({passes}/{steps})", fill="black")
    faster_diffusion.disable(pipe)
    canvas.save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "quality.json")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", choices=("frontier", "heatmap", "grid"), default=None)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    if args.only in (None, "frontier"):
        made.append(frontier(json.loads(args.report.read_text()), args.out / "frontier.png"))
    if args.only in (None, "heatmap"):
        for name in ("DDIM-50steps-8x8", "DPMSolverMultistep-20steps-8x8"):
            made.append(heatmap(MODEL / "calibration" / f"{name}.json", args.out / f"cost-{name}.png"))
    if args.only in (None, "grid"):
        made.append(grid(args.out / "grid.png"))
    for path in made:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
