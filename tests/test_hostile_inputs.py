"""No run lost, round three (issue 34): nothing from a model folder runs, every "--resume" hint is true, a run
resumes from any directory, and every bad input (card.json, arguments, templates, weights, thread counts) is
refused in one line naming it."""
import io
import json
import math
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

import espo
import espo.rl.checkpoint
from espo import prompting
from espo.app.cli import main
from espo.engine.models import builtin_model_path, load_model
from espo.rl.trainer import TrainConfig, setup, train
from espo.tasks import task_from_checkpoint

TINY = dict(steps=1, prompts_per_step=4, group_size=3, num_problems=16, eval_problems=0, max_batch=16, ppo_epochs=1,
            minibatches=1, lr=1e-3, algo="grpo")
TINY_FLAGS = ["--algo", "grpo", "--prompts-per-step", "4", "--group-size", "3", "--num-problems", "16",
              "--eval-problems", "0", "--max-batch", "16", "--ppo-epochs", "1", "--minibatches", "1", "--no-progress"]


def one_line_failure(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


# ------------------------------------------------------------------------- 1: no code from a model folder


CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_folder_naming_custom_code_is_refused_and_its_code_never_runs(tmp_path, capsys, monkeypatch, where):
    from model_folders import make_model_folder

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    make_model_folder(folder, card={"task": {"kind": "word-problems", "digits": 1, "steps": 1}})
    (folder / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    data = json.loads((folder / where).read_text())
    data["auto_map"] = ({"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
                        if where == "config.json" else {"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (folder / where).write_text(json.dumps(data))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a user who would answer transformers' question
    capsys.readouterr()
    with pytest.raises(ValueError, match="custom code") as err:
        load_model(folder)
    assert str(folder / where) in str(err.value) and "auto_map" in str(err.value)
    line = one_line_failure(capsys, "train", "--model", folder, "--steps", "1", "--out-dir", tmp_path / "run")
    assert "custom code" in line and where in line and "Do you wish" not in line
    assert not marker.exists()


def test_every_transformers_load_is_told_not_to_trust_remote_code(tmp_path, monkeypatch):
    import transformers
    from model_folders import make_model_folder

    make_model_folder(tmp_path / "model")
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(tmp_path / "model")
    assert calls and all(c is False for c in calls), calls


# ------------------------------------------------------------------------------ 4: bad API arguments


def test_an_eos_outside_the_vocabulary_is_refused():
    from espo.integrations.transformers import generate_rollouts

    model, _ = espo.load_builtin()
    vocab = model.get_input_embeddings().num_embeddings
    dec = espo.Decoder(model, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match=f"eos_token_id {10**6} is outside the model's vocabulary \\[0, {vocab}\\)"):
        dec.generate([[1, 4, 5]], 1, max_new_tokens=4, eos_token_id=10**6)
    with pytest.raises(ValueError, match=f"eos_token_id {vocab} is outside"):
        dec.generate([[1, 4, 5]], 1, max_new_tokens=4, eos_token_id=[2, vocab])
    assert len(dec.generate([[1, 4, 5]], 1, max_new_tokens=4, eos_token_id=vocab - 1)) == 1
    with pytest.raises(ValueError, match=f"eos_token_id {10**6} is outside"):
        generate_rollouts(model, [[1, 4, 5]], max_new_tokens=4, eos_token_id=10**6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_generate_rollouts_refuses_values_that_decoder_generate_refuses(bad):
    from espo.integrations.transformers import generate_rollouts

    model, _ = espo.load_builtin()
    dec = espo.Decoder(model, max_batch=2, max_seq_len=32)
    prompts = [[1, 4, 5], [1, 6]]
    with pytest.raises(ValueError, match="prompt_values must be finite"):
        dec.generate(prompts, 1, max_new_tokens=4, prompt_values=[0.5, bad])
    with pytest.raises(ValueError, match="prompt_values must be finite"):
        generate_rollouts(model, prompts, max_new_tokens=4, prompt_values=[0.5, bad])
    with pytest.raises(ValueError, match="prompt_values must hold one value per prompt"):
        generate_rollouts(model, prompts, max_new_tokens=4, prompt_values=[0.5])


def test_stop_ids_leave_out_tokens_the_model_cannot_sample():
    model, tok = espo.load_builtin()
    vocab = model.get_input_embeddings().num_embeddings
    model.generation_config.eos_token_id = [tok.eos_token_id, vocab + 5]
    assert prompting.stop_token_ids(tok, model) == [tok.eos_token_id]


# ------------------------------------------------------------------------------------- 5: a full disk


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_a_resumed_run_keeps_no_mapping_of_the_checkpoint_it_loaded(tmp_path):
    """A mapped checkpoint that the next save replaces keeps its disk space: the resumed run would need room
    for three checkpoints, not two."""
    run_dir = tmp_path / "run"
    train(TrainConfig(**TINY, out_dir=str(run_dir)), progress=False)
    ckpt = str(run_dir / "checkpoint.pt")
    run = setup(TrainConfig(**{**TINY, "steps": 2}, out_dir=str(run_dir)), resume=True)
    try:
        assert ckpt not in _mapped_files()
        espo.rl.trainer.train_step(run, 1)  # replaces the checkpoint it resumed from
        assert f"{ckpt} (deleted)" not in _mapped_files() and ckpt not in _mapped_files()
    finally:
        run.close()


def test_a_full_disk_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    run_dir, real_save = tmp_path / "run", torch.save

    def full_disk(state, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4785664 vs 4785552")

    monkeypatch.setattr(espo.rl.checkpoint.torch, "save", full_disk)
    line = one_line_failure(capsys, "train", "--steps", "2", *TINY_FLAGS, "--out-dir", run_dir)
    assert f"could not write checkpoint {run_dir / 'checkpoint.pt'}" in line, line
    assert "rerun with --resume" not in line and "nothing for --resume to continue" in line, line
    monkeypatch.setattr(espo.rl.checkpoint.torch, "save", real_save)
    assert main(["train", "--steps", "2", *TINY_FLAGS, "--out-dir", str(run_dir)]) == 0  # the hint was true


def test_a_full_disk_while_starting_a_run_folder_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    run_dir, real_fsync = tmp_path / "run", os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(espo.rl.checkpoint.os, "fsync", full_disk)
    line = one_line_failure(capsys, "train", "--steps", "1", *TINY_FLAGS, "--out-dir", run_dir)
    assert "could not write file" in line and "config.json" in line and "nothing for --resume" in line, line
    monkeypatch.setattr(espo.rl.checkpoint.os, "fsync", real_fsync)
    assert main(["train", "--steps", "1", *TINY_FLAGS, "--out-dir", str(run_dir)]) == 0


def test_a_full_disk_for_the_metrics_line_keeps_the_step_for_resume(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(espo.rl.trainer, "open", full_disk, raising=False)
    line = one_line_failure(capsys, "train", "--steps", "1", *TINY_FLAGS, "--out-dir", run_dir)
    assert f"could not write metrics {run_dir / 'metrics.jsonl'}" in line and "rerun with --resume" in line, line
    monkeypatch.undo()
    assert main(["train", "--resume", "--steps", "2", "--no-progress", "--out-dir", str(run_dir)]) == 0
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# -------------------------------------------------------------------- 7: resumable from any directory


def test_a_run_with_a_relative_model_resumes_from_another_directory(tmp_path, capsys, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(builtin_model_path(), work / "model")
    monkeypatch.chdir(work)
    assert main(["train", "--model", "model", "--steps", "1", *TINY_FLAGS, "--out-dir", "run"]) == 0
    saved = espo.rl.checkpoint.load_checkpoint(work / "run" / "checkpoint.pt")["config"]
    assert saved["model"] == str(work / "model")
    monkeypatch.chdir(elsewhere)
    code = main(["train", "--resume", "--steps", "2", "--no-progress", "--out-dir", str(work / "run")])
    assert code == 0, capsys.readouterr().err
    code = main(["train", "--resume", "--steps", "3", "--no-progress", "--model", str(work / "model"),
                 "--out-dir", str(work / "run")])
    assert code == 0, capsys.readouterr().err


def test_a_checkpoint_saved_with_a_relative_model_resumes_with_its_absolute_path(tmp_path, capsys, monkeypatch):
    """Checkpoints written before models were stored absolute: the relative folder is found from where the run
    started (what its relative out_dir tells), and the absolute path it names is the same setting."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(builtin_model_path(), work / "model")
    monkeypatch.chdir(work)
    assert main(["train", "--model", "model", "--steps", "1", *TINY_FLAGS, "--out-dir", "run"]) == 0
    ckpt = work / "run" / "checkpoint.pt"
    state = espo.rl.checkpoint.load_checkpoint(ckpt)
    state["config"]["model"], state["config"]["out_dir"] = "model", "run"  # as older runs saved them
    espo.rl.checkpoint.save_atomic(state, ckpt)
    monkeypatch.chdir(elsewhere)
    for extra in (["--model", str(work / "model")], []):
        code = main(["train", "--resume", "--no-progress", "--out-dir", str(work / "run"), *extra])
        assert code == 0, capsys.readouterr().err
    line = one_line_failure(capsys, "train", "--resume", "--no-progress", "--out-dir", work / "run", "--model",
                            builtin_model_path())
    assert "another configuration" in line and "model" in line


# ------------------------------------------------------------------------------------ 8: bad card.json


@pytest.mark.parametrize("card, field", [
    ('{"task": {"kind": "word-problems", "evil": 1}}', "task.evil"),
    ('{"task": {"steps": -1}}', "task.steps"),
    ('{"task": {"kind": "word-problems", "digits": "two"}}', "task.digits"),
    ('{"task": {"modulus": 1.5}}', "task.modulus"),
    ('{"task": {"kind": 3}}', "task.kind"),
    ('{"task": 5}', '"task"'),
    ('[1, 2]', "not an object"),
])
def test_every_bad_card_task_names_card_json_and_the_field(tmp_path, capsys, card, field):
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    (model / "card.json").write_text(card)
    with pytest.raises(ValueError) as err:
        task_from_checkpoint(model)
    assert str(model / "card.json") in str(err.value) and field in str(err.value), str(err.value)
    line = one_line_failure(capsys, "train", "--model", model, "--steps", "1", "--out-dir", tmp_path / "run")
    assert "card.json" in line and field in line, line


# ----------------------------------------------------------------- 9: threads, templates, weight dtypes


def test_a_thread_count_beyond_the_cores_is_one_line(capsys, monkeypatch, tmp_path):
    from espo import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    with pytest.raises(ValueError, match="threads 100000 is more than 8 .4 per core of the 2"):
        threads.choose_cpu_threads(100000)
    assert threads.choose_cpu_threads(8) == (8, "--threads")
    line = one_line_failure(capsys, "train", "--threads", "100000", "--out-dir", tmp_path / "run")
    assert "at most 8" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS 100000 is more than 8"):
        threads.choose_cpu_threads()


def _encode_in_a_thread(tok, seconds: float):
    """encode_prompt's outcome (ids or the exception), or None when it has not returned within ``seconds``."""
    out = []

    def call():
        try:
            out.append(prompting.encode_prompt(tok, "Tom has 3 apples ."))
        except Exception as err:  # noqa: BLE001 - returned to the test
            out.append(err)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    return out[0] if out else None


def test_a_chat_template_that_loops_for_ever_is_stopped(monkeypatch):
    from model_folders import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    monkeypatch.setattr(prompting, "RENDER_SECONDS", 0.5)
    got = _encode_in_a_thread(tok, 60)
    assert isinstance(got, ValueError) and "chat template took over 0.5 s" in str(got), got
    tok.chat_template = "{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}"
    got = _encode_in_a_thread(tok, 60)
    assert isinstance(got, ValueError) and "2600000 characters" in str(got), got
    tok.chat_template = make_tokenizer().chat_template  # a sound template still renders, after both
    assert isinstance(_encode_in_a_thread(tok, 60), list)


def _int8_weight_folder(tmp_path, file_format: str) -> tuple[Path, str]:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    weights = load_file(model / "model.safetensors")
    name = sorted(k for k in weights if k.endswith("up_proj.weight"))[0]
    weights[name] = (weights[name] * 100).round().clamp(-128, 127).to(torch.int8)
    if file_format == "bin":
        (model / "model.safetensors").unlink()
        torch.save(weights, model / "pytorch_model.bin")
    else:
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model, name


@pytest.mark.parametrize("file_format, stored", [("safetensors", "I8"), ("bin", "int8")])
def test_int8_weights_in_a_model_folder_are_refused_by_name(tmp_path, capsys, file_format, stored):
    model, name = _int8_weight_folder(tmp_path, file_format)
    with pytest.raises(ValueError, match=f"{name} \\({stored}\\)") as err:
        load_model(model)
    assert "float32, float16, bfloat16" in str(err.value)
    line = one_line_failure(capsys, "train", "--model", model, "--steps", "1", "--out-dir", tmp_path / "run")
    assert name in line and "Dequantise" in line


def test_int8_weights_in_a_run_checkpoint_are_refused_by_name(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(TrainConfig(**TINY, out_dir=str(run_dir)), progress=False)
    ckpt = run_dir / "checkpoint.pt"
    state = espo.rl.checkpoint.load_checkpoint(ckpt)
    name = sorted(k for k in state["model"] if k.endswith("up_proj.weight"))[0]
    state["model"][name] = state["model"][name].to(torch.int8)
    espo.rl.checkpoint.save_atomic(state, ckpt)
    line = one_line_failure(capsys, "train", "--resume", "--steps", "2", "--no-progress", "--out-dir", run_dir)
    assert f"model.{name} (int8)" in line and str(ckpt) in line, line
