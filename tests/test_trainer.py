"""The trainer: every algorithm runs and logs, a resumed run matches an uninterrupted one, two DDP
processes keep identical state, and bad input fails clearly without corrupting a checkpoint."""
import dataclasses
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from espo.tasks import ChainArithmetic, TaskError, builtin_model_path
from espo.trainer import ALGOS, TrainConfig, train

TINY = dict(steps=2, prompts_per_step=4, group_size=3, num_problems=16, eval_problems=6, eval_every=2, max_batch=16,
            ppo_epochs=1, minibatches=2, lr=1e-3)
# stops that fire on this task within a few steps (see espo/demo.py for why the paper's defaults do not)
QUICK_STOPS = dict(alpha_s=0.5, beta=1.0, beta_min=0.1, eta_beta=0.5)


def config(tmp_path, **kw):
    espo = kw.pop("espo", {})
    return TrainConfig(**{**TINY, **kw}, espo=espo, out_dir=str(tmp_path / kw.get("algo", "espo")))


def comparable(history):
    return [{k: v for k, v in h.items() if not k.endswith("time_s")} for h in history]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_algorithm_runs_and_logs(algo, tmp_path):
    cfg = config(tmp_path, algo=algo, espo=QUICK_STOPS)
    history = train(cfg, progress=False).history
    assert [h["step"] for h in history] == [0, 1]
    lines = [json.loads(x) for x in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    assert comparable(lines) == comparable(history)
    assert (tmp_path / algo / "checkpoint.pt").is_file()
    assert history[1]["cum_tokens"] == history[0]["tokens"] + history[1]["tokens"] > 0
    assert history[-1]["eval_accuracy"] is not None and 0 <= history[-1]["eval_accuracy"] <= 1
    if "cero" not in algo:
        assert all(h["rollouts"] == 4 * 3 for h in history)
    if not ALGOS[algo][1]:
        assert all(h["stopped"] == 0 for h in history)
    for h in history:
        assert 0 <= h["false_stops"] <= h["stopped"] <= h["rollouts"]
        assert 0 <= h["doomed_tokens"] <= h["tokens"]  # the built-in task says where a wrong rollout went wrong


def test_doomed_tokens_count_what_a_perfect_stopper_would_cut(tmp_path):
    """Recount the oracle from the rollouts themselves, and get None from a task that cannot say."""
    seen = []

    class Recording(ChainArithmetic):
        def first_mistake(self, problem, completion):
            at = super().first_mistake(problem, completion)
            seen.append(0 if at is None or at >= len(completion) else len(completion) + 1 - (at + 1))
            return at

    history = train(config(tmp_path, algo="ppo", steps=1, eval_problems=0), task=Recording(), progress=False).history
    assert seen and history[0]["doomed_tokens"] == sum(seen) > 0  # +1: every wrong rollout here ends with EOS

    class Opaque:
        name = "opaque"
        max_new_tokens = 8

        def problems(self, n, seed):
            return ChainArithmetic(steps=1).problems(n, seed)

        def reward(self, problem, completion):
            return 0.0

    history = train(config(tmp_path / "o", algo="ppo", steps=1, eval_problems=0), task=Opaque(), progress=False).history
    assert history[0]["doomed_tokens"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", ["espo", "espo-cero"])
def test_training_on_the_gpu_runs_and_stops(algo, tmp_path):
    """The path of the GPU study: rollouts with in-kernel stops, PPO updates and checkpoints on the device."""
    cfg = config(tmp_path, algo=algo, device="cuda", steps=3, espo=QUICK_STOPS)
    history = train(cfg, progress=False).history
    assert sum(h["stopped"] for h in history) > 0 and all(h["doomed_tokens"] is not None for h in history)
    torch.cuda.synchronize()
    assert (tmp_path / algo / "checkpoint.pt").is_file()
    # no bit-for-bit check here: attention backward on the GPU may use atomics, so runs can drift by rounding


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    kw = dict(algo="espo-cero", steps=4, espo=QUICK_STOPS)
    whole = train(config(tmp_path / "a", **kw), progress=False).history

    class Killed(Exception):
        pass

    def kill_after_step_1(record):
        if record["step"] == 1:
            raise Killed

    cut = config(tmp_path / "b", **kw)
    with pytest.raises(Killed):
        train(cut, progress=False, on_step=kill_after_step_1)
    resumed = train(cut, resume=True, progress=False).history
    assert comparable(resumed) == comparable(whole)
    a = torch.load(tmp_path / "a" / "espo-cero" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "espo-cero" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["allocator"] is not None and json.dumps(a["allocator"], default=str) == json.dumps(b["allocator"], default=str)
    assert torch.equal(a["stopper"]["scalars"], b["stopper"]["scalars"])


def _ddp_worker(rank, world, port, out, cfg_dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    result = train(TrainConfig(**cfg_dict), progress=False)
    torch.save({
        "history": result.history, "model": result.model.state_dict(), "stopper": result.stopper.state_dict(),
        "allocator": result.allocator.state_dict(),
    }, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_keep_identical_state(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, algo="espo-cero", steps=2, prompts_per_step=4, espo=QUICK_STOPS)
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), dataclasses.asdict(cfg)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert comparable(r0["history"]) == comparable(r1["history"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"ranks diverged on {k}"
    assert torch.equal(r0["stopper"]["scalars"], r1["stopper"]["scalars"])
    assert json.dumps(r0["allocator"], default=str) == json.dumps(r1["allocator"], default=str)
    assert r0["history"][0]["rollouts"] > 0


class RaisingTask(ChainArithmetic):
    def reward(self, problem, completion):
        raise KeyError("no such answer")


class StringTask(ChainArithmetic):
    def reward(self, problem, completion):
        return "correct"


class EmptyTask(ChainArithmetic):
    def problems(self, n, seed):
        return []


@pytest.mark.parametrize("task, error, words", [
    (RaisingTask(), TaskError, "raised KeyError"),
    (StringTask(), TaskError, "must return a finite number"),
    (EmptyTask(), TaskError, "returned 0 problems"),
])
def test_bad_tasks_fail_clearly(task, error, words, tmp_path):
    with pytest.raises(error, match=words):
        train(config(tmp_path, algo="grpo", steps=1), task=task, progress=False)


def test_a_checkpoint_made_for_the_builtin_task_brings_its_task(tmp_path):
    model_dir = tmp_path / "arith"
    shutil.copytree(builtin_model_path(), model_dir)
    history = train(config(tmp_path, algo="grpo", steps=1, eval_problems=0, model=str(model_dir)), progress=False).history
    assert history[0]["rollouts"] == 4 * 3
    (model_dir / "card.json").unlink()
    with pytest.raises(ValueError, match="no card.json naming its task"):
        train(config(tmp_path / "again", algo="grpo", steps=1, model=str(model_dir)), progress=False)


def test_bad_settings_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="algo"):
        config(tmp_path, algo="dpo")
    with pytest.raises(ValueError, match="num_problems"):
        train(config(tmp_path, algo="grpo", num_problems=2), progress=False)
    with pytest.raises(ValueError, match="smaller than one group"):
        train(config(tmp_path, algo="grpo-cero", cero_budget=1), progress=False)


def test_resume_from_another_config_is_refused_and_keeps_the_checkpoint(tmp_path):
    cfg = config(tmp_path, algo="grpo", steps=1)
    train(cfg, progress=False)
    path = tmp_path / "grpo" / "checkpoint.pt"
    before = path.read_bytes()
    with pytest.raises(ValueError, match="clip: saved 0.2 vs now 0.3"):
        train(dataclasses.replace(cfg, clip=0.3), resume=True, progress=False)
    assert path.read_bytes() == before


def _padded_minibatch_loss(model, value_head, batch, rows, old_logprobs, old_values, advantages, returns, ref_logprobs,
                           cfg):
    """The update as it was: one forward over the minibatch padded to the whole batch's longest row."""
    from espo.losses import kl_penalty, policy_loss, value_loss

    out = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], output_hidden_states=True)
    pos = batch.positions[rows]
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1).gather(2, batch.tokens[rows][..., None])[..., 0]
    hidden = out.hidden_states[-1]
    values = value_head(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))
    m = batch.mask[rows]
    loss, _ = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, clip=cfg.clip)
    loss = loss + cfg.vf_coef * value_loss(values, returns[rows], m, old_values=old_values[rows], clip=cfg.value_clip)
    return loss + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs[rows], m)


