#!/usr/bin/env python
"""Markdown summary of a results directory (speed_*.json, flops.json) with the targets checked.

    python bench/summarize.py bench/results [--out bench/results/summary.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_PARALLEL_SPEEDUP = 1.7  # GPU, SD1.5 512², DDIM-50, fp16, batch 1
TARGET_MEM_OVERHEAD = 0.51  # peak memory at most +51%
TARGET_CPU_SEQ_SPEEDUP = 1.3


def speed_section(path: Path) -> list[str]:
    import speed

    data = json.loads(path.read_text())
    env = data["environment"]
    hw = env.get("gpu") or f"{env.get('cpu')} ({env.get('torch_threads')} threads)"
    lines = [f"### {path.name}", "",
             f"{hw}; {env['date_utc']}; torch {env['torch']}, diffusers {env['diffusers']}"
             f"{', CUDA ' + env['cuda'] if env.get('cuda') else ''}; model: {data['model_description']}; "
             f"compile: {data['compile_description']}; output_type {data['settings']['output_type']}; "
             f"CFG {data['settings']['guidance']}; key steps {data['settings']['key_steps']}; "
             f"median of {data['settings']['repeats']} runs after {data['settings']['warmup']} warm-up run(s) per mode.", "",
             f"`{env['command']}`", ""]
    if not data["results"]:
        return lines + ["(no configuration finished)", ""]
    lines += [speed.table(data["results"]), ""]
    for r in data["results"]:
        par, seq = r["modes"].get("parallel"), r["modes"].get("sequential")
        cuda = r["device"].startswith("cuda")
        if cuda and r["sampler"] == "ddim" and r["steps"] == 50 and r["batch"] == 1 and par and "speedup_vs_stock" in par:
            ok = par["speedup_vs_stock"] >= TARGET_PARALLEL_SPEEDUP
            mem = par.get("peak_mem_vs_stock", 1) - 1
            lines.append(
                f"- target parallel ≥ {TARGET_PARALLEL_SPEEDUP}× ({r['compile']}): {par['speedup_vs_stock']:.2f}× "
                f"{'MET' if ok else 'MISSED by ' + format(TARGET_PARALLEL_SPEEDUP - par['speedup_vs_stock'], '.2f') + '×'}; "
                f"peak memory {100 * mem:+.0f}% (target ≤ +{100 * TARGET_MEM_OVERHEAD:.0f}%: "
                f"{'MET' if mem <= TARGET_MEM_OVERHEAD else 'MISSED'})"
            )
        if not cuda and seq and "speedup_vs_stock" in seq and r["model"] == "sd15":
            ok = seq["speedup_vs_stock"] >= TARGET_CPU_SEQ_SPEEDUP
            lines.append(
                f"- target CPU sequential ≥ {TARGET_CPU_SEQ_SPEEDUP}× ({r['sampler_name']}-{r['steps']}): "
                f"{seq['speedup_vs_stock']:.2f}× {'MET' if ok else 'MISSED'}"
            )
        if r.get("parallel_vs_sequential_max_abs_diff") is not None:
            lines.append(f"- {r['sampler_name']}-{r['steps']} batch {r['batch']}: parallel vs sequential output max |diff| "
                         f"{r['parallel_vs_sequential_max_abs_diff']:.3g}")
    return lines + [""]


def flops_section(path: Path) -> list[str]:
    import flops

    data = json.loads(path.read_text())
    lines = [f"### {path.name}", "", f"{data['convention']}; `{data['environment']['command']}`", "", flops.table(data["rows"]), ""]
    for r in data["rows"]:
        if "paper_reduction" in r:
            lines.append(
                f"- {r['model']} {r['sampler_name']}-{r['steps']} paper schedule: −{100 * r['reduction']:.2f}% vs paper "
                f"−{100 * r['paper_reduction']:.2f}% ({r['reduction_minus_paper_pp']:+.2f} pp, "
                f"{100 * r['reduction_rel_diff_to_paper']:+.1f}% relative); with attention matmuls at half weight "
                f"(reproduces the paper's {r['paper_gflops_per_step']:.0f} GFLOPs/step as "
                f"{r['gflops_per_forward_batch1_paper_convention']:.1f}): −{100 * r['reduction_paper_convention']:.2f}%"
            )
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", nargs="?", default=str(common.BENCH / "results"))
    ap.add_argument("--out", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    root = Path(args.results)
    lines = [f"## Benchmark summary ({root})", ""]
    for path in sorted(root.glob("speed*.json")):
        try:
            lines += speed_section(path)
        except Exception as exc:  # a partial file must not hide the others
            lines += [f"### {path.name}: unreadable ({exc!r})", ""]
    for path in sorted(root.glob("flops*.json")):
        try:
            lines += flops_section(path)
        except Exception as exc:
            lines += [f"### {path.name}: unreadable ({exc!r})", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
