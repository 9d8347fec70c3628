"""The weights' safety checker: run by default where the weights ship one, off with ``disable_safety_checker``.

``service.weights.load_pipeline`` loads the checker (and its feature extractor) when the model's
``model_index.json`` names one (SD1.5 does); the pipeline's own code runs it on the decoded images
and reports ``nsfw_content_detected``. ``kept_images`` then drops the flagged images; when every
image is flagged the prediction fails with ``SafetyCheckerError``.
"""

from __future__ import annotations

import contextlib


class SafetyCheckerError(RuntimeError):
    """Every image of a prediction was flagged by the safety checker."""


def has_checker(pipe) -> bool:
    return getattr(pipe, "safety_checker", None) is not None


@contextlib.contextmanager
def checker_disabled(pipe, disabled: bool):
    """``pipe`` without its safety checker inside the block when ``disabled``; as it was afterwards."""
    checker = getattr(pipe, "safety_checker", None)
    if not disabled or checker is None:
        yield pipe
        return
    pipe.safety_checker = None
    try:
        yield pipe
    finally:
        pipe.safety_checker = checker


def kept_images(images: list, flags) -> list:
    """``images`` without those the checker flagged (``flags``: the pipeline output's
    ``nsfw_content_detected``, None when no checker ran); SafetyCheckerError if all were flagged."""
    if flags is None:
        return list(images)
    kept = [image for image, flagged in zip(images, flags) if not flagged]
    if not kept:
        raise SafetyCheckerError(
            f"the safety checker flagged {'the image' if len(images) == 1 else f'all {len(images)} images'} of this "
            "prediction as NSFW, so nothing is returned; try another prompt or seed"
        )
    return kept
