"""Checkpoints that are never half-written and never run code.

Saving writes a temporary file beside the target, fsyncs it and renames it over the target, so a crash
(or a full disk) leaves either the old file or the new one. Loading uses ``torch.load(weights_only=True)``:
only tensors and plain Python data come back; a file holding anything else (a crafted pickle) is refused
before any of it runs.
"""
from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


class DiskWriteError(OSError):
    """A run's file could not be written: the disk holding it is full or failing. The file it would have replaced
    is kept as it was."""


#: how to go on after a failed write, when the caller says nothing else: what a run with a checkpoint (and the
#: demo, whose --resume also starts a run that has none) can do
RESUME_HINT = "free space and rerun with --resume"


def disk_write_error(what: str, path: Path, err: BaseException, then: str = RESUME_HINT) -> DiskWriteError:
    """The one error a failed write raises: it names the file and the disk, and says how to go on (``then``)."""
    cause = (err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())) or repr(err)
    return DiskWriteError(
        getattr(err, "errno", None) or errno.EIO,
        f"could not write {what} {path}: the disk holding {path.parent} is full or failing ({cause}); {then}",
    )


# What torch's zip writer (caffe2's PyTorchStreamWriter) says when the disk under it fills or fails, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 4785664 vs 4785552"
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter failed", "unexpected pos", "file write failed")


def _is_torch_write_failure(err: RuntimeError) -> bool:
    return any(marker in str(err) for marker in TORCH_WRITE_FAILURES)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write: Callable[[Any], None], what: str = "file", then: str = RESUME_HINT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a full disk: ENOSPC, EDQUOT, EIO
            raise disk_write_error(what, path, err, then) from err
        except RuntimeError as err:
            if not _is_torch_write_failure(err):
                raise  # not the disk: what could not be saved says so itself
            raise disk_write_error(what, path, err, then) from err
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it 0o600; a run's files follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(state: dict[str, Any], path: str | os.PathLike, *, then: str = RESUME_HINT) -> Path:
    """torch.save ``state`` to ``path`` so that a crash leaves either the old file or the new one.

    Raises DiskWriteError (an OSError naming the file and its disk, ending with ``then``: how to go on) when the
    disk is full or failing."""
    return _write_atomic(Path(path), lambda f: torch.save(state, f), what="checkpoint", then=then)


def write_text_atomic(text: str, path: str | os.PathLike, *, then: str = RESUME_HINT) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with the same guarantee as :func:`save_atomic`."""
    return _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")), then=then)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expected_config: dict[str, Any] | None = None,
    may_differ: Iterable[str] = (),
    missing_as: dict[str, Any] | None = None,
    compare_as: dict[str, Callable[[Any], Any]] | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint of tensors and plain data; with ``expected_config``, refuse one written under another
    configuration (see :func:`check_config`).

    The tensors are read into memory: nothing keeps the file open or mapped once this returns, so a run can
    replace it and the disk gets its space back at once. ``mmap=True`` maps them instead, for a caller that reads
    only the plain data and drops the tensors.

    Raises FileNotFoundError when there is no file, ValueError when it is corrupt, holds anything but tensors
    and plain data, or was written under another configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: start without --resume, or point to the run's folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise ValueError(
                f"checkpoint {path} holds Python objects other than tensors and plain data, which espo never writes; "
                "refusing to load it, since unpickling such objects can run code"
            ) from None
        raise ValueError(f"checkpoint {path} is corrupt ({err}); delete it and start a new run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({str(err).splitlines()[0]}); "
                         "delete it and start a new run") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not an espo checkpoint's dict")
    if expected_config is not None:
        check_config(path, state.get("config"), expected_config, may_differ=may_differ, missing_as=missing_as,
                     compare_as=compare_as)
    return state


def check_config(
    path: Path,
    saved: Any,
    expected_config: dict[str, Any],
    *,
    may_differ: Iterable[str] = (),
    missing_as: dict[str, Any] | None = None,
    compare_as: dict[str, Callable[[Any], Any]] | None = None,
) -> None:
    """Refuse the configuration ``saved`` in the checkpoint ``path`` when it is not ``expected_config``: fields
    named in ``may_differ`` excepted; a field that the saved configuration lacks, written before the field
    existed, is compared as its value in ``missing_as``; a field in ``compare_as`` is compared as what its
    function makes of the saved and the expected value (e.g. two spellings of one folder)."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path} has no configuration: it was not written by espo's trainer")
    skip, older, as_ = set(may_differ), missing_as or {}, compare_as or {}
    saved = {**{k: v for k, v in older.items() if k not in saved}, **saved}
    for k, v in older.items():  # a nested setting (e.g. the stop rule's) that gained fields
        if isinstance(v, dict) and isinstance(saved.get(k), dict):
            saved[k] = {**v, **saved[k]}
    same = lambda k, a, b: a == b or (k in as_ and as_[k](a) == as_[k](b))  # noqa: E731
    diff = sorted(k for k in set(saved) | set(expected_config)
                  if k not in skip and not same(k, saved.get(k), expected_config.get(k)))
    if diff:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {expected_config.get(k)!r}" for k in diff[:6])
        raise ValueError(f"checkpoint {path} was written by another configuration ({details}); "
                         "resume with the same settings or start a new run folder")
