"""Key-step schedules: which sampling steps run the UNet encoder.

A schedule is given as a *spec* and resolved against a step count:

- ``"auto"``: calibrated on the model (``faster_diffusion.calibration``): the fewest
  encoder passes whose encoder features stay within a tolerance of the stock run's, or, where
  the calibration was validated on outputs, whose final latents do.
- ``"auto:B"``: calibrated, with exactly ``B`` encoder passes.
- ``"paper"``: the paper's non-uniform schedule (dense early, sparse late).
- ``"all"``: every step is a key step (no acceleration; equals the stock UNet).
- ``"uniform:K"``: every K-th step (0, K, 2K, ...).
- explicit indices: a list of ints or a string such as ``"0,1,2,5,10"``; strictly
  increasing, starting at 0.

This module is the one place where a key step is decided; the calibrated schedules
come from ``Calibration.schedule``.
"""

from __future__ import annotations

from collections.abc import Sequence

# The schedules published with the paper (Li et al. 2023, sec. 4 / their code):
# DDIM-50 and DPM-Solver-20.
PAPER_SCHEDULES = {
    20: (0, 1, 2, 3, 5, 10, 15),
    50: (0, 1, 2, 3, 5, 10, 15, 25, 35),
}
# For other step counts: keep the first DENSE_PREFIX steps (where encoder
# features change fastest), then place the later keys at the same *fractions*
# of the run as the nearest published schedule (20-step table for N <= 35,
# 50-step table above), rounded down.
DENSE_PREFIX = 4

ACCEPTED_FORMS = (
    "'auto', 'auto:B' with an integer budget B >= 1 of encoder passes, "
    "'paper', 'all', 'uniform:K' with an integer K >= 1, or strictly increasing step "
    "indices starting at 0 (a list of ints or a string such as '0,1,2,5,10')"
)


def parse_key_steps(spec) -> str | tuple[int, ...]:
    """Checks the form of a key-step spec without a step count.

    Returns a normalised spec: ``"auto"``, ``"auto:B"``, ``"paper"``, ``"all"``,
    ``"uniform:K"`` or a tuple of indices. Raises ``ValueError`` naming the value and the accepted forms.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("auto", "paper", "all"):
            return text
        for prefix, letter in (("uniform:", "K"), ("auto:", "B")):
            if text.startswith(prefix):
                k = text.split(":", 1)[1].strip()
                if not k.isdigit() or int(k) < 1:
                    raise ValueError(f"key_steps={spec!r}: {letter} must be an integer >= 1; accepted: {ACCEPTED_FORMS}")
                return f"{prefix}{int(k)}"
        parts = [p.strip() for p in text.split(",")]
        if not text or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"key_steps={spec!r} is not a key-step schedule; accepted: {ACCEPTED_FORMS}")
        indices = tuple(int(p) for p in parts)
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        indices = tuple(spec)
    else:
        raise ValueError(f"key_steps={spec!r} is not a key-step schedule; accepted: {ACCEPTED_FORMS}")

    if not indices:
        raise ValueError(f"key_steps={spec!r} is empty; accepted: {ACCEPTED_FORMS}")
    if min(indices) < 0:
        raise ValueError(f"key_steps={spec!r} has a negative index; accepted: {ACCEPTED_FORMS}")
    if indices[0] != 0:
        raise ValueError(f"key_steps={spec!r} must start at 0 (step 0 is always a key step)")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"key_steps={spec!r} must be strictly increasing; accepted: {ACCEPTED_FORMS}")
    return indices


def is_calibrated(spec) -> bool:
    """Whether a (valid) spec is ``"auto"`` or ``"auto:B"``: its steps come from a calibration."""
    spec = parse_key_steps(spec)
    return isinstance(spec, str) and spec.split(":")[0] == "auto"


def auto_budget(spec) -> int | None:
    """B of ``"auto:B"``; None for ``"auto"`` and other specs."""
    spec = parse_key_steps(spec)
    return int(spec.split(":")[1]) if isinstance(spec, str) and spec.startswith("auto:") else None


def check_key_steps(spec, num_steps: int) -> None:
    """Raises ``ValueError`` if ``spec`` cannot give a schedule for ``num_steps`` steps (calibrated or not)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    spec = parse_key_steps(spec)
    if isinstance(spec, tuple) and spec[-1] >= num_steps:
        raise ValueError(
            f"key_steps={list(spec)}: index {spec[-1]} is out of range for {num_steps} steps "
            f"(indices must lie in [0, {num_steps - 1}])"
        )
    if isinstance(spec, str) and spec.startswith("auto:") and int(spec.split(":")[1]) > num_steps:
        raise ValueError(
            f"key_steps={spec!r}: a budget of {spec.split(':')[1]} encoder passes is more than the "
            f"{num_steps} steps of the run (B must lie in [1, {num_steps}])"
        )


def key_step_indices(spec, num_steps: int, calibration=None) -> list[int]:
    """Resolves a key-step spec to sorted step indices for a run of ``num_steps`` steps.

    ``"auto"`` and ``"auto:B"`` need the run's ``calibration`` (a ``Calibration``)."""
    check_key_steps(spec, num_steps)
    spec = parse_key_steps(spec)
    if is_calibrated(spec):
        if calibration is None:
            raise ValueError(f"key_steps={spec!r} needs a calibration (faster_diffusion.calibrate)")
        if calibration.num_steps != num_steps:
            raise ValueError(
                f"key_steps={spec!r}: the calibration is for {calibration.num_steps} steps, the run has {num_steps}"
            )
        return calibration.schedule(budget=auto_budget(spec))
    if spec == "all":
        return list(range(num_steps))
    if spec == "paper":
        return paper_schedule(num_steps)
    if isinstance(spec, str):  # uniform:K
        return list(range(0, num_steps, int(spec.split(":")[1])))
    return list(spec)


def paper_schedule(num_steps: int) -> list[int]:
    if num_steps in PAPER_SCHEDULES:
        return list(PAPER_SCHEDULES[num_steps])
    base = 20 if num_steps <= 35 else 50
    late = [k * num_steps // base for k in PAPER_SCHEDULES[base] if k >= DENSE_PREFIX]
    keys = set(range(min(DENSE_PREFIX, num_steps))) | {k for k in late if k < num_steps}
    return sorted(keys)
