"""espo/threads.py: a CPU run takes the cores that other processes leave free, unless the user chose."""
import pytest
import torch

from espo import threads
from espo.app.cli import main


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("load, want", [(0.0, 2), (0.4, 2), (1.2, 1), (4.0, 1), (9.0, 1)])
def test_threads_follow_the_free_cores(two_cores, load, want):
    two_cores.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    count, why = threads.choose_cpu_threads()
    assert count == want
    assert ("busy" in why) == (want < 2)


def test_the_user_always_wins(two_cores):
    two_cores.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert threads.choose_cpu_threads(2) == (2, "--threads")
    two_cores.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_cpu_threads()[1] == "OMP_NUM_THREADS"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            threads.choose_cpu_threads(bad)


def test_the_cli_sets_and_reports_the_count(two_cores, tmp_path, capsys):
    two_cores.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    before = torch.get_num_threads()
    try:
        assert main(["train", "--threads", "0", "--out-dir", str(tmp_path / "r")]) == 2
        assert "threads must be a positive int" in capsys.readouterr().err
        threads.use_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
