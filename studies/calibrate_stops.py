"""ESPO's stop rule on a model's own rollouts: which settings stop wrong rollouts early and leave right ones alone.

    python studies/calibrate_stops.py /tmp/smol-hf --preset smollm2 --problems 96 --samples 2 \\
        --out studies/results/real-calibration

Decodes calibration problems (their own seed, never the training or evaluation prompts a run draws) through
espo.Decoder at the preset's sampling, without stopping, and records every token's regret. A run with a stopper
draws exactly these tokens up to its stop (each draw depends on the rollout's seed and the token's position
only), so replaying espo's own stop rule (``stop_update_reference``) over the recorded regrets gives, for
every setting of a grid, exactly where each rollout would stop. A stop on a rollout that ends right is a false stop,
measured exactly, not estimated. Beside each setting, two controls that cut the same number of rollouts or
tokens: random stopping (the same number of rollouts, each at a uniform position) and a length cap.

The threshold is ``beta * max(V, value_floor)``: the grid is over tau = beta * V, and the table gives the beta
that puts tau at the value ``--value`` (0.5: a value head's start; with CERO, the prompt's posterior mean).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from espo import Decoder
from espo.engine.models import checkpoint_card, load_model
from espo.ops.reference import stop_update_reference
from espo.ops.stopper import EarlyStopper, ESPOConfig
from espo.rl.config import PRESETS, TrainConfig
from espo.tasks import score, task_from_checkpoint
from espo.tasks.prompting import encode_prompt, stop_token_ids
from studies import common

CALIBRATION_SEED = 2_000_003  # training prompts use the run's seed, evaluation seed + 1_000_003
ALPHAS = (0.5, 0.7, 0.9)
CLIPS = (3.0, 10.0)
TAUS = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)
MIN_TOKENS = (0, 8)


def decode(model_dir: str, cfg: TrainConfig, problems: int, samples: int, seed: int) -> dict:
    """Calibration rollouts without a stopper: per rollout its regrets [length], reward and finish reason."""
    model, tok = load_model(model_dir, device=cfg.device)
    task = task_from_checkpoint(model_dir)
    probs = task.problems(problems, seed=CALIBRATION_SEED)
    prompts = [encode_prompt(tok, p.prompt) for p in probs]
    max_new = cfg.max_new_tokens or int(getattr(task, "max_new_tokens", 128))
    dec = Decoder(model, max_batch=min(cfg.max_batch, problems * samples), max_seq_len=max(map(len, prompts)) + max_new)
    t0 = time.perf_counter()
    out = dec.generate(prompts, samples, max_new_tokens=max_new, temperature=cfg.temperature, top_p=cfg.top_p,
                       seed=seed, eos_token_id=stop_token_ids(tok, model), progress=True)
    seconds = time.perf_counter() - t0
    rows = []
    for r in out:
        text = tok.decode(r.tokens.tolist(), skip_special_tokens=True)
        rows.append({"prompt": r.prompt_index, "reward": score(task, probs[r.prompt_index], text),
                     "finish": r.finish_reason, "regret": [round(float(g), 5) for g in r.regret], "text": text})
    return {"seconds": seconds, "max_new_tokens": max_new, "rollouts": rows}


def stop_points(g: torch.Tensor, lengths: torch.Tensor, cfg: ESPOConfig, mean: float, var: float) -> torch.Tensor:
    """The token index [N] at which each rollout stops under ``cfg`` (-1: never), by espo's own stop rule
    (``espo.ops.reference.stop_update_reference`` on an ``EarlyStopper``) fed the recorded regrets ``g``
    [N, L]. Every row's value is 1, so the threshold is ``cfg.beta`` itself (tau)."""
    N, L = g.shape
    stopper = EarlyStopper(cfg, N)
    stopper.scalars.copy_(torch.tensor([mean, var, cfg.beta, 1.0, 1.0]))  # statistics set, armed
    state = stopper.state(values=torch.ones(N))
    at = torch.full((N,), -1, dtype=torch.long)
    for t in range(L):
        stop = stop_update_reference(g[:, t], t < lengths, state)
        at = torch.where(stop & (at < 0), t, at)
    return at


