"""Training with and without ESPO's stops on a real model: GRPO against GRPO + ESPO, PPO against ESPO.

    python3 bench/study_real_training.py MODEL_DIR --preset smollm2 --steps 40 --seeds 0 1 2 \\
        --eval-problems 512 --out bench/results/real-training          # a GPU: see scripts/gpu_study.sh
    python3 bench/study_real_training.py --preset quick --steps 2 --seeds 0 --eval-problems 16 --out /tmp/rt  # tiny

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

import common
from tqdm.auto import tqdm

from espo.config import ALGOS, PRESETS, TrainConfig
from espo.demo import wilson_interval
from espo.run_folder import CHECKPOINT_FILE
from espo.trainer import setup, train_step

PAIRS = (("grpo", "grpo-espo"), ("ppo", "espo"))


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
                                          out_dir=str(out_dir), device=args.device)
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
        per_seed[seed] = {
            "initial_accuracy": hist[0].get("initial_eval_accuracy"), "final_accuracy": final,
            "final_interval": wilson_interval(hits, eval_problems), "tokens": hist[-1]["cum_tokens"],
            "rollout_time_s": sum(h["rollout_time_s"] for h in hist),
            "update_time_s": sum(h["update_time_s"] for h in hist),
            "step_time_s": sum(h["step_time_s"] for h in hist),
            "stop_rate": stopped / max(1, sum(h["rollouts"] for h in hist)),
            "false_stop_share": false / stopped if stopped else None,
            "explained_variance": [h.get("explained_variance") for h in hist] if ALGOS[algo].critic else None,
        }
    finals = [s["final_accuracy"] for s in per_seed.values()]
    return {"algo": algo, "per_seed": per_seed, "mean_final_accuracy": statistics.mean(finals),
            "seed_std": statistics.pstdev(finals) if len(finals) > 1 else None,
            "mean_tokens": statistics.mean(s["tokens"] for s in per_seed.values()),
            "mean_step_time_s": statistics.mean(s["step_time_s"] for s in per_seed.values())}


def markdown(results: dict[str, dict], env: dict, args) -> list[str]:
    md = [f"# Training with and without ESPO's stops on {env['model']}", "",
          f"{env['date']}, {env['device']}, torch {env['torch']}, load average before {env['load_before']}, after "
          f"{env['load_after']}. Command: `{env['command']}`. Preset {args.preset}, {args.steps} steps, seeds "
          f"{args.seeds}, {args.eval_problems} held-out problems evaluated before and after.", "",
          "| algorithm | final accuracy per seed [95% interval] | mean (seed std) | tokens | rollout s | update s | "
          "step s | stop rate | false stops / stops |", "|---|---|---|---|---|---|---|---|---|"]
    for algo, r in results.items():
        seeds = "; ".join(f"{s['final_accuracy']:.1%} [{s['final_interval'][0]:.1%}, {s['final_interval'][1]:.1%}]"
                          for s in r["per_seed"].values())
        first = next(iter(r["per_seed"].values()))
        std = f" ({r['seed_std']:.1%})" if r["seed_std"] is not None else ""
        false = first["false_stop_share"]
        md.append(f"| {algo} | {seeds} | {r['mean_final_accuracy']:.1%}{std} | {r['mean_tokens']:.0f} | "
                  f"{first['rollout_time_s']:.0f} | {first['update_time_s']:.0f} | {r['mean_step_time_s']:.0f} | "
                  f"{first['stop_rate']:.1%} | {'-' if false is None else f'{false:.1%}'} |")
    md += ["", "Times are of the first seed's run (all seeds in the json); tokens and step time are seed means. "
           "An accuracy difference inside the intervals is no difference."]
    for base, with_stops in PAIRS:
        if base in results and with_stops in results:
            b, w = results[base], results[with_stops]
            gain = 100 * (w["mean_final_accuracy"] - b["mean_final_accuracy"])
            md.append(f"- {with_stops} vs {base}: accuracy {gain:+.1f} points, tokens "
                      f"{w['mean_tokens'] / b['mean_tokens'] - 1:+.1%}, step time "
                      f"{w['mean_step_time_s'] / b['mean_step_time_s'] - 1:+.1%}")
    for algo, r in results.items():
        if ALGOS[algo].critic:
            ev = next(iter(r["per_seed"].values()))["explained_variance"]
            md.append(f"- {algo}: value head's explained variance per step (first seed): "
                      + ", ".join("-" if v is None else f"{v:.2f}" for v in ev))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a converted checkpoint folder (default: the tiny model)")
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--algos", nargs="+", default=["grpo", "grpo-espo", "ppo", "espo"], choices=sorted(ALGOS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-problems", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", type=Path, required=True, help="the results' stem: OUT.json, OUT.md; runs in OUT-runs/")
    args = ap.parse_args()
    env = {**common.environment("cuda" if args.device.startswith("cuda") else "cpu"),
           "command": "python3 " + " ".join(sys.argv), "model": args.model or "the built-in tiny model",
           "load_before": [round(x, 2) for x in os.getloadavg()]}
    runs: dict[str, dict[int, list[dict]]] = {algo: {} for algo in args.algos}
    with tqdm(total=len(args.seeds) * len(args.algos) * args.steps, desc="study", unit="step") as bar:
        for seed in args.seeds:  # seeds outermost: a study cut short still has every algorithm at the first seed
            for algo, history in run_seed(args, seed, bar).items():
                runs[algo][seed] = history
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {algo: summarise(algo, r, args.eval_problems) for algo, r in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    md = markdown(results, env, args)
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
