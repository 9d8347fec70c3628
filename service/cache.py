"""The service's cache directory, and a size-bounded store of JSON entries in it.

Where (``cache_dir``): ``$FASTER_DIFFUSION_CACHE`` if set, else ``$XDG_CACHE_HOME/faster-diffusion``,
else ``~/.cache/faster-diffusion``. Weights and LoRA downloads go under it (``service.weights``,
``service.lora``), and so do the calibrations the server makes (``service.calibrations``).

``JsonCache`` keeps one folder of ``*.json`` entries per weights identity (``weights_identity``:
a hash of the model's configs and of each weight file's size and first and last MiB, so
the same weights copied elsewhere keep their entries and other weights never read them). Its
folder is bounded in bytes (``FASTER_DIFFUSION_CACHE_MAX_MB``, default 64): writing drops the
oldest entries first. A file that cannot be read, is not an entry, or belongs to other weights
is skipped with a log line; reading never fails a prediction.

The ``lora_weights`` downloads in ``<cache>/lora/`` have a bound of their own
(``FASTER_DIFFUSION_LORA_CACHE_MAX_MB``, ``service.lora``), kept by the same ``trim_folder``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("faster_diffusion.service")

DEFAULT_MAX_MB = 64
FORMAT = "faster-diffusion-service-cache/1"
_CHUNK = 1 << 20  # the part of each weight file the identity reads, at each end


def cache_dir() -> Path:
    """$FASTER_DIFFUSION_CACHE, else $XDG_CACHE_HOME/faster-diffusion, else ~/.cache/faster-diffusion."""
    env = os.environ.get("FASTER_DIFFUSION_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "faster-diffusion"


def weights_identity(model_dir) -> str:
    """16 hex digits that change when the weights at ``model_dir`` do (configs, and each weight
    file's name, size, first and last MiB), not when the folder moves or is copied."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in ("calibration",) or rel.endswith(".md") or "/." in f"/{rel}":
            continue  # what describes or accompanies the weights, not the weights
        digest.update(rel.encode() + b"\0")
        if path.suffix == ".json" or path.suffix == ".txt":
            digest.update(path.read_bytes())
            continue
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(_CHUNK))
            if size > 2 * _CHUNK:
                f.seek(-_CHUNK, os.SEEK_END)
                digest.update(f.read(_CHUNK))
    return digest.hexdigest()[:16]


def env_number(name: str, default: float) -> float:
    """The number in environment variable ``name``, else ``default`` (logged when it is not a number)."""
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        logger.warning("%s=%r is not a number; using %g", name, raw, default)
        return default


def max_bytes() -> int:
    return int(env_number("FASTER_DIFFUSION_CACHE_MAX_MB", DEFAULT_MAX_MB) * 2**20)


def trim_folder(folder: Path, pattern: str, limit: int, keep: Path | None = None) -> list[Path]:
    """Removes the oldest files matching ``pattern`` (by modification time) until ``folder`` is within
    ``limit`` bytes; ``keep`` (the file just written) stays whatever its size."""
    files = sorted(Path(folder).glob(pattern), key=_mtime)
    total = sum(_size(p) for p in files)
    dropped = []
    for oldest in files:
        if total <= limit:
            break
        if oldest == keep:
            continue
        total -= _size(oldest)
        oldest.unlink(missing_ok=True)
        dropped.append(oldest)
    if dropped:
        logger.info("cache: dropped %d oldest entries of %s to stay within %d bytes", len(dropped), folder, limit)
    return dropped


class JsonCache:
    """``<root>/<kind>/<identity>/<name>.json``: entries ``{"format", "identity", "kind", "data"}``."""

    def __init__(self, kind: str, identity: str, root: Path | None = None, limit: int | None = None):
        self.kind, self.identity = kind, identity
        self.folder = Path(root if root is not None else cache_dir()) / kind / identity
        self.limit = max_bytes() if limit is None else limit

    def load_all(self) -> list[tuple[Path, dict]]:
        """Every readable entry of this kind and identity, oldest first; the rest skipped with a log line."""
        if not self.folder.is_dir():
            return []
        entries = []
        for path in sorted(self.folder.glob("*.json"), key=_mtime):
            data = self._read(path)
            if data is not None:
                entries.append((path, data))
        return entries

    def load(self, path: Path):
        """The data of the entry at ``path``, or None (logged) when it is not a readable entry of ours."""
        return self._read(Path(path))

    def _read(self, path: Path):
        try:
            entry = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("cache: skipping %s: not readable JSON (%s)", path, err)
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("kind") != self.kind:
            logger.warning("cache: skipping %s: not a %s entry of this service", path, self.kind)
            return None
        if entry.get("identity") != self.identity:
            logger.warning("cache: skipping %s: made for other weights (%s, not %s)", path, entry.get("identity"), self.identity)
            return None
        return entry.get("data")

    def put(self, name: str, data) -> Path | None:
        """Writes entry ``name`` atomically, then drops the oldest entries past the size limit.
        A cache that cannot be written (read-only, full disk) is logged, not raised."""
        path = self.folder / f"{name}.json"
        text = json.dumps({"format": FORMAT, "identity": self.identity, "kind": self.kind, "data": data})
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".write-", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(staging, path)
        except OSError as err:
            logger.warning("cache: could not write %s (%s); the server keeps it in memory only", path, err)
            return None
        self.trim()
        return path

    def trim(self) -> list[Path]:
        """Removes the oldest entries (by modification time) until the folder is within the limit."""
        return trim_folder(self.folder, "*.json", self.limit)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