def replay(data: dict, value: float, rng: np.random.Generator) -> list[dict]:
    """Every grid setting's stops over the recorded rollouts, with the random-stop and length-cap controls."""
    rows = data["rollouts"]
    lengths = np.array([len(r["regret"]) for r in rows])
    right = np.array([r["reward"] >= 1.0 for r in rows])
    g = torch.zeros(len(rows), int(lengths.max()))
    for i, r in enumerate(rows):
        g[i, : lengths[i]] = torch.tensor(r["regret"])
    live = torch.arange(g.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
    mean, var = float(g[live].mean()), float(g[live].var(unbiased=False))  # the first batch's, as the stopper sets
    floor = ESPOConfig().value_floor
    total = lengths.sum()
    results = []
    for alpha, clip, tau, min_tokens in itertools.product(ALPHAS, CLIPS, TAUS, MIN_TOKENS):
        with warnings.catch_warnings():  # the grid holds settings that cannot fire (tau >= clip) on purpose
            warnings.simplefilter("ignore")
            cfg = ESPOConfig(alpha_s=alpha, clip=clip, beta=tau, beta_min=0.0, eta_beta=0.0, min_tokens=min_tokens)
        at = stop_points(g, torch.as_tensor(lengths), cfg, mean, var).numpy()
        stopped = at >= 0
        kept = np.where(stopped, at + 1, lengths)  # a stop keeps its trigger token
        n_stop = int(stopped.sum())
        results.append({
            "alpha_s": alpha, "clip": clip, "tau": tau, "beta_at_value": tau / max(value, floor),
            "min_tokens": min_tokens, "stop_rate": n_stop / len(rows),
            "false_stop_rate": float((stopped & right).sum() / max(n_stop, 1)),
            "right_stopped": float((stopped & right).sum() / max(right.sum(), 1)),
            "wrong_stopped": float((stopped & ~right).sum() / max((~right).sum(), 1)),
            "tokens_saved": float(1 - kept.sum() / total),
            "reachable": bool(tau < clip),
            **controls(lengths, right, n_stop, int(total - kept.sum()), rng),
        })
    return results, {"mean": mean, "var": var, "tokens": int(total), "rollouts": len(rows),
                     "success": float(right.mean())}


def controls(lengths: np.ndarray, right: np.ndarray, n_stop: int, cut: int, rng: np.random.Generator) -> dict:
    """Random stopping of n_stop rollouts (mean over 200 draws) and the length cap that cuts ``cut`` tokens."""
    if n_stop == 0:
        return {"random_false_stop_rate": None, "random_tokens_saved": 0.0, "cap": None, "cap_right_cut": 0.0}
    false, saved = [], []
    for _ in range(200):
        pick = rng.choice(len(lengths), n_stop, replace=False)
        at = rng.integers(1, lengths[pick] + 1)  # tokens kept, the trigger included
        false.append(right[pick].mean())
        saved.append((lengths[pick] - at).sum() / lengths.sum())
    cap = next((c for c in range(int(lengths.max()), 0, -1) if np.maximum(lengths - c, 0).sum() >= cut), 1)
    return {"random_false_stop_rate": float(np.mean(false)), "random_tokens_saved": float(np.mean(saved)),
            "cap": cap, "cap_right_cut": float((right & (lengths > cap)).sum() / max(right.sum(), 1))}


def markdown(results: list[dict], stats: dict, data: dict, env: dict, args) -> str:
    ok = [r for r in results if r["stop_rate"] > 0 and r["false_stop_rate"] <= args.max_false]
    best = sorted(ok, key=lambda r: -r["tokens_saved"])[:12]
    busy = sorted((r for r in results if r["stop_rate"] >= 0.15), key=lambda r: r["false_stop_rate"])[:12]
    lines = [
        f"# ESPO's stop rule replayed on {args.model_name}'s own rollouts",
        "",
        f"{env['date']}, {env['device']}, torch {env['torch']}, load average {env['load']}. Command: "
        f"`{env['command']}`. {stats['rollouts']} calibration rollouts ({args.problems} problems x {args.samples}, "
        f"problem seed {CALIBRATION_SEED}, sampling seed {args.seed}; never a run's training or evaluation prompts) "
        f"at temperature {args.cfg.temperature}, top_p {args.cfg.top_p}, <= {data['max_new_tokens']} new tokens, "
        f"decoded in {data['seconds']:.0f} s; success {stats['success']:.1%}; {stats['tokens']} tokens; "
        f"regret mean {stats['mean']:.3f}, variance {stats['var']:.3f}.",
        "",
        "A stop is replayed exactly (the stopped run draws these tokens up to its stop); a false stop is a stop of a "
        "rollout that ends right. tau = beta * max(V, value_floor); beta at V = "
        f"{args.value}. Random stop: the same number of rollouts, each at a uniform position (200 draws); cap: "
        "the length cap that cuts as many tokens.",
        "",
        f"Success is {stats['success']:.1%}, so a random stop lands on a rollout that would end right "
        f"{stats['success']:.0%} of the time: a stop rule that knows nothing has that false-stop share.",
        "",
        "What this does not show: time (a replay decodes nothing twice; no rollout or step time is measured here), "
        "the spread over sampling seeds (one seed; a false-stop share over k stops has a binomial standard error "
        "of about sqrt(p(1-p)/k), 5 points at 44 stops), or how a setting does on new prompts (the best rows "
        "are picked among 108 settings on these same rollouts, so they flatter it; confirm on evaluation prompts).",
    ]
    few_false = f"Settings with false stops <= {args.max_false:.0%} of stops, most tokens saved first:"
    for title, chosen in ((few_false, best), ("Settings that stop at least 15% of rollouts, fewest false stops first:",
                                              busy)):
        lines += ["", title, ""] + table(chosen)
    paper = [r for r in results if (r["alpha_s"], r["clip"], r["min_tokens"]) == (0.9, 3.0, 0)]
    lines += ["", "The paper's smoothing (alpha_s 0.9) at the clip 3, by tau (beta 7 at V 0.5 is tau 3.5: "
              "above the clip, so it never fires):", "",
              "| tau | stop rate | false stops | tokens saved |", "|---|---|---|---|"]
    lines += [f"| {r['tau']} | {r['stop_rate']:.1%} | {r['false_stop_rate']:.1%} | {r['tokens_saved']:.1%} |"
              for r in paper]
    return "\n".join(lines) + "\n"


def table(results: list[dict]) -> list[str]:
    lines = ["| alpha_s | clip | tau | beta at V | min_tokens | stop rate | false stops | wrong stopped | "
             "right stopped | tokens saved | random stop: false stops, tokens saved | "
             "cap: length, right rollouts cut |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['alpha_s']} | {r['clip']} | {r['tau']} | {r['beta_at_value']:.2f} | {r['min_tokens']} | "
            f"{r['stop_rate']:.1%} | {r['false_stop_rate']:.1%} | {r['wrong_stopped']:.1%} | "
            f"{r['right_stopped']:.1%} | "
            f"{r['tokens_saved']:.1%} | {r['random_false_stop_rate']:.1%}, {r['random_tokens_saved']:.1%} | "
            f"{r['cap']}, {r['cap_right_cut']:.1%} |")
    return lines


def plot(results: list[dict], stats: dict, out: Path) -> None:
    """False-stop share against tokens saved: every setting, its random-stop control, and the no-skill line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fired = [r for r in results if r["stop_rate"] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([r["tokens_saved"] for r in fired], [r["false_stop_rate"] for r in fired], s=14, label="ESPO settings")
    ax.scatter([r["random_tokens_saved"] for r in fired], [r["random_false_stop_rate"] for r in fired], s=10,
               marker="x", color="grey", label="random stops, same number of rollouts")
    ax.axhline(stats["success"], color="red", lw=1, ls="--", label=f"success rate ({stats['success']:.0%}): no skill")
    ax.set_xlabel("share of rollout tokens saved")
    ax.set_ylabel("share of stops that were of right rollouts")
    ax.set_title("Stop rule replayed on the model's own rollouts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a local checkpoint folder whose card.json names its task")
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS), help="sampling settings")
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model and the decoder)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11, help="the sampling seed")
    ap.add_argument("--value", type=float, default=0.5, help="V at which the table gives beta")
    ap.add_argument("--max-false", type=float, default=0.05, help="largest false-stop share listed")
    ap.add_argument("--out", type=Path, required=True, help="the results' stem: OUT.json, OUT.md and OUT.png")
    ap.add_argument("--replay", action="store_true", help="replay the rollouts already in OUT.json (no decoding)")
    args = ap.parse_args()
    if args.out.with_suffix(".json").exists() and not args.replay:
        ap.error(f"{args.out.with_suffix('.json')} exists: choose another --out, or --replay its rollouts")
    args.cfg = TrainConfig.from_preset(args.preset, model=args.model, device=args.device)
    args.model_name = checkpoint_card(args.model).get("description", Path(args.model).name)
    env = {**common.environment("cpu"), "load": [round(x, 2) for x in os.getloadavg()],
           "threads": torch.get_num_threads()}
    if args.replay:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        env, data = saved["env"], saved["rollouts"]
    else:
        data = decode(args.model, args.cfg, args.problems, args.samples, args.seed)
    results, stats = replay(data, args.value, np.random.default_rng(0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "stats": stats, "results": results,
                                                         "rollouts": data}, indent=1))
    common.write_report(args.out.with_suffix(".md"), markdown(results, stats, data, env, args))
    plot(results, stats, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
