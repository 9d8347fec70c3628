"""bench/soak.py's pure parts: the request mix and the percentiles it reports."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import percentile, plan  # noqa: E402

SCHEDULERS = ["DDIM", "UniPC"]


def test_plan_mixes_new_and_repeated_settings_lora_and_img2img():
    requests = plan(400, random.Random(0), SCHEDULERS, range(10, 31), [64, 72, 80], new=0.25, lora=0.25, img2img=0.2)
    settings = [(r["inputs"]["scheduler"], r["inputs"]["num_inference_steps"], r["inputs"]["width"]) for r in requests]
    assert requests[0]["new"]
    for i, (request, setting) in enumerate(zip(requests, settings)):
        assert request["new"] == (setting not in settings[:i])  # new means never sent before
        assert request["inputs"]["width"] == request["inputs"]["height"]
    for kind, fraction in (("new", 0.25), ("lora", 0.25), ("img2img", 0.2)):
        assert abs(sum(r[kind] for r in requests) / len(requests) - fraction) < 0.06
    assert all("orange" in r["inputs"]["prompt"] for r in requests if r["lora"])


def test_plan_is_fixed_by_its_seed():
    make = lambda seed: plan(30, random.Random(seed), SCHEDULERS, range(10, 31), [64, 128], 0.3, 0.3, 0.3)
    assert make(1) == make(1) != make(2)


@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_matches_numpy(q):
    rng = random.Random(3)
    values = [rng.uniform(0, 10) for _ in range(17)] + [0.5, 7.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))
