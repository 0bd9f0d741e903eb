"""``espo demo``: what ESPO saves and what it costs, on the built-in task, on this machine.

Trains PPO against ESPO, and GRPO against GRPO + CERO, from the same shipped model on the same prompts, one
step of each in turn so that their times are measured side by side (whatever else the machine is doing
falls on all of them alike). Writes a report (markdown, JSON, PNG plots of accuracy against cumulative
rollout tokens and of the stop rate over training) and prints a summary: tokens saved, rollout time saved
and step time saved, accuracy, false-stop rate.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from espo.rl.checkpoint import write_text_atomic
from espo.rl.config import ALGOS, DEMO_ESPO, PRESETS, TrainConfig
from espo.rl.run_folder import CHECKPOINT_FILE, check_writable
from espo.rl.trainer import Run, setup, train_step
from espo.stats import MIN_PAIRS, beyond_noise, paired_saving, wilson_interval

PAIRS = (("ppo", "espo"), ("grpo", "grpo-cero"))
DEMO, QUICK = PRESETS["demo"], PRESETS["quick"]
__all__ = [
    "DEMO",
    "DEMO_ESPO",
    "PAIRS",
    "QUICK",
    "run_demo",
    "savings",
    "summarise",
]
TIMES = ("rollout_time_s", "update_time_s", "step_time_s", "measure_time_s", "eval_time_s")


def summarise(algo: str, history: list[dict], slots: int | None = None) -> dict[str, Any]:
    """One run's totals: rollout tokens and times, accuracy, stops, false stops, informative rollouts; ``slots``
    (the decoder's pool) is recorded beside the rollouts of a step, for the reader to see whether the pool was full."""
    evals = [h["eval_accuracy"] for h in history if h.get("eval_accuracy") is not None]
    stopped = sum(h["stopped"] for h in history)
    checked = sum(h.get("false_stop_checked", h["stopped"]) for h in history)
    false = sum(h["false_stops"] for h in history)
    rollouts = sum(h["rollouts"] for h in history)
    return {
        "algo": algo,
        "slots": slots,
        "steps": len(history),
        "rollouts": rollouts,
        "rollout_tokens": history[-1]["cum_tokens"] if history else 0,
        "initial_accuracy": history[0].get("initial_eval_accuracy") if history else None,
        "final_accuracy": evals[-1] if evals else None,
        "train_success_rate": sum(h["success_rate"] * h["rollouts"] for h in history) / max(rollouts, 1),
        "stop_rate": stopped / max(rollouts, 1),
        # a share of the stops may be checked (TrainConfig.false_stop_sample): the rate is then an estimate
        "false_stop_rate": false / checked if checked else None,
        "false_stop_interval": wilson_interval(false, checked),
        "false_stops_checked": checked,
        "informative_fraction": sum(h["informative_fraction"] * h["rollouts"] for h in history) / max(rollouts, 1),
        # seconds over the run: the step's own parts, and what measuring it cost (never inside the step time)
        **{t: sum(h.get(t, 0.0) for h in history) for t in TIMES},
        "per_step": {t: [h[t] for h in history] for t in ("rollout_time_s", "step_time_s")},
        "time_per_step_s": sum(h["step_time_s"] for h in history) / max(len(history), 1),
        # tokens after the first mistake of wrong rollouts that ran on: in a run without stopping, the share
        # of its tokens that a perfect stopper would have cut (None when the task cannot say where it went wrong)
        "doomed_fraction": (sum(h["doomed_tokens"] for h in history) / max(history[-1]["cum_tokens"], 1)
                            if history and all(h.get("doomed_tokens") is not None for h in history) else None),
    }


def savings(base: dict, other: dict) -> dict[str, Any]:
    """What ``other`` saves against ``base`` (two ``summarise`` results): shares of rollout tokens, rollout time and
    step time; each time saving with its 95% interval over the paired steps and whether it is beyond that noise."""
    def saved(key: str) -> float:
        return 1 - other[key] / base[key] if base[key] else 0.0

    out: dict[str, Any] = {"tokens_saved": saved("rollout_tokens"),
                           "pairs": min(len(base.get("per_step", {}).get("step_time_s", [])),
                                        len(other.get("per_step", {}).get("step_time_s", [])))}
    for key, name in (("rollout_time_s", "rollout_time"), ("step_time_s", "step_time")):
        out[f"{name}_saved"] = saved(key)
        paired = "per_step" in base and "per_step" in other  # summaries from before per-step times: no interval
        _, interval = paired_saving(base["per_step"][key], other["per_step"][key]) if paired else (None, None)
        out[f"{name}_interval"] = interval
        out[f"{name}_beyond_noise"] = beyond_noise(interval)
    return out


def _time_saved(sv: dict, name: str) -> str:
    """A time saving with its interval; one inside its noise is reported as none."""
    interval = sv.get(f"{name}_interval")
    if interval is None:
        pairs = sv.get("pairs")
        few = f" (no interval: {pairs} paired steps, fewer than {MIN_PAIRS})" if pairs and pairs < MIN_PAIRS else ""
        return _pct(sv.get(f"{name}_saved")) + few
    text = f"{_pct(sv[f'{name}_saved'])} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return text if sv[f"{name}_beyond_noise"] else f"none beyond noise ({text})"


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


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _false_stops(s: dict) -> str:
    if s["false_stop_rate"] is None:
        return "-"
    lo, hi = s["false_stop_interval"]
    return f"{_pct(s['false_stop_rate'])} [{100 * lo:.1f}, {100 * hi:.1f}] of {s['false_stops_checked']}"


def pool_words(s: dict) -> str:
    """The decoder's pool beside a step's rollouts: whether a stop's freed slot could take new work."""
    if not s.get("slots") or not s.get("steps"):
        return ""
    per_step = s["rollouts"] / s["steps"]
    if s["slots"] < per_step:
        return f" ({s['slots']} slots for {per_step:.0f} rollouts a step: a full pool)"
    return (f" ({s['slots']} slots for {per_step:.0f} rollouts a step: every rollout has a slot from the start, so a "
            "stop frees a slot that no rollout waits for; run with max_batch below the rollouts a step for the time "
            "a full pool saves)")


def headline(summaries: dict[str, dict]) -> str | None:
    """ESPO against PPO in one line: tokens saved, rollout time saved, step time saved, and the pool."""
    if "ppo" not in summaries or "espo" not in summaries:
        return None
    sv = savings(summaries["ppo"], summaries["espo"])
    return (f"ESPO vs PPO{pool_words(summaries['espo'])}: {sv['tokens_saved']:.1%} tokens saved, rollout time saved "
            f"{_time_saved(sv, 'rollout_time')}, step time saved {_time_saved(sv, 'step_time')}")


def report_markdown(summaries: dict[str, dict], cfg: dict, seconds: float) -> str:
    lines = [
        "# espo demo report",
        "",
        f"Built-in chained-arithmetic task and shipped tiny model; {cfg['steps']} steps x {cfg['prompts_per_step']} "
        f"prompts x {cfg['group_size']} rollouts (CERO: the same total budget), {cfg['max_batch']} decoder slots, seed "
        f"{cfg['seed']}, device {cfg['device']}; {seconds:.0f} s in all, the algorithms' steps interleaved so that "
        f"their times are measured side by side. Stop settings: {cfg['espo']}.",
        "",
    ]
    top = headline(summaries)
    lines += [f"**{top}.**", ""] if top else []
    lines += [
        "| algo | rollout tokens | tokens saved | rollout s | rollout time saved | update s | step s | step time saved "
        "| accuracy start -> end | stop rate | false-stop rate [95% CI] of checked | informative rollouts "
        "| measuring s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for base, other in PAIRS:
        for algo in (base, other):
            if algo not in summaries:
                continue
            s = summaries[algo]
            sv = {}
            if algo == other and base in summaries and "espo" in algo:  # CERO pairs spend one budget by design
                sv = savings(summaries[base], s)
            lines.append(
                f"| {algo} | {s['rollout_tokens']} | {_pct(sv.get('tokens_saved'))} | {s['rollout_time_s']:.1f} | "
                f"{_time_saved(sv, 'rollout_time')} | {s['update_time_s']:.1f} | {s['step_time_s']:.1f} | "
                f"{_time_saved(sv, 'step_time')} | {_pct(s['initial_accuracy'])} -> {_pct(s['final_accuracy'])} | "
                f"{_pct(s['stop_rate'])} | {_false_stops(s)} | {_pct(s['informative_fraction'])} | "
                f"{s['measure_time_s'] + s['eval_time_s']:.1f} |"
            )
    ceiling = ceiling_line(summaries)
    lines += ["", ceiling] if ceiling else []
    lines += [
        "",
        "Time saved: 1 - (the run's time / its partner's), with a 95% bootstrap interval over the paired steps "
        "(each step of one run against the same step of the other, run one after it); a saving whose interval "
        "holds 0 is reported as none beyond noise.",
        "",
        "Step time = rollout + rewards + update, the cost of training; measuring (false-stop continuation, the "
        "doomed-token oracle, held-out evaluation) is timed apart and never inside it. Accuracy: sampled at the "
        "training temperature on held-out problems, without stopping. A false stop is a stopped rollout that, "
        "continued from its stop with the same seeds and no stopper, ends correct (a random share of the stops is "
        "checked when false_stop_sample < 1). Informative rollouts: those in groups whose rewards are not all "
        "equal (a non-zero GRPO advantage).",
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
        acc.plot(*accuracy_points(hist), marker="o", ms=3, label=algo,
                 linewidth=2.2 if algo in ("espo", "grpo-cero") else 1.4)
        if any(h["stopped"] for h in hist) or ALGOS[algo].stops:
            steps = [h["step"] for h in hist]
            stops.plot(steps, [h["stop_rate"] for h in hist], marker="o", ms=3, label=f"{algo} stop rate")
            stops.plot(steps, [h["false_stops"] / max(h["rollouts"], 1) for h in hist], linestyle="--",
                       label=f"{algo} false stops / rollouts")
    finish_axes(acc, "Accuracy against rollout tokens", "cumulative rollout tokens (thousands)",
                "held-out accuracy (sampled)")
    finish_axes(stops, "ESPO stops over training", "training step", "fraction of rollouts")
    fig.tight_layout()
    fig.savefig(out_dir / "demo.png", dpi=130)
    plt.close(fig)


def _check_writable(out_dir: Path) -> None:
    """Refuse a demo folder that cannot be written, naming the demo's own flag (--out)."""
    check_writable(out_dir, "demo folder", "--out")


def _setup_run(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Run:
    """One algorithm's run of the demo: with ``resume``, continued from its checkpoint when it has one (a finished
    run is reused as it is), else started."""
    if resume and (Path(cfg.out_dir) / CHECKPOINT_FILE).is_file():
        return setup(cfg, resume=True)
    return setup(cfg, overwrite=overwrite)


def _check_demo_folder(out_dir: Path, algos: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a demo unless it is to be resumed or replaced."""
    if resume and overwrite:
        raise ValueError("--resume continues the demo in --out and --overwrite replaces it: pass one of them")
    held = [p.name for p in (out_dir / "report.json", out_dir / "report.md", *(out_dir / a for a in algos))
            if p.exists()]
    if held and not (overwrite or resume):
        raise ValueError(f"{out_dir} already holds a demo ({', '.join(held)}): continue it with --resume, choose "
                         "another --out or pass --overwrite")


def run_demo(out_dir: str | Path = "espo-demo", *, algos: tuple[str, ...] = ("ppo", "espo", "grpo", "grpo-cero"),
             progress: bool = True, overwrite: bool = False, resume: bool = False, preset: str = "demo",
             **overrides: Any) -> dict[str, dict]:
    """Train each of ``algos`` with the same settings (``overrides`` go over the named preset: ``model=DIR`` with
    ``preset="smollm2"`` runs the demo on a real chat model) and write the report.

    The algorithms advance one step each in turn, so that their times are measured side by side. A folder that
    already holds a report or a run is refused unless ``overwrite`` is given, or ``resume``: each algorithm's run
    (a run folder under ``out_dir``) then continues from its checkpoint through the trainer's resume (a finished
    one is reused, one without a checkpoint starts), and the report is written as usual. A resumed demo needs the
    settings it started with; its report's times are those of the steps run since the resume."""
    out_dir = Path(out_dir)
    _check_demo_folder(out_dir, algos, resume=resume, overwrite=overwrite)
    _check_writable(out_dir)
    t0 = time.perf_counter()
    base = TrainConfig.from_preset(preset, **overrides)
    runs = {a: _setup_run(dataclasses.replace(base, algo=a, out_dir=str(out_dir / a)), resume=resume,
                          overwrite=overwrite) for a in algos}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(base.steps - run.start for run in runs.values()), desc="demo", unit="step")
    try:
        for step in range(base.steps):
            for algo, run in runs.items():
                if step < run.start:  # done before the resume
                    continue
                record = train_step(run, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(algo=algo, acc=f"{record['success_rate']:.2f}", stop=f"{record['stop_rate']:.2f}")
    finally:
        if bar is not None:
            bar.close()
        for run in runs.values():
            run.close()
    histories = {a: run.history for a, run in runs.items()}
    summaries = {a: summarise(a, h, slots=base.max_batch) for a, h in histories.items()}
    seconds = time.perf_counter() - t0
    cfg_dict = base.to_dict()
    pairs = {f"{o}_vs_{b}": savings(summaries[b], summaries[o]) for b, o in PAIRS if b in summaries and o in summaries}
    write_text_atomic(json.dumps({"config": cfg_dict, "summaries": summaries, "savings": pairs, "seconds": seconds,
                                  "histories": histories}, indent=2), out_dir / "report.json")
    write_text_atomic(report_markdown(summaries, cfg_dict, seconds), out_dir / "report.md")
    plot(histories, out_dir)
    return summaries


def print_summary(summaries: dict[str, dict], out_dir: Path) -> None:
    print(f"\nespo demo: report in {out_dir / 'report.md'}")
    top = headline(summaries)
    if top:
        print("  " + top)
    for base, other in PAIRS:
        if base in summaries and other in summaries:
            b, o = summaries[base], summaries[other]
            tokens = "" if "espo" in other else "the same rollout budget; "
            print(f"  {other} vs {base}: {tokens}accuracy {_pct(b['final_accuracy'])} -> {_pct(o['final_accuracy'])}; "
                  f"informative rollouts {_pct(b['informative_fraction'])} -> {_pct(o['informative_fraction'])}")
    ceiling = ceiling_line(summaries)
    if ceiling:
        print("  " + ceiling)
    for s in summaries.values():
        print(f"  {s['algo']:>9}: stop rate {_pct(s['stop_rate'])}, false-stop rate {_false_stops(s)}, "
              f"{s['time_per_step_s']:.2f} s/step (rollout {s['rollout_time_s']:.1f} s, "
              f"update {s['update_time_s']:.1f} s; measuring {s['measure_time_s'] + s['eval_time_s']:.1f} s apart)")
