"""Value pretraining (espo.rl.value_fit, `espo value fit`, a run starting from a fitted head): the hidden states the fit
reads are the ones the decoder's value head reads, the fit recovers a value that exists, files round-trip without
running code, and a run starts from the head it is given."""
import json
import shutil

import numpy as np
import pytest
import torch

import espo
from espo.app.cli import main
from espo.engine.models import builtin_model_path, load_model
from espo.rl.trainer import TrainConfig, initial_value_head, value_head_source
from espo.rl.value_fit import (
    CARD_FILE,
    HEAD_FILE,
    FittedValue,
    RolloutFeatures,
    explained_variance,
    features_from_rollouts,
    fit_value_head,
    load_value_head,
    save_value_head,
    value_report,
)
from espo.tasks import builtin_task
from espo.tasks.prompting import encode_prompt


def synthetic(n_rollouts=240, hidden=16, seed=0) -> tuple[RolloutFeatures, np.ndarray]:
    """Rollouts whose outcome is a coin with probability sigmoid(w . h) read off a per-rollout direction that every
    token's hidden state carries (plus noise): a value that exists for the fit to find."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=hidden)
    lengths = rng.integers(3, 12, n_rollouts)
    base = rng.normal(size=(n_rollouts, hidden))
    p = 1 / (1 + np.exp(-2 * base @ w / np.sqrt(hidden)))
    right = rng.random(n_rollouts) < p
    rollout = np.repeat(np.arange(n_rollouts), lengths)
    h = base[rollout] + 0.3 * rng.normal(size=(len(rollout), hidden))
    zeros = np.zeros(len(rollout), np.float32)
    return RolloutFeatures(rollout=rollout, position=np.concatenate([np.arange(n) for n in lengths]),
                           hidden=h.astype(np.float32), regret=zeros, entropy=zeros, logprob=zeros,
                           prompt=np.arange(n_rollouts) // 2, reward=right.astype(np.float32), right=right,
                           lengths=lengths, finish=["eos"] * n_rollouts), p


def tiny_model_with_a_random_head(problem_seed: int):
    """The built-in model, a value head of random weights decoding beside it, and prompts of its task."""
    model, tok = load_model(builtin_model_path())
    head = espo.ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=0.3)
    prompts = [encode_prompt(tok, p.prompt) for p in builtin_task().problems(4, seed=problem_seed)]
    return model, head, prompts, espo.Decoder(model, max_batch=4, max_seq_len=160, value_source=head)


def test_the_fit_reads_the_hidden_states_the_decoders_value_head_reads():
    model, head, prompts, dec = tiny_model_with_a_random_head(5)
    prompts = prompts[:3]
    out = dec.generate(prompts, 2, max_new_tokens=40, seed=3)
    feats = features_from_rollouts(model, prompts, out, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    with torch.no_grad():
        replayed = head(torch.from_numpy(feats.hidden)).numpy()
    live = torch.cat([r.values for r in out]).numpy()
    assert feats.hidden.shape == (sum(r.length for r in out), model.config.hidden_size)
    np.testing.assert_allclose(replayed, live, atol=2e-4)
    assert feats.right.tolist() == [True, False, True, True, False, False]
    assert feats.target.shape == (len(live),)


def test_a_value_that_exists_is_found_and_scored_on_held_out_prompts():
    data, p = synthetic(600)
    fitted = fit_value_head(data.subset(np.arange(400)))
    held = data.subset(np.arange(400, 600))
    report = value_report(fitted, held)
    ceiling = explained_variance(p[400:][held.rollout], held.target)  # the true probability's own EV
    assert ceiling > 0.3 and report["explained_variance"] > 0.7 * ceiling
    assert abs(sum(r["tokens"] for r in report["by_decile"]) - len(held.rollout)) == 0
    rising = [r["observed"] for r in report["by_decile"]]
    assert rising[-1] > rising[0] + 0.3  # the top decile succeeds far more often than the bottom one
    assert set(fitted.selection) == {"0.01", "0.1", "1", "10", "100", "1000"}


def test_a_fit_without_both_outcomes_is_refused():
    data, _ = synthetic(40)
    data.right[:] = True
    with pytest.raises(ValueError, match="rollouts that end right and rollouts that end wrong"):
        fit_value_head(data)


def test_explained_variance_is_one_for_a_perfect_value_and_zero_for_the_mean():
    y = np.array([0.0, 1.0, 1.0, 0.0])
    assert explained_variance(y, y) == 1.0
    assert explained_variance(np.full(4, 0.5), y) == 0.0
    assert np.isnan(explained_variance(y, np.ones(4)))


def test_a_head_round_trips_and_is_never_replaced_without_asking(tmp_path):
    fitted = FittedValue(weight=np.arange(8, dtype=np.float32), bias=0.25, ridge=1.0, selection={})
    save_value_head(tmp_path, fitted.head(), {"temperature": 0.5})
    head, card = load_value_head(tmp_path, hidden_size=8)
    assert card == {"temperature": 0.5, "hidden_size": 8}
    x = torch.randn(3, 8)
    assert torch.allclose(head(x), fitted.head()(x))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_value_head(tmp_path, fitted.head(), {})
    save_value_head(tmp_path, espo.ValueHead(8), {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([HEAD_FILE, CARD_FILE])  # no temporary file left
    with pytest.raises(ValueError, match="fitted on another model"):
        load_value_head(tmp_path / HEAD_FILE, hidden_size=9)


def test_a_file_that_is_not_a_head_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / HEAD_FILE))
    with pytest.raises(ValueError, match="not a value head written by espo"):
        load_value_head(tmp_path)
    with pytest.raises(FileNotFoundError, match="espo value fit"):
        load_value_head(tmp_path / "elsewhere")


@pytest.fixture
def model_with_head(tmp_path):
    """A copy of the built-in model's folder with a fitted head beside it (by `espo value fit`)."""
    folder = tmp_path / "model"
    shutil.copytree(builtin_model_path(), folder)
    code = main(["value", "fit", "--model", str(folder), "--problems", "12", "--samples", "4", "--threads", "1"])
    assert code == 0
    return folder


