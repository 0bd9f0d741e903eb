"""ESPO on a real model's rollouts, on evaluation prompts: stops, false stops, accuracy and rollout time (issue 23).

    nice python studies/study_real_rollouts.py /tmp/smol-hf --problems 64 --samples 4 --repeats 3 \\
        --out studies/results/real-rollouts

One unstopped decode through espo.Decoder of evaluation prompts (``task.problems(P, seed=--problem-seed)``, a seed
other than calibrate_stops' CALIBRATION_SEED, on which SMOLLM2_REGRET_ESPO was chosen) records every token's regret, the
reward and the length. A run with a stopper draws exactly these tokens up to its stop, so replaying espo's stop
rule (``calibrate_stops.stop_points``) gives each setting's exact stops and exact false stops (a stopped rollout
whose unstopped continuation ends right). Side by side on the same rollouts: (a) no stopping, (b) ESPOConfig()'s
defaults (the paper's), (c) the calibrated SMOLLM2_REGRET_ESPO, (d) random stops at (c)'s rate, (e) the length cap that
cuts as many tokens as (c). The threshold is beta * max(V, value_floor) at the value ``--value`` (calibrate_stops'
convention). Then where wrong rollouts go wrong against where they stop, and the real wall-clock time of
espo.Decoder with (c)'s stopper against without one, at a full pool (slots = rollouts / 4) and at pool = batch.
``--replay`` rebuilds the tables and the plot from OUT.json without decoding.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from espo import Decoder
from espo.engine.models import checkpoint_card, load_model
from espo.ops.stopper import EarlyStopper, ESPOConfig
from espo.rl.config import PRESETS, SMOLLM2_REGRET_ESPO, TrainConfig
from espo.stats import bootstrap_indices, quantile_interval, wilson_interval
from espo.tasks import score, task_from_checkpoint
from espo.tasks.prompting import encode_prompt, stop_token_ids
from espo.tasks.word_problems import NUMBER, ascii_digits, final_answer_match
from studies import calibrate_stops, common

EVAL_SEED = 3_000_017  # not calibrate_stops.CALIBRATION_SEED (2_000_003), where SMOLLM2_REGRET_ESPO was chosen
SETTINGS = {"b": ("ESPO, paper's defaults (ESPOConfig())", {}),
            "c": ("ESPO, calibrated (SMOLLM2_REGRET_ESPO)", SMOLLM2_REGRET_ESPO)}
RANDOM_DRAWS = 200
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------------- decoding


def context(model_dir: str, cfg: TrainConfig, problems: int, problem_seed: int) -> SimpleNamespace:
    """The model, its tokenizer and task, the evaluation problems and their encoded prompts."""
    model, tok = load_model(model_dir, device=cfg.device)
    task = task_from_checkpoint(model_dir)
    probs = task.problems(problems, seed=problem_seed)
    prompts = [encode_prompt(tok, p.prompt) for p in probs]
    max_new = cfg.max_new_tokens or int(getattr(task, "max_new_tokens", 128))
    return SimpleNamespace(model=model, tok=tok, task=task, probs=probs, prompts=prompts, max_new=max_new,
                           eos=stop_token_ids(tok, model), cfg=cfg)


def decoder(ctx: SimpleNamespace, slots: int) -> Decoder:
    return Decoder(ctx.model, max_batch=slots, max_seq_len=max(map(len, ctx.prompts)) + ctx.max_new)


def generate(ctx: SimpleNamespace, dec: Decoder, samples: int, seed: int, stopper: EarlyStopper | None = None,
             value: float = 0.5):
    """One decode of every prompt x samples; (rollouts, wall seconds)."""
    values = [value] * len(ctx.prompts) if stopper is not None else None
    t0 = time.perf_counter()
    out = dec.generate(ctx.prompts, samples, max_new_tokens=ctx.max_new, temperature=ctx.cfg.temperature,
                       top_p=ctx.cfg.top_p, seed=seed, eos_token_id=ctx.eos, stopper=stopper, prompt_values=values)
    return out, time.perf_counter() - t0


def record(ctx: SimpleNamespace, out) -> list[dict]:
    """Per rollout: prompt, reward, finish reason, tokens, regrets and text."""
    rows = []
    for r in out:
        tokens = r.tokens.tolist()
        text = ctx.tok.decode(tokens, skip_special_tokens=True)
        reward = score(ctx.task, ctx.probs[r.prompt_index], text)
        rows.append({"prompt": r.prompt_index, "reward": reward, "finish": r.finish_reason, "tokens": tokens,
                     "regret": [float(g) for g in r.regret], "text": text,
                     "wrong_step": wrong_step_tokens(ctx, r.prompt_index, tokens, text, reward >= 1.0)})
    return rows


# ------------------------------------------------------------------------------------- the stop rules


def replay_config(espo: dict, value: float) -> tuple[ESPOConfig, ESPOConfig, float]:
    """(the setting, its replay config whose beta is tau = beta * max(V, value_floor), tau)."""
    cfg = ESPOConfig(**espo)
    tau = cfg.beta * max(value, cfg.value_floor)
    return cfg, dataclasses.replace(cfg, beta=tau, beta_min=0.0, eta_beta=0.0), tau


def arrays(rows: list[dict]) -> SimpleNamespace:
    lengths = np.array([len(r["regret"]) for r in rows])
    g = torch.zeros(len(rows), int(lengths.max()))
    for i, r in enumerate(rows):
        g[i, : lengths[i]] = torch.tensor(r["regret"])
    live = torch.arange(g.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
    return SimpleNamespace(g=g, lengths=lengths, right=np.array([r["reward"] >= 1.0 for r in rows]),
                           prompt=np.array([r["prompt"] for r in rows]),
                           mean=float(g[live].mean()), var=float(g[live].var(unbiased=False)))


def espo_stops(a: SimpleNamespace, espo: dict, value: float) -> tuple[np.ndarray, float]:
    """Each rollout's stop index under the setting (-1: never), replayed exactly; and tau."""
    _, cfg, tau = replay_config(espo, value)
    return calibrate_stops.stop_points(a.g, torch.as_tensor(a.lengths), cfg, a.mean, a.var).numpy(), tau


