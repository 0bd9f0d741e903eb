"""espo inside TRL's GRPOTrainer(rollout_func=...), against the real library on the CPU."""
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import espo

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
if os.environ.get("CI") != "true":  # CI installs TRL: there a missing TRL fails instead of skipping
    pytest.importorskip("trl", reason="TRL is not installed: pip install 'espo-rl[trl]'")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from espo.integrations.trl import ESPORollout  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo.py"
EX = runpy.run_path(str(EXAMPLE))  # its builders; run_name is not "__main__", so nothing trains here
CONFIG = espo.ESPOConfig(alpha_s=0.5, beta=2.0, r_fail=-2.0)


def grpo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=16, learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True,
                bf16=False, report_to="none", gradient_checkpointing=False, seed=3)
    return GRPOConfig(**{**base, **kw})


def weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def teacher_forced(model, out, temperature):
    """log softmax(logits / T) of each returned completion token (the appended terminator excluded)."""
    result = []
    with torch.no_grad():
        for p, c, mask in zip(out["prompt_ids"], out["completion_ids"], out["env_mask"]):
            n = sum(mask)
            logits = model(input_ids=torch.tensor([p + c[:n]])).logits[0, len(p) - 1: len(p) + n - 1]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            result.append(logp.gather(1, torch.tensor(c[:n])[:, None])[:, 0])
    return result