def test_value_fit_writes_a_head_beside_the_model_and_refuses_to_replace_it(model_with_head, capsys):
    card = json.loads((model_with_head / CARD_FILE).read_text())
    assert card["rollouts"] == 48 and card["problems"] == 12 and card["samples"] == 4
    assert {"explained_variance", "by_decile", "by_position"} <= set(card["held_out"])
    capsys.readouterr()
    assert main(["value", "fit", "--model", str(model_with_head), "--problems", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --overwrite" in err[0]


def test_a_critic_run_starts_from_the_fitted_head(model_with_head, tmp_path):
    fitted, _ = load_value_head(model_with_head)
    cfg = TrainConfig(algo="espo", model=str(model_with_head), out_dir=str(tmp_path / "run"))
    assert value_head_source(cfg) == model_with_head
    head = initial_value_head(cfg, fitted.hidden_size, torch.device("cpu"))
    assert torch.equal(head.proj.weight, fitted.proj.weight)
    fresh = initial_value_head(TrainConfig(algo="espo", model=str(model_with_head), value_head="none"),
                               fitted.hidden_size, torch.device("cpu"))
    assert float(fresh.proj.bias) == 0.5 and not fresh.proj.weight.any()
    with pytest.warns(UserWarning, match="fitted on rollouts sampled at temperature 1.0"):
        initial_value_head(TrainConfig(algo="espo", model=str(model_with_head), temperature=0.5),
                           fitted.hidden_size, torch.device("cpu"))


def test_the_hidden_states_recorded_while_decoding_are_the_teacher_forced_ones():
    from espo.rl.value_fit import HiddenRecorder, prefix_hidden_states

    model, tok = load_model(builtin_model_path())
    prompts = [encode_prompt(tok, p.prompt) for p in builtin_task().problems(3, seed=7)]
    recorder = HiddenRecorder(model.config.hidden_size)
    out = espo.Decoder(model, max_batch=4, max_seq_len=160, value_source=recorder).generate(
        prompts, 2, max_new_tokens=30, seed=1)
    forced = prefix_hidden_states(model, [prompts[r.prompt_index] for r in out], [r.tokens.tolist() for r in out])
    for r, h in zip(out, forced):
        torch.testing.assert_close(recorder.hidden_of(r.values), h, atol=2e-4, rtol=1e-4)


def test_the_decoder_stops_a_rollout_once_its_value_head_gives_up():
    _, _, prompts, dec = tiny_model_with_a_random_head(2)
    free = dec.generate(prompts, 2, max_new_tokens=40, seed=3)
    level = float(torch.stack([f.values[3:].min() for f in free]).median())  # some rollouts dip below it, some not
    stopper = espo.EarlyStopper(espo.ESPOConfig(value_rule=True, regret_rule=False, value_stop=level, min_tokens=3), 4)
    stopper.arm()
    out = dec.generate(prompts, 2, max_new_tokens=40, seed=3, stopper=stopper)
    stops = 0
    for r, f in zip(out, free):
        below = (f.values[3:] < level).nonzero()
        first = int(below[0]) + 3 if len(below) else None
        if first is not None and first < f.length:
            assert r.finish_reason == "stopped" and r.length == first + 1  # the token that triggered it is kept
            stops += 1
        else:
            assert r.finish_reason != "stopped" and r.length == f.length
        assert torch.equal(r.tokens, f.tokens[: r.length])
    assert 0 < stops < len(out)


def test_the_value_rule_is_refused_where_values_are_per_prompt(tmp_path):
    with pytest.raises(ValueError, match="needs a per-token critic value"):
        TrainConfig(algo="grpo-espo", espo={"value_rule": True})
    TrainConfig(algo="espo", espo={"value_rule": True})


def test_a_run_saved_before_the_value_rule_resumes(tmp_path):
    cfg = TrainConfig(algo="espo", steps=1, prompts_per_step=4, group_size=3, num_problems=16, eval_problems=0,
                      max_batch=16, ppo_epochs=1, minibatches=1, out_dir=str(tmp_path / "run"))
    espo.train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    for name in ("regret_rule", "value_rule", "value_stop"):
        del state["config"]["espo"][name]
        del state["stopper"]["config"][name]
    del state["config"]["value_head"]
    torch.save(state, ckpt)
    import dataclasses

    history = espo.train(dataclasses.replace(cfg, steps=2), resume=True, progress=False).history
    assert [h["step"] for h in history] == [0, 1]
