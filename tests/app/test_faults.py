"""Fault injection: no run is lost, no checkpoint runs code, every CLI failure is one line with exit code 2.

A diverging loss, a disk that fills during a save, a crafted pickle, a moved run folder and a hundred ways
to mistype a flag: each must leave the last good checkpoint loadable and say what to change.
"""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import espo
import espo.rl.checkpoint
import espo.rl.trainer
import espo.rl.update
from espo.app.cli import main
from espo.engine.models import builtin_model_path
from espo.rl.trainer import TrainConfig, TrainingDiverged, train
from espo.tasks import ChainArithmetic, TaskError

TINY = dict(steps=2, prompts_per_step=4, group_size=3, num_problems=16, eval_problems=0, max_batch=16, ppo_epochs=1,
            minibatches=1, lr=1e-3)
TINY_FLAGS = ["--prompts-per-step", "4", "--group-size", "3", "--num-problems", "16", "--eval-problems", "0",
              "--max-batch", "16", "--ppo-epochs", "1", "--minibatches", "1", "--no-progress"]


def cli(capsys, *argv):
    """Run the CLI; return (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def one_line_failure(capsys, *argv) -> str:
    code, err = cli(capsys, *argv)
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


# ------------------------------------------------------------------------------------ data loss


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, algo="grpo", out_dir=str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    saved = {}
    real_loss = espo.rl.update.policy_loss

    def loss_that_turns_nan(*args, **kwargs):
        loss, info = real_loss(*args, **kwargs)
        return (loss * float("nan"), info) if "step0" in saved else (loss, info)

    monkeypatch.setattr(espo.rl.update, "policy_loss", loss_that_turns_nan)
    with pytest.raises(TrainingDiverged, match=r"step 1: the policy loss is not finite.*lr=0.001.*kept at"):
        train(cfg, progress=False, on_step=lambda record: saved.setdefault("step0", ckpt.read_bytes()))
    assert ckpt.read_bytes() == saved["step0"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0]
    monkeypatch.setattr(espo.rl.update, "policy_loss", real_loss)
    history = train(cfg, resume=True, progress=False).history  # the kept checkpoint resumes
    assert [h["step"] for h in history] == [0, 1]


def test_a_diverging_cli_run_is_one_line_naming_the_learning_rate(tmp_path, capsys):
    run = tmp_path / "run"
    line = one_line_failure(capsys, "train", "--algo", "ppo", "--lr", "10", "--steps", "6", *TINY_FLAGS,
                            "--out-dir", run)
    assert "diverged" in line and "lr=10.0" in line and "kept at" in line
    kept = espo.rl.checkpoint.load_checkpoint(run / "checkpoint.pt")
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = espo.rl.checkpoint.save_atomic({"config": {"a": 1}, "step": 0, "w": torch.ones(3)}, tmp_path / "ckpt.pt")

    def disk_full(state, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(espo.rl.checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        espo.rl.checkpoint.save_atomic({"config": {"a": 1}, "step": 1, "w": torch.zeros(3)}, path)
    state = espo.rl.checkpoint.load_checkpoint(path)
    assert state["step"] == 0 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_folder_holding_a_run_is_never_replaced_without_asking(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "steps": 1}, algo="grpo", out_dir=str(run)), progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = one_line_failure(capsys, "train", "--algo", "grpo", "--steps", "1", *TINY_FLAGS, "--out-dir", run)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    code, _ = cli(capsys, "train", "--algo", "ppo", "--steps", "1", *TINY_FLAGS, "--out-dir", run, "--overwrite")
    assert code == 0 and json.loads((run / "config.json").read_text())["algo"] == "ppo"


def test_the_demo_folder_is_never_replaced_without_asking(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    line = one_line_failure(capsys, "demo", "--quick", "--out", tmp_path)
    assert "already holds a demo" in line and (tmp_path / "report.json").read_text() == "{}"


# ------------------------------------------------------------------------------------- security


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_a_crafted_pickle_is_refused_without_running(tmp_path, capsys, zip_format):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    state = {"config": TrainConfig(**TINY, out_dir=str(run)).to_dict(), "step": 0, "payload": _Payload(marker)}
    if zip_format:
        torch.save(state, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(pickle.dumps(state))
    line = one_line_failure(capsys, "train", "--resume", "--out-dir", run)
    assert not marker.exists()
    assert ("refusing to load" in line or "corrupt" in line) and "checkpoint.pt" in line


# ---------------------------------------------------------------------------------------- resume


def test_resume_from_the_folder_alone_however_it_is_spelled_or_moved(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = cli(capsys, "train", "--algo", "espo", "--steps", "1", "--lr", "5e-4", *TINY_FLAGS,
                  "--out-dir", "runs/k9")
    assert code == 0
    shutil.move("runs/k9", "moved")
    code, err = cli(capsys, "train", "--resume", "--out-dir", "./moved/", "--steps", "2", "--no-progress")
    assert code == 0, err
    code, err = cli(capsys, "train", "--resume", "--out-dir", tmp_path / "moved", "--steps", "3", "--no-progress")
    assert code == 0, err
    history = [json.loads(line) for line in Path("moved/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2]
    saved = json.loads(Path("moved/config.json").read_text())
    assert saved["lr"] == 5e-4 and saved["steps"] == 3 and saved["algo"] == "espo"  # the saved settings, extended
    line = one_line_failure(capsys, "train", "--resume", "--out-dir", "moved", "--clip", "0.3")
    assert "clip: saved 0.2 vs now 0.3" in line
    line = one_line_failure(capsys, "train", "--resume", "--out-dir", "moved", "--steps", "2")
    assert "already done 3 steps" in line


def test_a_cero_run_cannot_be_extended_past_its_budget_plan(tmp_path):
    cfg = TrainConfig(**{**TINY, "steps": 1}, algo="grpo-cero", out_dir=str(tmp_path / "run"))
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="cannot be extended"):
        train(TrainConfig(**{**cfg.to_dict(), "steps": 2}), resume=True, progress=False)


# ------------------------------------------------------------------------- one-line CLI failures


def _truncated_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return model


def _bad_config_json(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    (model / "config.json").write_text("{not json")
    return model


def _corrupt_checkpoint(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    return run


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file"


CLI_FAILURES = [  # (argv builder, words the one line must hold)
    (lambda p: ["train", "--model", _truncated_model(p)], "could not load the model weights"),
    (lambda p: ["train", "--model", _bad_config_json(p)], "not valid JSON"),
    (lambda p: ["train", "--dtype", "float99"], "dtype must be one of"),
    (lambda p: ["train", "--eval-every", "0"], "eval_every must be >= 1"),
    (lambda p: ["train", "--lr", "nan"], "lr must be a finite number"),
    (lambda p: ["train", "--clip", "-0.2"], "clip must be > 0"),
    (lambda p: ["train", "--gamma", "5"], "gamma must be <= 1"),
    (lambda p: ["train", "--lam", "-1"], "lam must be >= 0"),
    (lambda p: ["train", "--espo-r-fail", "nan"], "r_fail must be a finite number"),
    (lambda p: ["train", "--espo-min-tokens", "1.5"], "invalid int value"),
    (lambda p: ["train", "--check-false-stops", "maybe"], "expected true or false"),
    (lambda p: ["train", "--steps", "two"], "invalid int value"),
    (lambda p: ["train", "--algo", "dpo"], "algo must be one of"),
    (lambda p: ["train", "--out-dir", _a_file(p)], "cannot write the run folder"),
    (lambda p: ["train", "--out-dir", _a_file(p) / "below"], "cannot write the run folder"),
    (lambda p: ["train", "--resume", "--out-dir", _corrupt_checkpoint(p)], "corrupt"),
    (lambda p: ["train", "--resume", "--out-dir", p / "nowhere"], "no checkpoint at"),
    (lambda p: ["demo", "--steps", "x"], "invalid int value"),
    (lambda p: ["frobnicate"], "invalid choice"),
]
if not torch.cuda.is_available():
    CLI_FAILURES.append((lambda p: ["train", "--device", "cuda"], "no usable CUDA GPU"))
if not espo.backends()["cuda"].available:
    CLI_FAILURES.append((lambda p: ["example", "--backend", "cuda"], "backend 'cuda' is not available"))


@pytest.mark.parametrize("argv, words", CLI_FAILURES, ids=[w for _, w in CLI_FAILURES])
def test_every_cli_failure_is_one_line_with_exit_code_2(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    if args[0] == "train" and "--out-dir" not in args:
        args += ["--out-dir", tmp_path / "out"]
    line = one_line_failure(capsys, *args)
    assert words in line, line


def test_version(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"espo-rl {espo.__version__}"


# --------------------------------------------------------------------------------- bad tasks


class FewerProblems(ChainArithmetic):
    def problems(self, n, seed):
        return super().problems(n, seed)[: n // 2]


class DictProblems(ChainArithmetic):
    def problems(self, n, seed):
        return [{"prompt": p.prompt, "answer": p.answer} for p in super().problems(n, seed)]


@pytest.mark.parametrize("task, words", [(FewerProblems(), "returned 8 problems"), (DictProblems(), "espo.Problem")])
def test_a_task_breaking_the_problems_contract_is_named(task, words, tmp_path):
    with pytest.raises(TaskError, match=words):
        train(TrainConfig(**TINY, algo="grpo", out_dir=str(tmp_path / "run")), task=task, progress=False)


# ------------------------------------------------------------------------------ issue 24: round two


def _model_with_layers(tmp_path: Path, extra: int) -> Path:
    """The built-in model's weights under a config.json naming ``extra`` more (or fewer) layers."""
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] += extra
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("extra, words", [(1, "missing from the weights"), (-1, "in the weights but not in the model")])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, capsys, extra, words):
    model = _model_with_layers(tmp_path, extra)
    line = one_line_failure(capsys, "train", "--model", model, "--steps", "1", *TINY_FLAGS,
                            "--out-dir", tmp_path / "run")
    assert words in line and "model.layers." in line and "config.json" in line, line


