"""Test setup: without a GPU the Triton kernels run under the interpreter (set before triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import espo  # noqa: E402


def available_backends() -> list[str]:
    """Backends other than the reference that can run here."""
    return [name for name, info in espo.backends().items() if info.available and name != "torch"]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list:
    """(backend, device) pairs to hold to the reference: triton/cuda on the GPU, triton interpreted on the CPU."""
    pairs = []
    for backend in available_backends():
        for device in devices():
            if device == "cpu" and backend != "triton":
                continue
            if device == "cpu" and torch.cuda.is_available():
                continue  # the interpreter is off when a GPU is present
            marks = [pytest.mark.gpu] if device == "cuda" else []
            pairs.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return pairs


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny matmuls on several threads only contend (and run far slower on a busy
    2-core machine). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