def test_micro_batched_update_has_the_padded_update_s_loss_and_gradients(tmp_path):
    """Length-sorted micro-batches, each padded to its own longest row, give the loss and gradients of one
    forward over the minibatch padded to the batch's longest row (the update before micro-batching)."""
    from types import SimpleNamespace

    from espo.tasks import load_builtin
    from espo.trainer import build_batch, micro_batches, minibatch_backward, score_batch
    from espo.value_head import ValueHead

    torch.manual_seed(0)
    model, _ = load_builtin()
    head = ValueHead(model.config.hidden_size)
    prompts = [[1, 5, 6, 7, 8], [1, 9, 3], [1, 4, 4, 4, 4, 4, 4]]
    lengths = [1, 40, 3, 17, 2, 33, 9, 25, 5, 12, 40, 7]
    rollouts = [SimpleNamespace(prompt_index=i % 3, length=L, tokens=torch.randint(3, 20, (L,))) for i, L in enumerate(lengths)]
    batch = build_batch(prompts, rollouts, [float(i % 2) for i in range(len(lengths))], [0, 1, 2], 0, "cpu")
    cfg = TrainConfig(update_tokens=60, kl_coef=0.1, value_clip=0.2)
    old_logprobs, old_values = score_batch(model, head, batch, cfg.temperature, cfg.update_tokens)
    N, T = batch.mask.shape
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(N, T, generator=g) * batch.mask
    returns = torch.randn(N, T, generator=g) * batch.mask
    ref_logprobs = old_logprobs + 0.1 * torch.randn(N, T, generator=g) * batch.mask
    rows = torch.tensor([0, 1, 3, 5, 6, 8, 10, 11])
    assert len(micro_batches(batch, rows, cfg.update_tokens)) > 2  # the test exercises several micro-batches
    params = list(model.parameters()) + list(head.parameters())
    # the update's own old logprobs equal the padded forward's (they are its ratio's denominator)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits.gather(1, batch.positions[..., None].expand(-1, -1, out.logits.shape[-1]))
        padded_old = torch.log_softmax(logits, -1).gather(2, batch.tokens[..., None])[..., 0] * batch.mask
    torch.testing.assert_close(old_logprobs * batch.mask, padded_old, rtol=1e-5, atol=1e-6)

    loss = _padded_minibatch_loss(model, head, batch, rows, old_logprobs, old_values, advantages, returns, ref_logprobs, cfg)
    loss.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    terms = minibatch_backward(model, head, batch, rows, old_logprobs, old_values, advantages, returns, ref_logprobs, cfg)
    total = terms["policy_loss"] + cfg.vf_coef * terms["value_loss"] + cfg.kl_coef * terms["kl"]
    assert total == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
