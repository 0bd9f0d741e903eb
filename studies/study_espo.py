"""The token-savings study: PPO vs ESPO and GRPO vs GRPO+CERO over several seeds.

Each seed trains all four algorithms from the same model on the same prompts (``espo.app.demo.run_demo``);
false stops are measured exactly, by continuing every stopped rollout from its stop with the same seeds
and no stopper. Writes studies/results/study.{json,md,png} (--name changes the stem): mean and std over seeds of
rollout tokens, final held-out accuracy, stop and false-stop rates and informative-rollout fractions, with the targets
(ESPO >= 20% fewer tokens than PPO at accuracy no worse beyond seed noise; false stops < 5%; CERO more
informative rollouts than GRPO at equal budget, accuracy at least as high).

    python studies/study_espo.py                              # the demo's settings, 3 seeds, on the CPU
    # a GPU run: a larger model of a longer task (scripts/make_tiny_model.py's docstring), then
    python studies/study_espo.py --device cuda --model /tmp/arith-big --steps 200 --prompts-per-step 64 \\
        --num-problems 4096

A model made by scripts/make_tiny_model.py carries its task in card.json, so --model needs nothing else.
After a kill (a device call's time limit, say), the same command with --resume reuses the finished seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from espo.app.demo import DEMO, DEMO_ESPO, PAIRS, accuracy_points, finish_axes, run_demo, savings
from espo.engine.models import checkpoint_card
from espo.ops.stopper import ESPOConfig
from espo.rl.trainer import TrainConfig
from studies.common import RESULTS, write_report

METRICS = ("rollout_tokens", "rollout_time_s", "update_time_s", "step_time_s", "final_accuracy", "stop_rate",
           "false_stop_rate", "informative_fraction", "doomed_fraction")
SAVINGS = ("tokens_saved", "rollout_time_saved", "step_time_saved")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    algos = per_seed[0].keys()
    return {a: {m: mean_std([s[a][m] for s in per_seed]) for m in METRICS} for a in algos}


def seed_savings(per_seed: list[dict]) -> dict:
    """Per algorithm of each pair, against its baseline: mean and std over seeds of the tokens, rollout time and
    step time it saved, and its false-stop rate (the JSON's headline)."""
    out = {}
    for base, other in PAIRS:
        per = [savings(s[base], s[other]) for s in per_seed if base in s and other in s]
        if per:
            out[other] = {k: mean_std([p[k] for p in per]) for k in SAVINGS}
            out[other]["false_stop_rate"] = mean_std([s[other]["false_stop_rate"] for s in per_seed])
            out[other]["baseline"] = base
    return out


def verdicts(per_seed: list[dict], agg: dict) -> list[str]:
    saved = [1 - s["espo"]["rollout_tokens"] / s["ppo"]["rollout_tokens"] for s in per_seed]
    times = [savings(s["ppo"], s["espo"]) for s in per_seed]
    tok = statistics.fmean(saved)
    roll = statistics.fmean(t["rollout_time_saved"] for t in times)
    step_ = statistics.fmean(t["step_time_saved"] for t in times)
    acc_gap = [s["espo"]["final_accuracy"] - s["ppo"]["final_accuracy"] for s in per_seed]
    noise = max(agg["ppo"]["final_accuracy"][1] or 0.0, agg["espo"]["final_accuracy"][1] or 0.0)
    fs = agg["espo"]["false_stop_rate"][0]
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    ceiling = [s["ppo"].get("doomed_fraction") for s in per_seed]
    ceiling_text = ""
    if all(c is not None for c in ceiling):
        ceiling_text = (f"; a perfect stopper would have cut {statistics.fmean(ceiling):.1%} of PPO's tokens (per seed "
                        f"{', '.join(f'{c:.1%}' for c in ceiling)}), so ESPO got "
                        f"{statistics.fmean(saved) / max(statistics.fmean(ceiling), 1e-9):.0%} of that ceiling")
    ratio = lambda x: f"{x / tok:.2f}x" if tok > 0 else "-"  # noqa: E731
    lines = [
        f"ESPO rollout tokens vs PPO: {statistics.fmean(saved):.1%} fewer (per seed "
        f"{', '.join(f'{x:.1%}' for x in saved)}); target >= 20%: {ok(statistics.fmean(saved) >= 0.2)}{ceiling_text}",
        f"ESPO final accuracy minus PPO's: {statistics.fmean(acc_gap):+.1%} (seed noise, std {noise:.1%}); "
        f"target no worse beyond noise: {ok(statistics.fmean(acc_gap) >= -noise)}",
        f"ESPO false-stop rate: {'-' if fs is None else f'{fs:.1%}'} "
        f"({'no stops' if fs is None else 'of stopped rollouts'}); target <= 5%: {ok(fs is not None and fs <= 0.05)}",
        f"ESPO vs PPO: {tok:.1%} tokens saved, {roll:.1%} rollout time saved ({ratio(roll)} the tokens saved; target "
        f">= 0.8x: {ok(tok > 0 and roll >= 0.8 * tok)}), {step_:.1%} step time saved ({ratio(step_)}; target >= 0.6x: "
        f"{ok(tok > 0 and step_ >= 0.6 * tok)})",
    ]
    if "grpo" in agg and "grpo-cero" in agg:
        inf_gain = agg["grpo-cero"]["informative_fraction"][0] - agg["grpo"]["informative_fraction"][0]
        cero_gap = agg["grpo-cero"]["final_accuracy"][0] - agg["grpo"]["final_accuracy"][0]
        lines.append(f"GRPO+CERO informative rollouts minus GRPO's: {inf_gain:+.1%}; final accuracy {cero_gap:+.1%}; "
                     f"target more informative and at least as accurate: {ok(inf_gain > 0 and cero_gap >= -noise)}")
    return lines


def stop_settings(pairs: list[str], parser: argparse.ArgumentParser, paper: bool = False) -> dict:
    """The demo's ESPO settings (with ``paper``: the paper's, ``ESPOConfig``'s defaults) with KEY=VALUE
    overrides (numbers)."""
    settings = dataclasses.asdict(ESPOConfig()) if paper else dict(DEMO_ESPO)
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in ESPOConfig.__dataclass_fields__ or not value:
            parser.error(f"--espo {pair!r}: expected KEY=VALUE with KEY one of "
                         f"{', '.join(ESPOConfig.__dataclass_fields__)}")
        settings[key] = int(value) if key == "min_tokens" else float(value)
    return settings


def finished_seed(work: Path, settings: dict) -> dict | None:
    """The report of a seed already run under ``work`` with exactly these settings, else None."""
    path = work / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    expected = json.loads(json.dumps(TrainConfig(**{**DEMO, **settings}).to_dict()))
    return report if report.get("config") == expected else None


def markdown(agg: dict, lines: list[str], env: dict) -> str:
    out = [
        f"ESPO study: {env['seeds']} seeds, {env['settings']}; {env['device_name']}, torch {env['torch']}, "
        f"{env['date']}, {env['minutes']:.1f} min. Command: `{env['command']}`."
        + (f" The model was made by `{env['model_recipe']}`." if env.get("model_recipe") else "")
        + (f" Stop settings: {env['espo']}." if env.get("espo") else ""),
        "",
        "| algo | rollout tokens | rollout s | update s | step s | final accuracy | stop rate | false-stop rate "
        "| informative rollouts | doomed tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seconds = "{:.1f} ± {:.1f}"
    fmt = {"rollout_tokens": "{:.0f} ± {:.0f}", "rollout_time_s": seconds, "update_time_s": seconds,
           "step_time_s": seconds}
    for algo, row in agg.items():
        cells = []
        for m in METRICS:
            mu, sd = row[m]
            cells.append("-" if mu is None else fmt.get(m, "{:.1%} ± {:.1%}").format(mu, sd))
        out.append(f"| {algo} | " + " | ".join(cells) + " |")
    notes = ["", "Seconds are totals over a run; step = rollout + rewards + update, with the measuring (false-stop "
             "continuation, doomed-token oracle, evaluation) timed apart. The algorithms' steps run interleaved, so "
             "their times are measured side by side.", "",
             "Doomed tokens: the share of a run's rollout tokens that came after the first mistake of a wrong "
             "rollout that ran to its end (in PPO's run, what a perfect stopper would have cut; in ESPO's, what it "
             "left uncut)."]
    return "\n".join(out + notes + [""] + [f"- {x}" for x in lines] + ["", f"![study]({env['name']}.png)", ""])


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"ppo": "tab:blue", "espo": "tab:orange", "grpo": "tab:green", "grpo-cero": "tab:red"}
    for i, rep in enumerate(reports):
        for algo, hist in rep.items():
            ax = axes[0] if algo in ("ppo", "espo") else axes[1]
            ax.plot(*accuracy_points(hist), color=colors[algo], alpha=0.8, label=algo if i == 0 else None, marker="o",
                    ms=2)
    for ax, title in zip(axes, ("PPO vs ESPO", "GRPO vs GRPO + CERO (equal budget)")):
        finish_axes(ax, title + " (one line per seed)", "cumulative rollout tokens (thousands)",
                    "held-out accuracy (sampled)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a local checkpoint trained for the built-in task")
    parser.add_argument("--steps", type=int, default=DEMO["steps"])
    parser.add_argument("--prompts-per-step", type=int, default=DEMO["prompts_per_step"])
    parser.add_argument("--num-problems", type=int, default=DEMO["num_problems"], help="training prompts")
    parser.add_argument("--eval-problems", type=int, default=DEMO["eval_problems"], help="held-out prompts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="study", help="the results' file stem: OUT/NAME.{json,md,png}")
    parser.add_argument("--work", type=Path, default=Path("runs/study"), help="where the runs' checkpoints go")
    parser.add_argument("--espo", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stop settings over the demo's (espo.app.demo.DEMO_ESPO), e.g. --espo eta_beta=1.0")
    parser.add_argument("--paper-stops", action="store_true",
                        help="start from the paper's stop settings (espo.ESPOConfig's defaults) instead of the demo's")
    studied = [algo for pair in PAIRS for algo in pair]
    parser.add_argument("--algos", nargs="+", default=studied, choices=studied,
                        help="the algorithms to run (ppo and espo at least)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the seeds already finished under --work with the same settings (after a kill)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the runs under --work and the results OUT/NAME.*")
    args = parser.parse_args(argv)
    if (args.out / f"{args.name}.json").exists() and not args.overwrite:
        parser.error(f"{args.out / (args.name + '.json')} holds a finished study: pass --overwrite or another --name")
    if not {"ppo", "espo"} <= set(args.algos):
        parser.error("--algos must hold ppo and espo (the study compares them)")
    espo = stop_settings(args.espo, parser, args.paper_stops)
    t0 = datetime.datetime.now()
    reports, per_seed = [], []
    for seed in range(args.seeds):
        settings = dict(seed=seed, device=args.device, model=args.model, steps=args.steps,
                        prompts_per_step=args.prompts_per_step, num_problems=args.num_problems,
                        eval_problems=args.eval_problems, espo=espo)
        report = finished_seed(args.work / f"seed{seed}", settings) if args.resume else None
        if report is None:
            run_demo(args.work / f"seed{seed}", algos=tuple(args.algos), overwrite=args.overwrite or args.resume,
                     **settings)
            report = json.loads((args.work / f"seed{seed}" / "report.json").read_text())
        else:
            print(f"seed {seed}: reusing the finished runs in {args.work / f'seed{seed}'}")
        per_seed.append(report["summaries"])
        reports.append(report["histories"])
    agg = aggregate(per_seed)
    saved = seed_savings(per_seed)
    lines = verdicts(per_seed, agg)
    env = {
        "name": args.name, "seeds": args.seeds, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": platform.python_version(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (2 cores)",
        "espo": espo,
        "settings": f"{args.steps} steps x {args.prompts_per_step} prompts x {DEMO['group_size']} rollouts, "
                    f"{args.num_problems} training prompts, {args.eval_problems} held-out, "
                    f"model {args.model or 'built-in tiny-arith'}",
        "minutes": (datetime.datetime.now() - t0).total_seconds() / 60,
        "command": " ".join(["python studies/study_espo.py"] + sys.argv[1:]),
        "model_recipe": (checkpoint_card(args.model) or {}).get("command") if args.model else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"environment": env, "savings": saved, "per_seed": per_seed,
                                                     "aggregate": agg, "verdicts": lines}, indent=2))
    write_report(args.out / f"{args.name}.md", markdown(agg, lines, env))
    plot(reports, args.out / f"{args.name}.png")
    print(markdown(agg, lines, env))


if __name__ == "__main__":
    main()
