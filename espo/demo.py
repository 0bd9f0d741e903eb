"""``espo demo``: what ESPO saves and what it costs, on the built-in task, on this machine.

Trains PPO against ESPO, and GRPO against GRPO + CERO, from the same shipped model on the same prompts,
then writes a report (markdown, JSON, PNG plots of accuracy against cumulative rollout tokens and of the
stop rate over training) and prints a summary: tokens saved, accuracy of each, false-stop rate, time per
step.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from .checkpoint import write_text_atomic
from .trainer import TrainConfig, train

PAIRS = (("ppo", "espo"), ("grpo", "grpo-cero"))

# The paper's stop settings (beta 7, alpha_s 0.9) were set for 8k-token math rollouts. On this task a
# wrong rollout is one unlikely digit followed by confident steps, so its smoothed regret peaks at about
# 0.22 with alpha_s = 0.9 but 1.4 with alpha_s = 0.5, while correct rollouts stay near 0 (measured on the
# shipped model, 400 rollouts); beta * value must sit between the two for stops to fire within a short
# demo, and the threshold controller gets a faster step so it settles within the demo's few batches.
# beta_min = 1 keeps the threshold above what correct rollouts reach: once the policy is good, fewer
# rollouts than target_rate go wrong, the controller lowers beta as far as it may, and a floor of 0.2
# let it stop correct rollouts, punish them with r_fail and collapse one seed of the study from 91% to 45%.
DEMO_ESPO = dict(alpha_s=0.5, beta=2.0, beta_min=1.0, eta_beta=0.5, target_rate=0.25)
# CERO's first pass over the prompts is uniform by design: a prompt set of 64 gives it several epochs.
DEMO = dict(steps=30, prompts_per_step=16, group_size=8, num_problems=64, eval_problems=128, eval_every=5, espo=DEMO_ESPO)
QUICK = dict(DEMO, steps=6, prompts_per_step=8, group_size=4, num_problems=16, eval_problems=32, eval_every=3)


def summarise(algo: str, history: list[dict]) -> dict[str, Any]:
    """One run's totals: rollout tokens, accuracy, stops, false stops, informative rollouts, time per step."""
    evals = [h["eval_accuracy"] for h in history if h.get("eval_accuracy") is not None]
    stopped = sum(h["stopped"] for h in history)
    rollouts = sum(h["rollouts"] for h in history)
    return {
        "algo": algo,
        "steps": len(history),
        "rollouts": rollouts,
        "rollout_tokens": history[-1]["cum_tokens"] if history else 0,
        "initial_accuracy": history[0].get("initial_eval_accuracy") if history else None,
        "final_accuracy": evals[-1] if evals else None,
        "train_success_rate": sum(h["success_rate"] * h["rollouts"] for h in history) / max(rollouts, 1),
        "stop_rate": stopped / max(rollouts, 1),
        "false_stop_rate": sum(h["false_stops"] for h in history) / stopped if stopped else None,
        "informative_fraction": sum(h["informative_fraction"] * h["rollouts"] for h in history) / max(rollouts, 1),
        "time_per_step_s": sum(h["time_s"] for h in history) / max(len(history), 1),
        # tokens after the first mistake of wrong rollouts that ran on: in a run without stopping, the share
        # of its tokens that a perfect stopper would have cut (None when the task cannot say where it went wrong)
        "doomed_fraction": (sum(h["doomed_tokens"] for h in history) / max(history[-1]["cum_tokens"], 1)
                            if history and all(h.get("doomed_tokens") is not None for h in history) else None),
    }


def ceiling_line(summaries: dict[str, dict]) -> str | None:
    """ESPO's saving beside the oracle ceiling measured on the PPO run, or None if either is missing."""
    ppo, espo = summaries.get("ppo"), summaries.get("espo")
    if not ppo or not espo or ppo.get("doomed_fraction") is None:
        return None
    saved = 1 - espo["rollout_tokens"] / max(ppo["rollout_tokens"], 1)
    ceiling = ppo["doomed_fraction"]
    share = f", {saved / ceiling:.0%} of that ceiling" if ceiling > 0 else ""
    return (f"A perfect stopper (every wrong PPO rollout stopped at the token of its first mistake) would have cut "
            f"{ceiling:.1%} of PPO's rollout tokens; ESPO used {saved:.1%} fewer than PPO{share}.")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3g}"
    return str(v)


