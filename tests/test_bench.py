"""Benchmarks (bench/): the configs, the FLOP counter at toy size, and `bench/gpu.sh --cpu-smoke`.

No timing is asserted: these check that the benchmark code runs end to end, writes
the JSON rows it promises, and counts what the engine does (encoder passes, FLOPs
below stock for the paper schedule).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import flops  # noqa: E402

import faster_diffusion  # noqa: E402

# Public parameter counts of the three UNets (and SD1.5's VAE / CLIP text encoder): the configs are the real ones.
PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_unet_configs_match_public_parameter_counts(name):
    unet = flops.build_meta_unet(common.load_unet_config(name))
    assert sum(p.numel() for p in unet.parameters()) == PARAMS[name]


def test_sd15_vae_and_text_encoder_configs():
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    load = lambda n: {k: v for k, v in json.loads((common.CONFIGS / n).read_text()).items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(load("sd15_vae.json"))
        text = CLIPTextModel(CLIPTextConfig(**load("sd15_text_encoder.json")))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 123_060_480


def test_flops_toy_paper_schedule(tmp_path):
    out = tmp_path / "flops.json"
    assert flops.main(["--models", "toy", "--resolution", "64", "--samplers", "ddim:50,dpmpp:20",
                       "--schedules", "paper,uniform:5", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sampler"], r["steps"], r["schedule"]) for r in rows} == {
        (s, n, k) for s, n in (("ddim", 50), ("dpmpp", 20)) for k in ("paper", "uniform:5")
    }
    for r in rows:
        keys = faster_diffusion.key_step_indices(r["schedule"], r["steps"])
        assert r["key_steps"] == list(keys)
        assert r["encoder_passes"] == len(keys)
        assert r["decoder_passes"] == r["steps"]
        assert 0 < r["faster_gflops_per_image"] < r["stock_gflops_per_image"]
        # the engine skips exactly the encoder at non-key steps: measured == predicted from one forward's split
        assert r["reduction"] == pytest.approx(r["predicted_reduction"], rel=1e-9)
    paper50 = next(r for r in rows if r["steps"] == 50 and r["schedule"] == "paper")
    assert paper50["encoder_passes"] == 9 and paper50["key_steps"] == [0, 1, 2, 3, 5, 10, 15, 25, 35]


def test_flops_sequential_equals_parallel():
    unet = flops.build_meta_unet(common.load_unet_config("toy"), device="cpu")
    timesteps = flops.sampler_timesteps("ddim", 20)
    with flops.one_thread():
        seq = flops.count_run(unet, 2, 64, timesteps, "sequential", "paper")
        par = flops.count_run(unet, 2, 64, timesteps, "parallel", "paper")
        stock = flops.count_run(unet, 2, 64, timesteps, "stock", "paper")
    assert seq["total"] == par["total"] < stock["total"]
    assert seq["stats"]["unet_calls"] == 20 and par["stats"]["unet_calls"] == seq["stats"]["encoder_passes"] == 7


def test_flops_levels_toy(tmp_path):
    """Each level's FLOPs, counted through the accelerator: a full call is a stock forward, and each cheaper level
    skips more (encoder propagation the encoder, shallow also the inner decoder, deep all but the outermost layers)."""
    import flops_levels

    out = tmp_path / "levels.json"
    assert flops_levels.main(["--models", "toy", "--resolution", "64", "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    fr, g = row["fraction_of_full"], row["gflops_per_call"]
    assert fr["full"] == 1.0 and 1 > fr["encoder"] > fr["shallow"] > fr["deep"] > 0
    assert fr["deep_cfg"] == pytest.approx(fr["deep"] / 2, rel=1e-6)  # the same layers on the conditional row alone
    # a forecast does the work of the level it forecasts (its extrapolation is elementwise)
    assert (fr["deep_forecast"], fr["deep_cfg_forecast"]) == (fr["deep"], fr["deep_cfg"])
    unet = flops.build_meta_unet(common.load_unet_config("toy"), device="cpu")
    with flops.one_thread():
        stock = flops.count_stock_forward(unet, 2, 64)
    assert g["full"] * 1e9 == pytest.approx(stock["total"], rel=1e-12)
    # encoder propagation runs exactly the decoder (and the time embedding, which the counter does not see)
    assert g["encoder"] * 1e9 == pytest.approx(stock["decoder"], rel=1e-12)


def test_gpu_sh_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("speed_eager.json", "speed_compiled.json", "flops.json", "peers.json", "peers.md", "peers.png", "summary.md", "setup_budgeted.json",
                 "gpu_log.txt"):
        assert (tmp_path / name).is_file(), name

    eager = json.loads((tmp_path / "speed_eager.json").read_text())
    got = {(r["sampler"], r["steps"], r["batch"]) for r in eager["results"]}
    assert got == {("ddim", 8, 1), ("ddim", 8, 2), ("dpmpp", 6, 1), ("dpmpp", 6, 2)}
    for r in eager["results"]:
        keys = faster_diffusion.key_step_indices("paper", r["steps"])
        assert set(r["modes"]) == {"stock", "sequential", "parallel", "parallel:2"}
        for mode, e in r["modes"].items():
            assert len(e["seconds"]) == 1 and e["median_s"] > 0 and e["peak_mem_bytes"] > 0
            if mode != "stock":
                assert e["engine_stats"]["encoder_passes"] == len(keys)
                assert e["engine_stats"]["decoder_passes"] == r["steps"]
                assert e["speedup_vs_stock"] > 0
        assert r["modes"]["sequential"]["engine_stats"]["unet_calls"] == r["steps"]
        assert r["modes"]["parallel"]["engine_stats"]["unet_calls"] == len(keys)
        assert r["modes"]["parallel:2"]["engine_stats"]["unet_calls"] >= len(keys)
        assert r["parallel_vs_sequential_max_abs_diff"] < 1e-3

    toy = json.loads((tmp_path / "peers_toy-flux.json").read_text())  # the transformer rows, at toy size
    assert [r["method"] for r in toy["rows"]][:3] == ["stock", "fbc:0.1", "taylorseer:3"] and toy["rows"][0]["speedup"] == 1.0
    setup = json.loads((tmp_path / "setup_budgeted.json").read_text())  # the bundled model without its calibrations
    assert setup["calibration_spent"] <= 27 and setup["setup_in_stock_images_time"] > 0

    compiled = json.loads((tmp_path / "speed_compiled.json").read_text())
    assert [(r["sampler"], r["batch"], r["compile"]) for r in compiled["results"]] == [("ddim", 1, "none+cl")]

    rows = json.loads((tmp_path / "flops.json").read_text())["rows"]
    assert {(r["sampler"], r["steps"]) for r in rows} == {("ddim", 50), ("dpmpp", 20)}
    for r in rows:
        assert r["encoder_passes"] == len(faster_diffusion.key_step_indices("paper", r["steps"]))
        assert r["faster_gflops_per_image"] < r["stock_gflops_per_image"]
    assert "speed_eager.json" in (tmp_path / "summary.md").read_text()

    # the peers step (bench/peers.py at toy size); DeepCache / ToMe rows only where they are installed
    peers = json.loads((tmp_path / "peers.json").read_text())
    rows = {r["method"]: r for r in peers["methods"]}
    planner = {"plan:auto", "plan:auto:2", "plan:auto:3", "plan:auto:4"}
    expected = {"stock", "fd:uniform:3", "fd:auto"} | planner
    if importlib.util.find_spec("DeepCache"):
        expected |= {f"deepcache:{n}" for n in range(2, 6)}
    if importlib.util.find_spec("tomesd"):
        expected |= {"tome:0.5"}
    assert set(rows) == expected
    # the planner: its error model fitted and validated in the warm-up (random weights ship none), its cost model
    # measured by its first call; every method's FLOPs counted
    assert peers["plan_calibration"]["fitted"]
    for name in planner:
        r = rows[name]
        assert r["predicted_speedup"] > 1 and sum(r["plans"].values()) == 4
        assert r["stats"]["unet_flops"] < r["stats"]["stock_unet_flops"] and r["flop_speedup_vs_stock"] > 1
    for r in rows.values():
        assert r["gflops_per_image"] > 0 and r["flop_speedup_vs_stock"] >= 1.0
    assert (peers["model"], peers["device"], peers["dtype"], peers["resolution"], peers["steps"]) == ("toy", "cpu", "fp32", 64, 10)
    assert "partial" not in peers and rows["stock"]["psnr"] == "inf"
    for r in rows.values():
        assert len(r["seconds"]) == 4 and r["median_s_per_image"] > 0  # 2 prompts x 2 repeats
        assert r["adherence"] is None  # random weights: the shapes detector does not apply
        assert r["calibrating_calls"] == 0  # no timed call ran stock to calibrate
    # no shipped calibration for the toy model: the one fitted for the planner before the warm-up serves fd:auto too,
    # so no call ran stock to calibrate
    assert peers["calibrated_in_warmup"] == []
    assert rows["fd:auto"]["stats"]["schedule_source"].startswith("auto from the calibration argument")
    assert rows["fd:auto"]["stats"]["encoder_passes"] < peers["steps"]
