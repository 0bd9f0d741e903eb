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

from espo.engine.models import builtin_model_path
from espo.rl.trainer import ALGOS, TrainConfig, train
from espo.tasks import ChainArithmetic, TaskError

TINY = dict(steps=2, prompts_per_step=4, group_size=3, num_problems=16, eval_problems=6, eval_every=2, max_batch=16,
            ppo_epochs=1, minibatches=2, lr=1e-3)
# stops that fire on this task within a few steps (see espo/app/demo.py for why the paper's defaults do not)
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
        assert ("explained_variance" in h) == ALGOS[algo].critic and ("value_at_start" in h) == ALGOS[algo].critic


def test_value_fit_is_the_explained_variance_of_the_returns_over_response_tokens():
    from espo.rl.trainer import value_fit
    from espo.rl.update import Targets

    mask = torch.tensor([[True, True, False], [True, True, True]])
    returns = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    values = torch.tensor([[0.5, 2.5, -7.0], [3.0, 3.0, 5.5]])
    batch = type("Batch", (), {"mask": mask})()
    fit = value_fit(Targets(batch, None, values, None, returns, None))
    r, v = returns[mask].double(), values[mask].double()
    expected = 1 - ((r - v) - (r - v).mean()).pow(2).mean() / (r - r.mean()).pow(2).mean()
    assert fit["explained_variance"] == pytest.approx(float(expected))
    assert fit["value_at_start"] == pytest.approx(1.75)
    assert value_fit(Targets(batch, None, None, None, None, None)) == {}


def test_value_lr_gives_the_value_head_its_own_rate_and_survives_a_resume(tmp_path):
    """At a policy's small lr the value head barely moves; value_lr moves it at its own rate, and a resumed run
    keeps both rates."""
    from espo.rl.trainer import setup

    def head_change(**kw) -> float:
        cfg = config(tmp_path / str(len(kw)), algo="ppo", steps=1, lr=1e-6, eval_problems=0, **kw)
        result = train(cfg, progress=False)
        return float(result.value_head.proj.weight.detach().abs().max())  # the head starts at weight 0

    shared, own = head_change(), head_change(value_lr=1e-3)
    assert shared < 1e-5 < 1e-4 < own
    cfg = config(tmp_path / "1", algo="ppo", steps=2, lr=1e-6, eval_problems=0, value_lr=1e-3)
    run = setup(cfg, resume=True)
    try:
        assert [g["lr"] for g in run.optimizer.param_groups] == [1e-6, 1e-3]
    finally:
        run.close()


def test_a_checkpoint_written_before_value_lr_existed_still_resumes(tmp_path):
    cfg = config(tmp_path, algo="ppo", steps=1, eval_problems=0)
    train(cfg, progress=False)
    ckpt = tmp_path / "ppo" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["value_lr"]
    torch.save(state, ckpt)
    history = train(dataclasses.replace(cfg, steps=2), resume=True, progress=False).history
    assert [h["step"] for h in history] == [0, 1]
    with pytest.raises(ValueError, match="value_lr: saved 0.0 vs now 0.001"):
        train(dataclasses.replace(cfg, steps=3, value_lr=1e-3), resume=True, progress=False)


def test_grpo_espo_uses_each_prompts_posterior_mean_as_its_value_and_no_allocation(tmp_path):
    result = train(config(tmp_path, algo="grpo-espo", steps=3, espo=QUICK_STOPS), progress=False)
    assert all(h["rollouts"] == 4 * 3 for h in result.history)  # group_size per prompt: no CERO allocation
    assert sum(h["stopped"] for h in result.history) > 0
    posterior = result.allocator.state_dict()
    assert float((posterior["alpha"] + posterior["beta"]).sum()) > 2 * 16  # the posteriors saw the outcomes


def test_without_diagnostics_a_run_trains_the_same_and_measures_nothing(tmp_path):
    """The diagnostics hook only measures: without it the training numbers are the same, and nothing beside the
    step is timed or evaluated."""
    with_hook = train(config(tmp_path / "a", espo=QUICK_STOPS), progress=False).history
    without = train(config(tmp_path / "b", espo=QUICK_STOPS), progress=False, diagnostics=False).history
    trained = ("tokens", "stopped", "success_rate", "policy_loss", "value_loss")
    assert [[h[k] for k in trained] for h in without] == [[h[k] for k in trained] for h in with_hook]
    for h in without:
        assert h["eval_accuracy"] is None and h["doomed_tokens"] is None
        assert h["false_stop_checked"] == 0 and h["measure_time_s"] == 0.0 and h["eval_time_s"] == 0.0
    assert without[0]["initial_eval_accuracy"] is None


def test_doomed_tokens_count_what_a_perfect_stopper_would_cut(tmp_path):
    """Recount the oracle from the rollouts themselves, and get None from a task that cannot say."""
    seen = []

    class Recording(ChainArithmetic):
        def first_mistake(self, problem, completion):
            at = super().first_mistake(problem, completion)
            ended = len(completion) < self.max_new_tokens  # EOS came before the limit: one token more
            seen.append(0 if at is None or at >= len(completion) else len(completion) + ended - (at + 1))
            return at

    history = train(config(tmp_path, algo="ppo", steps=1, eval_problems=0), task=Recording(), progress=False).history
    assert seen and history[0]["doomed_tokens"] == sum(seen) > 0

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
    assert a["allocator"] is not None and (json.dumps(a["allocator"], default=str)
                                           == json.dumps(b["allocator"], default=str))
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
    history = train(config(tmp_path, algo="grpo", steps=1, eval_problems=0, model=str(model_dir)),
                    progress=False).history
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

