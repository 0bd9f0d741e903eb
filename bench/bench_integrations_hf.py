"""What the transformers and TRL adapters cost per decode step, beside plain generate and espo.Decoder (CPU).

1. generate: B rows (P prompts x n, for each P in --prompts) of --prompt-len random tokens, --new-tokens tokens each,
   no EOS, on a random-initialised Qwen2 (--hidden, --layers, --vocab), timed (best of --repeats interleaved rounds
   after a warm-up; medians in the JSON) as
   * plain ``model.generate(do_sample=True, temperature=1, top_k=0, top_p=1)``;
   * ``generate_rollouts`` (ESPOSampler: espo.sample draws, the processor forces), without and with a stopper;
   * ``espo.Decoder.generate`` at the same batch and lengths, without and with the same stopper.
   Per decode step = wall / new tokens; the adapter's overhead = its step minus plain generate's. The
   stopped runs stop the rows of half the prompts, at the same tokens in both (equal keys): their values
   are 0 under a zero value floor (threshold 0, after --min-tokens), the others' 1e6 (never). generate
   keeps computing a stopped row; the Decoder frees its slot.
2. TRL: GRPOTrainer steps on a random Qwen2 with a character tokenizer (examples/trl_grpo.py's), TRL's own
   generation against ESPORollout (without and with the stop); the best of TRL's ``step_time`` after
   the first step, and the rollout tokens per step (the runs draw different tokens, so lengths differ).

    python bench/bench_integrations_hf.py            # -> bench/results/integrations-hf.{json,md}
    python bench/bench_integrations_hf.py --smoke    # seconds: checks the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import statistics
import time
from pathlib import Path

import torch
from common import REPO, environment, write_report  # first: puts this checkout's espo ahead of an installed one

import espo  # noqa: E402
from espo.integrations.transformers import generate_rollouts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float, object]]:
    """Per name, the best and the median wall-clock of ``fn()`` over ``repeats`` rounds, and its last result.

    One warm-up call each, then rounds that call every fn once in turn, so that a change of load on a
    shared machine falls on all of them alike; the best round is the least disturbed one."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(times[name]), statistics.median(times[name]), results[name]) for name in fns}


def armed_stopper(model, prompts, n, new_tokens, min_tokens) -> espo.EarlyStopper:
    """A stopper with token statistics (one batch seen) and armed, whose threshold is 0 for value 0."""
    stopper = espo.EarlyStopper(espo.ESPOConfig(value_floor=0.0, min_tokens=min_tokens), batch_size=len(prompts) * n)
    generate_rollouts(model, prompts, n, max_new_tokens=new_tokens, seed=123, stopper=stopper, eos_token_id=[])
    stopper.end_batch()
    stopper.arm()
    return stopper


def bench_generate(a, num_prompts: int) -> list[dict]:
    model = build_model(a.vocab, a.hidden, a.layers)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, a.vocab, (num_prompts, a.prompt_len), generator=g).tolist()
    n, B, T = a.n, num_prompts * a.n, a.new_tokens
    ids = torch.tensor([p for p in prompts for _ in range(n)])
    values = [0.0 if i % 2 == 0 else 1e6 for i in range(num_prompts)]  # half the prompts' rows may stop
    stopper = armed_stopper(model, prompts, n, T, a.min_tokens)
    decoder = espo.Decoder(model, max_batch=B, max_seq_len=a.prompt_len + T)
    common = dict(max_new_tokens=T, temperature=1.0, seed=7, eos_token_id=[])

    def plain():
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        return out.shape[1] - ids.shape[1], B * T

    def adapter(with_stop):
        kw = dict(stopper=stopper, prompt_values=values) if with_stop else {}
        return lambda: generate_rollouts(model, prompts, n, **common, **kw)

    def dec(with_stop):
        kw = dict(stopper=stopper, prompt_values=values) if with_stop else {}
        return lambda: decoder.generate(prompts, n, **common, **kw)

    logits = torch.randn(B, a.vocab, generator=g)
    draws = {"espo.sample alone (torch backend)": lambda: espo.sample(logits, seed=torch.arange(B), offset=3),
             "softmax + multinomial alone (HF's draw)": lambda: torch.multinomial(torch.softmax(logits, -1), 1)}
    runs = {"generate (do_sample=True)": plain, "generate + ESPOSampler": adapter(False),
            "generate + ESPOSampler, stopper": adapter(True), "espo.Decoder": dec(False),
            "espo.Decoder, stopper": dec(True),
            **{name: (lambda f=f: [f() for _ in range(T)]) for name, f in draws.items()}}
    rows = []
    for name, (wall, median, res) in timed(runs, a.repeats).items():
        if isinstance(res, espo.Rollouts):
            tokens, stopped = res.tokens_generated, res.finish_counts["stopped"]
        else:
            tokens, stopped = (res[1], 0) if isinstance(res, tuple) else (B * T, 0)
        rows.append(dict(name=name, batch=B, wall_s=wall, median_wall_s=median, ms_per_step=1e3 * wall / T,
                         tokens=tokens, stopped=stopped, tokens_per_s=tokens / wall))
    base = {r["name"]: r["ms_per_step"] for r in rows}
    for r in rows:
        r["vs_generate_ms"] = r["ms_per_step"] - base["generate (do_sample=True)"]
        r["vs_decoder_ms"] = r["ms_per_step"] - base["espo.Decoder"]
    return rows


