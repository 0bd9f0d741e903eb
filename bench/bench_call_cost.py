"""What one call of espo.sample costs from Python at small B, where the host, not the kernel, sets the time.

Per backend available here (torch; triton and cuda on a GPU, triton interpreted is left out on the CPU): the
time per call of N back-to-back calls with one synchronisation at the end (what a decoding loop outside a CUDA
graph pays), the share of it spent in espo.sample's own argument checks (the call with the backend replaced
by a function that returns preallocated outputs), and the backend called alone with its arguments prepared (its
dispatch, allocations and launches), beside the cost of 8 allocations and of one small kernel from Python. The
peer is torch's softmax + multinomial on the same logits.
Each figure is the median of --repeats runs (the min and max beside it), with the machine's load average.

    python bench/bench_call_cost.py --out bench/results   # -> call-cost.{json,md} on a GPU, call-cost-cpu.* on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import environment, write_report  # first: puts this checkout's espo ahead of an installed one

import espo
from espo import sampling


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, device, calls: int, repeats: int) -> dict:
    for _ in range(max(3, calls // 10)):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return {"median_us": statistics.median(runs), "min_us": min(runs), "max_us": max(runs), "repeats": repeats,
            "calls": calls}


def measure(B: int, V: int, device: torch.device, calls: int, repeats: int, checks_only: bool = False) -> list[dict]:
    logits = torch.randn(B, V, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    kw = dict(temperature=0.7, seed=1, offset=5)
    rows = []
    interpreted = device.type != "cuda"
    for backend, info in espo.backends().items():
        if not info.available or (backend != "torch" and interpreted):
            continue
        for validate in () if checks_only else (True, False):
            timing = per_call_us(lambda: espo.sample(logits, backend=backend, validate=validate, **kw), device, calls,
                                 repeats)
            rows.append({"what": f"espo.sample backend={backend} validate={validate}", **timing})
        real = sampling._IMPLEMENTATIONS[backend]
        params = espo.SamplingParams(0.7, 0, 1.0, 1)
        if not checks_only:
            rows.append({"what": f"the backend alone, its arguments prepared (backend={backend})",
                         **per_call_us(lambda: real(logits, params, 5, None), device, calls, repeats)})
        outputs = real(logits, params, 5, None)
        sampling._IMPLEMENTATIONS[backend] = lambda *args, outputs=outputs: outputs
        try:
            timing = per_call_us(lambda: espo.sample(logits, backend=backend, **kw), device, calls, repeats)
        finally:
            sampling._IMPLEMENTATIONS[backend] = real
        rows.append({"what": f"espo.sample's checks and dispatch alone (backend={backend})", **timing})
    # What the backends' launch paths are made of, for scale: a backend's output allocations and one kernel launch.
    rows.append({"what": "for scale: 8 x torch.empty([B]) (a backend's outputs, one allocation each)",
                 **per_call_us(lambda: [torch.empty(B, device=device) for _ in range(8)], device, calls, repeats)})
    small = torch.zeros(B, device=device)
    rows.append({"what": "for scale: one small kernel from Python (add_ on [B])",
                 **per_call_us(lambda: small.add_(1.0), device, calls, repeats)})
    rows.append({"what": "peer: torch.softmax + torch.multinomial",
                 **per_call_us(lambda: torch.multinomial(torch.softmax(logits.float() / 0.7, dim=-1), 1), device,
                               calls, repeats)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--V", type=int, default=None, help="151936 on a GPU, 1000 on the CPU")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--checks-only", action="store_true",
                        help="only the checks-and-dispatch rows, the rows for scale and the peer")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    V = args.V or (151936 if device.type == "cuda" else 1000)
    load_before = os.getloadavg()
    rows = measure(args.B, V, device, args.calls, args.repeats, args.checks_only)
    env = {**environment(device.type), "B": args.B, "V": V, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "call-cost" if device.type == "cuda" else "call-cost-cpu"
    (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# One call of espo.sample from Python (B = {args.B}, V = {V}, {device})", "",
             f"`{env['command']}` (median of {args.repeats} runs of {args.calls} back-to-back calls, "
             f"one sync at the end); load average {load_before[0]:.2f} before, {env['loadavg_after'][0]:.2f} after.",
             "", "| what | median us/call | min | max |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['median_us']:.2f} | {r['min_us']:.2f} | {r['max_us']:.2f} |" for r in rows]
    write_report(args.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
