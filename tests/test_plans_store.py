"""The service keeps the planner's cost models in its cache directory across restarts."""

import json
import logging

import pytest
from tiny_pipelines import tiny_unet

import faster_diffusion
from faster_diffusion.plan import CostModel
from service.plans import CostModelStore

KEY = ((2, 4, 8, 8), "torch.float32", "cpu", True)


def cost_model() -> CostModel:
    return CostModel(full={1: 0.02, 2: 0.03, 4: 0.04, 8: 0.06}, level={"encoder": 0.014, "shallow": 0.009, "deep": 0.003},
                     step_overhead=0.002, call_overhead=0.011, flops={"full": 1e8, "encoder": 7e7, "shallow": 4e7, "deep": 1.4e7},
                     info={"device": "cpu", "sample_shape": list(KEY[0])},
                     flop_curve={level: [1e5, 1e6, 1e3] for level in ("full", "encoder", "shallow", "deep")})


def test_cost_models_survive_a_restart_and_bad_files_are_skipped(caplog):
    unet = tiny_unet()
    store = CostModelStore(unet, "weights-a", "cpu")
    assert store.models is faster_diffusion.cost_models(unet) and store.models == {}
    store.models[KEY] = cost_model()
    store.save_new()
    (store.cache.folder / "junk.json").write_text("{not json")
    unkeyed = {"key": [list(KEY[0]), *KEY[1:3]], "model": cost_model().to_dict()}  # keyed before `guided`
    (store.cache.folder / "unkeyed.json").write_text(json.dumps(unkeyed))
    uncurved = {"key": [[2, 4, 16, 16], *KEY[1:]], "model": {**cost_model().to_dict(), "flop_curve": {}}}  # nothing to predict from
    store.cache.put("uncurved", uncurved)
    restarted = tiny_unet()  # a new process: a new UNet object, an empty dictionary
    with caplog.at_level(logging.WARNING):
        loaded = CostModelStore(restarted, "weights-a", "cpu").models
    assert loaded[KEY] == cost_model() and faster_diffusion.cost_models(restarted) is loaded
    assert loaded.keys() == {KEY}
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "junk.json" in warnings and "unkeyed.json" in warnings and "uncurved.json: not a cost model ('flop_curve (measured before" in warnings
    assert CostModelStore(tiny_unet(), "weights-b", "cpu").models == {}  # other weights: their own


def test_cost_model_round_trip():
    assert CostModel.from_dict(cost_model().to_dict()) == cost_model()
    with pytest.raises(KeyError):
        CostModel.from_dict({"level": {}})
    older = cost_model().to_dict()
    del older["call_overhead"]  # measured before speed-ups were of the whole call: measured again, not reused
    with pytest.raises(KeyError, match="call_overhead"):
        CostModel.from_dict(older)


def test_a_cost_model_measured_again_is_saved_again():
    """A run measures again a cached model that lacks a level it can take (one cached before the level existed);
    the store writes the new one over the old."""
    store = CostModelStore(tiny_unet(), "weights-c", "cpu")
    store.models[KEY] = cost_model()
    store.save_new()
    again = cost_model()
    again.level["deep_forecast"] = 0.003
    store.models[KEY] = again
    store.save_new()
    assert CostModelStore(tiny_unet(), "weights-c", "cpu").models[KEY] == again
