"""Stop records: what the engine's processor writes (one JSON line per event) and the trainer reads back.

Each line names its run (``run``: the ``run_id`` of the settings the engine was started with), so a folder
reused across runs keeps them apart: ``read_stops`` reads one run's stops, and refuses to guess between runs.
Reading is tolerant: a line that is not a well-formed record is skipped with a ``RecordWarning`` naming its
file and line, never an exception.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

from ...checks import is_integer
from .settings import EXTRA_ARGS_KEY, default_record_dir

_PATTERN = "espo-*.jsonl"


class RecordWarning(UserWarning):
    """A line of a stop-record file was skipped (it names the file and the line)."""


@dataclass(frozen=True)
class StopRecord:
    """One ESPO stop: request ``id`` (seeded ``seed``) stopped at generated token ``index`` (0-based).

    The token at ``index`` triggered the stop and is kept; the engine forced ``eos`` right after it. ``run_id`` is
    the run whose engine wrote it (None for records of engines started without one).
    """

    id: str
    seed: int
    index: int
    eos: int | None = None
    run_id: str | None = None


class Recorder:
    """Appends records as JSON lines, each naming ``run_id``, to a file of this process's own under ``record_dir``
    (what the processor writes)."""

    def __init__(self, record_dir: str, run_id: str | None = None):
        self.record_dir = record_dir
        self.run_id = run_id
        self._file = None

    def write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(self.record_dir, exist_ok=True)
            name = f"espo-{self.run_id or 'run'}-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.jsonl"
            self._file = open(os.path.join(self.record_dir, name), "a", encoding="utf-8")
        self._file.write(json.dumps({**event, "run": self.run_id, "time": time.time()}) + "\n")
        self._file.flush()


def _record_files(record_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(record_dir, _PATTERN)))


def _is_count(value: Any) -> bool:
    return is_integer(value) and value >= 0


def _stop(e: dict[str, Any]) -> StopRecord:
    """The record of one "stop" line; ValueError saying what is wrong with it."""
    rid, seed, index, eos = e.get("id"), e.get("seed"), e.get("index"), e.get("eos")
    if not isinstance(rid, str):
        raise ValueError(f"its id is {rid!r}, not a string")
    if not is_integer(seed):
        raise ValueError(f"its seed is {seed!r}, not an int")
    if not _is_count(index):
        raise ValueError(f"its index is {index!r}, not a non-negative int")
    if eos is not None and not _is_count(eos):
        raise ValueError(f"its eos is {eos!r}, not a token id")
    return StopRecord(rid, int(seed), int(index), None if eos is None else int(eos), e.get("run"))


class StopReader:
    """The records under ``record_dir`` (default: ``default_record_dir()``), read as they grow.

    It keeps its place in every file, so a trainer that asks after each request reads each line once.
    With ``run_id`` it reads that run's records only; without, every run's (request ids must then be unique
    across the runs that share the folder, as the verl agent loop's random ids are). ``stops`` maps request ids
    to ``StopRecord`` (requests absent did not stop); ``updates`` lists the batch-boundary statistics updates,
    oldest first per engine; ``runs`` holds every run id seen in the folder.
    """

    def __init__(self, record_dir: str | None = None, run_id: str | None = None):
        self.record_dir = record_dir or default_record_dir()
        self.run_id = run_id
        self.stops: dict[str, StopRecord] = {}
        self.updates: list[dict[str, Any]] = []
        self.runs: set[str | None] = set()
        self._offsets: dict[str, tuple[int, int]] = {}  # path -> (bytes read, lines read)

    def refresh(self) -> dict[str, StopRecord]:
        """Read what was appended since the last call; return ``stops``."""
        for path in _record_files(self.record_dir):
            offset, lines = self._offsets.get(path, (0, 0))
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError as err:
                warnings.warn(f"espo: skipped the stop records in {path}: {err}", RecordWarning, stacklevel=2)
                continue
            end = data.rfind(b"\n") + 1  # a line still being written has no newline yet
            complete = data[:end].split(b"\n")[:-1]
            self._offsets[path] = (offset + end, lines + len(complete))
            for n, line in enumerate(complete, start=lines + 1):
                try:
                    self._add(json.loads(line.decode("utf-8")))
                except (ValueError, TypeError, AttributeError) as err:  # UnicodeDecodeError, JSONDecodeError too
                    warnings.warn(f"espo: skipped line {n} of {path}, not a stop record ({err})", RecordWarning,
                                  stacklevel=2)
        return self.stops

    def _add(self, e: Any) -> None:
        if not isinstance(e, dict):
            raise TypeError(f"a JSON {type(e).__name__}, not an object")
        kind, run = e.get("event"), e.get("run")
        if kind not in ("start", "stop", "cancel", "update"):
            raise ValueError(f"unknown event {kind!r}")
        if run is not None and not isinstance(run, str):
            raise ValueError(f"its run is {run!r}, not a string")
        if kind == "stop":
            stop = _stop(e)
        elif kind == "cancel" and not isinstance(e.get("id"), str):
            raise ValueError(f"its id is {e.get('id')!r}, not a string")
        elif kind == "update" and not all(isinstance(v, (int, float)) for k, v in e.items()
                                          if k in ("mean", "var", "beta", "finished", "tokens")):
            raise ValueError("an update with a non-numeric statistic")
        self.runs.add(run)
        if self.run_id is not None and run != self.run_id:
            return
        if kind == "stop":
            self.stops[stop.id] = stop
        elif kind == "cancel":  # the engine discarded the draw that stopped
            self.stops.pop(e["id"], None)
        elif kind == "update":
            self.updates.append(e)


def _reader(source: str | Mapping[str, Any] | None, run_id: str | None) -> StopReader:
    """One run's reader: ``source`` is the dict ``engine_kwargs`` returned (its folder and run) or a folder."""
    if isinstance(source, Mapping):
        settings = (source.get("additional_config") or {}).get(EXTRA_ARGS_KEY)
        if not isinstance(settings, Mapping):
            raise ValueError("read_stops: record_dir is a dict but not what engine_kwargs returned (it has no "
                             "additional_config['espo']): pass engine_kwargs' dict, or a folder and run_id")
        source, run_id = settings.get("record_dir"), run_id or settings.get("run_id")
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"read_stops: record_dir must be a folder, or the dict engine_kwargs returned; "
                        f"got {type(source).__name__}")
    reader = StopReader(None if source is None else os.fspath(source), run_id)
    reader.refresh()
    if run_id is None and len(reader.runs) > 1:
        runs = ", ".join(sorted(str(r) for r in reader.runs))
        raise ValueError(
            f"{reader.record_dir} holds the records of {len(reader.runs)} runs ({runs}), and a request id may "
            "recur across runs: read one run's with read_stops(engine_kwargs(...)'s dict) or run_id=..., or "
            "clear_records(folder) before a new run"
        )
    return reader


