"""Atomic checkpoints: a failed save leaves the old file intact and no temporary behind."""
import pytest
import torch

from espo.rl.checkpoint import load_checkpoint, save_atomic


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_round_trip_and_config_check(tmp_path):
    path = save_atomic({"config": {"lr": 1e-3}, "step": 4, "w": torch.arange(3)}, tmp_path / "run" / "ckpt.pt")
    state = load_checkpoint(path, expected_config={"lr": 1e-3})
    assert state["step"] == 4 and torch.equal(state["w"], torch.arange(3))
    with pytest.raises(ValueError, match="lr: saved 0.001 vs now 0.01"):
        load_checkpoint(path, expected_config={"lr": 1e-2})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = save_atomic({"step": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