def test_grpo_trains_two_steps_with_espo_rollouts(tmp_path):
    model, tokenizer = EX["tiny_model_and_tokenizer"]()
    stale = EX["tiny_model_and_tokenizer"]()[0]
    rollout = ESPORollout(CONFIG)
    calls, scored = [], []

    def rollout_func(prompts, trainer):
        out = rollout(prompts, trainer)
        calls.append(dict(prompts=list(prompts), out=out, state=trainer.model.state_dict(keep_vars=False),
                          logprobs=teacher_forced(trainer.model, out, trainer.args.temperature)))
        calls[-1]["state"] = {k: v.clone() for k, v in calls[-1]["state"].items()}
        return out

    def has_one(completions, **kw):  # a reward a random model earns sometimes, so that step 1 has a gradient
        scored.append(list(completions))
        return [float("1" in c) for c in completions]

    wrapped = rollout.reward(has_one)

    def espo_correct(prompts, completions, completion_ids, **kw):
        rewards = wrapped(prompts, completions, completion_ids, **kw)
        calls[-1]["rewards"], calls[-1]["stopped"] = rewards, kw["espo_stopped"]
        return rewards

    trainer = GRPOTrainer(model=model, args=grpo_args(tmp_path, mask_truncated_completions=True),
                          train_dataset=EX["sums_dataset"](), processing_class=tokenizer,
                          rollout_func=rollout_func, reward_funcs=[espo_correct])
    before = weights(model)
    trainer.train()
    assert not torch.equal(before, weights(model)), "training changed no parameter"
    assert len(calls) == 3
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for c in calls:
        out = c["out"]
        assert len(out["completion_ids"]) == len(c["prompts"]) == 8 and len(c["rewards"]) == 8
        assert len(set(map(tuple, out["prompt_ids"]))) == 2  # two prompts, each num_generations times
        for got, want in zip(out["logprobs"], c["logprobs"]):  # the weights of the moment drew them
            torch.testing.assert_close(torch.tensor(got[: len(want)]), want, atol=1e-4, rtol=0)
        for ids, mask, stopped, reward in zip(out["completion_ids"], out["env_mask"], c["stopped"], c["rewards"]):
            assert (reward == CONFIG.r_fail) if stopped else reward in (0.0, 1.0)
            assert (mask[-1] == 0 and ids[-1] == pad) if stopped else all(mask)
    assert sum(map(len, scored)) == sum(c["stopped"].count(False) for c in calls)  # stopped ones never scored
    assert any(any(c["stopped"]) for c in calls[1:]), "no completion was stopped: the test checks nothing"

    # Step 2 sampled from the weights step 1 left, not from a stale copy.
    assert not torch.equal(calls[0]["state"]["lm_head.weight"], calls[1]["state"]["lm_head.weight"])
    stale.load_state_dict(calls[0]["state"])
    old = teacher_forced(stale, calls[1]["out"], trainer.args.temperature)
    assert max((a - b).abs().max().item() for a, b in zip(old, calls[1]["logprobs"])) > 1e-3

    logs = [h for h in trainer.state.log_history if "espo/stop_rate" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for c, h in zip(calls, logs):
        assert h["espo/stop_rate"] == pytest.approx(sum(c["stopped"]) / 8)
        assert h["espo/rollout_tokens"] == sum(sum(m) for m in c["out"]["env_mask"])
        assert h["espo/decode_time_s"] > 0
        clipped = [not s and ids[-1] != eos for ids, s in zip(c["out"]["completion_ids"], c["stopped"])]
        assert h["completions/clipped_ratio"] == pytest.approx(sum(clipped) / 8)  # a stop is not a clip


def test_success_estimate_is_the_beta_posterior_mean():
    rollout = ESPORollout(CONFIG)
    rollout._keys = [(1, 2)] * 3 + [(3,)]
    reward = rollout.reward(lambda prompts, completions, completion_ids, **kw: [1.0] * len(prompts))
    rewards = reward(["a"] * 4, ["x"] * 4, [[5]] * 4, espo_stopped=[False, True, False, False])
    assert rewards == [1.0, CONFIG.r_fail, 1.0, 1.0]
    assert rollout.success_estimate([1, 2]) == pytest.approx((1 + 2) / (2 + 3))
    assert rollout.success_estimate([3]) == pytest.approx(2 / 3) and rollout.success_estimate([9]) == 0.5


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    model, tokenizer = EX["tiny_model_and_tokenizer"]()
    return GRPOTrainer(model=model, args=grpo_args(tmp_path_factory.mktemp("grpo")), train_dataset=EX["sums_dataset"](),
                       processing_class=tokenizer, rollout_func=ESPORollout(CONFIG), reward_funcs=[EX["correct"]])


def test_bad_input_names_the_setting(trainer):
    rollout = ESPORollout(CONFIG)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        rollout(["1+2=", ""], trainer)
    with pytest.raises(ValueError, match="no prompts"):
        rollout([], trainer)
    with pytest.raises(ValueError, match="processing_class"):
        rollout(["1+2="], SimpleNamespace(processing_class=None, args=trainer.args))
    for name, value in (("use_vllm", True), ("repetition_penalty", 1.2), ("min_p", 0.1)):
        saved = getattr(trainer.args, name)
        setattr(trainer.args, name, value)
        try:
            with pytest.raises(ValueError, match=f"set {name}="):
                rollout(["1+2="], trainer)
        finally:
            setattr(trainer.args, name, saved)
    with pytest.raises(TypeError, match="ESPOConfig"):
        ESPORollout({"beta": 2.0})
    with pytest.raises(ValueError, match=r"rollout.reward\(your_reward\)"):  # its rewards are not wrapped
        trainer.rollout_func(["1+2="], trainer)


def test_without_stop_the_rollouts_are_those_of_the_stopped_run_up_to_the_stops(trainer):
    prompts = ["1+2="] * 4 + ["3+4="] * 4
    stopping, plain = ESPORollout(CONFIG), ESPORollout(CONFIG, stop=False)
    for r in (stopping, plain):  # the same call index, so the same seeds
        r(prompts, trainer)
    a, b = stopping(prompts, trainer), plain(prompts, trainer)
    assert any(a["espo_stopped"]) and not any(b["espo_stopped"])
    for ids, mask, full in zip(a["completion_ids"], a["env_mask"], b["completion_ids"]):
        assert ids[: sum(mask)] == full[: sum(mask)]


def test_example_runs(tmp_path, capsys):
    trainer = EX["main"](output_dir=str(tmp_path), steps=2)
    out = capsys.readouterr().out
    assert "step 2: stop rate" in out and trainer.state.global_step == 2


def test_import_espo_imports_no_host():
    code = ("import sys, espo, espo.integrations; "
            "assert 'trl' not in sys.modules, sorted(m for m in sys.modules if 'trl' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
