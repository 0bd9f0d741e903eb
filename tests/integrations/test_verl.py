"""espo's verl adapter against the real verl: run by `bash scripts/host_envs.sh verl`."""
from __future__ import annotations

import asyncio
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from espo_hosts import require

require("verl", "verl", "espo.integrations.verl")

from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from espo.integrations import verl as ev  # noqa: E402
from espo.integrations.vllm import Recorder, StopRecord  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VERL_GAE = core_algos.compute_gae_advantage_return  # verl's own, whatever a test patches


def _batch(lengths, rewards, stopped=None) -> DataProto:
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    scores = torch.zeros(B, T)
    scores[torch.arange(B), torch.tensor(lengths) - 1] = torch.tensor(rewards, dtype=torch.float32)
    non_tensors = {"uid": np.array([f"p{i // 4}" for i in range(B)], dtype=object)}
    if stopped is not None:
        non_tensors["espo_stopped"] = np.array(stopped, dtype=object)
    return DataProto.from_dict(tensors={"response_mask": mask, "token_level_scores": scores}, non_tensors=non_tensors)


def _group_normalised(outcomes: list[float]) -> list[float]:
    out = []
    for g in range(0, len(outcomes), 4):
        x = np.array(outcomes[g : g + 4], dtype=np.float64)
        out += ((x - x.mean()) / (x.std() + 1e-6)).tolist()
    return out


def test_estimator_through_verls_compute_advantage_gives_stopped_rollouts_r_fail():
    lengths = [5, 3, 6, 4, 2, 6, 6, 3]  # rollout 5 reached the length limit (T = 6) without being stopped
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    stopped = [False, True, False, False, False, False, False, True]
    data = ev.mark_stops(_batch(lengths, rewards, stopped), r_fail=-1.0)
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    out = compute_advantage(data, adv_estimator=ev.ESTIMATOR, config=AlgoConfig(adv_estimator=ev.ESTIMATOR))
    expected = _group_normalised([1.0, -1.0, 0.0, 1.0, 0.0, 0.0, 1.0, -1.0])
    adv, mask = out.batch["advantages"], out.batch["response_mask"]
    torch.testing.assert_close(adv[torch.arange(8), 0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))  # nothing on padding
    assert data.batch["token_level_scores"][5, 5].item() == 0.0  # the length-limited one kept its own outcome


def test_estimator_called_directly_with_the_stop_flag():
    data = _batch([4, 4, 4, 4], [1.0, 1.0, 0.0, 1.0])
    adv, _ = ev.espo_grpo_advantage(
        data.batch["token_level_scores"], data.batch["response_mask"], index=data.non_tensor_batch["uid"],
        espo_stopped=[False, True, False, False], r_fail=-1.0,
    )
    torch.testing.assert_close(adv[:, 0].double(),
                               torch.tensor(_group_normalised([1.0, -1.0, 0.0, 1.0]), dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_batch_without_the_stop_flag_is_refused_naming_it():
    with pytest.raises(ValueError,
                       match=r"the batch has no stop flag 'espo_stopped': set data.non_tensor_batch\['espo_stopped'\]"):
        ev.mark_stops(_batch([3, 2, 3, 1], [1.0, 0.0, 0.0, 1.0]))


def test_estimator_without_uid_is_refused():
    data = _batch([3, 2, 3, 1], [1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"verl passes data.non_tensor_batch\['uid'\] as index"):
        ev.espo_grpo_advantage(data.batch["token_level_scores"], data.batch["response_mask"])


def _gae_inputs(B: int, T: int, holes: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    if holes:  # a multi-turn loop's tool output inside the response: masked out, not trained on
        mask[:, T // 3 : T // 3 + 2] = 0
        mask[:, 0] = 1
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)
    return rewards, values, mask


@pytest.mark.parametrize("holes", [False, True])
def test_espo_gae_equals_verls_gae_on_rows_without_stops(holes):
    rewards, values, mask = _gae_inputs(16, 40, holes=holes)
    ref_adv, ref_ret = VERL_GAE(rewards, values, mask, 0.99, 0.95)
    adv, ret = ev.espo_gae(rewards, values, mask, 0.99, 0.95)
    m = mask.bool()
    torch.testing.assert_close(adv[m], ref_adv[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret[m], ref_ret[m], atol=1e-5, rtol=1e-5)


def test_espo_gae_bootstraps_nothing_past_a_stop():
    rewards, values, mask = _gae_inputs(8, 30, seed=1)
    mask[:] = 1  # each response runs on past its stop (a trainer that kept the tokens after it)
    stop = torch.tensor([4, -1, 10, -1, 1, 29, 7, -1])
    adv, ret = ev.espo_gae(rewards, values, mask, 1.0, 0.95, stop_index=stop, r_fail=-1.0, whiten=False)
    for b, s in enumerate(stop.tolist()):
        if s < 0:  # a row without a stop: verl's GAE of the row (returns = advantages + values, before whitening)
            _, ref_ret = VERL_GAE(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1], 1.0, 0.95)
            torch.testing.assert_close(ret[b], ref_ret[0], atol=1e-5, rtol=1e-5)
            continue
        assert adv[b, s].item() == pytest.approx(-1.0 - values[b, s].item(), abs=1e-6)  # r_fail - V(s): nothing after
        assert torch.equal(adv[b, s + 1 :], torch.zeros(29 - s)) and torch.equal(ret[b, s + 1 :], torch.zeros(29 - s))
        cut_r = rewards[b : b + 1, : s + 1].clone()  # verl's GAE of the row cut at its stop: its own per-token
        cut_r[0, s] = -1.0  # rewards before the stop (a KL penalty, say) are kept, r_fail on the stop
        _, ref_ret = VERL_GAE(cut_r, values[b : b + 1, : s + 1], torch.ones(1, s + 1), 1.0, 0.95)
        torch.testing.assert_close(ret[b, : s + 1], ref_ret[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adv[b, : s + 1], ref_ret[0] - values[b, : s + 1], atol=1e-5, rtol=1e-5)


def test_espo_gae_writes_0_at_masked_positions_where_verls_gae_leaves_its_estimate():
    rewards, values, mask = _gae_inputs(16, 40, holes=True, seed=3)
    ref_adv, _ = VERL_GAE(rewards, values, mask, 0.99, 0.95)
    adv, ret = ev.espo_gae(rewards, values, mask, 0.99, 0.95)
    masked = ~mask.bool()
    assert (adv[masked] == 0).all() and (ret[masked] == 0).all()
    assert not torch.equal(ref_adv[masked], torch.zeros_like(ref_adv[masked]))  # the documented difference


def test_use_espo_gae_swaps_verls_gae_in_compute_advantage(monkeypatch):
    monkeypatch.setattr(core_algos, "compute_gae_advantage_return", VERL_GAE)
    ev.use_espo_gae()
    assert core_algos.compute_gae_advantage_return is ev.espo_gae
    rewards, values, mask = _gae_inputs(4, 12, seed=2)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "values": values, "response_mask": mask.long()})
    out = compute_advantage(data, adv_estimator="gae", gamma=1.0, lam=0.95, config=AlgoConfig())
    torch.testing.assert_close(out.batch["advantages"], ev.espo_gae(rewards, values, mask, 1.0, 0.95)[0])


def test_cut_at_stop_keeps_the_triggering_token_and_drops_the_forced_eos():
    out = ev.cut_at_stop(TokenOutput(token_ids=[10, 11, 12, 13, 1], log_probs=[-0.1, -0.2, -0.3, -0.4, -0.5]),
                         StopRecord("a", 7, 3))
    assert out.token_ids == [10, 11, 12, 13] and out.log_probs == [-0.1, -0.2, -0.3, -0.4]
    assert ev.cut_at_stop(TokenOutput(token_ids=[10, 1]), None).token_ids == [10, 1]
    with pytest.raises(ValueError, match="at token 5, but the engine returned 2 tokens"):
        ev.cut_at_stop(TokenOutput(token_ids=[10, 1]), StopRecord("b", 7, 5))


class _Engine:
    """The engine's side as espo's processor plays it: a stop record for the request, then EOS after the stop."""

    def __init__(self, record_dir: str, stop_at: int | None):
        self.recorder, self.stop_at, self.seen = Recorder(record_dir), stop_at, []

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        args = sampling_params["extra_args"]["espo"]
        self.seen.append(args)
        if self.stop_at is not None:
            self.recorder.write({"event": "stop", "id": args["id"], "seed": args["seed"], "index": self.stop_at})
        return TokenOutput(token_ids=[10, 11, 12, 1], log_probs=[-1.0, -2.0, -3.0, -4.0])


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<bos>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 64)}},
                                     unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="t2",
                                pad_token="<bos>")
    t.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return t