def kept_tokens(at: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.where(at >= 0, at + 1, lengths)  # a stop keeps its trigger token


# -------------------------------------------------------------------------------------------- metrics


def per_prompt(a: SimpleNamespace, stopped: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """[P, 6] sums per prompt: rollouts, stops, false stops, right, tokens, kept tokens."""
    cols = np.stack([np.ones_like(stopped), stopped, stopped & a.right, a.right, a.lengths, kept], 1).astype(float)
    out = np.zeros((a.prompt.max() + 1, cols.shape[1]))
    np.add.at(out, a.prompt, cols)
    return out


def shares(s: np.ndarray) -> dict[str, np.ndarray]:
    """The key shares from summed columns (last axis) of ``per_prompt``."""
    n, stops, false, right, tokens, kept = np.moveaxis(s, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"stop_rate": stops / n, "tokens_saved": 1 - kept / tokens,
                "false_share": np.where(stops > 0, false / np.maximum(stops, 1), 0.0),
                "right_lost": false / np.maximum(right, 1), "accuracy": (right - false) / n,
                # a random stop's expected false-stop share is the success rate: below 0, fewer false stops than it
                "false_share_vs_random": np.where(stops > 0, false / np.maximum(stops, 1), 0.0) - right / n}


def metrics(a: SimpleNamespace, stopped: np.ndarray, kept: np.ndarray, rng: np.random.Generator | None) -> dict:
    """Counts and shares of one stop rule; with ``rng``, 95% bootstrap intervals over prompts."""
    s = per_prompt(a, stopped, kept)
    out = {k: float(v) for k, v in shares(s.sum(0)).items()}
    out |= {"stops": int(stopped.sum()), "false_stops": int((stopped & a.right).sum()),
            "tokens_cut": int(a.lengths.sum() - kept.sum())}
    if rng is not None:
        idx = bootstrap_indices(len(s), BOOTSTRAP, rng)
        boot = shares(s[idx].sum(1))
        out["ci"] = {k: list(quantile_interval(v)) for k, v in boot.items()}
        out["wilson_false_share"] = list(wilson_interval(out["false_stops"], out["stops"]) or (0.0, 1.0))
    return out


def random_control(a: SimpleNamespace, n_stop: int, rng: np.random.Generator) -> dict:
    """n_stop rollouts, each stopped at a uniform position (its trigger token kept): mean and 2.5-97.5% range
    over RANDOM_DRAWS draws."""
    draws = []
    for _ in range(RANDOM_DRAWS):
        stopped = np.zeros(len(a.lengths), bool)
        stopped[rng.choice(len(a.lengths), n_stop, replace=False)] = True
        kept = np.where(stopped, rng.integers(1, a.lengths + 1), a.lengths)
        draws.append(metrics(a, stopped, kept, None))
    keys = [k for k, v in draws[0].items() if isinstance(v, float)]
    out = {k: float(np.mean([d[k] for d in draws])) for k in keys}
    out["ci"] = {k: list(quantile_interval([d[k] for d in draws])) for k in keys}
    out |= {"stops": n_stop, "false_stops": float(np.mean([d["false_stops"] for d in draws])),
            "tokens_cut": float(np.mean([d["tokens_cut"] for d in draws]))}
    return out


def length_cap(a: SimpleNamespace, n_stop: int, cut: int, rng: np.random.Generator) -> tuple[dict, int]:
    """The cap that cuts as many tokens as ``cut`` (calibrate_stops.controls' cap); a capped rollout fails."""
    cap = calibrate_stops.controls(a.lengths, a.right, max(n_stop, 1), cut, rng)["cap"]
    stopped = a.lengths > cap
    return metrics(a, stopped, np.minimum(a.lengths, cap), rng), cap


def compare(rows: list[dict], value: float, seed: int = 0) -> tuple[dict, dict, SimpleNamespace]:
    """(a)-(e) on the same rollouts; and each ESPO setting's stop index per rollout."""
    rng = np.random.default_rng(seed)
    a = arrays(rows)
    none = np.zeros(len(rows), bool)
    arms = {"a": {"name": "no stopping", **metrics(a, none, a.lengths, rng)}}
    stops = {}
    for key, (name, espo) in SETTINGS.items():
        at, tau = espo_stops(a, espo, value)
        stops[key] = at
        cfg = ESPOConfig(**espo)
        arms[key] = {"name": name, "tau": tau, "config": dataclasses.asdict(cfg),
                     **metrics(a, at >= 0, kept_tokens(at, a.lengths), rng)}
    c = arms["c"]
    arms["d"] = {"name": "random stops at (c)'s rate", **random_control(a, c["stops"], rng)}
    cap_metrics, cap = length_cap(a, c["stops"], c["tokens_cut"], rng)
    arms["e"] = {"name": f"length cap {cap} (cuts as many tokens as (c))", "cap": cap, **cap_metrics}
    return arms, stops, a


# -------------------------------------------------------------------------------- where they go wrong


def char_tokens(tok, tokens: list[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it."""
    return [len(tok.decode(tokens[: k + 1], skip_special_tokens=True)) for k in range(len(tokens))]


def final_answer_at(text: str) -> int | None:
    """Where the number that the task's extract_answer reads starts (its own patterns, in its order)."""
    match = final_answer_match(text)
    return None if match is None else match.start(2)


def list_marker(text: str, m) -> bool:
    """A number that opens a line and is followed by '.' or ')' ('1. ...', '2) ...'): a list's numbering."""
    line = text[text.rfind("\n", 0, m.start()) + 1: m.start()]
    return not line.strip() and text[m.end(): m.end() + 1] in (".", ")")


def wrong_step_tokens(ctx: SimpleNamespace, prompt: int, tokens: list[int], text: str, right: bool) -> dict:
    """For a wrong rollout, the token indices of (1) the first number in the text that is neither in the prompt
    nor the right answer (a 'new wrong number'); (2) the start of the (wrong) final answer that extract_answer
    reads. None where the text has no such number (and for right rollouts)."""
    if right:
        return {"new_number": None, "final_answer": None}
    problem, text = ctx.probs[prompt], ascii_digits(text)
    known = {m.group(2).replace(",", "") for m in NUMBER.finditer(problem.prompt)} | {problem.answer}
    new = next((m.start(2) for m in NUMBER.finditer(text)
                if m.group(2).replace(",", "") not in known and not list_marker(text, m)), None)
    final = final_answer_at(text)
    ends = char_tokens(ctx.tok, tokens) if new is not None or final is not None else []
    at = lambda c: None if c is None else next((k for k, e in enumerate(ends) if e > c), None)  # noqa: E731
    return {"new_number": at(new), "final_answer": at(final)}


def offsets_table(rows: list[dict], stops: dict, a: SimpleNamespace) -> dict:
    """For wrong rollouts: each event's token index minus the wrong step's (before < 0, at 0, after > 0)."""
    wrong = [i for i, r in enumerate(rows) if r["reward"] < 1.0]
    peak = {i: int(np.argmax(rows[i]["regret"])) for i in wrong}
    out = {"wrong_rollouts": len(wrong)}
    for ref in ("new_number", "final_answer"):
        covered = [i for i in wrong if rows[i]["wrong_step"][ref] is not None]
        events = {"regret peak": {i: peak[i] for i in covered}}
        for key in stops:
            events[f"stop ({key}) = z crossing"] = {i: int(stops[key][i]) for i in covered if stops[key][i] >= 0}
        out[ref] = {"covered": len(covered), "coverage": len(covered) / max(len(wrong), 1), "events": {}}
        for name, pos in events.items():
            d = np.array([p - rows[i]["wrong_step"][ref] for i, p in pos.items()])
            out[ref]["events"][name] = {"n": len(d), "before": int((d < 0).sum()), "at": int((d == 0).sum()),
                                        "after": int((d > 0).sum()),
                                        "median_offset": float(np.median(d)) if len(d) else None}
    return out


# ---------------------------------------------------------------------------------------------- time


def armed_stopper(espo: dict, slots: int, mean: float, var: float, device: str = "cpu") -> EarlyStopper:
    """The setting's stopper, its statistics set from the unstopped run (as the replay does), armed."""
    stopper = EarlyStopper(ESPOConfig(**espo), slots, device=device)
    stopper.set_statistics(mean, var)
    stopper.arm()
    return stopper


def time_decodes(ctx: SimpleNamespace, args, decs: dict, a: SimpleNamespace, expected: np.ndarray, save,
                 result: dict | None = None) -> dict:
    """Interleaved repeats (none, espo, none, espo, ...) at each pool size; checks every stopped run against the
    replay (stop count and each rollout's length). Appends to ``result``'s runs when given."""
    pools = list(decs)
    result = result or {"pools": pools, "load_before": [round(x, 2) for x in os.getloadavg()], "runs": []}
    first = 1 + max((r["rep"] for r in result["runs"]), default=-1)
    for rep in range(first, first + args.repeats):
        for pool in pools:
            for arm in ("none", "espo"):
                stopper = (armed_stopper(SMOLLM2_REGRET_ESPO, pool, a.mean, a.var, ctx.cfg.device) if arm == "espo"
                           else None)
                out, secs = generate(ctx, decs[pool], args.samples, args.seed, stopper, args.value)
                lengths = np.array([r.length for r in out])
                stops = sum(r.finish_reason == "stopped" for r in out)
                run = {"rep": rep, "pool": pool, "arm": arm, "seconds": secs, "tokens": int(out.tokens_generated),
                       "stops": stops, "matches_replay": bool((lengths == expected).all()) if arm == "espo"
                       else bool((lengths == a.lengths).all())}
                result["runs"].append(run)
                print(run, flush=True)
                save(result)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def time_summary(timing: dict, exclude: tuple[int, ...] = ()) -> list[dict]:
    """Per pool size: median and min-max seconds of each arm, time saved and its range over the repeats' pairwise
    ratios; runs whose index in timing["runs"] is in ``exclude`` are left out (a repeat's pair with them)."""
    rows = []
    kept = [r for i, r in enumerate(timing["runs"]) if i not in exclude]
    for pool in timing["pools"]:
        runs = {arm: {r["rep"]: r for r in kept if r["pool"] == pool and r["arm"] == arm} for arm in ("none", "espo")}
        if not runs["none"] or not runs["espo"]:
            continue
        sec = {arm: np.array([r["seconds"] for r in rs.values()]) for arm, rs in runs.items()}
        both = sorted(set(runs["none"]) & set(runs["espo"]))
        pair = np.array([1 - runs["espo"][k]["seconds"] / runs["none"][k]["seconds"] for k in both])
        saved = 1 - np.median(sec["espo"]) / np.median(sec["none"])
        tok = 1 - next(iter(runs["espo"].values()))["tokens"] / next(iter(runs["none"].values()))["tokens"]
        rows.append({"pool": pool, "repeats": len(both), "none": span(sec["none"]), "espo": span(sec["espo"]),
                     "time_saved": float(saved), "pairwise": [float(pair.min()), float(pair.max())] if len(pair)
                     else [float("nan")] * 2, "tokens_saved": float(tok),
                     "time_per_token_saved": float(saved / tok) if tok > 0 else None,
                     "stops": [r["stops"] for r in runs["espo"].values()],
                     "all_match_replay": all(r["matches_replay"] for rs in runs.values() for r in rs.values())})
    return rows


def span(x: np.ndarray) -> list[float]:
    return [float(np.median(x)), float(x.min()), float(x.max())]


# ------------------------------------------------------------------------------------------- reports


def pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def interval(m: dict, key: str) -> str:
    lo, hi = m.get("ci", {}).get(key, (None, None))
    return pct(m[key]) + ("" if lo is None else f" [{pct(lo)}, {pct(hi)}]")


def arms_table(arms: dict) -> list[str]:
    lines = ["| | rule | stop rate | tokens saved | false stops (count / stops) | false-stop share of stops | "
             "right rollouts lost | accuracy after stopping |", "|---|---|---|---|---|---|---|---|"]
    for key, m in arms.items():
        count = f"{m['false_stops']:.1f} / {m['stops']}" if key == "d" else f"{m['false_stops']} / {m['stops']}"
        lines.append(f"| ({key}) | {m['name']} | {interval(m, 'stop_rate')} | {interval(m, 'tokens_saved')} | "
                     f"{count} | {interval(m, 'false_share')} | {interval(m, 'right_lost')} | "
                     f"{interval(m, 'accuracy')} |")
    return lines


def offsets_lines(off: dict) -> list[str]:
    lines = []
    for ref, title in (("new_number", "first new wrong number"), ("final_answer", "wrong final answer")):
        o = off[ref]
        lines += ["", f"Reference: the {title}: {o['covered']} of {off['wrong_rollouts']} wrong rollouts "
                      f"({pct(o['coverage'], 0)}) have one.", "",
                  "| event | rollouts | before | at | after | median offset (tokens) |", "|---|---|---|---|---|---|"]
        for name, e in o["events"].items():
            med = "-" if e["median_offset"] is None else f"{e['median_offset']:+.0f}"
            lines.append(f"| {name} | {e['n']} | {e['before']} | {e['at']} | {e['after']} | {med} |")
    return lines


def time_lines(summary: list[dict], timing: dict, replay_stops: int) -> list[str]:
    lines = ["| slots (pool) | repeats | no stopper: median (min-max) s | ESPO (c): median (min-max) s | time saved "
             "(pairwise min-max) | tokens saved | time saved / tokens saved | "
             f"stops per run (replay: {replay_stops}) | lengths = replay |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        noise = " (no time saving beyond noise)" if s["pairwise"][0] <= 0 <= s["pairwise"][1] else ""
        ratio = "-" if s["time_per_token_saved"] is None else f"{s['time_per_token_saved']:.2f}"
        lines.append(f"| {s['pool']} | {s['repeats']} | {s['none'][0]:.1f} ({s['none'][1]:.1f}-{s['none'][2]:.1f}) | "
                     f"{s['espo'][0]:.1f} ({s['espo'][1]:.1f}-{s['espo'][2]:.1f}) | {pct(s['time_saved'])} "
                     f"({pct(s['pairwise'][0])} to {pct(s['pairwise'][1])}){noise} | {pct(s['tokens_saved'])} | "
                     f"{ratio} | {s['stops']} | {s['all_match_replay']} |")
    lines += ["", f"Load average before {timing['load_before']}, after {timing.get('load_after')}."]
    if "load_before_more" in timing:
        lines[-1] += (" The repeats after the first run's were timed in a second process (`--replay --more-repeats`) "
                      f"after an untimed warm-up decode of 8 prompts; load average before them "
                      f"{timing['load_before_more']}.")
    return lines


def runs_lines(timing: dict, exclude: tuple[int, ...]) -> list[str]:
    lines = ["| run | repeat | slots | stopper | seconds | tokens | stops | left out |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(timing["runs"]):
        lines.append(f"| {i} | {r['rep']} | {r['pool']} | {r['arm']} | {r['seconds']:.1f} | {r['tokens']} | "
                     f"{r['stops']} | {'yes' if i in exclude else ''} |")
    return lines


def verdict(arms: dict, summary: list[dict], off: dict) -> list[str]:
    c, d = arms["c"], arms["d"]
    lines = [f"- False stops <= 5% of stops? (b): {pct(arms['b']['false_share'])} of {arms['b']['stops']} stops; "
             f"(c): {pct(c['false_share'])} of {c['stops']} (bootstrap 95% {pct(c['ci']['false_share'][0])}-"
             f"{pct(c['ci']['false_share'][1])}, Wilson {pct(c['wilson_false_share'][0])}-"
             f"{pct(c['wilson_false_share'][1])}): "
             + ("yes." if c["ci"]["false_share"][1] <= 0.05 else
                "not shown: the interval reaches above 5%." if c["false_share"] <= 0.05 else "no.")]
    lo, hi = c["ci"]["false_share_vs_random"]
    ahead = hi < 0
    lines.append(f"- ESPO (c) ahead of random stopping at the same rate? false-stop share {pct(c['false_share'])} "
                 f"against {pct(d['false_share'])} (random draws' 95% range {pct(d['ci']['false_share'][0])}-"
                 f"{pct(d['ci']['false_share'][1])}); accuracy after stopping {pct(c['accuracy'])} against "
                 f"{pct(d['accuracy'])}; tokens saved {pct(c['tokens_saved'])} against {pct(d['tokens_saved'])}. "
                 f"(c)'s false-stop share minus the success rate (a random stop's expected false-stop share): "
                 f"{c['false_share_vs_random']:+.1%}, bootstrap 95% [{lo:+.1%}, {hi:+.1%}]: "
                 + ("ESPO stops fewer right rollouts than random stopping would, beyond the bootstrap's noise."
                    if ahead else "not shown beyond noise at this size."))
    lines.append(f"- Accuracy: {pct(arms['a']['accuracy'])} without stopping; after stopping (b) "
                 f"{pct(arms['b']['accuracy'])}, (c) {pct(c['accuracy'])}, (d) {pct(d['accuracy'])}, (e) "
                 f"{pct(arms['e']['accuracy'])}.")
    for ref, title in (("new_number", "first new wrong number"), ("final_answer", "wrong final answer")):
        e = off[ref]["events"]["stop (c) = z crossing"]
        if e["n"]:
            lines.append(f"- Of the {e['n']} wrong rollouts that (c) stops and that have a {title}, {e['before']} stop "
                         f"before it, {e['at']} at it and {e['after']} after it (median offset "
                         f"{e['median_offset']:+.0f} tokens).")
    for s in summary:
        noise = s["pairwise"][0] <= 0 <= s["pairwise"][1]
        ratio = "" if s["time_per_token_saved"] is None else f" (ratio {s['time_per_token_saved']:.2f})"
        lines.append(f"- Time at {s['pool']} slots: {pct(s['time_saved'])} saved (pairwise {pct(s['pairwise'][0])} to "
                     f"{pct(s['pairwise'][1])}) for {pct(s['tokens_saved'])} of tokens saved{ratio}"
                     + (": no time saving beyond noise." if noise else "."))
    return lines


def markdown(data: dict, args) -> str:
    env, arms, stats = data["env"], data["arms"], data["stats"]
    b, c = arms["b"], arms["c"]
    lines = [
        f"# ESPO on {data['model_name']}'s rollouts, on evaluation prompts: stops, false stops and time",
        "",
        f"{env['date']}, {env.get('cpu', env['device'])} ({env.get('cores')} cores), torch {env['torch']}, "
        f"{env['threads']} torch threads, niceness {env.get('nice')}, load average before {env['load']}. "
        f"Command: `{env['command']}`.",
        "",
        f"{stats['rollouts']} rollouts: {data['problems']} evaluation problems x {data['samples']} samples, problem "
        f"seed {data['problem_seed']} (the calibration that chose SMOLLM2_REGRET_ESPO used seed "
        f"{calibrate_stops.CALIBRATION_SEED}: these prompts are new to it), sampling seed {data['seed']}, preset "
        f"{data['preset']} (temperature {data['temperature']}, top_p {data['top_p']}), <= {data['max_new_tokens']} "
        f"new tokens. The unstopped decode ({data['decode_slots']} slots) took {data['decode_seconds']:.0f} s; "
        f"success {pct(stats['success'])}; {stats['tokens']} tokens; regret mean {stats['mean']:.3f}, variance "
        f"{stats['var']:.3f} (the stopper's statistics, set from this batch as a stopper sets them from its first).",
        "",
        f"Stops are replayed exactly with espo's stop rule (`calibrate_stops.stop_points`); a stopped rollout counts "
        f"as a failure, and a false stop is a stop of a rollout whose unstopped version ends right. Threshold "
        f"tau = beta * max(V, value_floor) at V = {data['value']} (calibrate_stops' `--value` convention, with which "
        f"SMOLLM2_REGRET_ESPO was chosen): (b) ESPOConfig() as in espo/stopper.py (alpha_s {b['config']['alpha_s']}, "
        f"beta "
        f"{b['config']['beta']}, clip {b['config']['clip']}, min_tokens {b['config']['min_tokens']}): tau "
        f"{b['tau']:g}; (c) SMOLLM2_REGRET_ESPO (alpha_s {c['config']['alpha_s']}, beta {c['config']['beta']}, clip "
        f"{c['config']['clip']}): tau {c['tau']:g}. The controller (eta_beta) acts only between batches, so it "
        f"plays no part in one batch. (d) random stops: as many rollouts as (c) stops, each at a uniform position "
        f"(trigger kept), {RANDOM_DRAWS} draws: mean and the draws' 2.5-97.5% range. (e) the longest length cap "
        f"that cuts at least as many tokens as (c). Brackets: 95% bootstrap over prompts ({BOOTSTRAP} resamples).",
        "",
    ] + arms_table(arms) + [
        "",
        "## Where wrong rollouts go wrong, and where they stop",
        "",
        "Two simple references on free text, as token indices of the rollout: the first number in the completion "
        "whose value is neither in the prompt nor the right answer (a 'new wrong number'), and the token where the "
        "wrong final answer that the task's extract_answer reads starts (the last 'answer is N' / boxed N, else the "
        "last number). Offset = event token - reference token (negative: before the mistake). 'stop = z crossing': "
        "with min_tokens 0 a stop is the first token where z crosses tau.",
    ] + offsets_lines(data["wrong_step"])
    if data.get("timing"):
        summary = time_summary(data["timing"])
        lines += ["", "## Rollout time (wall clock of espo.Decoder.generate)", "",
                  f"The same {stats['rollouts']} rollouts decoded again with (c)'s stopper (EarlyStopper, statistics "
                  "set from the unstopped run, armed, V = prompt_values) and without one, interleaved (none, ESPO, "
                  "none, ESPO, ...) at each pool size; one Decoder per pool size, built once and reused "
                  "(the full pool's decoded the rollouts first, which also warmed it up). "
                  "'lengths = replay': every rollout's length equals the replay's (and the unstopped runs' the first "
                  "decode's). Time saved = 1 - median(ESPO) / median(none); the range is over the repeats' pairwise "
                  "ratios. Random stopping is not timed (the stopper's decision is inside espo.sample; timing it would "
                  "need changes to espo/): it is compared in tokens only.", ""]
        excluded = data.get("excluded")
        if excluded:
            lines += [f"With every run, runs {excluded['runs']} included (they are suspect: {excluded['why']}):", ""]
            lines += time_lines(summary, data["timing"], arms["c"]["stops"])
            summary = time_summary(data["timing"], tuple(excluded["runs"]))
            lines += ["", f"Without runs {excluded['runs']} ('repeats' counts the repeats whose two runs are both "
                          "kept; medians use every kept run):", ""]
        lines += time_lines(summary, data["timing"], arms["c"]["stops"])
        lines += ["", "Each timed run, in the order run:", ""] + runs_lines(data["timing"],
                                                                           tuple((excluded or {}).get("runs", ())))
    else:
        summary = []
        lines += ["", "Rollout time: not measured in this run."]
    lines += ["", "## What holds", ""] + verdict(arms, summary, data["wrong_step"]) + [
        "", f"What this does not show: other sampling seeds or models, a trained critic's values (V is a constant "
            f"{data['value']} here), the controller over many batches, or time on a GPU."]
    return "\n".join(lines) + "\n"


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = data["arms"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, color in zip("bcde", ("tab:blue", "tab:green", "tab:grey", "tab:orange")):
        m = arms[key]
        x, y = m["tokens_saved"], m["false_share"]
        (xlo, xhi), (ylo, yhi) = m["ci"]["tokens_saved"], m["ci"]["false_share"]
        ax.errorbar(x, y, xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o", color=color,
                    capsize=3, label=f"({key}) {m['name']}")
    ax.axhline(data["stats"]["success"], color="red", lw=1, ls="--", label="success rate: no skill")
    ax.axhline(0.05, color="black", lw=0.8, ls=":", label="5% false stops")
    ax.set_xlabel("share of rollout tokens saved")
    ax.set_ylabel("false stops: share of stops that were of right rollouts")
    ax.set_title("Evaluation prompts, 95% intervals")
    ax.legend(fontsize=7)
    summary = time_summary(data["timing"], tuple(data.get("excluded", {}).get("runs", ()))) if data.get("timing") \
        else []
    for i, s in enumerate(summary):
        for j, arm in enumerate(("none", "espo")):
            med, lo, hi = s[arm]
            bx.bar(i * 3 + j, med, yerr=[[med - lo], [hi - med]], capsize=4,
                   color=("tab:grey", "tab:green")[j], label=("no stopper", "ESPO (c)")[j] if i == 0 else None)
    bx.set_xticks([i * 3 + 0.5 for i in range(len(summary))], [f"{s['pool']} slots" for s in summary])
    bx.set_ylabel("decode wall time, s (median, min-max)")
    bx.set_title("espo.Decoder rollout time")
    if summary:
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def analyse(data: dict, rows: list[dict]) -> tuple[SimpleNamespace, np.ndarray]:
    """Fills data's arms, stats and wrong_step; returns the arrays and (c)'s expected length of each rollout."""
    arms, stops, a = compare(rows, data["value"])
    data["arms"] = arms
    data["stats"] = {"mean": a.mean, "var": a.var, "tokens": int(a.lengths.sum()), "rollouts": len(rows),
                     "success": float(a.right.mean())}
    data["wrong_step"] = offsets_table(rows, stops, a)
    return a, kept_tokens(stops["c"], a.lengths)


def more_repeats(data: dict, args, save) -> None:
    """More timed repeats of OUT.json's rollouts in a new process (after an untimed warm-up decode)."""
    cfg = TrainConfig.from_preset(data["preset"], model=args.model, device=args.device)
    ctx = context(args.model, cfg, data["problems"], data["problem_seed"])
    args.samples, args.seed, args.value = data["samples"], data["seed"], data["value"]
    a, expected = analyse(data, data["rollouts"])
    decs = {p: decoder(ctx, p) for p in data["timing"]["pools"]}
    warm = SimpleNamespace(**{**vars(ctx), "prompts": ctx.prompts[:8]})
    generate(warm, next(iter(decs.values())), args.samples, args.seed)
    data["timing"]["load_before_more"] = [round(x, 2) for x in os.getloadavg()]
    data["timing"] = time_decodes(ctx, args, decs, a, expected, lambda t: save({**data, "timing": t}), data["timing"])


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a local checkpoint folder whose card.json names its task")
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS), help="sampling settings")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model and the decoder)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--problem-seed", type=int, default=EVAL_SEED, help="the evaluation problems' seed")
    ap.add_argument("--seed", type=int, default=11, help="the sampling seed")
    ap.add_argument("--value", type=float, default=0.5, help="V in the threshold beta * max(V, value_floor)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per arm and pool size (0: no timing)")
    ap.add_argument("--out", type=Path, required=True, help="the results' stem: OUT.json, OUT.md and OUT.png")
    ap.add_argument("--replay", action="store_true", help="rebuild the report from OUT.json (no decoding)")
    ap.add_argument("--exclude-runs", type=int, nargs="*", default=None,
                    help="with --replay: timed runs (their index) to leave out of the time summary, e.g. ones another "
                         "process disturbed; both summaries are reported")
    ap.add_argument("--more-repeats", action="store_true",
                    help="with --replay: time --repeats more interleaved repeats and add them to OUT.json's")
    ap.add_argument("--exclude-why", default="", help="why those runs are left out (shown in the report)")
    args = ap.parse_args()
    path = args.out.with_suffix(".json")
    if path.exists() and not args.replay:
        ap.error(f"{path} exists: choose another --out, or --replay it")

    def save(data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))

    if args.replay:
        data = json.loads(path.read_text())
        analyse(data, data["rollouts"])
        if args.exclude_runs is not None:
            data["excluded"] = {"runs": args.exclude_runs, "why": args.exclude_why} if args.exclude_runs else None
        if args.more_repeats:
            more_repeats(data, args, save)
    else:
        cfg = TrainConfig.from_preset(args.preset, model=args.model, device=args.device)
        env = {**common.environment("cpu"), "load": [round(x, 2) for x in os.getloadavg()],
               "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": cpu_model(), "nice": os.nice(0)}
        ctx = context(args.model, cfg, args.problems, args.problem_seed)
        n = args.problems * args.samples
        decs = {p: decoder(ctx, p) for p in (max(1, n // 4), n)}  # a full pool, and pool = batch
        slots = next(iter(decs))
        out, secs = generate(ctx, decs[slots], args.samples, args.seed)
        data = {"env": env, "model_name": checkpoint_card(args.model).get("description", Path(args.model).name),
                "problems": args.problems, "samples": args.samples, "problem_seed": args.problem_seed,
                "seed": args.seed, "preset": args.preset, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "value": args.value, "max_new_tokens": ctx.max_new, "decode_slots": slots, "decode_seconds": secs,
                "rollouts": record(ctx, out)}
        a, expected = analyse(data, data["rollouts"])
        save(data)
        print(markdown(data, args), flush=True)
        if args.repeats:
            data["timing"] = time_decodes(ctx, args, decs, a, expected, lambda t: save({**data, "timing": t}))
    save(data)
    common.write_report(args.out.with_suffix(".md"), markdown(data, args))
    plot(data, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