def test_a_folder_a_run_holds_is_refused_to_a_second_run(tmp_path, capsys):
    run, seen = tmp_path / "run", {}

    def start_a_second_run(record):  # while the first run holds the folder
        if "code" not in seen:
            seen["code"], seen["err"] = cli(capsys, "train", "--algo", "grpo", "--steps", "2", *TINY_FLAGS,
                                            "--out-dir", run, "--overwrite")

    train(TrainConfig(**TINY, algo="grpo", out_dir=str(run)), progress=False, on_step=start_a_second_run)
    assert seen["code"] == 2 and len(seen["err"]) == 1, seen
    assert str(run) in seen["err"][0] and "another run holds it" in seen["err"][0]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]  # each step once, of the one run
    assert espo.rl.checkpoint.load_checkpoint(run / "checkpoint.pt")["step"] == 1
    code, err = cli(capsys, "train", "--resume", "--out-dir", run, "--steps", "3", "--no-progress")
    assert code == 0, err  # the lock went with the run


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def test_overwrite_never_replaces_a_model_or_files_that_are_not_a_runs(tmp_path, capsys):
    model = tmp_path / "models" / "mine"
    shutil.copytree(builtin_model_path(), model)
    before = _files(tmp_path / "models")
    for out_dir, where in [(model, "is the model folder"), (model / "runs", "is inside the model folder"),
                           (tmp_path / "models", "holds the model folder")]:
        line = one_line_failure(capsys, "train", "--model", model, "--steps", "1", *TINY_FLAGS,
                                "--out-dir", out_dir, "--overwrite")
        assert where in line and "choose another --out-dir" in line, line
    assert _files(tmp_path / "models") == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("mine")
    (notes / "todo.txt").write_text("mine too")
    line = one_line_failure(capsys, "train", "--steps", "1", *TINY_FLAGS, "--out-dir", notes, "--overwrite")
    assert "not a run's (todo.txt)" in line, line
    assert _files(notes) == {"config.json": b"mine", "todo.txt": b"mine too"}
    assets = _files(builtin_model_path())
    line = one_line_failure(capsys, "train", "--steps", "1", *TINY_FLAGS, "--out-dir", builtin_model_path(),
                            "--overwrite")
    assert "is the model folder" in line and _files(builtin_model_path()) == assets