def bench_trl(a) -> list[dict]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from espo.integrations.trl import ESPORollout

    ex = runpy.run_path(str(REPO / "examples" / "trl_grpo.py"))
    tokenizer = ex["tiny_model_and_tokenizer"]()[1]

    def run(mode: str) -> dict:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
            num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
            pad_token_id=0))
        args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="espo-bench-"), max_steps=a.trl_steps, logging_steps=1,
                          per_device_train_batch_size=16, num_generations=4, max_completion_length=a.new_tokens,
                          learning_rate=1e-4, save_strategy="no", use_cpu=True, bf16=False, report_to="none",
                          gradient_checkpointing=False, disable_tqdm=True, seed=0)
        kw = {}
        reward = ex["correct"]
        if mode != "TRL generate":
            rollout = ESPORollout(espo.ESPOConfig(alpha_s=0.5, beta=2.0), stop=mode.endswith("stop"))
            kw, reward = dict(rollout_func=rollout), rollout.reward(reward)
        trainer = GRPOTrainer(model=model, args=args, train_dataset=ex["sums_dataset"](256), processing_class=tokenizer,
                              reward_funcs=[reward], **kw)
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints every log line
            trainer.train()
        logs = [h for h in trainer.state.log_history if "step_time" in h][1:]  # the first step pays warm-ups
        step = min(h["step_time"] for h in logs)
        tokens = statistics.median(16 * h["completions/mean_length"] for h in logs)
        return dict(name=mode, step_s=step, rollout_tokens=tokens, ms_per_token=1e3 * step / tokens,
                    stop_rate=statistics.mean(h.get("espo/stop_rate", 0.0) for h in logs))

    modes = ("TRL generate", "ESPORollout", "ESPORollout + stop")
    runs = [run(m) for _ in range(a.trl_repeats) for m in modes]  # alternated, so load changes fall on all
    out = []
    for m in modes:
        mine = [r for r in runs if r["name"] == m]
        out.append(min(mine, key=lambda r: r["step_s"]))
    return out


def markdown(env: dict, a, gen: dict[int, list[dict]], trl: list[dict]) -> str:
    lines = [
        "# transformers and TRL adapters on the CPU",
        "",
        f"{env['date']}, {env['device']} ({os.cpu_count()} cores, load average {env['load_before']} before, "
        f"{env['load_after']} after), torch {env['torch']}, transformers {env['transformers']}, trl {env.get('trl')}; "
        f"`{env['command']}`.",
    ]
    for P, rows in gen.items():
        lines += [
            "",
            f"## generate: B = {P * a.n} rows ({P} prompts x {a.n}), prompt {a.prompt_len}, {a.new_tokens} new tokens, "
            f"random Qwen2 (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), float32, best of {a.repeats} "
            "interleaved rounds",
            "",
            "| run | wall s | ms / decode step | vs plain generate | vs espo.Decoder | tokens | stopped rows | "
            "tokens / s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['name']} | {r['wall_s']:.3f} | {r['ms_per_step']:.2f} | "
                         f"{r['vs_generate_ms']:+.2f} ms | {r['vs_decoder_ms']:+.2f} ms | {r['tokens']} | "
                         f"{r['stopped']} | {r['tokens_per_s']:.0f} |")
    lines += [
        "",
        "A stopped row keeps costing compute in generate (its batch never shrinks) and stops costing in espo.Decoder "
        "(its slot is freed): compare each runner's row with and without the stopper. The last two rows time the "
        "token draw alone on the step's [B, V] logits (per step; tokens = rows): on the CPU espo.sample is its exact "
        "integer torch reference, the bulk of the adapter's and the Decoder's cost over plain generate at this "
        "vocabulary.",
        "",
        f"## TRL GRPOTrainer: 16 completions per step (4 prompts x 4), max {a.new_tokens} tokens, best step time "
        f"of steps 2..{a.trl_steps} over {a.trl_repeats} alternated runs per mode (TRL's step_time: generation + "
        "scoring + update)",
        "",
        "| rollouts by | best s / step | median rollout tokens / step | ms / rollout token | stop rate |",
        "|---|---|---|---|---|",
    ]
    for r in trl:
        lines.append(f"| {r['name']} | {r['step_s']:.3f} | {r['rollout_tokens']:.0f} | {r['ms_per_token']:.2f} | "
                     f"{r['stop_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[4, 16], help="prompts per batch (B = prompts x n)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trl-steps", type=int, default=6)
    p.add_argument("--trl-repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, results under /tmp")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    if a.smoke:
        a.new_tokens, a.min_tokens, a.hidden, a.layers, a.vocab, a.repeats, a.trl_steps, a.trl_repeats = (
            8, 2, 32, 2, 256, 1, 2, 1)
        a.out = Path("/tmp/espo-bench-smoke")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    gen = {P: bench_generate(a, P) for P in a.prompts}
    trl = bench_trl(a)
    import trl as trl_module

    env = environment("cpu", trl=trl_module.__version__, load_before=load_before,
                      load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()), threads=torch.get_num_threads())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "integrations-hf.json").write_text(json.dumps(
        {"env": env, "args": {k: str(v) for k, v in vars(a).items()},
         "generate": [r for rows in gen.values() for r in rows], "trl": trl}, indent=2))
    md = markdown(env, a, gen, trl)
    write_report(a.out / "integrations-hf.md", md)
    print(md)


if __name__ == "__main__":
    main()
