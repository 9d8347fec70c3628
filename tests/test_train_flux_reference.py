"""script/train-flux-reference: its T5 tokenizer, a smoke run that makes a loadable FluxPipeline folder
(and resumes from its checkpoint), and the shipped weights/tiny-shapes-flux at its default call."""

import importlib.util
import json
from importlib.machinery import SourceFileLoader
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "script" / "train-flux-reference"
SHIPPED = ROOT / "weights" / "tiny-shapes-flux"


def load_script():
    loader = SourceFileLoader("train_flux_reference", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def default_call(pipe, prompt, seed=0):
    """The model's documented default sampling call (script/train-flux-reference's STOCK_CALL)."""
    return pipe(prompt, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=28, height=64, width=64,
                max_sequence_length=32, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_t5_tokenizer_has_t5s_special_ids_one_piece_per_caption_word_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tok = load_script().make_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a blue triangle at the top", padding="max_length", max_length=10).input_ids
    assert ids[6:] == [1, 0, 0, 0]  # six words, </s>, padding
    assert tok.unk_token_id not in ids[:6]
    assert tok("").input_ids == [1]  # the empty (negative) prompt is </s> alone
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a red circle on the left").input_ids == tok("a red circle on the left").input_ids


def test_smoke_run_writes_a_flux_pipeline_that_samples_at_the_default_call_and_resumes(tmp_path, monkeypatch, capsys):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = load_script()
    out, work = tmp_path / "flux", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--minutes", "0.03", "--num-images", "64", "--check", "0", "--batch", "8"]
    threads = torch.get_num_threads()
    try:
        assert train.main(argv) == 0
        info = json.loads((out / "training.json").read_text())
        assert info["steps"] >= 1 and info["loss"] > 0
        assert (work / "checkpoint.pt").exists() and (work / "train.log").exists()
        # a second run in the same work dir continues from the checkpoint (its budget is spent: export only)
        capsys.readouterr()
        assert train.main(argv) == 0
        assert "resumed from" in capsys.readouterr().out
        assert json.loads((out / "training.json").read_text())["steps"] == info["steps"]
    finally:
        torch.set_num_threads(threads)

    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae_scale_factor == 8
    pipe.set_progress_bar_config(disable=True)
    image = default_call(pipe, "a red circle on the left")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="weights/tiny-shapes-flux missing")
def test_shipped_model_loads_and_draws_the_caption_at_the_default_call(monkeypatch):
    from diffusers import FluxPipeline

    from faster_diffusion.quality import shapes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = FluxPipeline.from_pretrained(str(SHIPPED), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a blue triangle at the top"
    image = default_call(pipe, prompt)
    assert image.shape == (64, 64, 3)
    found = shapes.detect(image)
    assert (found.colour, found.shape, found.position) == tuple(shapes.parse_caption(prompt))
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 20e6


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="weights/tiny-shapes-flux missing")
def test_quality_harness_takes_the_flux_model(tmp_path):
    from faster_diffusion.quality import evaluate as ev

    assert ev.is_flux(SHIPPED) and not ev.is_flux(ev.DEFAULT_MODEL)
    rc = ev.main(["--model", str(SHIPPED), "--num-prompts", "2", "--seeds", "1", "--settings", "flux-euler,flux-dpm",
                  "--threads", "1", "--out", str(tmp_path / "q")])
    assert rc == 0
    report = json.loads((tmp_path / "q.json").read_text())
    rows = {r["name"]: r for r in report["settings"]}
    assert list(rows) == ["flux-euler", "flux-dpm"] and report["guidance_scale"] == 4.0
    assert rows["flux-euler"]["psnr"] == "inf" and rows["flux-dpm"]["psnr"] > 20
