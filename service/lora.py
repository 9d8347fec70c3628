"""The service's ``lora_weights`` input: where a LoRA file comes from.

Any HTTP client sets ``lora_weights``, so the server reads only what its operator opened to them:

* an ``http(s)://`` URL of a ``.safetensors`` file, fetched by ``service.fetch``'s rules (public
  addresses only, unless ``FASTER_DIFFUSION_ALLOW_HOSTS`` lists the host; every redirect checked), at
  most ``FASTER_DIFFUSION_LORA_MAX_MB`` (default 1024: SD1.5 LoRAs are mostly under 150 MB, SDXL ones
  approach 1 GB) in at most ``FASTER_DIFFUSION_LORA_TIMEOUT_S`` seconds (default 300). It is
  downloaded once per distinct URL into ``<cache_dir()>/lora/`` (``service.cache.cache_dir``) and
  reused; that folder is kept within ``FASTER_DIFFUSION_LORA_CACHE_MAX_MB`` (default 4096), least
  recently used out first. A failed download leaves nothing behind;
* a local path or ``file://`` URL only when the operator sets ``FASTER_DIFFUSION_LORA_DIR``, and only
  if it resolves (``..`` and symlinks followed) inside that directory: a ``.safetensors`` file, or a
  directory holding exactly one. A relative path is taken inside it. Any other path gets ``REFUSED``,
  the same words whether the file exists or not, so a client cannot map the server's files.

The file is checked to be a readable safetensors file here; ``applied_lora`` loads it with
``pipe.load_lora_weights`` (diffusers or kohya format) for one prediction and unloads it
afterwards, whatever happens.

Every failure is a ``ValueError`` whose message starts with ``lora_weights:``, so the prediction
fails before sampling and names the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .cache import cache_dir, env_number, trim_folder
from .fetch import FetchError, Limits, fetch

FIELD = "lora_weights"
LORA_DIR = "FASTER_DIFFUSION_LORA_DIR"
MAX_MB, DEFAULT_MAX_MB = "FASTER_DIFFUSION_LORA_MAX_MB", 1024
TIMEOUT_S, DEFAULT_TIMEOUT_S = "FASTER_DIFFUSION_LORA_TIMEOUT_S", 300
CACHE_MAX_MB, DEFAULT_CACHE_MAX_MB = "FASTER_DIFFUSION_LORA_CACHE_MAX_MB", 4096
STAGING = ".download-"  # a download in progress; one a killed worker left is removed after the time limit


def _error(source: str, reason: str) -> ValueError:
    return ValueError(f"{FIELD}: {source!r}: {reason}")


def refused() -> ValueError:
    """The one answer for every local path the server does not serve, whether the file exists or not."""
    where = f" or files in its {LORA_DIR}" if os.environ.get(LORA_DIR) else ""
    return ValueError(f"{FIELD}: this server takes only http:// or https:// URLs{where}")


def resolve_lora(source: str, dest_root: Path | None = None) -> Path:
    """The local .safetensors file for ``source`` (downloaded and cached once for a URL)."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme in ("http", "https"):
        path = fetch_lora(source, dest_root)
    elif parts.scheme == "file" and parts.netloc in ("", "localhost"):
        path = local_lora(urllib.request.url2pathname(parts.path), source)
    elif parts.scheme:
        raise refused()
    else:
        path = local_lora(source, source)
    check_safetensors(path, source)
    return path


def local_lora(path: str, source: str) -> Path:
    """The file ``path`` names inside FASTER_DIFFUSION_LORA_DIR, after ``..`` and symlinks are resolved."""
    if not os.environ.get(LORA_DIR) or "\0" in path:
        raise refused()
    root = Path(os.environ[LORA_DIR]).resolve()
    found = (root / path).resolve()  # an absolute path replaces root
    if not found.is_relative_to(root):
        raise refused()
    if not found.exists():
        raise _error(source, f"no such file in {LORA_DIR}")
    if found.is_dir():
        files = sorted(p.resolve() for p in found.glob("*.safetensors"))
        if len(files) != 1:
            raise _error(source, f"a directory with {len(files)} .safetensors files; give the file itself")
        if not files[0].is_relative_to(root):  # a symlink out of the directory
            raise refused()
        found = files[0]
    return found


def lora_limits() -> Limits:
    return Limits(int(env_number(MAX_MB, DEFAULT_MAX_MB) * 2**20), env_number(TIMEOUT_S, DEFAULT_TIMEOUT_S), MAX_MB, TIMEOUT_S)


def fetch_lora(url: str, dest_root: Path | None = None) -> Path:
    """Downloads the file at ``url`` once into the cache; later calls return the cached copy (and mark it used)."""
    dest_root = (Path(dest_root) if dest_root is not None else cache_dir()) / "lora"
    dest = dest_root / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors"
    if dest.is_file():
        os.utime(dest)  # the cache drops the least recently used first
        return dest
    limits = lora_limits()
    dest_root.mkdir(parents=True, exist_ok=True)
    for stale in dest_root.glob(f"{STAGING}*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < time.time() - limits.seconds - 60:
                stale.unlink()
    fd, staging = tempfile.mkstemp(prefix=STAGING, dir=dest_root)
    try:
        with open(fd, "wb") as out:
            try:
                fetch(url, out, limits)
            except FetchError as err:
                raise _error(url, str(err)) from None
        check_safetensors(Path(staging), url)  # a bad download is not cached
        Path(staging).rename(dest)
    finally:
        Path(staging).unlink(missing_ok=True)
    trim_folder(dest_root, "*.safetensors", int(env_number(CACHE_MAX_MB, DEFAULT_CACHE_MAX_MB) * 2**20), keep=dest)
    return dest


def check_safetensors(path: Path, source: str) -> None:
    """Raises the ``lora_weights`` error unless ``path`` is a readable safetensors file with tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
        raise _error(source, f"not a safetensors file ({type(err).__name__}: {err})") from None
    if not keys:
        raise _error(source, "the safetensors file holds no tensors")


ADAPTER = "request_lora"  # the adapter name of a prediction's lora_weights, unloaded after it


@contextlib.contextmanager
def applied_lora(pipe, lora_file: Path | None, source: str, scale: float):
    """``pipe`` (and the pipelines sharing its UNet and text encoder) with ``lora_file`` loaded at
    ``scale`` inside the block, the base weights again after it (also on error); a no-op for None.
    A file diffusers cannot apply raises the ``lora_weights`` ValueError with nothing left loaded."""
    if lora_file is None:
        yield pipe
        return
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    except Exception as err:
        pipe.unload_lora_weights()
        raise _error(source, f"not a LoRA this {type(pipe).__name__} can load ({type(err).__name__}: {err})") from None
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()