@pytest.mark.parametrize("stop_at", [2, None])
def test_agent_loop_seeds_requests_and_applies_their_stops(tmp_path, stop_at):
    from verl_espo import config_demo  # noqa: PLC0415

    config = config_demo()["config"]
    config.actor_rollout_ref.rollout.engine_kwargs.vllm.additional_config.espo.record_dir = str(tmp_path)
    engine = _Engine(str(tmp_path), stop_at)

    async def rollout():
        loop = ev.ESPOAgentLoop(trainer_config=DictConfigWrap(config), server_manager=engine, tokenizer=_tokenizer(),
                                processor=None, dataset_cls=None, data_config=DictConfigWrap(config.data))
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True},
                              raw_prompt=[{"role": "user", "content": "t5 t6"}])

    out = asyncio.run(rollout())
    (args,) = engine.seen
    assert out.prompt_ids == [5, 6] and out.extra_fields["espo_seed"] == args["seed"]
    if stop_at is None:
        assert out.response_ids == [10, 11, 12, 1] and out.reward_score is None  # verl's reward step scores it
        assert out.extra_fields["espo_stopped"] is False and out.extra_fields["espo_stop_index"] == -1
    else:
        assert out.response_ids == [10, 11, 12] and out.response_logprobs == [-1.0, -2.0, -3.0]
        assert (out.reward_score == -1.0 and out.extra_fields["espo_stopped"] is True
                and out.extra_fields["espo_stop_index"] == 2)


def test_registrations_and_config():
    assert core_algos.get_adv_estimator_fn(ev.ESTIMATOR) is ev.espo_grpo_advantage
    assert _agent_loop_registry[ev.AGENT_LOOP] == {"_target_": "espo.integrations.verl.ESPOAgentLoop"}
    from verl_espo import config_demo  # noqa: PLC0415  (examples/ is on sys.path via the example test below)

    demo = config_demo()
    assert demo["config"].algorithm.adv_estimator == ev.ESTIMATOR
    assert demo["engine_kwargs"]["logits_processors"] == ["espo.integrations.vllm:ESPOLogitsProcessor"]
    assert isinstance(demo["engine_kwargs"]["additional_config"], dict)  # verl passes a dict to vLLM as JSON
    assert ev._processor_settings(demo["config"].actor_rollout_ref.rollout)["update_every"] == 256


def test_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "verl_espo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert ("espo_grpo advantages through verl's compute_advantage: "
            "[0.905, -1.508, -0.302, 0.905, -1.0, -1.0, 1.0, 1.0]") in out


@pytest.fixture(autouse=True, scope="module")
def _examples_on_path():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    yield
    sys.path.remove(str(ROOT / "examples"))