def test_an_unsupported_dtype_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    assert "float64" not in capsys.readouterr().out  # --help offers only what runs
    line = one_line_failure(capsys, "train", "--dtype", "float64", "--steps", "1", *TINY_FLAGS,
                            "--out-dir", tmp_path / "run")
    assert "dtype must be one of float32, bfloat16, float16" in line, line
    assert not (tmp_path / "run").exists()


def test_resume_removes_the_temporaries_of_a_killed_save(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "steps": 1}, algo="grpo", out_dir=str(run)), progress=False)
    for name in (".checkpoint.pt.k1ll3d.tmp", ".metrics.jsonl.x7y.tmp"):  # what SIGKILL during a save leaves
        (run / name).write_bytes(b"half a file")
    code, err = cli(capsys, "train", "--resume", "--out-dir", run, "--steps", "2", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


class RaisingTask(ChainArithmetic):
    def reward(self, problem, completion):
        raise RuntimeError("broken reward")


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_a_plain_rerun(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", "--algo", "grpo", "--steps", "1", *TINY_FLAGS, "--out-dir", run]
    real_step = espo.rl.trainer.train_step

    def ctrl_c(run_, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(espo.rl.trainer, "train_step", ctrl_c)
    code, err = cli(capsys, *argv)
    assert code == 130 and len(err) == 1 and "nothing to resume" in err[0] and "is kept" not in err[0], err
    monkeypatch.setattr(espo.rl.trainer, "train_step", real_step)
    code, err = cli(capsys, *argv)
    assert code == 0, err
    code, err = cli(capsys, "train", "--resume", "--out-dir", run, "--steps", "2", "--no-progress")
    assert code == 0, err
    monkeypatch.setattr(espo.rl.trainer, "train_step", ctrl_c)
    code, err = cli(capsys, "train", "--resume", "--out-dir", run, "--steps", "3", "--no-progress")
    assert code == 130 and "checkpoint is kept in" in err[0] and "--resume" in err[0], err

    other = tmp_path / "other"
    monkeypatch.setattr(espo.rl.trainer, "train_step", real_step)
    with pytest.raises(TaskError, match="broken reward"):  # a task that raises at step 0
        train(TrainConfig(**TINY, algo="grpo", out_dir=str(other)), task=RaisingTask(), progress=False)
    assert [h["step"] for h in train(TrainConfig(**TINY, algo="grpo", out_dir=str(other)), progress=False).history] \
        == [0, 1]


def test_a_folder_locked_by_another_process_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(  # another process holding the run folder's lock, as a running `espo train` does
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_failure(capsys, "train", "--steps", "1", *TINY_FLAGS, "--out-dir", run)
        assert str(run) in line and "another run holds it" in line, line
        assert list(run.iterdir()) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_malformed_card_is_one_line_naming_the_file(tmp_path, capsys):
    from model_folders import make_model_folder

    make_model_folder(tmp_path / "model")
    (tmp_path / "model" / "card.json").write_text('{"task": {kind: 1}}')
    capsys.readouterr()  # the folder's save prints its own progress
    code = main(["train", "--model", str(tmp_path / "model"), "--steps", "1", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "model" / "card.json") in err and "not valid JSON" in err


def test_a_full_disk_during_the_checkpoint_names_the_file_and_the_disk_and_keeps_no_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk_on_the_second_save(state, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # what torch's zip writer says when the disk fills under it
            f.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4785664 vs 4785552")
        return real_save(state, f, *args, **kwargs)

    monkeypatch.setattr(espo.rl.checkpoint.torch, "save", full_disk_on_the_second_save)
    line = one_line_failure(capsys, "train", "--algo", "grpo", "--steps", "2", *TINY_FLAGS, "--out-dir", run)
    assert f"could not write checkpoint {run / 'checkpoint.pt'}" in line, line
    assert f"the disk holding {run} is full or failing" in line and "unexpected pos" in line, line
    assert "free space and rerun with --resume" in line and "RuntimeError" not in line, line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0]  # no line for the step whose checkpoint failed
    assert espo.rl.checkpoint.load_checkpoint(run / "checkpoint.pt")["step"] == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    monkeypatch.setattr(espo.rl.checkpoint.torch, "save", real_save)
    code, err = cli(capsys, "train", "--resume", "--out-dir", run, "--no-progress")
    assert code == 0, err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_runs_files_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(TrainConfig(**{**TINY, "steps": 1}, algo="grpo", out_dir=str(run)), progress=False)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir()}
    assert modes == dict.fromkeys(["checkpoint.pt", "config.json", "metrics.jsonl"], oct(0o644)), modes


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": 2}, "of another shape than config.json describes: model.embed_tokens.weight"),
    ({"num_hidden_layers": 1}, "missing from the weights"),
])
def test_a_model_that_fails_to_load_is_one_line_from_the_cli_process(tmp_path, change, words):
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    config = json.loads((model / "config.json").read_text())
    for key, factor in change.items():
        config[key] = config[key] * factor if key == "hidden_size" else config[key] + factor
    (model / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(Path(espo.__file__).parents[1]), "TRANSFORMERS_VERBOSITY": "info"}
    done = subprocess.run([sys.executable, "-m", "espo", "train", "--model", str(model), "--steps", "1", *TINY_FLAGS,
                           "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert words in lines[0] and "above report" not in lines[0], lines[0]
    assert "LOAD REPORT" not in done.stdout + done.stderr


def test_cli_wording_names_the_flag_and_the_help_of_the_command_that_ran(tmp_path, capsys):
    line = one_line_failure(capsys, "demo", "--quick", "--out", _a_file(tmp_path))
    assert "choose a writable --out" in line and "--out-dir" not in line, line
    line = one_line_failure(capsys, "train", "--stpes", "3", "--out-dir", tmp_path / "run")
    assert "unrecognized arguments: --stpes 3" in line and "(see espo train --help)" in line, line
    line = one_line_failure(capsys, "frobnicate")
    assert "(see espo --help)" in line, line


def test_durations_in_the_demo_help_are_for_idle_cores(capsys):  # README's: tests/test_readme.py
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "about 7 minutes on 2 idle CPU cores; a loaded machine takes longer" in text
    assert "about 1 minute on 2 idle CPU cores; a loaded machine takes longer" in text


def test_an_espo_run_that_never_stopped_says_so_loudly():
    from espo.app.cli import _stops_never_fired
    from espo.rl.config import TrainConfig

    cfg = TrainConfig(algo="espo")
    message = _stops_never_fired(cfg, [{"stop_rate": 0.0}, {"stop_rate": 0.0}])
    assert "stopped no rollout in 2 steps" in message and "--preset quick" in message and "PPO" in message
    assert _stops_never_fired(cfg, [{"stop_rate": 0.0}, {"stop_rate": 0.1}]) == ""
    assert _stops_never_fired(TrainConfig(algo="ppo"), [{"stop_rate": 0.0}]) == ""
