"""A run's folder: what it holds, how a new run claims it, and how a resumed run reads its checkpoint.

    DIR/config.json     the run's TrainConfig
    DIR/metrics.jsonl   one JSON record per finished step
    DIR/checkpoint.pt   everything needed to continue after the last finished step (tensors and plain data)

Nothing here replaces a run without being asked (``overwrite``), nor touches a file that is not a run's own;
a run locks its folder for its life (a second run there is refused); a checkpoint is read with
``weights_only=True`` and its configuration checked before any weights are used.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch

from espo.engine.models import check_weight_dtypes

from .checkpoint import RESUME_HINT, check_config, load_checkpoint, write_text_atomic
from .config import ALGOS, TrainConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE = "checkpoint.pt", "config.json", "metrics.jsonl"
RUN_FILES = (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE)
WRITE_CHECK = ".espo-write-check"  # the probe that checks a new run's folder is writable
# What a resumed run may change: where the folder is now, how long the run is, where it runs, its learning rate
# (to recover from a divergence), diagnostics.
RESUMABLE_CHANGES = ("out_dir", "value_head", "steps", "device", "lr", "eval_every", "check_false_stops",
                     "false_stop_sample")
# Settings added after checkpoints were first written, with the value that reproduces the older runs: a checkpoint
# that lacks one is read as holding that value.
SETTINGS_ADDED = {"value_lr": 0.0, "value_head": "none",
                  "espo": {"regret_rule": True, "value_rule": False, "value_stop": 0.05}}
CHECKPOINT_KEYS = ("config", "step", "history", "model", "value_head", "optimizer", "stopper", "allocator", "warmup")


def _model_folder_as_started(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``config`` with a relative ``model`` (saved before models were stored absolute) made absolute from the
    directory the run started in, where the saved ``out_dir`` (relative too) tells it: a run saved as
    ``--model m --out-dir runs/x`` and now in /work/runs/x started in /work."""
    model, out = config.get("model"), config.get("out_dir")
    if not isinstance(model, str) or Path(model).expanduser().is_absolute() or not isinstance(out, str):
        return config
    out_parts, here = Path(out).parts, run_dir.resolve()
    if Path(out).is_absolute() or ".." in out_parts or here.parts[len(here.parts) - len(out_parts):] != out_parts:
        return config
    started_in = Path(*here.parts[:len(here.parts) - len(out_parts)])
    return {**config, "model": str(started_in / model)} if (started_in / model).exists() else config


def _resolved_model(model: Any) -> Any:
    return str(Path(model).expanduser().resolve()) if isinstance(model, str) else model


def _check_weights(ckpt_path: Path, state: dict[str, Any]) -> None:
    """Refuse model or value-head weights of a dtype the trainer never writes (an int8 weight would be cast)."""
    for part in ("model", "value_head"):
        weights = state.get(part)
        if isinstance(weights, dict):
            check_weight_dtypes({f"{part}.{k}": str(v.dtype).removeprefix("torch.") for k, v in weights.items()
                                 if isinstance(v, torch.Tensor)}, f"checkpoint {ckpt_path}")


def read_checkpoint(ckpt_path: Path, expected_config: dict[str, Any] | None = None, *,
                    mmap: bool = False) -> dict[str, Any]:
    """A run's checkpoint, refused when it was not written by the trainer or (with ``expected_config``) under
    other settings than ``RESUMABLE_CHANGES``. The model folder is compared by the folder it names, however
    spelled. ``mmap``: see ``load_checkpoint`` (only for reading the plain data)."""
    state = load_checkpoint(ckpt_path, mmap=mmap)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}: it was not written by espo's trainer")
    if isinstance(state["config"], dict):
        state["config"] = _model_folder_as_started(state["config"], ckpt_path.parent)
    if expected_config is not None:
        check_config(ckpt_path, state["config"], expected_config, may_differ=RESUMABLE_CHANGES,
                     missing_as=SETTINGS_ADDED, compare_as={"model": _resolved_model})
    _check_weights(ckpt_path, state)
    return state


