"""A tiny run of the quality harness (faster_diffusion.quality.evaluate) on the bundled model."""

import json
import math

import pytest

from faster_diffusion.quality import evaluate as ev

pytestmark = pytest.mark.skipif(not (ev.DEFAULT_MODEL / "model_index.json").exists(), reason="weights/tiny-shapes missing")


def test_prompt_set_is_fixed():
    a = ev.prompt_set(100, 2)
    assert len(a) == 200 and a == ev.prompt_set(100, 2)
    assert len({p for p, _ in a}) == 90  # every caption appears
    assert len({s for _, s in a}) == 200  # one seed per image


def test_tiny_run_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "quality"
    rc = ev.main(["--num-prompts", "2", "--seeds", "2", "--settings", "ddim,ddim-paper-par",
                  "--ddim-steps", "6", "--out", str(out)])
    assert rc == 0
    report = json.loads((tmp_path / "quality.json").read_text())  # strict JSON: no NaN/Infinity tokens
    for key in ("model", "hardware", "date", "command", "num_images", "guidance_scale", "settings", "total_seconds"):
        assert key in report
    assert report["num_images"] == 4
    rows = {r["name"]: r for r in report["settings"]}
    assert list(rows) == ["ddim", "ddim-paper-par"]
    for r in rows.values():
        for key in ("label", "adherence", "psnr", "ssim", "seconds", "speedup", "stats"):
            assert key in r
        assert set(r["adherence"]) == {"colour", "shape", "position", "all"}
        assert all(0.0 <= v <= 1.0 for v in r["adherence"].values())
        confusion = r["position_confusion"]  # caption position -> detected position counts
        assert sum(sum(row.values()) for row in confusion.values()) == 4
        assert sum(row[want] for want, row in confusion.items()) / 4 == r["adherence"]["position"]
    stock, fast = rows["ddim"], rows["ddim-paper-par"]
    assert stock["psnr"] == "inf" and math.isinf(float(stock["psnr"])) and stock["ssim"] == 1.0
    assert stock["identical_images"] == 4
    assert fast["stats"]["encoder_passes"] < fast["stats"]["steps"] == 6
    assert math.isfinite(float(fast["psnr"])) and float(fast["psnr"]) > 10 and 0.5 < fast["ssim"] <= 1.0  # 12 dB: at 6 steps
    # the one reused step is the last, and this model's last step leans on its encoder features
    md = (tmp_path / "quality.md").read_text()
    assert "| setting |" in md and "DDIM-6 stock" in md and "DDIM-6 paper parallel" in md and "| inf |" in md
    assert "per caption position (rows), DDIM-6 stock:" in md and "| caption | left | right | top | bottom | center | none |" in md
    assert "paper parallel:" not in md  # confusion tables for the stock samplers only


def test_calibrated_settings_and_frontier(tmp_path, monkeypatch):
    """auto, auto:9 (refined) and cost:9 read the shipped DDIM-50 calibration; the frontier plots them."""
    pytest.importorskip("matplotlib")
    from faster_diffusion import Calibration
    from faster_diffusion.quality import figures

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "quality"
    rc = ev.main(["--num-prompts", "1", "--seeds", "1", "--settings", "ddim,ddim-auto,ddim-auto9,ddim-cost9", "--out", str(out)])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "quality.json").read_text())["settings"]}
    shipped = Calibration.load(ev.DEFAULT_MODEL / "calibration" / "DDIM-50steps-8x8.json")
    assert rows["ddim-auto"]["stats"]["key_steps"] == shipped.schedule()
    assert rows["ddim-auto9"]["stats"]["key_steps"] == shipped.refined[9] and rows["ddim-auto9"]["refined"]
    assert rows["ddim-cost9"]["stats"]["key_steps"] == shipped.least_cost_schedule(9) != shipped.refined[9]
    assert "from file" in rows["ddim-auto"]["schedule_source"]
    assert [figures.family(rows[n]) for n in ("ddim", "ddim-auto", "ddim-auto9", "ddim-cost9")] == [
        None, "auto / auto:B", "auto:B refined", "least reuse cost (no refinement)"]  # fmt: skip
    path = figures.frontier(json.loads((tmp_path / "quality.json").read_text()), tmp_path / "frontier.png")
    assert path.stat().st_size > 10_000


def test_other_samplers_are_compared_with_stock_ddim(tmp_path, monkeypatch):
    """Euler and UniPC run on the model's own scheduler config; each stock sampler other than DDIM
    is also compared with stock DDIM on the same seeds (the smoothness figure introduced with the v-prediction model, cee773a)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "quality"
    rc = ev.main(["--num-prompts", "2", "--seeds", "1", "--settings", "ddim,euler,unipc,dpm", "--ddim-steps", "8",
                  "--euler-steps", "8", "--unipc-steps", "6", "--dpm-steps", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = {r["name"]: r for r in report["settings"]}
    assert [rows[n]["label"] for n in ("ddim", "euler", "unipc", "dpm")] == [
        "DDIM-8 stock", "Euler-8 stock", "UniPC-6 stock", "DPM-Solver++-8 stock"]
    assert "psnr_to_ddim" not in rows["ddim"]
    for name in ("euler", "unipc", "dpm"):
        assert 10 < float(rows[name]["psnr_to_ddim"]) < 60 and 0 < rows[name]["ssim_to_ddim"] < 1
    assert float(rows["dpm"]["psnr_to_ddim"]) != float(rows["unipc"]["psnr_to_ddim"])
    md = (tmp_path / "quality.md").read_text()
    assert "Stock samplers against stock DDIM-8" in md and "| UniPC-6 stock |" in md
