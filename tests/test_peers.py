"""faster-diffusion next to its peers (issue #13): ToMe (tomesd) and DeepCache on the tiny SD pipeline,
and the benchmarks that compare them (bench/peers.py, bench/flops_peers.py).

Each peer is optional: tests that need one skip when it is not installed (`pip install tomesd==0.1.3
DeepCache==0.1.1`). ToMe draws its random merge partition from a generator it keeps across calls;
`sample` reseeds it before each call, so a ToMe-patched pipeline is reproducible.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import difference
from conftest import sample as shared_sample

import faster_diffusion

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

# conftest.sample: 32 px, 16x16 latents with the tiny VAE: ToMe merges in the full-resolution transformer blocks


@pytest.fixture
def tomesd():
    return pytest.importorskip("tomesd")


@pytest.fixture
def deepcache():
    return pytest.importorskip("DeepCache")


@pytest.fixture(autouse=True)
def stock_afterwards(pipe):
    yield
    faster_diffusion.disable(pipe)
    if "tomesd" in sys.modules:
        sys.modules["tomesd"].remove_patch(pipe)


def sample(pipe, steps=12, seed=0):
    info = getattr(pipe.unet, "_tome_info", None)
    if info is not None:  # ToMe's generator, reseeded per call
        info["args"]["generator"] = torch.Generator().manual_seed(seed)
    return shared_sample(pipe, steps=steps, seed=seed)


def enable_fd(pipe, parallel=True):
    return faster_diffusion.enable(pipe, key_steps="uniform:3", parallel=parallel, noise_injection=0.003)


def references(pipe, tomesd):
    """Outputs of stock, ToMe alone and faster-diffusion alone."""
    stock = sample(pipe)
    tomesd.apply_patch(pipe, ratio=0.5)
    tome = sample(pipe)
    tomesd.remove_patch(pipe)
    enable_fd(pipe)
    fd = sample(pipe)
    faster_diffusion.disable(pipe)
    assert torch.equal(sample(pipe), stock)
    return stock, tome, fd


# -- ToMe ---------------------------------------------------------------------------------------------------------


def test_tome_changes_the_output_and_is_reproducible_when_reseeded(pipe, tomesd):
    stock = sample(pipe)
    tomesd.apply_patch(pipe, ratio=0.5)
    tome = sample(pipe)
    assert difference(tome, stock) > 1e-3  # it merges tokens at this size
    assert torch.equal(sample(pipe), tome)
    tomesd.remove_patch(pipe)
    assert torch.equal(sample(pipe), stock)


@pytest.mark.parametrize("first", ["tome", "faster_diffusion"])
@pytest.mark.parametrize("removed_first", ["tome", "faster_diffusion"])
def test_faster_diffusion_composes_with_tome(pipe, tomesd, first, removed_first):
    stock, tome, fd = references(pipe, tomesd)
    if first == "tome":
        tomesd.apply_patch(pipe, ratio=0.5)
        accel = enable_fd(pipe)
    else:
        accel = enable_fd(pipe)
        tomesd.apply_patch(pipe, ratio=0.5)
    both = sample(pipe)
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"], accel.stats["unet_calls"]) == (4, 12, 4)
    assert difference(both, tome) > 1e-3 and difference(both, fd) > 1e-3  # both are active

    if removed_first == "faster_diffusion":
        faster_diffusion.disable(pipe)
        assert torch.equal(sample(pipe), tome)
        tomesd.remove_patch(pipe)
    else:
        tomesd.remove_patch(pipe)
        assert torch.equal(sample(pipe), fd)
        faster_diffusion.disable(pipe)
    assert torch.equal(sample(pipe), stock)


def test_order_of_enabling_does_not_matter(pipe, tomesd):
    tomesd.apply_patch(pipe, ratio=0.5)
    enable_fd(pipe)
    tome_first = sample(pipe)
    faster_diffusion.disable(pipe)
    tomesd.remove_patch(pipe)
    enable_fd(pipe)
    tomesd.apply_patch(pipe, ratio=0.5)
    assert torch.equal(sample(pipe), tome_first)


def test_faster_diffusion_disable_leaves_tome_patch_intact(pipe, tomesd):
    tomesd.apply_patch(pipe, ratio=0.5)
    attributes = {n: (type(m), set(m.__dict__)) for n, m in pipe.unet.named_modules()}
    enable_fd(pipe)
    faster_diffusion.disable(pipe)
    assert {n: (type(m), set(m.__dict__)) for n, m in pipe.unet.named_modules()} == attributes


def test_parallel_equals_sequential_under_deterministic_tome(pipe, tomesd):
    # With use_rand=False ToMe's partition is fixed, and batching the decoders changes nothing but rounding.
    # (With tomesd's default use_rand=True, one random partition is drawn per UNet call, so a parallel group's
    # steps share one draw: parallel and sequential then differ slightly.)
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    faster_diffusion.enable(pipe, key_steps="paper", parallel=False)
    sequential = sample(pipe, steps=20)
    faster_diffusion.enable(pipe, key_steps="paper", parallel=True)
    assert difference(sample(pipe, steps=20), sequential) <= 1e-5


# -- DeepCache ------------------------------------------------------------------------------------------------------


def deepcache_helper(pipe, deepcache, interval=2):
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


def test_sequential_faster_diffusion_under_deepcache(pipe, deepcache):
    """The one working composition: sequential faster-diffusion enabled first, DeepCache disabled first."""
    stock = sample(pipe)
    enable_fd(pipe, parallel=False)
    fd = sample(pipe)
    helper = deepcache_helper(pipe, deepcache)
    both = sample(pipe)
    assert difference(both, fd) > 1e-3
    helper.disable()
    assert torch.equal(sample(pipe), fd)
    faster_diffusion.disable(pipe)
    assert torch.equal(sample(pipe), stock)


def test_parallel_faster_diffusion_breaks_deepcache(pipe, deepcache):
    """Why bench/peers.py refuses fd:SPEC+deepcache:N: the paper schedule's groups differ in size, and DeepCache
    replays up-block outputs cached at another batch size."""
    stock = sample(pipe)
    faster_diffusion.enable(pipe, key_steps="paper", parallel=True)
    helper = deepcache_helper(pipe, deepcache)
    try:
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            sample(pipe, steps=20)
    finally:
        helper.disable()
        faster_diffusion.disable(pipe)
    assert torch.equal(sample(pipe), stock)


# -- the benchmarks -------------------------------------------------------------------------------------------------


def test_bench_method_names():
    import peers

    m = peers.parse_method("fd:auto:9+tome:0.5")
    assert [p.kind for p in m.parts] == ["fd", "tome"] and m.parts[0].param == "auto:9" and m.parts[1].ratio == 0.5
    assert m.family == "faster-diffusion + ToMe"
    assert peers.parse_method("fd-seq:paper+deepcache:3").family == "faster-diffusion (sequential) + DeepCache"
    plan = peers.parse_method("plan:auto:2.5")
    assert [p.kind for p in plan.parts] == ["plan"] and plan.parts[0].auto and plan.family == "planner"
    assert plan.label == "planner auto:2.5"
    explicit = peers.parse_method("plan:FDDE")
    assert not explicit.parts[0].auto and explicit.family == "plan (explicit)"
    assert peers.parse_method("plan:auto+tome:0.5").family == "planner + ToMe"
    for bad in ("fd:paper+deepcache:2", "deepcache:2+fd-seq:paper", "tome:1.5", "fd:sometimes", "ddpm:3", "tome:0.3+tome:0.5",
                "plan:auto:0.5", "plan:auto:x", "plan:DFF", "plan:FXQ", "plan:auto+deepcache:3", "plan:auto+fd:paper", "plan:"):
        with pytest.raises(ValueError):
            peers.parse_method(bad)


def test_peers_bench_runs(tmp_path, model_dir):
    pytest.importorskip("skimage")
    import peers

    out = tmp_path / "peers"
    methods = "stock,deepcache:2,tome:0.5,fd:uniform:2,fd:uniform:2+tome:0.5"
    assert peers.main(["--model", str(model_dir), "--num-prompts", "2", "--repeats", "2", "--warmup", "0", "--steps", "4",
                       "--threads", "1", "--methods", methods, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").is_file()
    rows = {r["method"]: r for r in result["methods"]}
    have = {"deepcache": _importable("DeepCache"), "tome": _importable("tomesd")}
    expected = [m for m in methods.split(",") if all(have.get(p.split(":")[0], True) for p in m.split("+"))]
    assert list(rows) == expected
    assert len(result["notes"]) == len(methods.split(",")) - len(expected)
    assert rows["stock"]["psnr"] == "inf" and rows["stock"]["speedup_vs_stock"] == 1.0
    assert result["decode_check_max_abs_diff"] == 0.0
    for r in rows.values():
        assert len(r["seconds"]) == 4 and r["repeat_max_abs_diff"] == 0.0  # 2 prompts x 2 repeats, reproducible
        assert set(r["adherence"]) == {"colour", "shape", "position", "all"}
    assert rows["fd:uniform:2"]["stats"]["encoder_passes"] == 2
    if "deepcache:2" in rows:
        assert rows["deepcache:2"]["stats"]["full_unet_steps"] == 2
        assert rows["deepcache:2"]["psnr"] != "inf"


def test_peers_bench_planner_batch_and_flops(tmp_path, model_dir, deepcache):
    """plan:SPEC next to DeepCache at batch 2, with FLOPs: a plan of DeepCache's own steps (full, then deep) is
    DeepCache's branch 0, so it draws the same images with the same FLOPs; plan:auto on a run the model ships no
    calibration for (4 steps) gets one fitted before the warm-up, and reports its predicted speed-up."""
    pytest.importorskip("skimage")
    import peers

    out = tmp_path / "planner"
    methods = "stock,deepcache:2,plan:FDFD,fd:uniform:2,plan:auto:1.5"
    assert peers.main(["--model", str(model_dir), "--num-prompts", "2", "--repeats", "2", "--warmup", "1", "--steps", "4",
                       "--batch", "2", "--calibration-prompts", "1", "--threads", "1", "--methods", methods,
                       "--out", str(out), "--plot", str(tmp_path / "frontier.png")]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert (result["batch"], result["images"], result["sampler"]) == (2, 4, "DDIM")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert result["plan_calibration"]["fitted"] and result["plan_calibration"]["validated_plan"].startswith("F")
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == methods.split(",")
    stock = rows["stock"]
    assert stock["flop_speedup_vs_stock"] == 1.0 and stock["gflops_per_image"] > stock["gflops_per_image_loop"] > 0
    for r in rows.values():
        # the planner re-plans every call (its step overhead is learned from each call's time): reproducible
        # when the plan did not change
        assert len(r["seconds"]) == 4 and (r["repeat_max_abs_diff"] == 0.0 or len(r.get("plans") or {}) > 1)
        assert r["median_s_per_image"] == pytest.approx(r["median_s_per_call"] / 2)
    # DeepCache interval 2 and the plan FDFD: the same arithmetic and the same images
    assert rows["plan:FDFD"]["gflops_per_image"] == pytest.approx(rows["deepcache:2"]["gflops_per_image"], rel=1e-9)
    assert rows["plan:FDFD"]["psnr"] == pytest.approx(rows["deepcache:2"]["psnr"], abs=0.05)
    assert rows["plan:FDFD"]["plans"] == {"FDFD": 4}
    # encoder propagation skips the encoder only; the deep level skips far more
    assert 1 < rows["fd:uniform:2"]["flop_speedup_vs_stock"] < rows["deepcache:2"]["flop_speedup_vs_stock"]
    auto = rows["plan:auto:1.5"]
    assert auto["predicted_speedup"] >= 1.5 and auto["predicted_over_measured"] > 0
    assert sum(auto["plans"].values()) == 4 and all(len(p) == 4 and p[0] == "F" for p in auto["plans"])
    assert auto["stats"]["unet_flops"] < auto["stats"]["stock_unet_flops"]
    assert "Plans of the timed calls" in out.with_suffix(".md").read_text()


def test_peers_bench_sampler_from_the_table(tmp_path, model_dir):
    pytest.importorskip("skimage")
    import peers

    out = tmp_path / "dpm"
    assert peers.main(["--model", str(model_dir), "--num-prompts", "1", "--repeats", "1", "--warmup", "0", "--steps", "3",
                       "--sampler", "dpmpp", "--no-flops", "--methods", "stock,plan:FSE", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert (result["sampler"], result["sampler_name"]) == ("DPM-Solver++", "DPMSolverMultistep")
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["plan:FSE"]["stats"]["plan"] == "FSE" and "gflops_per_image" not in rows["plan:FSE"]
    with pytest.raises(SystemExit):
        peers.main(["--sampler", "ddpm-nonesuch", "--out", str(tmp_path / "x")])


def test_flops_peers_toy(tmp_path):
    pytest.importorskip("tomesd")
    pytest.importorskip("DeepCache")
    import flops_peers

    out = tmp_path / "flops_peers.json"
    assert flops_peers.main(["--model", "toy", "--resolution", "64", "--device", "cpu", "--sampler", "ddim:10", "--methods",
                             "stock,deepcache:3,tome:0.5,fd:paper,fd:paper+tome:0.5", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    stock = rows["stock"]["gflops_per_image"]
    forward = stock / 10
    dc = rows["deepcache:3"]
    assert (dc["full_unet_steps"], dc["partial_unet_steps"]) == (math.ceil(10 / 3), 10 - math.ceil(10 / 3))
    # full steps cost a stock forward, partial steps what the helper leaves running
    assert dc["gflops_per_image"] == pytest.approx(4 * forward + 6 * dc["partial_step_flops"] / 1e9, rel=1e-9)
    assert 0 < dc["partial_step_flops"] / 1e9 < 0.2 * forward
    assert stock > dc["deepcache_sd_pipeline"]["gflops_per_image"] > dc["gflops_per_image"]
    assert rows["tome:0.5"]["gflops_per_image"] < stock
    assert rows["fd:paper"]["encoder_passes"] == len(faster_diffusion.key_step_indices("paper", 10))
    assert rows["fd:paper+tome:0.5"]["gflops_per_image"] < rows["fd:paper"]["gflops_per_image"] < stock


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
