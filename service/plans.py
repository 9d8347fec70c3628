"""The planner's cost models, kept in the cache directory: a restarted server plans as before it stopped.

The accelerator measures one cost model per dtype and device, at setup's warm-up (the default request's
batch and size), with the FLOP curve of its levels; a request of another batch or size gets its cost
model predicted from it (``CostModel.predicted``), nothing timed on the request path. The entries are
keyed by the weights (``cache.weights_identity``) and the device (its name and the torch threads), so
another card or CPU measures its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform

import torch

import faster_diffusion
from faster_diffusion.plan import CostModel

from .cache import JsonCache

logger = logging.getLogger("faster_diffusion.service")


def device_identity(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}-{os.cpu_count()}cpu"
    return f"{name}-{torch.get_num_threads()}threads"


class CostModelStore:
    """Loads the cached cost models of ``unet`` at setup; ``save_new`` writes the ones measured since."""

    def __init__(self, unet, weights_identity: str, device: str):
        identity = hashlib.sha256(f"{weights_identity}/{device_identity(device)}".encode()).hexdigest()[:16]
        self.cache = JsonCache("cost-models", identity)
        self.models = faster_diffusion.cost_models(unet)  # the accelerator's own dictionary
        for path, data in self.cache.load_all():
            try:
                shape, dtype, device, guided = data["key"]  # files keyed without `guided` are measured again
                key = (tuple(shape), dtype, device, bool(guided))
                model = CostModel.from_dict(data["model"])
                if not model.flop_curve and "predicted_from" not in model.info:
                    raise KeyError("flop_curve (measured before other shapes were predicted from it)")
                self.models.setdefault(key, model)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                logger.warning("cache: skipping %s: not a cost model (%s)", path, err)
        self.saved = dict(self.models)

    def save_new(self) -> None:
        """Writes the models measured since setup, and those measured again (a cached one lacked a level)."""
        for key, model in list(self.models.items()):
            if self.saved.get(key) is not model:
                name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
                self.cache.put(name, {"key": [list(key[0]), *key[1:]], "model": model.to_dict()})
                self.saved[key] = model
