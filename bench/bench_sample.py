"""Benchmark one fused decoding step: espo.sample (with the ESPO stop update) against its peers.

The step = temperature sampling (plus a few rows with exact top-k / top-p) + sampled logprob + entropy + max logprob
+ regret + stop-state update + stop mask, on [B, V] logits. Peers, measured in the same run: the same step written in
plain PyTorch (eager), that function under torch.compile, and FlashInfer's sampling_from_logits (sampling only) when
it is importable. Each time is a median of device-event timings (triton.testing.do_bench) over inputs
rotated through more memory than L2 holds, and is reported against the floor: one read of the logits
at the copy bandwidth measured on this GPU in this run.

    python bench/bench_sample.py                 # the full table on a GPU -> bench/results/sample.{json,md}
    python bench/bench_sample.py --smoke         # tiny shapes on the CPU, to check the script runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from common import device_times, environment, write_report  # first: puts this checkout's espo first

RESULTS = Path(__file__).resolve().parent / "results"
FULL_B = [1, 8, 64, 256, 1024]
FULL_V = [32000, 151936]
# the exact top-k / top-p path (threshold searches, extra passes over the row): a few rows beside plain sampling
# torch.compile builds anew for every shape (seconds each): the peer runs at these (B, dtype) unless --compile-all
COMPILE_AT = {(1, "bfloat16"), (64, "bfloat16"), (256, "bfloat16")}
FILTERED = [(B, 151936, "bfloat16", top_k, top_p) for B in (8, 256) for top_k, top_p in ((50, 1.0), (0, 0.95))]


def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k then top-p in plain PyTorch (sort-based, as most trainers do): masked logits are -inf."""
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = torch.softmax(sorted_l, dim=-1).cumsum(-1) - torch.softmax(sorted_l, dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def eager_step(logits, temperature, z, scalars, alpha_s=0.9, clip=3.0, delta=1e-6, value_floor=0.2, top_k=0, top_p=1.0):
    """The step as one would write it in PyTorch: a peer, not a reference (its random stream differs)."""
    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    p = logp.exp()
    if top_k > 0 or top_p < 1.0:
        p = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)  # sample from the filtered distribution
    tokens = torch.argmax(p / torch.empty_like(p).exponential_(), dim=-1)  # exponential race = categorical draw
    lp = logp.gather(1, tokens[:, None])[:, 0]
    entropy = -(p * logp).sum(-1)
    max_lp = logp.max(-1).values
    regret = max_lp - lp
    mean, var, beta = scalars[0], scalars[1], scalars[2]
    g = ((regret - mean) / torch.sqrt(var + delta)).clamp(-clip, clip)
    z.mul_(alpha_s).add_((1 - alpha_s) * g)
    stop = z > beta * value_floor
    return tokens, lp, entropy, max_lp, regret, stop


def measure_copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    import triton.testing

    n = 1 << 28
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3)


