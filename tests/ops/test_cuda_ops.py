"""The compiled extension without running a kernel: where ``espo._C`` is built (a CUDA build of torch and
nvcc at install time), its ops are registered with the schema the "cuda" backend calls, declare the stop
state they update in place, and have meta implementations that give torch.compile the right shapes and
reject bad logits as the kernels do. Needs no GPU (``scripts/check_cuda_ext_build.sh`` runs it on a
machine without one); skipped where the extension was not built, as on CI's CPU build of torch.
"""
import importlib

import pytest
import torch

try:
    importlib.import_module("espo._C")
    BUILT, WHY = True, ""
except ImportError as err:
    BUILT, WHY = False, f"espo._C is not built here ({err})"

pytestmark = pytest.mark.skipif(not BUILT, reason=WHY)

OUTPUTS = ["tokens", "logprobs", "raw_logprobs", "entropy", "max_logprob", "regret", "valid"]
STOP_STATE = ["z", "sum_g", "sum_g2", "count", "position", "stopped"]


def schema(name):
    return getattr(torch.ops.espo, name).default._schema


def row_args(logits):
    """Every per-row argument as a scalar (the tensor slot None), as espo.ops.cuda passes Python numbers."""
    return (logits, None, 0.7, None, 0, None, 1.0, None, 0, None, 0)


def stop_args(B, device="meta"):
    f = lambda dtype: torch.empty(B, dtype=dtype, device=device)  # noqa: E731
    state = [f(torch.float32), f(torch.float32), f(torch.float32), f(torch.int32), f(torch.int32), f(torch.bool)]
    return (*state, torch.empty(5, device=device), None, None, 0.9, 3.0, 1e-6, 0.2, 0)


def test_the_ops_have_the_schemas_the_backend_calls():
    sample, stop = schema("sample"), schema("sample_stop")
    assert [r.name for r in sample.returns] == OUTPUTS
    assert [r.name for r in stop.returns] == OUTPUTS + ["stop"]
    assert not any(a.alias_info and a.alias_info.is_write for a in sample.arguments)
    written = [a.name for a in stop.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == STOP_STATE  # torch.compile must know what the stop update mutates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, V", [(1, 7), (5, 1001), (3, 151936)])
def test_meta_outputs_have_the_documented_shapes(dtype, B, V):
    logits = torch.empty(B, V, dtype=dtype, device="meta")
    expected = [torch.int64] + [torch.float32] * 5 + [torch.bool]
    out = torch.ops.espo.sample(*row_args(logits))
    assert [(o.shape, o.dtype) for o in out] == [((B,), d) for d in expected]
    out = torch.ops.espo.sample_stop(*row_args(logits), *stop_args(B))
    assert [(o.shape, o.dtype) for o in out] == [((B,), d) for d in expected + [torch.bool]]


@pytest.mark.parametrize("shape, dtype, words", [
    ((3,), torch.float32, "shape \\[B, V\\]"),
    ((3, 0), torch.float32, "empty vocabulary"),
    ((3, 4), torch.int32, "float32, bfloat16 or float16"),
])
def test_meta_rejects_bad_logits(shape, dtype, words):
    with pytest.raises(RuntimeError, match=words):
        torch.ops.espo.sample(*row_args(torch.empty(shape, dtype=dtype, device="meta")))


# What a fresh process passes first: the bad ranks alone, or a bad dtype before them (if that one crashes too, the
# cause is the first error thrown from espo._C in a process, not the rank)
FIRST_ERRORS = {
    "ranks": [((3,), torch.float32, "shape [B, V]"), ((), torch.float32, "shape [B, V]"),
              ((2, 3, 4), torch.float32, "shape [B, V]")],
    "dtype-then-ranks": [((3, 4), torch.int32, "float32, bfloat16 or float16"), ((3,), torch.float32, "shape [B, V]")],
}


@pytest.mark.parametrize("first", list(FIRST_ERRORS))
def test_meta_rank_errors_raise_in_a_fresh_process(first):
    """Issue 36: on the first GPU run a rank-1 meta tensor killed its pytest worker (a segfault, not an error).
    Run the bad inputs in a child process under faulthandler, so that a crash fails this test with its native
    stack instead of killing the run; with or without CUDA, each must raise the documented RuntimeError."""
    import subprocess
    import sys

    cases = [(shape, str(dtype)[len("torch."):], words) for shape, dtype, words in FIRST_ERRORS[first]]
    code = (
        "import torch, espo._C\n"
        f"for shape, dtype, words in {cases}:\n"
        "    x = torch.empty(shape, dtype=getattr(torch, dtype), device='meta')\n"
        "    try:\n"
        "        torch.ops.espo.sample(x, None, 0.7, None, 0, None, 1.0, None, 0, None, 0)\n"
        "    except RuntimeError as e:\n"
        "        assert words in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(f'meta logits of shape {shape} and dtype {dtype} were accepted')\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:] + run.stderr[-4000:]
