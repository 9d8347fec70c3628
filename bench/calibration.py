"""What calibration costs: memory of the stored sketches, and time against a stock run.

    python bench/calibration.py                     # both; memory at SD1.5 512² and SDXL 1024², time on tiny-shapes
    python bench/calibration.py --repeats 5 --threads 2

* memory: each encoder module's output size per batch row at SD1.5 512² and SDXL 1024²
  (the UNet on the meta device, public configs), the sketch that calibration keeps
  (``SKETCH_SIZE`` float32 coordinates per module, row and step);
* time: ``faster_diffusion.calibrate`` against the same stock pipeline call, on the bundled
  model (CPU, DDIM-50, its 8 calibration prompts, guidance 7.5), interleaved repeats, median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import ROOT, load_unet_config

sys.path.insert(0, str(ROOT))


def memory(model: str, resolution: int, prompts: int, steps: int) -> str:
    import torch
    from flops import build_meta_unet, unet_inputs

    from faster_diffusion.calibration import SKETCH_SIZE, _feature_tensors
    from faster_diffusion.unet_split import encoder_modules

    unet = build_meta_unet(load_unet_config(model))
    sizes = []
    handles = [m.register_forward_hook(lambda mod, a, out: sizes.append(sum(t[0].numel() for t in _feature_tensors(out))))
               for m in encoder_modules(unet)]  # fmt: skip
    sample, kwargs = unet_inputs(unet, 1, resolution)
    with torch.no_grad():
        unet(sample, torch.tensor(999.0, device="meta"), **kwargs)
    for h in handles:
        h.remove()
    rows = 2 * prompts  # classifier-free guidance
    sketch = len(sizes) * min(SKETCH_SIZE, min(sizes)) * 4 * rows * steps
    return (
        f"{model} {resolution}²: {len(sizes)} encoder modules, features per row "
        f"{', '.join(f'{s / 1e6:.2f}M' for s in sizes)} values; {prompts} prompts x {steps} steps with guidance: "
        f"sketches {sketch / 2**20:.1f} MiB (CPU; gathered per output tensor, no copy of the features)"
    )


def timing(repeats: int, threads: int) -> str:
    import torch
    from diffusers import StableDiffusionPipeline

    import faster_diffusion
    from service.calibrations import calibration_prompts

    torch.set_num_threads(threads)
    model = ROOT / "weights" / "tiny-shapes"
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = calibration_prompts(model)
    kwargs = dict(guidance_scale=7.5, output_type="latent")  # the same call in both; calibrate's default is 50 steps

    def generators():
        return [torch.Generator().manual_seed(k) for k in range(len(prompts))]

    def stock():
        pipe(prompts, num_inference_steps=50, generator=generators(), **kwargs)

    def calibrate():
        faster_diffusion.calibrate(pipe, prompts, 50, generator=generators(), **kwargs)

    times = {"stock": [], "calibrate": []}
    stock()  # warm-up
    for _ in range(repeats):
        for name, fn in (("stock", stock), ("calibrate", calibrate)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    s, c = statistics.median(times["stock"]), statistics.median(times["calibrate"])
    return (
        f"tiny-shapes, CPU {threads} threads, fp32, DDIM-50, {len(prompts)} prompts, median of {repeats}: stock {s:.3f}s, "
        f"calibrate {c:.3f}s (+{100 * (c / s - 1):.1f}%); all runs: stock {[round(t, 3) for t in times['stock']]}, "
        f"calibrate {[round(t, 3) for t in times['calibrate']]}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("memory", "time"), default=None)
    args = parser.parse_args(argv)
    if args.only in (None, "memory"):
        print(memory("sd15", 512, prompts=4, steps=50))
        print(memory("sdxl", 1024, prompts=4, steps=50))
    if args.only in (None, "time"):
        print(timing(args.repeats, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