def resume_config(out_dir: str | os.PathLike, **changes: Any) -> TrainConfig:
    """The configuration of the run in ``out_dir`` (read from its checkpoint), with ``changes`` applied.

    ``espo`` in ``changes`` may be a dict of the stop settings to change. The run is resumed from wherever
    the folder is now: ``out_dir`` is set to it.
    """
    saved = dict(read_checkpoint(Path(out_dir) / CHECKPOINT_FILE, mmap=True)["config"])
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


def _is_run_file(name: str) -> bool:
    """A file a run writes: its three files and the temporaries an atomic write leaves when it is killed."""
    if name in RUN_FILES or name == WRITE_CHECK:
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


class RunFolderLock:
    """An OS advisory lock (``flock``) on the run folder itself, held for the run's life: a second run on the
    same folder is refused while the first holds it. The OS drops it when the process ends, however it ends.
    (Where ``fcntl`` is missing, as on Windows, nothing is locked.)"""

    def __init__(self, out_dir: Path):
        self.fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                return  # a file system without advisory locks (some network mounts): the run goes unlocked
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"{out_dir} is in use: another run holds it (its lock); wait for that run to end, "
                             "or choose another --out-dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def check_apart_from_model(out_dir: Path, model_dir: Path) -> None:
    """Refuse a run folder that is the model's folder, lies inside it or holds it: the run would write (and
    ``--overwrite`` delete) files beside or over the model's."""
    if not model_dir.exists():
        return
    out, model = out_dir.expanduser().resolve(), model_dir.expanduser().resolve()
    where = "is" if out == model else "is inside" if model in out.parents else "holds" if out in model.parents else ""
    if where:
        raise ValueError(f"--out-dir {out_dir} {where} the model folder {model_dir}: a run's folder must lie apart "
                         "from its model; choose another --out-dir")


def check_writable(out_dir: Path, what: str, flag: str) -> None:
    """Make ``out_dir`` and write a probe file there; refuse with a ValueError naming the command's ``flag``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / WRITE_CHECK
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write the {what} {out_dir} ({err.strerror or err}); choose a writable {flag}") \
            from None


def lock_run_folder(out_dir: Path, *, create: bool) -> RunFolderLock:
    """Lock ``out_dir`` for this run (``create``: make it first and check it is writable); stale temporaries of
    killed atomic writes are removed once the lock is held."""
    if create:
        check_writable(out_dir, "run folder", "--out-dir")
    elif not out_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {out_dir}: start without --resume, or point to the run's folder")
    lock = RunFolderLock(out_dir)
    for path in out_dir.iterdir():
        if path.name.endswith(".tmp") and _is_run_file(path.name):
            path.unlink(missing_ok=True)  # a temporary of a write that was killed (SIGKILL, power loss)
    return lock


def check_new_run_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder for a new run when it holds a run's checkpoint (unless ``overwrite``) or anything but a
    run's own files. A folder whose run wrote no checkpoint yet holds nothing to lose: a rerun starts afresh."""
    foreign = sorted(p.name for p in out_dir.iterdir() if not _is_run_file(p.name))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(f"{out_dir} holds files that are not a run's ({shown}); a run needs a new or empty folder "
                         "(or one of its own runs): choose another --out-dir")
    if (out_dir / CHECKPOINT_FILE).exists() and not overwrite:
        held = [name for name in (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE) if (out_dir / name).exists()]
        raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume, choose "
                         "another --out-dir, or pass --overwrite to replace it")


def rerun_hint(out_dir: Path) -> str:
    """How to go on after a write in the run folder failed for space: --resume only where it has a checkpoint."""
    if (out_dir / CHECKPOINT_FILE).is_file():
        return RESUME_HINT
    return ("free space and run the command again: no checkpoint had been written yet, so there is nothing for "
            "--resume to continue and the run starts again from its first step")


def start_run_folder(out_dir: Path, config: dict[str, Any], history: list[dict], *, new: bool) -> None:
    """Write the run's config.json and metrics.jsonl (``history``); a ``new`` run first removes the checkpoint of
    the run it replaces. Only a run's own files are touched."""
    if new:
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    then = rerun_hint(out_dir)
    write_text_atomic(json.dumps(config, indent=2), out_dir / CONFIG_FILE, then=then)
    write_text_atomic("".join(json.dumps(h) + "\n" for h in history), out_dir / METRICS_FILE, then=then)
