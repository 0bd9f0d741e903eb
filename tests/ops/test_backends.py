"""espo.ops.backends.resolve_backend: which backend runs for tensors on a device, and the errors when one cannot."""
import pytest
import torch

from espo.ops.backends import BackendUnavailable, backends, resolve_backend

CPU = torch.device("cpu")


def test_auto_runs_the_torch_backend_off_a_gpu(monkeypatch):
    backends()  # what is available is found once, with the session's TRITON_INTERPRET (not the one set below)
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert resolve_backend("auto", CPU) == "torch"
        assert resolve_backend("torch", CPU) == "torch"


def test_triton_on_the_cpu_follows_triton_interpret_at_each_call(monkeypatch):
    if not backends()["triton"].available:
        pytest.skip(f"the triton backend is unavailable here: {backends()['triton'].reason}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors, got tensors on cpu"):
        resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"


def test_cuda_needs_cuda_tensors_and_unknown_names_are_refused():
    with pytest.raises((BackendUnavailable, ValueError), match="backend 'cuda'"):
        resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'cuda', 'auto'\), got 'tpu'"):
        resolve_backend("tpu", CPU)