def read_stops(record_dir: str | Mapping[str, Any] | None = None, run_id: str | None = None
               ) -> dict[str, StopRecord]:
    """The stops of one run, by request id; requests that are absent did not stop.

    record_dir: the dict ``engine_kwargs`` returned (its folder and run: the usual call), or a folder (default:
        ``default_record_dir()``), then with the ``run_id`` to read unless the folder holds a single run's
        records (ValueError otherwise: a stop of another run is never applied).

    A stop is written when the engine draws the token that triggers it, before the request's output is
    returned, so reading after ``LLM.generate`` (or after a request's final output) sees it.
    """
    return _reader(record_dir, run_id).stops


def read_updates(record_dir: str | Mapping[str, Any] | None = None, run_id: str | None = None
                 ) -> list[dict[str, Any]]:
    """One run's batch-boundary statistics updates (arguments as ``read_stops``), oldest first per engine."""
    return _reader(record_dir, run_id).updates


def clear_records(record_dir: str | None = None) -> None:
    """Delete the record files under ``record_dir`` (every run's)."""
    for path in _record_files(record_dir or default_record_dir()):
        os.remove(path)


def keep_tokens(token_ids: Sequence[int], stop: StopRecord | None) -> tuple[list[int], bool]:
    """The tokens the learner keeps from one request's output, and whether ESPO stopped it.

    A stopped request ends at the token that triggered the stop (its absorbing failure); the EOS that the
    engine forced after it is not the policy's choice and is dropped. A request whose output ended before the
    stopped token (a stop string, an abort) was not stopped. A record that cannot be this output's (the output
    goes on past the stop with anything but the forced EOS: a record of another run or request) raises
    ValueError rather than cut the output.
    """
    if stop is not None and not isinstance(stop, StopRecord):
        raise TypeError(f"keep_tokens: stop must be a StopRecord or None (from read_stops), "
                        f"got {type(stop).__name__}")
    if isinstance(token_ids, (str, bytes)) or not all(is_integer(t) for t in token_ids):
        raise TypeError("keep_tokens: token_ids must be a sequence of ints (a completion's token_ids)")
    tokens = [int(t) for t in token_ids]
    if stop is None:
        return tokens, False
    if not _is_count(stop.index):
        raise ValueError(f"keep_tokens: stop.index must be a non-negative int (the index of the token that "
                         f"triggered the stop), got {stop.index!r}")
    if stop.index >= len(tokens):
        return tokens, False
    kept, after = tokens[: stop.index + 1], tokens[stop.index + 1:]
    forced = [stop.eos] * len(after) if stop.eos is not None else after[:1]
    if after != forced:
        raise ValueError(
            f"the stop record of request {stop.id!r} (run {stop.run_id}) says it stopped at token {stop.index}, but "
            f"this output goes on for {len(after)} more tokens ({after[:4]}...), not the forced EOS: the record "
            "belongs to another request or run; read this run's with read_stops(engine_kwargs(...)'s dict)"
        )
    return kept, True