def rotating(make, bytes_each, device, l2_bytes):
    """Enough input sets that cycling through them overflows L2; returns a function giving the next one."""
    count = 1 if device == "cpu" else max(2, math.ceil(3 * l2_bytes / bytes_each))
    count = min(count, max(1, int(8e9 // bytes_each)))
    sets = [make(i) for i in range(count)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % count
        return sets[state["i"]]

    next_set.sets = sets
    return next_set


def graph_us(step, sets, most=200) -> float:
    """Device time of one step without the host's launch cost: one CUDA graph runs the step over up to ``most``
    of the rotating input sets in turn; the median replay time over the steps it holds."""
    import triton.testing

    sets = sets[:most]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the graph: compiles and loads the kernels
        for x in sets[:2]:
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in sets:
            step(x)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    del graph
    return ms * 1e3 / len(sets)


def time_us(fn, device):
    if device == "cpu":
        import time

        fn()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t) / 3 * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def bench_row(B, V, dtype, device, bandwidth, l2_bytes, peers, top_k=0, top_p=1.0):
    import espo

    bytes_each = B * V * torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device)

    def make(i):
        gen.manual_seed(i)
        return (torch.randn(B, V, device=device, generator=gen) * 3).to(dtype)

    next_logits = rotating(make, bytes_each, device, l2_bytes)
    stopper = espo.EarlyStopper(espo.ESPOConfig(), B, device)
    stopper.set_statistics(mean=0.5, var=1.0, beta=7.0)
    stopper.arm()
    offset = torch.zeros(B, dtype=torch.int64, device=device)
    row = {"B": B, "V": V, "dtype": str(dtype).replace("torch.", ""), "floor_us": bytes_each / bandwidth * 1e6}
    filters = dict(top_k=top_k, top_p=top_p)
    if top_k or top_p < 1.0:
        row["filter"] = f"top-k {top_k}" if top_k else f"top-p {top_p}"

    for backend in ("triton", "cuda"):
        if not espo.backends()[backend].available or (device == "cpu" and backend == "cuda"):
            continue
        def step(logits, backend=backend):
            return espo.sample(logits, temperature=0.8, seed=1, offset=offset, stopper=stopper, backend=backend,
                               validate=False, **filters)

        row[f"{backend}_us"] = time_us(lambda: step(next_logits()), device)
        if device != "cpu":
            row[f"{backend}_graph_us"] = graph_us(step, next_logits.sets)
            try:
                kernels = device_times(lambda: step(next_logits()), device, calls=20)
                row[f"{backend}_kernels_us"] = {name[:60]: round(t["us"], 2) for name, t in kernels.items()}
            except Exception as err:  # a profiler that fails here (no CUPTI access) is reported, not fatal
                row[f"{backend}_kernels_error"] = f"{type(err).__name__}: {err}"[:200]
    z = torch.zeros(B, device=device)
    scalars = stopper.scalars
    row["eager_us"] = time_us(lambda: eager_step(next_logits(), 0.8, z, scalars, **filters), device)
    if "compile" in peers and ("compile-all" in peers or ((B, row["dtype"]) in COMPILE_AT and "filter" not in row)):
        torch._dynamo.reset()  # a fresh compile per shape: past dynamo's recompile limit it would run eager, silently
        compiled = torch.compile(eager_step, dynamic=False)
        try:
            row["compile_us"] = time_us(lambda: compiled(next_logits(), 0.8, z, scalars, **filters), device)
        except Exception as err:  # a peer that fails to build is reported, not fatal
            row["compile_error"] = f"{type(err).__name__}: {err}"[:200]
    if "filter" in row:  # the sorting filter most trainers use, then softmax + multinomial (no statistics)
        row["torch_filter_us"] = time_us(lambda: torch.multinomial(torch.softmax(
            filter_logits(next_logits().float() / 0.8, top_k, top_p), dim=-1), 1), device)
    if "flashinfer" in peers:
        import flashinfer

        try:
            if "filter" not in row:
                row["flashinfer_us"] = time_us(lambda: flashinfer.sampling.sampling_from_logits(next_logits()), device)
            else:  # FlashInfer's sorting-free top-k / top-p sampler (top_k = V: no top-k)
                k_arg = top_k or V
                row["flashinfer_us"] = time_us(lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(
                    next_logits(), k_arg, top_p), device)
        except Exception as err:  # a peer that fails is reported, not fatal
            row["flashinfer_error"] = f"{type(err).__name__}: {err}"[:200]
    ours = min(row.get("cuda_us", math.inf), row.get("triton_us", math.inf))
    row["best_x_floor"] = ours / row["floor_us"]
    row["speedup_vs_eager"] = row["eager_us"] / ours
    graphed = min(row.get("cuda_graph_us", math.inf), row.get("triton_graph_us", math.inf))
    if graphed < math.inf:
        row["graph_x_floor"] = graphed / row["floor_us"]
    return row


COLUMNS = [
    ("B", "B", "{}"), ("V", "V", "{}"), ("dtype", "dtype", "{}"), ("filter", "filter", "{}"),
    ("floor_us", "floor us", "{:.1f}"), ("eager_us", "eager us", "{:.0f}"), ("compile_us", "compile us", "{:.0f}"),
    ("torch_filter_us", "torch sort filter us", "{:.0f}"), ("flashinfer_us", "flashinfer us", "{:.1f}"),
    ("triton_us", "triton us", "{:.1f}"), ("triton_graph_us", "triton graph us", "{:.1f}"),
    ("cuda_us", "cuda us", "{:.1f}"), ("cuda_graph_us", "cuda graph us", "{:.1f}"),
    ("best_x_floor", "best / floor", "{:.2f}x"), ("graph_x_floor", "best graph / floor", "{:.2f}x"),
    ("speedup_vs_eager", "vs eager", "{:.1f}x"), ("graph_x_unfiltered", "graph / unfiltered graph", "{:.2f}x"),
]


def add_filter_ratios(rows) -> None:
    """A filtered row's best graph time over the unfiltered row's at the same B, V, dtype (target: within 2x)."""
    plain = {(r["B"], r["V"], r["dtype"]): r for r in rows if "filter" not in r}
    for r in rows:
        base = plain.get((r["B"], r["V"], r["dtype"]))
        if "filter" in r and base is not None:
            ours = [r[k] / base[k] for k in ("cuda_graph_us", "triton_graph_us") if k in r and k in base]
            if ours:
                r["graph_x_unfiltered"] = min(ours)


def markdown(rows, env) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [
        f"Fused sample step on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
        f"floor = one read of the logits at the measured copy bandwidth {env['copy_bandwidth_TBps']:.2f} TB/s; "
        "us = one call from Python as a user makes it (host launch cost included); graph us = device time per step "
        "in a CUDA graph over the rotating inputs (no host cost). "
        f"Command: `{env['command']}`.",
        "",
        "| " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |")
    kernels = [(r, backend) for r in rows for backend in ("triton", "cuda") if f"{backend}_kernels_us" in r]
    if kernels:
        lines += ["", "Device time by kernel (torch.profiler over 20 calls; us per call):", ""]
        for r, backend in kernels:
            times = ", ".join(f"`{name}` {us:.1f}" for name, us in sorted(r[f"{backend}_kernels_us"].items(),
                                                                            key=lambda kv: -kv[1]))
            lines.append(f"- B = {r['B']}, V = {r['V']}, {r['dtype']}, {r.get('filter', 'unfiltered')}, {backend}: "
                         f"{times}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    parser.add_argument("--B", type=int, nargs="*", default=FULL_B)
    parser.add_argument("--V", type=int, nargs="*", default=FULL_V)
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--compile-all", action="store_true", help="the torch.compile peer at every row")
    parser.add_argument("--no-filtered", action="store_true", help="skip the top-k / top-p rows")
    parser.add_argument("--filtered-B", type=int, nargs="*", default=None,
                        help="batch sizes of the top-k 50 / top-p 0.95 rows (V = 151936, bf16; default 8 and 256)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.B, args.V, args.dtypes, args.no_compile = [1, 3], [100], ["bfloat16"], True
        filtered = [(3, 100, "bfloat16", 5, 1.0), (3, 100, "bfloat16", 0, 0.9)]
    else:
        filtered = [] if args.no_filtered else FILTERED
        if args.filtered_B is not None:
            filtered = [(B, V, dt, k, p) for B in args.filtered_B for _, V, dt, k, p in FILTERED[:2]]
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA GPU: run with --smoke to check the script on the CPU")
    peers = set() if args.no_compile else {"compile"} | ({"compile-all"} if args.compile_all else set())
    try:
        import flashinfer  # noqa: F401

        peers.add("flashinfer") if device == "cuda" else None
    except ImportError:
        pass
    bandwidth = measure_copy_bandwidth(device) if device == "cuda" else 1e11
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    env = environment(device, bandwidth)
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda x, **_: x  # noqa: E731
    shapes = [(b, v, d, 0, 1.0) for d in args.dtypes for v in args.V for b in args.B] + filtered
    for B, V, dt, top_k, top_p in tqdm(shapes, desc="bench_sample"):
        rows.append(bench_row(B, V, getattr(torch, dt), device, bandwidth, l2, peers, top_k=top_k, top_p=top_p))
    add_filter_ratios(rows)
    table = markdown(rows, env)
    print(table)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sample.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        write_report(args.out / "sample.md", table)


if __name__ == "__main__":
    main()
