"""Shared fixtures: the model directory the service tests load.

The bundled ``weights/tiny-shapes`` pipeline when it is present; otherwise a
tiny random-weights StableDiffusionPipeline (``tiny_pipelines.tiny_sd``) saved once
per test session, so the service tests always run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "weights" / "tiny-shapes"


def build_tiny_random_pipeline(path: Path) -> Path:
    """Saves the tests' tiny random-weights StableDiffusionPipeline (16x16 images) under ``path``."""
    from tiny_pipelines import tiny_sd

    tiny_sd().save_pretrained(path)
    return Path(path)


def bundled_model_available() -> bool:
    return (BUNDLED / "model_index.json").is_file()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """$FASTER_DIFFUSION_TEST_WEIGHTS if set, weights/tiny-shapes if committed, else a tiny random pipeline."""
    override = os.environ.get("FASTER_DIFFUSION_TEST_WEIGHTS")
    if override:
        return Path(override)
    if bundled_model_available():
        return BUNDLED
    return build_tiny_random_pipeline(tmp_path_factory.mktemp("tiny-random-sd"))
