"""Run one vLLM engine with espo's processor in a process of its own, and write what it returned as JSON:

    python tests/integrations/vllm_engine.py SPEC.json OUT.json

SPEC: {"engine": LLM keyword arguments, "espo": engine_kwargs settings, "runner": "v1" | "mrv2",
       "requests": [{"prompt": [ids], "params": SamplingParams keyword arguments}], "refused": [the same]}
OUT:  {"use_v2_model_runner": bool, "engine_kwargs": ..., "outputs": [{"token_ids", "logprobs", "finish_reason"}],
       "refused": [the error of each refused request, or null]}

Model Runner V2 needs Triton, and vLLM counts Triton only with a backend of the engine's platform; stock triton
has no CPU backend. With ESPO_TRITON_CPU=1 (the tests' choice on a machine without a GPU) this process and the
engine processes vLLM spawns from it (which import this file again) add a "cpu" entry to triton's backends
before vLLM is imported, and run Triton's kernels in its interpreter (TRITON_INTERPRET=1). On a GPU nothing is
changed: vLLM runs MRV2 as it does for its users.
"""
from __future__ import annotations

import json
import os
import sys


def _triton_cpu_backend() -> None:
    """A "cpu" entry in triton's backends whose driver reports itself active, as vLLM's CPU build looks for."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.backends as tb
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.compiler import CUDABackend

    class InterpreterDriver(DriverBase):  # never launches anything: the interpreter runs the kernels
        @staticmethod
        def is_active() -> bool:
            return True

        def get_current_target(self):
            raise RuntimeError("the Triton interpreter runs these kernels")

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("the Triton interpreter runs these kernels")

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise RuntimeError("the Triton interpreter runs these kernels")

    tb.backends.setdefault("cpu", tb.Backend(CUDABackend, InterpreterDriver))


if os.environ.get("ESPO_TRITON_CPU") == "1":
    _triton_cpu_backend()


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if spec["runner"] == "mrv2" else "0"
    from vllm import LLM, SamplingParams

    from espo.integrations import vllm as espo_vllm

    kwargs = espo_vllm.engine_kwargs(**spec["espo"])
    llm = LLM(**spec["engine"], **kwargs)
    try:
        requests = [{"prompt_token_ids": r["prompt"]} for r in spec["requests"]]
        params = [SamplingParams(**r["params"]) for r in spec["requests"]]
        outputs = []
        for out in llm.generate(requests, params, use_tqdm=False):
            c = out.outputs[0]
            logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] if c.logprobs is not None else None
            outputs.append({"token_ids": list(c.token_ids), "logprobs": logprobs, "finish_reason": c.finish_reason})
        refused = []
        for r in spec.get("refused", []):
            try:
                llm.generate([{"prompt_token_ids": r["prompt"]}], SamplingParams(**r["params"]), use_tqdm=False)
                refused.append(None)
            except Exception as err:  # noqa: BLE001  (vLLM raises its VLLMValidationError)
                refused.append(f"{type(err).__name__}: {err}")
        result = {"use_v2_model_runner": bool(getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", True)),
                  "engine_kwargs": kwargs, "outputs": outputs, "refused": refused}
    finally:
        llm.llm_engine.engine_core.shutdown()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
