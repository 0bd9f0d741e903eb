"""Checkpoints that are never half-written: save to a temporary file beside the target, fsync, rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save ``state`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, expected_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint; with ``expected_config``, refuse one written under another configuration."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: start without --resume, or point to the run's folder")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if expected_config is not None:
        saved = state.get("config")
        diff = sorted(k for k in set(saved or {}) | set(expected_config) if (saved or {}).get(k) != expected_config.get(k))
        if diff:
            details = ", ".join(f"{k}: saved {(saved or {}).get(k)!r} vs now {expected_config.get(k)!r}" for k in diff[:6])
            raise ValueError(f"checkpoint {path} was written by another configuration ({details}); "
                             "resume with the same settings or start a new run folder")
    return state
