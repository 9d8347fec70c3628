#!/usr/bin/env python
"""plan="auto" on every sampler and step count the bundled model ships a calibration for.

For each shipped ``calibration/*.json`` (or ``--runs``), ``bench/peers.py`` times stock, DeepCache
interval 3, encoder propagation at ``key_steps="auto"`` and ``plan="auto"`` in one process,
interleaved, on the same captions and seeds, with FLOPs of the whole call; then this script
gathers the runs into one table.

    python bench/planner_samplers.py --out bench/results/planner_samplers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = "stock,deepcache:3,fd:auto,plan:auto"


def shipped_runs(weights: Path) -> list[str]:
    """SAMPLER:STEPS of the model's calibrations, as its files name them (PNDM's loop has one step more)."""
    runs = []
    for path in sorted((weights / "calibration").glob("*.json")):
        data = json.loads(path.read_text())
        sampler = path.name.split("-")[0]
        runs.append(f"{sampler}:{data['info'].get('num_inference_steps', data['num_inference_steps'])}")
    return runs


def row(run: str, data: dict) -> list:
    methods = {m["method"]: m for m in data["methods"]}

    def cell(name):
        m = methods[name]
        return (f"{m['speedup_whole_call']:.2f}× / {m['flop_speedup_vs_stock']:.2f}× / {m['psnr']:.1f} dB / "
                f"{100 * m['adherence']['all']:.0f}%")

    plan = methods["plan:auto"]["stats"]["plan"]
    return [run, f"{100 * methods['stock']['adherence']['all']:.0f}%", cell("deepcache:3"), cell("fd:auto"), cell("plan:auto"),
            f"{plan.count('F')} of {len(plan)}", f"{methods['plan:auto']['predicted_speedup']:.2f}×"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--runs", default=None, help="comma-separated SAMPLER:STEPS (default: the shipped calibrations')")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results" / "planner_samplers")
    args = ap.parse_args(argv)
    runs = args.runs.split(",") if args.runs else shipped_runs(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        sampler, steps = run.split(":")
        out = args.out / f"{sampler}-{steps}"
        subprocess.run([sys.executable, str(common.ROOT / "bench" / "peers.py"), "--model", str(args.weights), "--sampler", sampler,
                        "--steps", steps, "--num-prompts", str(args.num_prompts), "--repeats", str(args.repeats), "--threads", "1",
                        "--methods", METHODS, "--out", str(out)], check=True)  # fmt: skip
        rows.append(row(run, json.loads(out.with_suffix(".json").read_text())))
    header = ["sampler:steps", "stock adherence", "DeepCache interval 3", "key_steps=\"auto\"", "plan=\"auto\"", "plan's full steps",
              "plan predicted"]  # fmt: skip
    table = common.markdown_table(header, rows)
    env = common.environment()
    text = (f"Whole-call time speed-up / FLOP speed-up / PSNR to stock / all-three adherence, {args.num_prompts} captions, "
            f"batch 1, guidance 7.5, 1 torch thread, fp32, {env['cpu']}, {env['date_utc']}, commit {env['git_commit']}; "
            f"each row one `bench/peers.py` run (`{args.out.name}/SAMPLER-STEPS.md`).\n\n{table}\n")
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
