"""The weights' safety checker in the service: on by default, flagged images dropped, all flagged is an
error, ``disable_safety_checker`` turns it off. Tiny checkers saved into a copy of the test model:
``StableDiffusionSafetyChecker`` flags an image when a concept's cosine similarity exceeds its weight,
so weights of -2 flag every image and weights of 2 none."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PROMPT
from service.safety import SafetyCheckerError, kept_images


def with_checker(model_dir, dest, concept_weight: float):
    """A copy of ``model_dir`` whose model_index.json ships a tiny safety checker and feature extractor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(model_dir, dest)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 4},
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(concept_weight)
        checker.special_care_embeds_weights.fill_(2.0)  # no "special care" adjustment
    checker.save_pretrained(dest / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dest / "feature_extractor")
    index = json.loads((dest / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)  # fmt: skip
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    return dest


@pytest.fixture(scope="module")
def checked_models(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("checked")
    return {"all": with_checker(model_dir, root / "flags-all", -2.0), "none": with_checker(model_dir, root / "flags-none", 2.0)}


def predictor_for(weights, monkeypatch):
    from predict import Predictor

    monkeypatch.setenv("COG_WEIGHTS", str(weights))
    predictor = Predictor()
    predictor.setup()
    return predictor


def predict(predictor, **inputs):
    """predictor.run with the schema's defaults for the inputs not given."""
    import inspect

    defaults = {name: p.default.default for name, p in inspect.signature(predictor.run).parameters.items()}
    return [np.asarray(Image.open(path)) for path in predictor.run(**{**defaults, **inputs})]


SMALL = dict(prompt=PROMPT, num_inference_steps=4, seed=3, key_steps="all")


def test_a_checker_that_flags_everything_fails_the_prediction(checked_models, monkeypatch, capsys):
    predictor = predictor_for(checked_models["all"], monkeypatch)
    assert "safety checker on by default" in capsys.readouterr().out
    for num_outputs in (1, 2):
        with pytest.raises(SafetyCheckerError, match=r"^the safety checker flagged .* as NSFW, so nothing is returned"):
            predict(predictor, num_outputs=num_outputs, **SMALL)
    # turned off: the images come back, as the model drew them (not blacked out)
    images = predict(predictor, num_outputs=2, disable_safety_checker=True, **SMALL)
    assert len(images) == 2 and all(image.max() > 0 for image in images)
    assert predictor.pipe.safety_checker is not None  # back on for the next prediction
    with pytest.raises(SafetyCheckerError):
        predict(predictor, **SMALL)


def test_a_checker_that_flags_nothing_returns_every_image(checked_models, monkeypatch):
    predictor = predictor_for(checked_models["none"], monkeypatch)
    checked = predict(predictor, num_outputs=2, **SMALL)
    unchecked = predict(predictor, num_outputs=2, disable_safety_checker=True, **SMALL)
    assert len(checked) == 2 and all(np.array_equal(a, b) for a, b in zip(checked, unchecked))
    # img2img and inpainting share the checker
    source = Image.fromarray(checked[0]).convert("RGB")
    path = checked_models["none"] / "source.png"
    source.save(path)
    assert len(predict(predictor, image=path, **SMALL)) == 1


def test_weights_without_a_checker_load_none(model_dir, monkeypatch):
    index = json.loads((model_dir / "model_index.json").read_text())
    if index.get("safety_checker", [None, None])[1] is not None:
        pytest.skip("the test model ships a checker")
    predictor = predictor_for(model_dir, monkeypatch)
    assert predictor.pipe.safety_checker is None


def test_flagged_images_are_dropped_and_the_rest_kept():
    assert kept_images(["a", "b", "c"], [True, False, True]) == ["b"]
    assert kept_images(["a", "b"], None) == ["a", "b"]  # no checker ran
    with pytest.raises(SafetyCheckerError, match="flagged all 2 images"):
        kept_images(["a", "b"], [True, True])