def report_markdown(summaries: dict[str, dict], cfg: dict, seconds: float) -> str:
    lines = [
        "# espo demo report",
        "",
        f"Built-in chained-arithmetic task and shipped tiny model; {cfg['steps']} steps x {cfg['prompts_per_step']} prompts "
        f"x {cfg['group_size']} rollouts (CERO: the same total budget), seed {cfg['seed']}, device {cfg['device']}; "
        f"{seconds:.0f} s in all. Stop settings: {cfg['espo']}.",
        "",
        "| algo | rollout tokens | tokens saved vs baseline | accuracy start -> end | stop rate | false-stop rate "
        "| informative rollouts | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for base, other in PAIRS:
        for algo in (base, other):
            if algo not in summaries:
                continue
            s = summaries[algo]
            saved = None
            if algo == other and base in summaries and "espo" in algo:  # CERO pairs spend one budget by design
                saved = 1 - s["rollout_tokens"] / max(summaries[base]["rollout_tokens"], 1)
            lines.append(
                f"| {algo} | {s['rollout_tokens']} | {_fmt(saved, pct=True)} | {_fmt(s['initial_accuracy'], True)} -> "
                f"{_fmt(s['final_accuracy'], True)} | {_fmt(s['stop_rate'], True)} | {_fmt(s['false_stop_rate'], True)} | "
                f"{_fmt(s['informative_fraction'], True)} | {s['time_per_step_s']:.2f} |"
            )
    ceiling = ceiling_line(summaries)
    lines += ["", ceiling] if ceiling else []
    lines += [
        "",
        "Accuracy: sampled at the training temperature on held-out problems, without stopping. A false stop is a "
        "stopped rollout that, continued from its stop with the same seeds and no stopper, ends correct. "
        "Informative rollouts: those in groups whose rewards are not all equal (a non-zero GRPO advantage).",
        "",
        "![accuracy against rollout tokens, and the stop rate over training](demo.png)",
        "",
    ]
    return "\n".join(lines)


def accuracy_points(history: list[dict]) -> tuple[list[float], list[float]]:
    """(thousands of cumulative rollout tokens, held-out accuracy) at every evaluation, from 0 tokens."""
    pts = [(0, history[0].get("initial_eval_accuracy"))] + [(h["cum_tokens"], h["eval_accuracy"]) for h in history]
    pts = [(x / 1e3, y) for x, y in pts if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def finish_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot(histories: dict[str, list[dict]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, stops) = plt.subplots(1, 2, figsize=(12, 4.2))
    for algo, hist in histories.items():
        acc.plot(*accuracy_points(hist), marker="o", ms=3, label=algo, linewidth=2.2 if algo in ("espo", "grpo-cero") else 1.4)
        if any(h["stopped"] for h in hist) or algo in ("espo", "espo-cero"):
            steps = [h["step"] for h in hist]
            stops.plot(steps, [h["stop_rate"] for h in hist], marker="o", ms=3, label=f"{algo} stop rate")
            stops.plot(steps, [h["false_stops"] / max(h["rollouts"], 1) for h in hist], linestyle="--",
                       label=f"{algo} false stops / rollouts")
    finish_axes(acc, "Accuracy against rollout tokens", "cumulative rollout tokens (thousands)", "held-out accuracy (sampled)")
    finish_axes(stops, "ESPO stops over training", "training step", "fraction of rollouts")
    fig.tight_layout()
    fig.savefig(out_dir / "demo.png", dpi=130)
    plt.close(fig)


def run_demo(out_dir: str | Path = "espo-demo", *, algos: tuple[str, ...] = ("ppo", "espo", "grpo", "grpo-cero"),
             progress: bool = True, overwrite: bool = False, **overrides: Any) -> dict[str, dict]:
    """Train each of ``algos`` with the same settings (``overrides`` go to TrainConfig) and write the report.

    A folder that already holds a report or a run is refused unless ``overwrite`` is given."""
    out_dir = Path(out_dir)
    held = [p.name for p in (out_dir / "report.json", out_dir / "report.md", *(out_dir / a for a in algos)) if p.exists()]
    if held and not overwrite:
        raise ValueError(f"{out_dir} already holds a demo ({', '.join(held)}): choose another --out or pass --overwrite")
    t0 = time.perf_counter()
    histories, summaries = {}, {}
    base = TrainConfig(**{**DEMO, **overrides})
    for algo in algos:
        cfg = dataclasses.replace(base, algo=algo, out_dir=str(out_dir / algo))
        histories[algo] = train(cfg, progress=progress, overwrite=overwrite).history
        summaries[algo] = summarise(algo, histories[algo])
    seconds = time.perf_counter() - t0
    cfg_dict = base.to_dict()
    write_text_atomic(json.dumps({"config": cfg_dict, "summaries": summaries, "seconds": seconds, "histories": histories},
                                 indent=2), out_dir / "report.json")
    write_text_atomic(report_markdown(summaries, cfg_dict, seconds), out_dir / "report.md")
    plot(histories, out_dir)
    return summaries


def print_summary(summaries: dict[str, dict], out_dir: Path) -> None:
    print(f"\nespo demo: report in {out_dir / 'report.md'}")
    for base, other in PAIRS:
        if base in summaries and other in summaries:
            b, o = summaries[base], summaries[other]
            saved = 1 - o["rollout_tokens"] / max(b["rollout_tokens"], 1)
            tokens = f"{saved:+.1%} rollout tokens saved" if "espo" in other else "the same rollout budget"
            print(f"  {other} vs {base}: {tokens}; accuracy {_fmt(b['final_accuracy'], True)} "
                  f"-> {_fmt(o['final_accuracy'], True)}; informative rollouts {_fmt(b['informative_fraction'], True)} "
                  f"-> {_fmt(o['informative_fraction'], True)}")
    ceiling = ceiling_line(summaries)
    if ceiling:
        print("  " + ceiling)
    for s in summaries.values():
        print(f"  {s['algo']:>9}: stop rate {_fmt(s['stop_rate'], True)}, false-stop rate {_fmt(s['false_stop_rate'], True)}, "
              f"{s['time_per_step_s']:.2f} s/step")
