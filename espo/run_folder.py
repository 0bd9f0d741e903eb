"""A run's folder: what it holds, how a new run claims it, and how a resumed run reads its checkpoint.

    DIR/config.json     the run's TrainConfig
    DIR/metrics.jsonl   one JSON record per finished step
    DIR/checkpoint.pt   everything needed to continue after the last finished step (tensors and plain data)

Nothing here replaces a run without being asked (``overwrite``), and a checkpoint is read with
``weights_only=True`` and its configuration checked before any weights are used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import ALGOS, TrainConfig

CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE = "checkpoint.pt", "config.json", "metrics.jsonl"
# What a resumed run may change: where the folder is now, how long the run is, where it runs, its learning rate
# (to recover from a divergence), diagnostics.
RESUMABLE_CHANGES = ("out_dir", "steps", "device", "lr", "eval_every", "check_false_stops", "false_stop_sample")
CHECKPOINT_KEYS = ("config", "step", "history", "model", "value_head", "optimizer", "stopper", "allocator", "warmup")


def read_checkpoint(ckpt_path: Path, expected_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's checkpoint, refused when it was not written by the trainer or (with ``expected_config``) under
    other settings than ``RESUMABLE_CHANGES``."""
    state = load_checkpoint(ckpt_path, expected_config=expected_config, may_differ=RESUMABLE_CHANGES)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}: it was not written by espo's trainer")
    return state


def resume_config(out_dir: str | os.PathLike, **changes: Any) -> TrainConfig:
    """The configuration of the run in ``out_dir`` (read from its checkpoint), with ``changes`` applied.

    ``espo`` in ``changes`` may be a dict of the stop settings to change. The run is resumed from wherever
    the folder is now: ``out_dir`` is set to it.
    """
    saved = dict(read_checkpoint(Path(out_dir) / CHECKPOINT_FILE)["config"])
    saved["espo"] = {**saved.get("espo", {}), **changes.pop("espo", {})}
    return TrainConfig(**{**saved, **changes, "out_dir": str(out_dir)})


def resume_state(cfg: TrainConfig, ckpt_path: Path) -> dict[str, Any]:
    """The checkpoint to continue ``cfg`` from, refused when it was written under other settings."""
    state = read_checkpoint(ckpt_path, expected_config=cfg.to_dict())
    done = int(state["step"]) + 1
    if cfg.steps < done:
        raise ValueError(f"the run in {ckpt_path.parent} has already done {done} steps; resume with steps >= {done}")
    planned = int(state["config"]["steps"])
    if cfg.steps != planned and ALGOS[cfg.algo].allocates:
        raise ValueError(f"{cfg.algo} spreads its rollout budget over the {planned} planned steps, so its run "
                         f"cannot be extended to {cfg.steps}; start a new run folder with the longer plan")
    return state


def claim_run_folder(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a new run: refuse one that holds a run unless ``overwrite``; check it is writable."""
    held = [name for name in (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE) if (out_dir / name).exists()]
    if held and not overwrite:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume, choose "
                         "another --out-dir, or pass --overwrite to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".espo-write-check"
        probe.write_bytes(b"")
        probe.unlink()
        for name in held:
            (out_dir / name).unlink()
    except OSError as err:
        raise ValueError(f"cannot write the run folder {out_dir} ({err.strerror or err}); "
                         "choose a writable --out-dir") from None
