"""Atomic, crash-safe file writes and stable hashing.

Every result file the project writes (manifests, stats, exports, checkpoints) goes through
these helpers, so a crash leaves either the old file or the new one, never a torn one: the
bytes are written to a temporary file in the same folder, flushed and fsync'ed, then moved over
the target with ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it over ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``target`` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash a JSON-serialisable object independently of dict key order."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def git_revision(path: str | os.PathLike[str] | None = None) -> str:
    """The git commit of the checkout holding ``path`` (default: this package), or ``"unknown"``.

    A ``-dirty`` suffix marks uncommitted changes, so a result can always be traced to code.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def load_weights_file(path: str | os.PathLike[str], *, default_file: str, what: str,
                      error: type[Exception]) -> tuple[Path, Any]:
    """``torch.load`` a file of tensors and plain data (``weights_only=True``), on the CPU.

    Args:
        path: the file, or a folder holding ``default_file`` (a run folder, a Tune checkpoint).
        default_file: the file name looked for inside a folder.
        what: what the file is, for the messages (e.g. "checkpoint", "encoder file").
        error: the exception class raised for a missing or unloadable file.

    Returns:
        The resolved file and what it holds; the caller checks its format marker.

    Raises:
        error: the file is missing, or is not a torch file of tensors and plain data (a tampered
            file with pickled code is refused, not executed).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / default_file
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise error(f"refusing to load {path}: not a valid {what} or it contains objects other than tensors and "
                    f"plain data ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, tampered with or from another config."""


def written_with(state: dict[str, Any], config: Any) -> bool:
    """Whether a checkpoint's config record (``state["config"]``, JSON) is ``config``: compared as
    JSON reads it back, since the record holds lists where the config holds tuples."""
    return json.loads(state["config"]) == json.loads(json.dumps(config.to_dict()))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash leaves the old file or the new one)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
