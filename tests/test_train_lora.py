"""script/train-lora at toy size: a few steps on a few renders, saved and loaded back (seconds)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from faster_diffusion.quality import shapes

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("peft")


def load_script():
    loader = importlib.machinery.SourceFileLoader("train_lora", str(ROOT / "script" / "train-lora"))
    spec = importlib.util.spec_from_loader("train_lora", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_orange_renders_and_is_detected_without_touching_the_palette():
    script = load_script()
    image = shapes.render("orange", "triangle", "top", rng=0, extra_colours=script.ORANGE)
    assert shapes.detect(image, extra_colours=script.ORANGE).attributes == ("orange", "triangle", "top")
    assert shapes.detect(image).colour in shapes.COLOURS  # without the extra colour: the nearest palette colour
    assert "orange" not in shapes.COLOURS and len(shapes.all_captions()) == 90
    with pytest.raises(ValueError):
        shapes.render("orange", "triangle", "top")
    caption = script.orange_caption("triangle", "top")
    assert caption == "an orange triangle at the top"


def test_main_trains_saves_and_loads(model_dir, tmp_path):
    script = load_script()
    threads = torch.get_num_threads()
    out = tmp_path / "lora"
    try:
        assert script.main(["--weights", str(model_dir), "--out", str(out), "--steps", "3", "--batch", "4",
                            "--num-images", "16", "--rank", "2", "--log-every", "1", "--guided-weight", "1"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and lora.stat().st_size < 5_000_000
    info = json.loads((out / "training.json").read_text())
    assert info["training"]["steps"] == 3 and np.isfinite(info["training"]["loss_ema"])
    assert info["guided_weight"] == 1 and info["guided_t_max"] == 300
    card = (out / "README.md").read_text()
    assert "script/train-lora --weights" in card and "3 steps" in card

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="orange")
    keys = {k for k in pipe.unet.state_dict() if "lora" in k}
    assert keys and any("to_q" in k for k in keys)
    assert any("lora" in k for k in pipe.text_encoder.state_dict())  # --text-encoder is the default
