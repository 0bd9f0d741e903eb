"""espo's vLLM stop records on the trainer's side (no vLLM needed): runs kept apart, corrupt lines skipped and named,
``keep_tokens`` never cutting an output with a record that does not fit it."""
from __future__ import annotations

import json
import os
import warnings

import pytest

from espo.integrations import vllm as ev

EOS = 1


def _write_lines(folder, name: str, lines: list[bytes]) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return path


def _recorder(kwargs: dict) -> "ev.Recorder":
    """The recorder of an engine started with these engine_kwargs, as the processor opens it."""
    settings = kwargs["additional_config"]["espo"]
    recorder = ev.Recorder(settings["record_dir"], run_id=settings["run_id"])
    recorder.write({"event": "start"})
    return recorder


def test_a_stop_of_an_earlier_run_in_the_same_folder_is_never_applied(tmp_path):
    """README's example twice with one record_dir and the same request ids: the second run's unstopped 10-token
    output of request "r0" must not be cut by the first run's stop of "r0" at token 2."""
    first = ev.engine_kwargs(record_dir=str(tmp_path))
    second = ev.engine_kwargs(record_dir=str(tmp_path))
    assert first["additional_config"]["espo"]["run_id"] != second["additional_config"]["espo"]["run_id"]
    _recorder(first).write({"event": "stop", "id": "r0", "seed": 5, "index": 2, "eos": EOS})
    _recorder(second)  # the second engine starts (it writes its start) and r0 does not stop
    output = list(range(10, 20))

    assert ev.read_stops(second) == {}
    assert ev.keep_tokens(output, ev.read_stops(second).get("r0")) == (output, False)
    assert ev.read_stops(first)["r0"].index == 2  # each run still reads its own
    with pytest.raises(ValueError, match=r"holds the records of 2 runs.*read_stops\(engine_kwargs"):
        ev.read_stops(str(tmp_path))  # which run's? never guessed
    ev.clear_records(str(tmp_path))
    assert ev.read_stops(str(tmp_path)) == {}


def test_keep_tokens_refuses_a_record_that_does_not_fit_the_output():
    stale = ev.StopRecord("r0", 5, 2)  # a record without run or EOS, as older engines wrote them
    with pytest.raises(ValueError, match=r"record of request 'r0'.*stopped at token 2.*7 more tokens"):
        ev.keep_tokens(list(range(10, 20)), stale)
    stop = ev.StopRecord("r0", 5, 2, eos=EOS)
    assert ev.keep_tokens([7, 8, 9, EOS], stop) == ([7, 8, 9], True)  # EOS forced after the stop
    assert ev.keep_tokens([7, 8, 9], stop) == ([7, 8, 9], True)  # the stop token was the last one allowed
    assert ev.keep_tokens([7, 8, 9, EOS, EOS], stop) == ([7, 8, 9], True)  # EOS forced until min_tokens
    with pytest.raises(ValueError, match="another request or run"):
        ev.keep_tokens([7, 8, 9, 4], stop)
    # The request ended before the stopped token reached its output (a stop string, an abort): not stopped.
    assert ev.keep_tokens([7, 8], stop) == ([7, 8], False)


@pytest.mark.parametrize("index", [-1, -5, 1.0, True, "2", None])
def test_keep_tokens_refuses_a_bad_index_naming_it(index):
    with pytest.raises(ValueError, match=r"keep_tokens: stop\.index must be a non-negative int"):
        ev.keep_tokens([4, 5, 6], ev.StopRecord("r", 1, index))


def test_keep_tokens_refuses_what_is_not_a_record_or_tokens():
    with pytest.raises(TypeError, match="keep_tokens: stop must be a StopRecord or None"):
        ev.keep_tokens([4, 5], {"id": "r", "seed": 1, "index": 0})
    with pytest.raises(TypeError, match="keep_tokens: token_ids must be a sequence of ints"):
        ev.keep_tokens([4, "x"], None)


def test_corrupt_lines_are_skipped_with_a_warning_naming_the_file(tmp_path):
    good = [json.dumps({"event": "stop", "id": f"g{i}", "seed": i, "index": i}).encode() for i in range(3)]
    bad = [
        b"{not json",
        b"[1, 2, 3]",  # JSON, not an object
        json.dumps({"event": "stop", "seed": 1, "index": 0}).encode(),  # no id
        json.dumps({"event": "stop", "id": "x", "seed": 1, "index": -1}).encode(),
        json.dumps({"event": "stop", "id": "x", "seed": "one", "index": 0}).encode(),
        json.dumps({"event": "update", "mean": "high"}).encode(),
        b"\xff\xfe\x00garbage",
    ]
    path = _write_lines(tmp_path, "espo-host-1-1.jsonl", [good[0], *bad[:4], good[1], *bad[4:], good[2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stops = ev.read_stops(str(tmp_path))
    assert sorted(stops) == ["g0", "g1", "g2"]
    skipped = [w for w in caught if issubclass(w.category, ev.RecordWarning)]
    assert len(skipped) == len(bad)
    assert all(path in str(w.message) and "skipped line" in str(w.message) for w in skipped)
    assert "line 2 of" in str(skipped[0].message)


def test_a_reader_reads_each_line_once_and_waits_for_a_line_being_written(tmp_path):
    reader = ev.StopReader(str(tmp_path))
    path = _write_lines(tmp_path, "espo-a.jsonl", [json.dumps({"event": "stop", "id": "a", "seed": 1, "index": 0})
                                                   .encode()])
    with open(path, "ab") as f:
        f.write(b'{"event": "stop", "id": "b", "se')  # no newline yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a half-written line is not corrupt
        assert sorted(reader.refresh()) == ["a"]
    with open(path, "ab") as f:
        f.write(b'ed": 2, "index": 1}\n')
    assert sorted(reader.refresh()) == ["a", "b"]


def test_records_of_one_engine_are_read_back_with_its_updates(tmp_path):
    kwargs = ev.engine_kwargs(record_dir=str(tmp_path), run_id="step-7")
    recorder = _recorder(kwargs)
    recorder.write({"event": "stop", "id": "a", "seed": 5, "index": 3, "eos": EOS})
    recorder.write({"event": "update", "mean": 0.1})
    recorder.write({"event": "cancel", "id": "a"})
    recorder.write({"event": "stop", "id": "a", "seed": 5, "index": 4, "eos": EOS})
    assert ev.read_stops(kwargs) == {"a": ev.StopRecord("a", 5, 4, eos=EOS, run_id="step-7")}
    assert ev.read_stops(str(tmp_path), run_id="step-7") == ev.read_stops(kwargs)
    assert [u["mean"] for u in ev.read_updates(kwargs)] == [0.1]


@pytest.mark.parametrize("run_id", ["", "a/b", "x" * 65, 7])
def test_a_bad_run_id_is_refused(run_id):
    with pytest.raises(ValueError, match="run_id"):
        ev.engine_kwargs(run_id=run_id)
