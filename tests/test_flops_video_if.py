"""bench/flops_video_if.py at toy size on CPU: IF stages I/II, the 3D UNet and the motion UNet are
counted through the engine, and the measured FLOPs equal the prediction from one forward's split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import flops_video_if  # noqa: E402

IF_BLOCKS = dict(
    block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=32, encoder_hid_dim=24, attention_head_dim=8,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"], mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], addition_embed_type="text",
    addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
)
TOYS = {
    "if_i": dict(kind="unet2d", config=dict(IF_BLOCKS, layers_per_block=1, in_channels=3, out_channels=6), resolution=16, vae_scale=1),
    "if_ii": dict(kind="unet2d", config=dict(IF_BLOCKS, layers_per_block=[1, 2], in_channels=6, out_channels=6,
                                             class_embed_type="timestep", time_embedding_dim=32), resolution=16, vae_scale=1),
    "t2v": dict(kind="unet3d", config=dict(
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32], norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=4, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"]), resolution=64, frames=3),
    "animatediff": dict(kind="motion", config=dict(common.TOY_UNET), resolution=64, frames=3, adapter=dict(
        block_out_channels=[32, 64, 64], motion_layers_per_block=1, motion_norm_num_groups=16,
        motion_num_attention_heads=2, motion_max_seq_length=8)),
}


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_counts_match_the_encoder_split(name):
    toy = TOYS[name]
    unet = flops_video_if.build_unet(toy["kind"], toy["config"], toy.get("adapter"), device="cpu")
    rows = flops_video_if.count_model(name, unet, toy["resolution"], toy.get("frames"), toy.get("vae_scale", 8),
                                      schedules=("paper", "uniform:5"), steps=20)
    assert [r["schedule"] for r in rows] == ["paper", "uniform:5"]
    for r in rows:
        stats = r["engine_stats"]
        assert stats["encoder_passes"] == len(r["key_steps"]) == stats["unet_calls"]
        assert stats["decoder_passes"] == 20
        assert 0 < r["faster_gflops_per_sample"] < r["stock_gflops_per_sample"]
        assert r["reduction"] == pytest.approx(r["predicted_reduction"], rel=1e-9)
        assert r["cut"] == pytest.approx(1 / (1 - r["reduction"]))
    assert rows[0]["unet_rows_per_step"] == 2 * (toy.get("frames") or 1)
    table = flops_video_if.table(rows)
    assert table.count("\n") == 1 + 3 and "stock (DDIM-50)" in table


def test_full_size_configs_build_on_meta():
    """The saved configs build (no weights) with the expected classes and input widths."""
    built = {name: flops_video_if.build_unet(m["kind"], m["config"], m.get("adapter")) for name, m in flops_video_if.MODELS.items()}
    assert {n: type(u).__name__ for n, u in built.items()} == {
        "if_i_xl": "UNet2DConditionModel", "if_ii_l": "UNet2DConditionModel",
        "ms_t2v": "UNet3DConditionModel", "animatediff": "UNetMotionModel",
    }
    assert built["if_ii_l"].config.in_channels == 6 and built["if_ii_l"].config.class_embed_type == "timestep"
    assert sum(p.numel() for p in built["animatediff"].parameters()) == 859_520_964 + 453_209_280  # SD1.5 UNet + adapter
