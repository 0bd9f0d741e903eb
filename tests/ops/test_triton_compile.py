"""The Triton kernels compile for the GPU (sm_90), not only under the interpreter the other tests use."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_triton_compile.py"


def test_triton_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "check_triton_compile: ok" in run.stdout
