"""The service's ``lora_weights`` input: where a LoRA file comes from.

A source is a local path (a ``.safetensors`` file, or a directory holding exactly one) or an
``http(s)://`` / ``file://`` URL of a ``.safetensors`` file. A URL is downloaded once per
distinct URL into ``<cache_dir()>/lora/`` (``service.cache.cache_dir``) and reused by later
predictions. The file is checked to be a readable safetensors file here; ``applied_lora`` loads
it with ``pipe.load_lora_weights`` (diffusers or kohya format) for one prediction and unloads it
afterwards, whatever happens.

Every failure is a ``ValueError`` whose message starts with ``lora_weights:``, so the prediction
fails before sampling and names the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import urllib.parse
from pathlib import Path

from .cache import cache_dir
from .weights import URL_SCHEMES, download

FIELD = "lora_weights"


def _error(source: str, reason: str) -> ValueError:
    return ValueError(f"{FIELD}: {source!r}: {reason}")


def resolve_lora(source: str, dest_root: Path | None = None) -> Path:
    """The local .safetensors file for ``source`` (downloaded and cached once for a URL)."""
    if urllib.parse.urlparse(source).scheme in URL_SCHEMES:
        path = fetch_lora(source, dest_root)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise _error(source, "no such file")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise _error(source, f"a directory with {len(files)} .safetensors files; give the file itself")
            path = files[0]
    check_safetensors(path, source)
    return path


def fetch_lora(url: str, dest_root: Path | None = None) -> Path:
    """Downloads the file at ``url`` once into the cache; later calls return the cached copy."""
    dest_root = (Path(dest_root) if dest_root is not None else cache_dir()) / "lora"
    dest = dest_root / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors"
    if dest.is_file():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".download-", dir=dest_root)
    try:
        try:
            download(url, fd)
        except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
            raise _error(url, f"download failed: {err}") from None
        check_safetensors(Path(staging), url)  # a bad download is not cached
        Path(staging).rename(dest)
    finally:
        Path(staging).unlink(missing_ok=True)
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
