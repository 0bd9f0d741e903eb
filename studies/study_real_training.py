"""Training with and without ESPO's stops on a real model: GRPO against GRPO + ESPO, PPO against ESPO.

    python3 studies/study_real_training.py MODEL_DIR --preset smollm2 --steps 40 --seeds 0 1 2 \\
        --eval-problems 512 --out studies/results/real-training          # a GPU: see scripts/gpu_study.sh
    python3 studies/study_real_training.py --preset quick --steps 2 --seeds 0 --eval-problems 16 --out /tmp/rt  # tiny

Each (algorithm, seed) is one ordinary ``espo train`` run folder under OUT-runs/ (resumable: rerunning the
command continues unfinished runs and reuses finished ones). Every run uses the preset's settings, the same
training prompts and the same held-out problems (the trainer's own evaluation seed, never the calibration
prompts that chose the preset's stop settings), evaluated before the first step and after the last. Reported per
algorithm: held-out accuracy with its 95% Wilson interval per seed and the seeds' mean and spread, rollout
tokens, rollout / update / step time (summed over steps, with the load average of the whole study), stop rate and
exact false stops, and for the critic algorithms the value head's explained variance per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from espo.rl.config import ALGOS, PRESETS, TrainConfig
from espo.rl.run_folder import CHECKPOINT_FILE
from espo.rl.trainer import setup, train_step
from espo.stats import beyond_noise, newcombe_interval, paired_saving, wilson_interval
from studies import common

PAIRS = (("grpo", "grpo-espo"), ("ppo", "espo"))


def stop_settings(algo: str) -> dict:
    """The critic-free algorithms stop on the regret rule: the value rule needs a per-token value."""
    return {} if ALGOS[algo].critic else {"value_rule": False, "regret_rule": True}


def run_seed(args, seed: int, bar) -> dict[str, list[dict]]:
    """Every algorithm at ``seed``, their steps interleaved (each algorithm's step k, then each one's step k + 1),
    so that their times are measured side by side under the same load. Each run folder resumes (a finished run is
    reused); the load average at each step is appended to OUT-runs/load.jsonl."""
    runs = {}
    try:
        for algo in args.algos:
            out_dir = Path(f"{args.out}-runs") / f"{algo}-seed{seed}"
            cfg = TrainConfig.from_preset(args.preset, algo=algo, seed=seed, steps=args.steps, model=args.model,
                                          eval_problems=args.eval_problems, eval_every=args.steps,
                                          out_dir=str(out_dir), device=args.device,
                                          espo=stop_settings(algo),
                                          **({} if args.value_lr is None else {"value_lr": args.value_lr}))
            runs[algo] = setup(cfg, resume=(out_dir / CHECKPOINT_FILE).is_file())
        for step in range(args.steps):
            for algo, run in runs.items():
                if step < run.start:
                    continue
                load = [round(x, 2) for x in os.getloadavg()]
                record = train_step(run, step)
                with open(Path(f"{args.out}-runs") / "load.jsonl", "a") as f:
                    f.write(json.dumps({"seed": seed, "algo": algo, "step": step, "load_before": load}) + "\n")
                bar.update(1)
                bar.set_postfix(seed=seed, algo=algo, stop=f"{record['stop_rate']:.2f}")
    finally:
        for run in runs.values():
            run.close()
    return {algo: run.history for algo, run in runs.items()}


def summarise(algo: str, runs: dict[int, list[dict]], eval_problems: int) -> dict:
    per_seed = {}
    for seed, hist in runs.items():
        final = hist[-1]["eval_accuracy"]
        hits = round(final * eval_problems)
        stopped, false = sum(h["stopped"] for h in hist), sum(h["false_stops"] for h in hist)
        checked = sum(h.get("false_stop_checked", h["stopped"]) for h in hist)
        per_seed[seed] = {
            "initial_accuracy": hist[0].get("initial_eval_accuracy"), "final_accuracy": final,
            "final_hits": hits, "final_interval": wilson_interval(hits, eval_problems),
            "tokens": hist[-1]["cum_tokens"],
            "rollout_time_s": sum(h["rollout_time_s"] for h in hist),
            "update_time_s": sum(h["update_time_s"] for h in hist),
            "step_time_s": sum(h["step_time_s"] for h in hist),
            "stopped": stopped, "stop_rate": stopped / max(1, sum(h["rollouts"] for h in hist)),
            "false_stops": false, "false_stop_share": false / checked if checked else None,
            "train_success": [h["success_rate"] for h in hist],
            "explained_variance": [h.get("explained_variance") for h in hist] if ALGOS[algo].critic else None,
            "value_at_start": [h.get("value_at_start") for h in hist] if ALGOS[algo].critic else None,
        }
    finals = [s["final_accuracy"] for s in per_seed.values()]
    hits, n = sum(s["final_hits"] for s in per_seed.values()), eval_problems * len(per_seed)
    stopped = sum(s["stopped"] for s in per_seed.values())
    return {"algo": algo, "per_seed": per_seed, "pooled_accuracy": hits / n, "pooled_hits": hits, "pooled_n": n,
            "pooled_interval": wilson_interval(hits, n),
            "seed_std": statistics.pstdev(finals) if len(finals) > 1 else None,
            "pooled_false_stop_share": sum(s["false_stops"] for s in per_seed.values()) / stopped if stopped else None,
            **{f"mean_{k}": statistics.mean(s[k] for s in per_seed.values())
               for k in ("tokens", "rollout_time_s", "update_time_s", "step_time_s", "stop_rate")}}


SAVED = ("tokens", "rollout_time_s", "update_time_s", "step_time_s")


def paired_savings(base: dict[int, list[dict]], other: dict[int, list[dict]]) -> dict:
    """What ``other`` saved against ``base``: in total over every seed and step, per seed, and per paired step (same
    seed, same step, run one after the other), each time saving with its 95% bootstrap interval over the paired
    steps (espo.stats.paired_saving). The steps where ``other`` stopped nothing (its first: the stopper's
    statistics are not set yet) did the same work as ``base``'s: their differences show the timing noise."""
    seeds = sorted(set(base) & set(other))
    steps = [(s, b, o) for s in seeds for b, o in zip(base[s], other[s])]
    out: dict = {"per_seed": {}, "per_step": [], "interval": {}, "beyond_noise": {}, "same_work_noise": {}}
    for key in SAVED:
        out[key], out["interval"][key] = paired_saving([b[key] for _, b, _ in steps], [o[key] for _, _, o in steps])
        out["beyond_noise"][key] = beyond_noise(out["interval"][key])
    for s in seeds:
        out["per_seed"][s] = {k: 1 - sum(o[k] for o in other[s]) / sum(b[k] for b in base[s]) for k in SAVED}
    for s, b, o in steps:
        out["per_step"].append({"seed": s, "step": b["step"], "stops": o["stopped"],
                                **{k: 1 - o[k] / b[k] for k in SAVED}})
    for key in SAVED[1:]:
        out["same_work_noise"][key] = max((abs(r[key]) for r in out["per_step"] if not r["stops"]), default=None)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(results: dict[str, dict], pairs: dict[str, dict], env: dict, args) -> list[str]:
    cfg = TrainConfig.from_preset(args.preset, **({} if args.value_lr is None else {"value_lr": args.value_lr}))
    md = [f"# Training with and without ESPO's stops on {env['model']}", "",
          f"{env['date']}, {env['device']}, torch {env['torch']}, {env['threads']} torch threads. Command: "
          f"`{env['command']}`. Load average (1, 5, 15 min) before {env['load_before']}, after {env['load_after']}; "
          f"at each step: {env['load_per_step']}.", "",
          f"Preset {args.preset}: {cfg.prompts_per_step} prompts x {cfg.group_size} rollouts a step in "
          f"{cfg.max_batch} decoder slots (pool = batch: a step's rollouts all start together and the step waits "
          f"for its longest), T {cfg.temperature}, top_p {cfg.top_p}, lr {cfg.lr}, value head's lr "
          f"{cfg.value_lr or cfg.lr}, stop settings {cfg.espo}. "
          f"{args.steps} steps, seeds {args.seeds}; at each seed the algorithms' steps are interleaved "
          f"(each one's step k, then each one's step k + 1), on the same training prompts. Held-out accuracy: "
          f"{args.eval_problems} problems per seed (the trainer's evaluation seed, seed + 1000003: never the "
          "calibration prompts that chose the stop settings), sampled at the training temperature before the first "
          "step and after the last; pooled over seeds below. False stops are exact: every stopped rollout is "
          "continued with its own seed and no stopper, timed apart from the step.", "",
          "| algorithm | accuracy before | accuracy after, pooled [95% Wilson] | after, per seed | rollout tokens | "
          "rollout s | update s | step s | stop rate | false stops / stops |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, r in results.items():
        seeds = list(r["per_seed"].values())
        before = ", ".join(_pct(s["initial_accuracy"]) for s in seeds)
        after = ", ".join(_pct(s["final_accuracy"]) for s in seeds)
        lo, hi = r["pooled_interval"]
        md.append(f"| {algo} | {before} | {r['pooled_accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | {after} | "
                  f"{r['mean_tokens']:.0f} | {r['mean_rollout_time_s']:.0f} | {r['mean_update_time_s']:.0f} | "
                  f"{r['mean_step_time_s']:.0f} | {r['mean_stop_rate']:.1%} | {_pct(r['pooled_false_stop_share'])} |")
    md += ["", "Tokens and times are per-run sums over the steps, means over seeds (every run in the json). Step time "
           "= rollouts + rewards + update; evaluation and false-stop checks are timed apart.", "",
           "## Each algorithm with stops against the same algorithm without", "",
           "| pair | accuracy after (points) [95% Newcombe] | tokens saved (per seed) | rollout time saved "
           "(per seed) [95% interval over paired steps] | update time saved | step time saved | timing noise "
           "(same work) |", "|---|---|---|---|---|---|---|"]
    for name, p in pairs.items():
        base, other = name.split(" vs ")[1], name.split(" vs ")[0]
        b, o = results[base], results[other]
        lo, hi = newcombe_interval(b["pooled_hits"], b["pooled_n"], o["pooled_hits"], o["pooled_n"])
        gain = o["pooled_accuracy"] - b["pooled_accuracy"]
        cells = []
        for key in SAVED:
            per_seed = ", ".join(_pct(s[key]) for s in p["per_seed"].values())
            cell = f"{p[key]:.1%} ({per_seed})"
            if key != "tokens" and p["interval"][key] is not None:
                lo_s, hi_s = p["interval"][key]
                verdict = ": none beyond noise" if not p["beyond_noise"][key] else (": slower, beyond noise" if hi_s < 0
                                                                                    else "")
                cell += f" [{lo_s:.1%}, {hi_s:.1%}]{verdict}"
            cells.append(cell)
        noise = p["same_work_noise"]["step_time_s"]
        md.append(f"| {name} | {100 * gain:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {' | '.join(cells)} | "
                  f"{'-' if noise is None else f'+-{noise:.1%}'} |")
    md += ["", "Intervals: 95% bootstrap over the paired steps (every seed's), espo.stats.paired_saving; a saving "
           "whose interval holds 0 is none. 'Timing noise' is the largest step-time difference between paired "
           "steps that did the same work (the first step, before the stopper has its statistics). An accuracy "
           "difference whose interval holds 0 is no difference.", ""]
    for algo, r in results.items():
        if ALGOS[algo].critic:
            for seed, s in r["per_seed"].items():
                ev = ", ".join("-" if v is None else f"{v:.2f}" for v in s["explained_variance"])
                vs = ", ".join("-" if v is None else f"{v:.2f}" for v in s["value_at_start"])
                tr = ", ".join(f"{v:.2f}" for v in s["train_success"])
                md.append(f"- {algo}, seed {seed}: value head's explained variance per step {ev}; its mean value at a "
                          f"rollout's start {vs}; training success {tr}")
    return md


def plot(results: dict[str, dict], pairs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (algo, r) in enumerate(results.items()):
        lo, hi = r["pooled_interval"]
        ax.errorbar(i, r["pooled_accuracy"], yerr=[[r["pooled_accuracy"] - lo], [hi - r["pooled_accuracy"]]],
                    fmt="o", capsize=4, label="after" if i == 0 else None, color="tab:blue")
        before = [s["initial_accuracy"] for s in r["per_seed"].values() if s["initial_accuracy"] is not None]
        if before:
            ax.plot(i - 0.15, statistics.mean(before), "x", color="tab:grey", label="before" if i == 0 else None)
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("held-out accuracy (pooled seeds, 95% Wilson)")
    ax.set_title("Held-out accuracy")
    ax.legend(fontsize=8)
    for j, (name, p) in enumerate(pairs.items()):
        for k, key in enumerate(SAVED):
            xs = [j * 5 + k] * len(p["per_step"])
            bx.scatter(xs, [r[key] for r in p["per_step"]], s=12,
                       c=["tab:green" if r["stops"] else "tab:grey" for r in p["per_step"]])
            bx.plot([j * 5 + k - 0.3, j * 5 + k + 0.3], [p[key]] * 2, color="black")
    bx.axhline(0, color="black", lw=0.8, ls=":")
    bx.set_xticks([j * 5 + k for j in range(len(pairs)) for k in range(len(SAVED))],
                  [f"{n.split(' vs ')[0]}\n{k.replace('_time_s', '')}" for n in pairs for k in SAVED], fontsize=7)
    bx.set_ylabel("saved against the same algorithm without stops")
    bx.set_title("Paired steps (green: with stops, grey: same work); bar: total")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a converted checkpoint folder (default: the tiny model)")
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--algos", nargs="+", default=["grpo", "grpo-espo", "ppo", "espo"], choices=sorted(ALGOS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-problems", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--value-lr", type=float, default=None, help="the value head's lr (default: the preset's; 0: lr)")
    ap.add_argument("--out", type=Path, required=True,
                    help="the results' stem: OUT.json, OUT.md, OUT.png; runs in OUT-runs/")
    args = ap.parse_args()
    env = {**common.environment("cuda" if args.device.startswith("cuda") else "cpu"),
           "command": "python3 " + " ".join(sys.argv), "model": args.model or "the built-in tiny model",
           "load_before": [round(x, 2) for x in os.getloadavg()], "threads": torch.get_num_threads()}
    runs: dict[str, dict[int, list[dict]]] = {algo: {} for algo in args.algos}
    with tqdm(total=len(args.seeds) * len(args.algos) * args.steps, desc="study", unit="step") as bar:
        for seed in args.seeds:  # seeds outermost: a study cut short still has every algorithm at the first seed
            for algo, history in run_seed(args, seed, bar).items():
                runs[algo][seed] = history
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {algo: summarise(algo, r, args.eval_problems) for algo, r in runs.items()}
    pairs = {f"{o} vs {b}": paired_savings(runs[b], runs[o]) for b, o in PAIRS if b in runs and o in runs}
    load_file = Path(f"{args.out}-runs") / "load.jsonl"
    env["load_per_step"] = "not recorded" if not load_file.is_file() else \
        "min {:.2f}, max {:.2f} (1-min average; OUT-runs/load.jsonl)".format(
            *(f(json.loads(line)["load_before"][0] for line in load_file.read_text().splitlines()) for f in (min, max)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results, "pairs": pairs,
                                                         "histories": runs}, indent=1))
    md = markdown(results, pairs, env, args)
    common.write_report(args.out.with_suffix(".md"), "\n".join(md) + "\n")
    plot(results, pairs, args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
