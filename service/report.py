"""What a prediction logs about its run: the schedule, where it came from, and the UNet (or transformer) passes."""

from __future__ import annotations

import contextlib


class EncoderCounter:
    """Counts UNet calls and encoder / decoder passes of the stock pipeline (forward hooks on the UNet); of a
    transformer, its calls."""

    def __init__(self, unet):
        self.calls = self.encoder = self.decoder = 0
        self.transformer = not hasattr(unet, "down_blocks")

        def count(attr):
            def hook(module, args):
                setattr(self, attr, getattr(self, attr) + 1)

            return hook

        self._handles = [unet.register_forward_pre_hook(count("calls"))]
        if not self.transformer:
            self._handles += [
                unet.down_blocks[0].register_forward_pre_hook(count("encoder")),
                unet.up_blocks[-1].register_forward_pre_hook(count("decoder")),
            ]

    def remove(self):
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def counted(unet, accel):
    """Yields a counter of the stock run's passes (None when an accelerator counts them itself)."""
    if accel is not None:
        yield None
        return
    counter = EncoderCounter(unet)
    try:
        yield counter
    finally:
        counter.remove()


def passes_line(accel, counter, notes=()) -> str:
    """The log line of a run's schedule and UNet passes (transformers: their calls), with the service's ``notes``
    on what it ran instead of what was asked (a transformer's plan="auto", for now)."""
    noted = "".join(f" ({note})" for note in notes)
    if accel is None:
        if counter.transformer:
            return f"key_steps=all (stock pipeline) transformer_calls={counter.calls}{noted}"
        return (f"key_steps=all (stock pipeline) encoder_passes={counter.encoder} "
                f"decoder_passes={counter.decoder} unet_calls={counter.calls}")  # fmt: skip
    stats = accel.stats
    plan = ""
    if "plan" in stats:
        speed = f" predicted {stats['predicted_speedup']}x" if stats.get("predicted_speedup") else ""
        plan = f"plan={stats['plan']} levels={stats['levels']}{speed} "
    return (
        f"{plan}key_steps={stats['key_steps']} ({len(stats['key_steps'])} of {stats['steps']}) "
        f"schedule_source={stats['schedule_source']!r} "
        f"encoder_passes={stats['encoder_passes']} decoder_passes={stats['decoder_passes']} "
        f"unet_calls={stats['unet_calls']} parallel={stats['parallel']} noise_injection={stats['noise_injection']}{noted}"
    )
