"""service.memory: freed heap memory goes back to the system after a prediction (glibc's malloc_trim)."""

import platform

import pytest

from service.memory import release_freed_memory


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_returned_to_the_system():
    blocks = [bytearray(64 * 1024 - 64) for _ in range(2000)]  # ~125 MiB of blocks below mmap's threshold
    keep = blocks[-1]  # the top of the heap stays in use: only malloc_trim gives the rest back
    del blocks
    before = rss_kib()
    assert release_freed_memory() is True
    assert rss_kib() < before - 50 * 1024, (before, rss_kib())
    del keep
