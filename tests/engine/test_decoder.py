"""espo.Decoder against transformers, on tiny random-initialised Llama, Qwen2, Qwen3 and Mistral models.

CPU, float32. The decoder's own forward over its own KV cache must reproduce transformers' greedy
generate token for token and its logits; sampling must not depend on batch composition, so a run with
an ESPO stopper is a prefix of the same run without one.
"""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import transformers as T
from conftest import requires_gpu
from graphs_on_cpu import graphs_on_cpu, spy_admissions

import espo
from espo.engine.decoder import Decoder, Rollouts, rollout_seed
from espo.engine.model_runner import ModelRunner
from espo.engine.scheduler import Scheduler
from espo.engine.slots import Slots
from espo.engine.value_head import Critic, ValueHead
from espo.ops.stopper import EarlyStopper, ESPOConfig

V = 160
SMALL = dict(
    vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
    pad_token_id=0,
)
FAMILIES = {
    "llama": lambda **kw: T.LlamaForCausalLM(T.LlamaConfig(**{**SMALL, "attention_bias": True, **kw})),
    "qwen2": lambda **kw: T.Qwen2ForCausalLM(T.Qwen2Config(**{**SMALL, "tie_word_embeddings": True, **kw})),
    "qwen3": lambda **kw: T.Qwen3ForCausalLM(T.Qwen3Config(**{**SMALL, "head_dim": 24, **kw})),
    "mistral": lambda **kw: T.MistralForCausalLM(T.MistralConfig(**{**SMALL, "num_key_value_heads": 1, **kw})),
}
EOS = [3, 7, 11]  # a few EOS ids, so that some rollouts end early and slots refill


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(family="qwen3", seed=0, **kw):
    torch.manual_seed(seed)
    return FAMILIES[family](**kw).eval()


def prompts_for(count, seed=0, lo=1, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def hf_greedy(model, prompt, max_new_tokens, eos):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def full_forward_stats(model, prompt, tokens, temperature):
    """transformers' logits over prompt + tokens, scored at the generated positions."""
    seq = torch.tensor([prompt + tokens])
    logits = model(seq).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()
    idx = torch.tensor(tokens)[:, None]
    raw = torch.log_softmax(logits, -1).gather(1, idx)[:, 0]
    logp_t = torch.log_softmax(logits / temperature, -1)
    lp = logp_t.gather(1, idx)[:, 0]
    ent = -(logp_t.exp() * logp_t).sum(-1)
    return raw, lp, ent, logits


# ----------------------------------------------------------------------------------- matches transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_generate(family):
    model = tiny(family)
    prompts = prompts_for(5, seed=1)
    dec = Decoder(model, max_batch=3, max_seq_len=48)
    ro = dec.generate(prompts, max_new_tokens=16, temperature=0.0, eos_token_id=EOS)
    for r, p in zip(ro, prompts):
        assert r.tokens.tolist() == hf_greedy(model, p, 16, EOS), f"prompt {r.prompt_index}"
        assert r.finish_reason == ("eos" if r.tokens[-1].item() in EOS else "length")
        assert torch.all(r.regret == 0) and torch.all(r.logprobs == 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sampled_logprobs_match_a_full_forward(family):
    """The decoder's logits at every position (prefill and decode, cache included) equal transformers'."""
    model = tiny(family, seed=1)
    prompts = prompts_for(3, seed=2)
    ro = Decoder(model, max_batch=2, max_seq_len=40).generate(prompts, 2, max_new_tokens=12, temperature=0.8, seed=5,
                                                              eos_token_id=[])
    for r in ro:
        raw, lp, ent, logits = full_forward_stats(model, prompts[r.prompt_index], r.tokens.tolist(), 0.8)
        torch.testing.assert_close(r.raw_logprobs, raw, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.logprobs, lp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.entropy, ent, atol=2e-5, rtol=1e-5)
        # the documented draw: seed = rollout_seed(run seed, rollout id), offset = index of the generated token
        assert r.seed == rollout_seed(5, r.rollout_id)
        redraw = espo.sample(logits, temperature=0.8, seed=r.seed, offset=torch.arange(r.length)).tokens
        assert redraw.tolist() == r.tokens.tolist()


def test_sliding_window_and_scaled_rope_follow_transformers():
    mistral = tiny("mistral", seed=3, sliding_window=6)
    llama = tiny("llama", seed=3, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    prompts = prompts_for(3, seed=3, lo=8, hi=14)  # prompts longer than the window: the prefill masks too
    for model in (mistral, llama):
        ro = Decoder(model, max_batch=2, max_seq_len=40).generate(prompts, max_new_tokens=14, temperature=0.0,
                                                                  eos_token_id=[])
        for r, p in zip(ro, prompts):
            assert r.tokens.tolist() == hf_greedy(model, p, 14, None)
        ro = Decoder(model, max_batch=3, max_seq_len=40).generate(prompts, max_new_tokens=10, seed=1, eos_token_id=[])
        for r in ro:
            raw, _, _, _ = full_forward_stats(model, prompts[r.prompt_index], r.tokens.tolist(), 1.0)
            torch.testing.assert_close(r.raw_logprobs, raw, atol=2e-5, rtol=1e-5)


def test_loads_a_local_checkpoint(tmp_path):
    model = tiny("qwen2", seed=4)
    model.save_pretrained(tmp_path)
    prompts = prompts_for(2, seed=4)
    ro = Decoder(str(tmp_path), max_batch=2, max_seq_len=32).generate(prompts, max_new_tokens=8, temperature=0.0,
                                                                      eos_token_id=[])
    assert [r.tokens.tolist() for r in ro] == [hf_greedy(model, p, 8, None) for p in prompts]


# ----------------------------------------------------------------------------------- sampling and stopping


def test_tokens_do_not_depend_on_batch_composition():
    model = tiny("llama", seed=5)
    prompts = prompts_for(4, seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=11, eos_token_id=EOS)
    a = Decoder(model, max_batch=1, max_seq_len=32).generate(prompts, 2, **kw)
    b = Decoder(model, max_batch=5, max_seq_len=32).generate(prompts, 2, **kw)
    assert [r.tokens.tolist() for r in a] == [r.tokens.tolist() for r in b]
    assert [r.seed for r in a] == [rollout_seed(11, i) for i in range(8)]
    c = Decoder(model, max_batch=5, max_seq_len=32).generate(prompts, 2, **{**kw, "seed": 12})
    assert [r.tokens.tolist() for r in a] != [r.tokens.tolist() for r in c]


def test_a_stopper_that_never_fires_changes_nothing():
    model = tiny("qwen3", seed=6)
    prompts = prompts_for(4, seed=6)
    dec = Decoder(model, max_batch=3, max_seq_len=40)
    kw = dict(max_new_tokens=15, temperature=1.2, seed=3, eos_token_id=EOS)
    base = dec.generate(prompts, 2, **kw)
    stopper = EarlyStopper(ESPOConfig(), 3)  # not armed: it tracks the rows but never stops one
    with_stopper = dec.generate(prompts, 2, stopper=stopper, **kw)
    for a, b in zip(base, with_stopper):
        assert a.tokens.tolist() == b.tokens.tolist() and a.finish_reason == b.finish_reason
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.regret, b.regret)
    report = stopper.end_batch()
    assert report["tokens"] == with_stopper.tokens_generated and report["sequences"] == len(with_stopper)
    assert report["stop_rate"] == 0.0


def stopping_stopper(dec, prompts, kw, max_batch):
    """A stopper whose statistics come from one batch of these prompts, armed with a low threshold."""
    stopper = EarlyStopper(ESPOConfig(beta=2.0, beta_min=0.5, alpha_s=0.7, min_tokens=2), max_batch, dec.device)
    dec.generate(prompts, 3, stopper=stopper, **{**kw, "seed": 99})
    stopper.end_batch()
    stopper.arm()
    return stopper


def test_stopped_rollouts_are_prefixes_of_the_unstopped_run():
    model = tiny("mistral", seed=7)
    prompts = prompts_for(5, seed=7)
    dec = Decoder(model, max_batch=4, max_seq_len=48)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=21, eos_token_id=EOS)
    base = dec.generate(prompts, 3, **kw)
    stopper = stopping_stopper(dec, prompts, kw, 4)
    # prompts 1 and 3 get a value too high to stop: their rollouts run on beside rows that stop and refill
    ro = dec.generate(prompts, 3, stopper=stopper, prompt_values=[0.2, 100.0, 0.2, 100.0, 0.2], **kw)
    stopped = [r for r in ro if r.finish_reason == "stopped"]
    assert 3 <= len(stopped) <= 12, ro.finish_counts
    for r, b in zip(ro, base):
        L = r.length
        assert L == len(r.tokens) and L <= b.length
        assert r.tokens.tolist() == b.tokens[:L].tolist(), f"rollout {r.rollout_id}"
        torch.testing.assert_close(r.logprobs, b.logprobs[:L], atol=1e-5, rtol=1e-5)
        if r.finish_reason != "stopped":
            assert L == b.length and r.finish_reason == b.finish_reason
        else:
            assert L >= 3  # min_tokens=2: the first stop can come at token index 2
    assert ro.tokens_generated < base.tokens_generated
    assert ro.stop_rate == len(stopped) / len(ro)
    # continuing each stopped rollout alone, with its own seed and no stopper, redraws the unstopped rollout
    redo = dec.generate([prompts[r.prompt_index] for r in stopped], 1, rollout_seeds=[r.seed for r in stopped],
                        **{k: v for k, v in kw.items() if k != "seed"})
    for r, again in zip(stopped, redo):
        assert again.tokens.tolist() == base[r.rollout_id].tokens.tolist()
    with pytest.raises(ValueError, match="rollout_seeds"):
        dec.generate(prompts, 2, rollout_seeds=[1, 2, 3], **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refills_prefilled_inside_a_decode_step_match_a_full_forward(family, monkeypatch):
    """An eager decode step takes its refills' prompts into its own forward: logits at every position still
    equal transformers', for decode rows and admitted rows alike (prompts shared by two rollouts included)."""
    model = tiny(family, seed=21, **({"sliding_window": 6} if family == "mistral" else {}))
    prompts = [[5, 9, 2], [4] * 7, [8, 1, 6, 2, 9], [2, 3], [7, 7, 1, 4, 5, 6], [9, 4, 4, 2]]
    kinds = []
    forward = espo.engine.forward.TransformerForward.forward

    def spy(self, ids, positions, *, decode=None, prefill=None, out_idx=None):
        kinds.append((decode is not None, prefill is not None))
        return forward(self, ids, positions, decode=decode, prefill=prefill, out_idx=out_idx)

    monkeypatch.setattr(espo.engine.forward.TransformerForward, "forward", spy)
    # max_seq_len 16 gives each prompt length its own limit, so rollouts end at different steps
    ro = Decoder(model, max_batch=3, max_seq_len=16).generate(
        prompts, [1, 2, 1, 2, 1, 2], max_new_tokens=40, temperature=0.9, seed=4, eos_token_id=[]
    )
    assert kinds.count((True, True)) >= 3, "the test must exercise refills inside decode steps"
    assert kinds.count((False, True)) == 1, "only the first admission (an empty pool) has a forward of its own"
    for r in ro:
        assert r.length == 16 - len(prompts[r.prompt_index]) and r.finish_reason == "length"
        raw, lp, ent, _ = full_forward_stats(model, prompts[r.prompt_index], r.tokens.tolist(), 0.9)
        torch.testing.assert_close(r.raw_logprobs, raw, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.logprobs, lp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.entropy, ent, atol=2e-5, rtol=1e-5)


def test_slots_refill_and_the_pool_drains(monkeypatch):
    model = tiny("qwen2", seed=8)
    prompts = prompts_for(6, seed=8)
    dec = Decoder(model, max_batch=4, max_seq_len=40)
    live_rows = []
    launch = Scheduler._launch

    def spy(self, run, **kw):
        live_rows.append(int(self.slots.live.sum()))
        assert self.slots.live[: live_rows[-1]].all(), "live rollouts occupy the leading slots"
        return launch(self, run, **kw)

    monkeypatch.setattr(Scheduler, "_launch", spy)
    ro = dec.generate(prompts, 2, max_new_tokens=20, seed=2, eos_token_id=EOS)
    assert isinstance(ro, Rollouts) and len(ro) == 12
    assert all(r.finish_reason in ("eos", "length") for r in ro)
    assert any(r.finish_reason == "eos" for r in ro) and any(r.finish_reason == "length" for r in ro)
    for r in ro:
        if r.finish_reason == "eos":
            assert r.tokens[-1].item() in EOS and not set(r.tokens[:-1].tolist()) & set(EOS)
        else:
            assert r.length == 20
    # every decode step computes only live rows: one row per token beyond each rollout's first (prefill) token
    assert sum(live_rows) == ro.tokens_generated - len(ro)
    assert max(live_rows) == 4 and live_rows[-1] >= 1
    assert ro.decode_steps == len(live_rows) < ro.tokens_generated
    assert ro.prefill_tokens <= sum(len(p) for p in prompts) * 2
    assert ro.slot_moves > 0, "the test must exercise moving live rollouts down as the pool drains"
    # the pool drained: a second call starts from an empty pool and gives the same rollouts,
    # as does decoding one rollout at a time (no refills, no moves)
    again = dec.generate(prompts, 2, max_new_tokens=20, seed=2, eos_token_id=EOS)
    alone = Decoder(model, max_batch=1, max_seq_len=40).generate(prompts, 2, max_new_tokens=20, seed=2,
                                                                 eos_token_id=EOS)
    assert alone.slot_moves == 0
    for a, b, c in zip(ro, again, alone):
        assert a.tokens.tolist() == b.tokens.tolist() == c.tokens.tolist()
        torch.testing.assert_close(a.logprobs, c.logprobs, atol=1e-5, rtol=1e-5)


def test_refill_batch_waits_for_free_slots_and_changes_no_token(monkeypatch):
    """refill_batch=k admits only once k slots are free (or fewer rollouts are pending, or none is live): the
    same rollouts, with fewer admissions (with CUDA graphs each admission is a forward of its own)."""
    model = tiny("qwen2", seed=8)
    prompts = prompts_for(6, seed=8)
    kw = dict(max_new_tokens=20, seed=2, eos_token_id=EOS)
    admissions = []
    take = Scheduler._take_pending

    def spy(self, run, holes):
        free, pending = len(holes), len(run.pending)
        adm = take(self, run, holes)
        if adm is not None:
            admissions.append((free, pending, int(self.slots.live.sum())))
        return adm

    monkeypatch.setattr(Scheduler, "_take_pending", spy)
    one = Decoder(model, max_batch=4, max_seq_len=40).generate(prompts, 3, **kw)
    every_free_slot = len(admissions)
    admissions.clear()
    dec = Decoder(model, max_batch=4, max_seq_len=40, refill_batch=3)
    assert dec.refill_batch == 3
    three = dec.generate(prompts, 3, **kw)
    assert [r.tokens.tolist() for r in one] == [r.tokens.tolist() for r in three]
    assert len(admissions) < every_free_slot
    for free, pending, live in admissions:
        assert free >= min(3, pending) or live == 0, (free, pending, live)
    assert Decoder(model, max_batch=4, max_seq_len=40).refill_batch == 1  # no CUDA graphs: refills ride along
    assert Decoder(model, max_batch=4, max_seq_len=40, refill_batch=99).refill_batch == 4
    with pytest.raises(ValueError, match="refill_batch"):
        Decoder(model, max_batch=4, max_seq_len=40, refill_batch=0)
    with pytest.raises(ValueError, match="refill_tokens must be an int >= 0"):
        Decoder(model, max_batch=4, max_seq_len=40, refill_tokens=-1)


def test_padded_graph_buckets_change_nothing(monkeypatch):
    """The GPU path pads live slots to a bucket and the cache length to a power of two: check that on the CPU."""
    model = tiny("mistral", seed=18, sliding_window=5)
    prompts = prompts_for(5, seed=18)
    kw = dict(max_new_tokens=20, temperature=1.0, seed=8, eos_token_id=EOS)
    eager = Decoder(model, max_batch=6, max_seq_len=140).generate(prompts, 2, **kw)
    dec = Decoder(model, max_batch=6, max_seq_len=140)
    shapes = []

    def padded(self, b, length, chunk=None):
        assert chunk is None  # the scheduler was made without graphs: no refill chunk
        shapes.append((b, length))
        return self._decode_forward(b, length)

    monkeypatch.setattr(ModelRunner, "_decode_graphed", padded)
    dec.cuda_graphs = True
    bucketed = dec.generate(prompts, 2, **kw)
    assert {b for b, _ in shapes} <= {1, 2, 3, 4, 6} and {L for _, L in shapes} == {128}
    for a, b in zip(eager, bucketed):
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_refills_in_the_graphed_step_change_no_token(family, monkeypatch):
    """With CUDA graphs, fewer than refill_batch refills ride in the decode step's graph, prefilled from a padded
    chunk (one masked attention over it, prompts shared by two rollouts written into both slots): the same
    rollouts as eager decoding, and an admission of its own only for an empty pool or refill_batch free slots."""
    model = tiny(family, seed=23, **({"sliding_window": 5} if family == "mistral" else {}))
    prompts = prompts_for(7, seed=23, lo=3, hi=12)
    kw = dict(max_new_tokens=18, temperature=1.0, seed=6, eos_token_id=EOS)
    eager = Decoder(model, max_batch=6, max_seq_len=48).generate(prompts, 2, **kw)
    admissions = spy_admissions(monkeypatch)
    dec = graphs_on_cpu(monkeypatch, Decoder(model, max_batch=6, max_seq_len=48), refill_batch=4, refill_tokens=20)
    assert dec.runner.refill_chunk.tokens == 20 and dec.runner.refill_chunk.rows == 3
    chunked = dec.generate(prompts, 2, **kw)
    for a, b in zip(eager, chunked):
        assert a.tokens.tolist() == b.tokens.tolist() and a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    in_graph = [a for a in admissions if a[3]]
    assert len(in_graph) >= 3, "the test must exercise refills inside graphed steps"
    assert any(k > 1 for _, k, _, _ in in_graph), "and a chunk holding more than one rollout"
    for live, k, tokens, graphed in admissions:
        if graphed:
            assert 1 <= k <= 3 and tokens <= 20 and live >= 1
        else:
            assert live == 0 or 6 - live >= 4, (live, k)


def test_refills_in_the_graphed_step_carry_critic_values_and_stops(monkeypatch):
    """A critic stepped in lockstep prefills the chunk too (its own cache), and an ESPO stopper's rows are reset
    for rollouts admitted in a graphed step: the values, stops and tokens of eager decoding."""
    model = tiny("qwen3", seed=26)
    critic_model = tiny("llama", seed=27, hidden_size=32, intermediate_size=64).model
    torch.manual_seed(2)
    critic = Critic(critic_model, ValueHead(32))
    prompts = prompts_for(8, seed=26, lo=2, hi=7)
    kw = dict(max_new_tokens=20, temperature=1.0, seed=5, eos_token_id=EOS)
    eager_dec = Decoder(model, max_batch=6, max_seq_len=40, value_source=critic)
    stoppers = [stopping_stopper(eager_dec, prompts, kw, 6) for _ in range(2)]
    eager = eager_dec.generate(prompts, 3, stopper=stoppers[0], **kw)
    admissions = spy_admissions(monkeypatch)
    dec = graphs_on_cpu(monkeypatch, Decoder(model, max_batch=6, max_seq_len=40, value_source=critic),
                        refill_batch=4, refill_tokens=24)
    chunked = dec.generate(prompts, 3, stopper=stoppers[1], **kw)
    assert sum(graphed for *_, graphed in admissions) >= 2
    assert 2 <= eager.finish_counts["stopped"] == chunked.finish_counts["stopped"]
    for a, b in zip(eager, chunked):
        assert a.tokens.tolist() == b.tokens.tolist() and a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def copy_stopper(stopper):
    twin = EarlyStopper(stopper.config, stopper.batch_size, stopper.device)
    twin.load_state_dict(stopper.state_dict())
    return twin


def assert_same_run(a, b, stoppers=None, atol=1e-5):
    """Two runs of the same request: the same rollouts (tokens and endings exact, statistics within float32 rounding
    of a batch of another composition), and with ``stoppers``, the same stopper state and batch report."""
    assert a.finish_counts == b.finish_counts and a.tokens_generated == b.tokens_generated
    for x, y in zip(a, b):
        assert x.tokens.tolist() == y.tokens.tolist(), f"rollout {x.rollout_id}"
        assert (x.finish_reason, x.length) == (y.finish_reason, y.length), f"rollout {x.rollout_id}"
        for field in ("logprobs", "raw_logprobs", "entropy", "regret", "values"):
            if getattr(x, field) is not None or getattr(y, field) is not None:
                torch.testing.assert_close(getattr(x, field), getattr(y, field), atol=atol, rtol=atol)
    if stoppers is not None:
        s, t = stoppers
        rows = [torch.stack([v.double() for v in st.rows.values()], dim=1) for st in (s, t)]  # [B, fields]
        rows = [r[torch.from_numpy(np.lexsort(r.T.numpy()[::-1]))] for r in rows]  # which row a rollout gets may differ
        torch.testing.assert_close(rows[0], rows[1], atol=atol, rtol=atol, msg="the stopper rows' states")
        torch.testing.assert_close(s._batch, t._batch, atol=10 * atol, rtol=atol)
        ra, rb = s.end_batch(), t.end_batch()
        assert ra.keys() == rb.keys() and all(ra[k] == pytest.approx(rb[k], rel=atol, abs=atol) for k in ra)


def spy_stepped_on(monkeypatch):
    """The rollouts that ended at a step which a later step had already drawn for (overlap_steps), per read."""
    seen = []
    read = Scheduler._read

    def spy(self, run, drawn, stepped_on=False):
        slots = read(self, run, drawn, stepped_on)
        if stepped_on:
            seen.append(len(slots))
        return slots

    monkeypatch.setattr(Scheduler, "_read", spy)
    return seen


OVERLAP_CASES = {
    # eager: refills ride in the decode step's forward; max_seq_len 30 ends the longer prompts' rollouts early
    "eager": dict(graphs=None, decoder={}),
    # emulated CUDA graphs with the refill chunk, and a critic stepped in lockstep
    "graphs, refill chunk, critic": dict(graphs=dict(refill_batch=3, refill_tokens=24), decoder={"critic": True}),
    # emulated CUDA graphs without a chunk: every refill a forward of its own, read after the step ahead
    "graphs, admissions of their own": dict(graphs=dict(refill_batch=2, refill_tokens=0), decoder={}),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_overlapped_steps_change_no_rollout_and_no_stopper_state(case, monkeypatch):
    """overlap_steps=True launches each decode step before reading the last one's finish codes: rollouts that ended
    there are drawn once more, and that draw is undone (records past their length, stopper rows restored). The
    rollouts, EOS, length limits, ESPO stops, values and the stopper's state and batch report are those of steps
    in turn."""
    spec = OVERLAP_CASES[case]
    model = tiny("qwen3", seed=31)
    value_source = None
    if spec["decoder"].get("critic"):
        torch.manual_seed(3)
        value_source = Critic(tiny("llama", seed=32, hidden_size=32, intermediate_size=64).model, ValueHead(32))
    prompts = prompts_for(7, seed=31, lo=2, hi=9)
    kw = dict(max_new_tokens=22, temperature=1.0, seed=8, eos_token_id=EOS)
    if value_source is None:  # half the prompts get a value too high to stop: their rollouts run on beside stops
        kw["prompt_values"] = [0.2, 100.0] * 3 + [0.2]

    def decoder(overlap):
        dec = Decoder(model, max_batch=5, max_seq_len=30, value_source=value_source, overlap_steps=overlap)
        if spec["graphs"] is not None:
            dec = graphs_on_cpu(monkeypatch, dec, overlap_steps=overlap, **spec["graphs"])
        return dec

    stopper = stopping_stopper(decoder(False), prompts, kw, 5)
    stoppers = stopper, copy_stopper(stopper)
    in_turn = decoder(False).generate(prompts, 3, stopper=stoppers[0], **kw)
    stepped_on = spy_stepped_on(monkeypatch)
    overlapped = decoder(True).generate(prompts, 3, stopper=stoppers[1], **kw)
    assert_same_run(in_turn, overlapped, stoppers)
    assert sum(stepped_on) >= 4, "the test must exercise rollouts drawn once more after they ended"
    reasons = in_turn.finish_counts
    assert reasons["stopped"] >= 2 and reasons["eos"] >= 2 and reasons["length"] >= 2, reasons
    assert overlapped.decode_steps >= in_turn.decode_steps


def test_overlapped_steps_need_the_stopper_rows_restored(monkeypatch):
    """The planted break behind the test above: without restoring the stopper rows of rollouts drawn once more
    after they ended, the stopper counts tokens that no rollout holds."""
    model = tiny("qwen3", seed=31)
    prompts = prompts_for(7, seed=31, lo=2, hi=9)
    kw = dict(max_new_tokens=22, temperature=1.0, seed=8, eos_token_id=EOS, prompt_values=[0.2] * 7)
    stopper = stopping_stopper(Decoder(model, max_batch=5, max_seq_len=30), prompts, kw, 5)
    twin = copy_stopper(stopper)
    Decoder(model, max_batch=5, max_seq_len=30).generate(prompts, 3, stopper=stopper, **kw)
    monkeypatch.setattr(EarlyStopper, "restore_rows", lambda self, rows: None)
    Decoder(model, max_batch=5, max_seq_len=30, overlap_steps=True).generate(prompts, 3, stopper=twin, **kw)
    assert twin.end_batch()["tokens"] > stopper.end_batch()["tokens"]


def test_overlap_steps_resolves_and_refuses_bad_values():
    model = tiny("qwen3", seed=31)
    assert Decoder(model, max_batch=2, max_seq_len=16).overlap_steps is False
    assert Decoder(model, max_batch=2, max_seq_len=16, overlap_steps=None).overlap_steps is False  # a CPU
    assert Decoder(model, max_batch=2, max_seq_len=16, overlap_steps=True).overlap_steps is True
    with pytest.raises(TypeError, match="overlap_steps must be True, False or None"):
        Decoder(model, max_batch=2, max_seq_len=16, overlap_steps="yes")


def test_refill_chunk_too_small_for_a_prompt_leaves_it_to_an_admission_of_its_own(monkeypatch):
    model = tiny("qwen2", seed=24)
    prompts = prompts_for(5, seed=24, lo=6, hi=10)
    kw = dict(max_new_tokens=14, temperature=1.0, seed=2, eos_token_id=EOS)
    eager = Decoder(model, max_batch=4, max_seq_len=40).generate(prompts, 2, **kw)
    admissions = spy_admissions(monkeypatch)
    dec = graphs_on_cpu(monkeypatch, Decoder(model, max_batch=4, max_seq_len=40), refill_batch=2, refill_tokens=5)
    with pytest.warns(RuntimeWarning, match=r"prompts of up to \d+ tokens are longer than refill_tokens \(5\)"):
        small = dec.generate(prompts, 2, **kw)
    assert [a.tokens.tolist() for a in eager] == [b.tokens.tolist() for b in small]
    assert admissions and not any(graphed for *_, graphed in admissions)


def test_a_failed_refill_graph_capture_falls_back_to_admissions_of_their_own(monkeypatch):
    model = tiny("qwen2", seed=25)
    prompts = prompts_for(6, seed=25, lo=2, hi=6)
    kw = dict(max_new_tokens=16, temperature=1.0, seed=3, eos_token_id=EOS)
    eager = Decoder(model, max_batch=4, max_seq_len=40).generate(prompts, 2, **kw)
    dec = graphs_on_cpu(monkeypatch, Decoder(model, max_batch=4, max_seq_len=40), refill_batch=3, refill_tokens=16)
    replayed = ModelRunner._capture

    def capture(self, forward):
        graph, outputs = replayed(self, forward)
        if outputs[0].shape[0] > 4:  # more rows than the largest bucket: the refill chunk's graph
            raise RuntimeError("capture refused")
        return graph, outputs

    monkeypatch.setattr(ModelRunner, "_capture", capture)
    with pytest.warns(RuntimeWarning, match="refill step failed"):
        got = dec.generate(prompts, 2, **kw)
    assert dec.cuda_graphs and dec.runner.refill_chunk is None
    assert [a.tokens.tolist() for a in eager] == [b.tokens.tolist() for b in got]


def test_refills_ride_in_the_smallest_chunk_size_that_fits(monkeypatch):
    """A refill chunk comes in sizes (its tokens halved down to 32, a graph each): each refill rides in the smallest
    that holds it, so that a short prompt does not pay for the whole chunk; the rollouts are eager decoding's."""
    model = tiny("qwen2", seed=25)
    prompts = prompts_for(9, seed=25, lo=12, hi=40)
    kw = dict(max_new_tokens=16, temperature=1.0, seed=4, eos_token_id=EOS)
    eager = Decoder(model, max_batch=6, max_seq_len=64).generate(prompts, 3, **kw)
    dec = graphs_on_cpu(monkeypatch, Decoder(model, max_batch=6, max_seq_len=64), refill_batch=4, refill_tokens=64)
    assert [(c.tokens, c.rows) for c in dec.runner.refill_chunks] == [(32, 3), (64, 3)]
    used, chunk_for = [], dec.runner.chunk_for

    def spy(tokens, rows):
        used.append((tokens, rows, chunk_for(tokens, rows).tokens))
        return chunk_for(tokens, rows)

    dec.runner.chunk_for = spy
    got = dec.generate(prompts, 3, **kw)
    assert {size for *_, size in used} == {32, 64}, used
    assert all(tokens <= size and (size == 32 or tokens > 32) and rows <= 3 for tokens, rows, size in used)
    assert {key[2] for key in dec.runner._graphs} == {0, 32, 64}  # a graph per chunk size, and plain steps
    for a, b in zip(eager, got):
        assert a.tokens.tolist() == b.tokens.tolist() and a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


def test_refill_chunk_sizes_halve_down_to_32_tokens():
    from espo.engine.sequence import RefillChunk

    assert [(c.tokens, c.rows) for c in RefillChunk(256, rows=7).sizes()] == [(32, 7), (64, 7), (128, 7), (256, 7)]
    assert [c.tokens for c in RefillChunk(300, rows=7).sizes()] == [37, 75, 150, 300]
    assert [(c.tokens, c.rows) for c in RefillChunk(20, rows=7).sizes()] == [(20, 7)]
    assert RefillChunk(64, rows=3).fits(64, 3) and not RefillChunk(64, rows=3).fits(65, 1)


def test_refill_chunk_pads_to_its_size():
    from espo.engine.sequence import RefillChunk

    chunk = RefillChunk(6, rows=3)
    flat = chunk.pack(np.array([5, 6, 7]), np.array([0, 1, 0]), np.array([0, 0, 1]), np.array([2, 2, 3]),
                      np.array([0, 1, 0]), np.array([0, 1, 2]), np.array([1, 2]))
    c = {k: v.tolist() for k, v in chunk.views(torch.from_numpy(flat)).items()}
    assert c["ids"] == [5, 6, 7, 0, 0, 0] and c["positions"] == [0, 1, 0, 0, 0, 0]
    assert c["seg"] == [0, 0, 1, 2, 2, 2]  # padding: a prompt of its own
    assert c["dst_slots"] == [2, 2, 3, 2, 2, 2] and c["dst_pos"] == [0, 1, 0, 0, 0, 0]
    assert c["src_idx"] == [0, 1, 2, 0, 0, 0] and c["out"] == [1, 2, 1]
    with pytest.raises(ValueError, match="1..6 tokens and 1..3 rollouts"):
        chunk.pack(*(np.arange(7),) * 6, np.array([0]))
    with pytest.raises(ValueError, match="1..3 rollouts"):
        chunk.pack(*(np.arange(2),) * 6, np.arange(4))


def _fake_flash_attn():
    """flash-attn's two entry points, written in torch from their documented semantics (for the CPU)."""
    import types

    def attend(q, k, v, scale, q_pos, window):  # q [Lq, H, D], k/v [Lk, Hk, D]; q_pos: each query's position
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        diff = q_pos[:, None] - torch.arange(k.shape[0])[None, :]
        ok = (diff >= 0) & ((diff <= window[0]) if window[0] >= 0 else True)
        return torch.einsum("hqk,khd->qhd", torch.softmax(s.masked_fill(~ok, float("-inf")), -1), v)

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                                causal=False, window_size=(-1, -1)):
        assert causal and q.shape[1] == k.shape[1] == 1 and cache_seqlens.dtype == torch.int32
        out = []
        for b, n in enumerate(cache_seqlens.tolist()):
            k_cache[b, n], v_cache[b, n] = k[b, 0], v[b, 0]
            out.append(attend(q[b], k_cache[b, : n + 1], v_cache[b, : n + 1], softmax_scale, torch.tensor([n]),
                              window_size))
        return torch.stack(out)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                               window_size=(-1, -1)):
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        out = torch.empty_like(q)
        cu = cu_q.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            out[a:b] = attend(q[a:b], k[a:b], v[a:b], softmax_scale, torch.arange(b - a), window_size)
        return out

    return types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache,
                                 flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_attn_path_against_transformers(monkeypatch):
    """The flash-attn layout and calls, with flash-attn's functions written in torch, still match transformers."""
    import sys

    import espo.engine.model_runner

    model = tiny("mistral", seed=19, sliding_window=5)
    prompts = prompts_for(4, seed=19, lo=3, hi=9)
    expected = [hf_greedy(model, p, 12, EOS) for p in prompts]
    with monkeypatch.context() as m:  # transformers itself probes for flash_attn: patch around the decoder only
        m.setitem(sys.modules, "flash_attn", _fake_flash_attn())
        m.setattr(espo.engine.model_runner, "resolve_attention", lambda *args: "flash")
        dec = Decoder(model, max_batch=3, max_seq_len=32)
        assert dec.policy.cache.layout == "flash"
        greedy = dec.generate(prompts, max_new_tokens=12, temperature=0.0, eos_token_id=EOS)
        sampled = dec.generate(prompts, 2, max_new_tokens=12, seed=3, eos_token_id=EOS)
    assert [r.tokens.tolist() for r in greedy] == expected
    for r in sampled:
        raw, _, _, _ = full_forward_stats(model, prompts[r.prompt_index], r.tokens.tolist(), 1.0)
        torch.testing.assert_close(r.raw_logprobs, raw, atol=2e-5, rtol=1e-5)


def test_max_seq_len_bounds_each_rollout():
    model = tiny("llama", seed=9)
    prompts = [[5] * 10, [6] * 3]
    ro = Decoder(model, max_batch=2, max_seq_len=16).generate(prompts, max_new_tokens=50, eos_token_id=[])
    assert [r.length for r in ro] == [6, 13] and all(r.finish_reason == "length" for r in ro)


def test_per_prompt_n_is_honoured():
    model = tiny("qwen3", seed=10)
    prompts = prompts_for(3, seed=10)
    ro = Decoder(model, max_batch=4, max_seq_len=32).generate(prompts, [1, 3, 2], max_new_tokens=5, eos_token_id=[])
    assert [(r.prompt_index, r.sample_index) for r in ro] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert [r.rollout_id for r in ro] == list(range(6))
    assert [len(ro.for_prompt(i)) for i in range(3)] == [1, 3, 2]
    assert len({tuple(r.tokens.tolist()) for r in ro.for_prompt(1)}) > 1, "samples of one prompt differ"
    assert ro.tokens_generated == 30 and ro.time_s > 0 and ro.finish_counts["length"] == 6


def test_progress_bar_runs(capsys):
    model = tiny("qwen3", seed=10)
    Decoder(model, max_batch=2, max_seq_len=16).generate([[1, 2]], 3, max_new_tokens=3, progress=True)
    assert "rollouts" in capsys.readouterr().err


def test_invalid_logits_end_a_rollout_without_a_token():
    model = tiny("llama", seed=11)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    ro = Decoder(model, max_batch=2, max_seq_len=16).generate([[1, 2]], 2, max_new_tokens=3)
    assert [(r.finish_reason, r.length) for r in ro] == [("invalid", 0), ("invalid", 0)]


# ----------------------------------------------------------------------------------------------- values


def test_values_from_the_value_head_equal_a_full_forward():
    model = tiny("qwen2", seed=12)
    torch.manual_seed(0)
    head = ValueHead(64)
    prompts = prompts_for(3, seed=12)
    dec = Decoder(model, max_batch=2, max_seq_len=32, value_source=head)
    ro = dec.generate(prompts, 2, max_new_tokens=10, seed=1, eos_token_id=EOS)
    for r in ro:
        p = prompts[r.prompt_index]
        hidden = model.model(torch.tensor([p + r.tokens.tolist()])).last_hidden_state[0]
        expected = head(hidden)[len(p) - 1 : len(p) - 1 + r.length]
        torch.testing.assert_close(r.values, expected, atol=2e-5, rtol=1e-5)


def test_values_from_a_separate_critic_equal_its_full_forward():
    model = tiny("qwen3", seed=13)
    critic_model = tiny("llama", seed=14, hidden_size=32, intermediate_size=64).model  # a base model is enough
    torch.manual_seed(1)
    head = ValueHead(32)
    prompts = prompts_for(3, seed=13)
    dec = Decoder(model, max_batch=2, max_seq_len=32, value_source=Critic(critic_model, head))
    ro = dec.generate(prompts, 2, max_new_tokens=10, seed=2, eos_token_id=EOS)
    for r in ro:
        p = prompts[r.prompt_index]
        hidden = critic_model(torch.tensor([p + r.tokens.tolist()])).last_hidden_state[0]
        torch.testing.assert_close(r.values, head(hidden)[len(p) - 1 : len(p) - 1 + r.length], atol=2e-5, rtol=1e-5)


def test_constant_values_per_prompt_reach_the_stop_rule():
    model = tiny("qwen3", seed=15)
    prompts = prompts_for(2, seed=15)
    dec = Decoder(model, max_batch=3, max_seq_len=40)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, eos_token_id=[])
    stopper = stopping_stopper(dec, prompts, kw, 3)
    # a value far above the regret signal's reach (z <= clip = 3 < beta * 100) never stops
    ro = dec.generate(prompts, 4, stopper=stopper, prompt_values=[0.2, 100.0], **kw)
    assert all(torch.equal(r.values, torch.full((r.length,), [0.2, 100.0][r.prompt_index])) for r in ro)
    assert all(r.finish_reason == "length" for r in ro.for_prompt(1))
    assert Decoder(model, max_batch=3, max_seq_len=40).generate(prompts, max_new_tokens=2)[0].values is None


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def decoder():
    return Decoder(tiny("llama", seed=16), max_batch=2, max_seq_len=12)


@pytest.mark.parametrize(
    "prompts, n, match",
    [
        ([[1] * 12], 1, "longer than max_seq_len"),
        ([[1, 2], []], 1, "prompt 1 is empty"),
        ([[1, V]], 1, r"outside the vocabulary \[0, 160\)"),
        ([[1, -1]], 1, "outside the vocabulary"),
        ([[1, 2]], 0, "n must be >= 1"),
        ([[1, 2], [3]], [2, 0], "n must be >= 1 .* prompt 1"),
        ([[1, 2], [3]], [2], "one int per prompt"),
    ],
)
def test_bad_input_gets_a_clear_error(decoder, prompts, n, match):
    with pytest.raises(ValueError, match=match):
        decoder.generate(prompts, n, max_new_tokens=4)


def test_bad_arguments_get_clear_errors(decoder):
    with pytest.raises(TypeError, match="list of ints"):
        decoder.generate([1, 2, 3], max_new_tokens=4)
    with pytest.raises(TypeError, match="float"):
        decoder.generate([[1.5, 2.0]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"stopper.batch_size \(3\) must equal the decoder's max_batch \(2\)"):
        decoder.generate([[1]], max_new_tokens=2, stopper=EarlyStopper(ESPOConfig(), 3))
    with pytest.raises(ValueError, match="prompt_values must hold one value per prompt"):
        decoder.generate([[1], [2]], max_new_tokens=2, prompt_values=[0.5])
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate([[1]], max_new_tokens=2, temperature=-1.0)
    for tiny_temperature in (1e-50, 1e-39):  # 0 < T < 2**-126: 1 / T is no finite float32
        with pytest.raises(ValueError, match="temperature must be finite and 0"):
            decoder.generate([[1]], max_new_tokens=2, temperature=tiny_temperature)


def test_bad_settings_name_the_argument(decoder):
    model = decoder.model
    with pytest.raises(ValueError, match="device must be a device such as 'cpu' or 'cuda:0', got 'tpu'"):
        Decoder(model, max_batch=2, max_seq_len=12, device="tpu")
    with pytest.raises(ValueError, match="device is 'cuda:99'"):
        Decoder(model, max_batch=2, max_seq_len=12, device="cuda:99")
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        Decoder(model, max_batch=2, max_seq_len=12, dtype=torch.float64)  # espo.sample reads no float64 logits
    with pytest.raises(ValueError, match="eos_token_id must be token ids >= 0"):
        decoder.generate([[1]], max_new_tokens=2, eos_token_id=2**70)
    with pytest.raises(ValueError, match="eos_token_id must be token ids >= 0"):
        decoder.generate([[1]], max_new_tokens=2, eos_token_id=[3, 2**63])
    with pytest.raises(TypeError, match=r"rollout_seeds must hold ints .*\[1.7\]"):
        decoder.generate([[1]], max_new_tokens=2, rollout_seeds=[1.7])
    with pytest.raises(TypeError, match="rollout_seeds must be a list of ints"):
        decoder.generate([[1]], max_new_tokens=2, rollout_seeds=7)


def test_unsupported_architecture_is_named():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="supports the llama, mistral, qwen2, qwen3 model families.*gpt2"):
        Decoder(gpt2, max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        Decoder(tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), max_batch=1,
                max_seq_len=8)


def test_out_of_memory_names_the_settings_to_lower(monkeypatch):
    import espo.engine.kv_cache

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(espo.engine.kv_cache, "_alloc", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"lower max_batch \(now 512\) or max_seq_len \(now 4096\)"):
        Decoder(tiny("qwen3"), max_batch=512, max_seq_len=4096)


def test_out_of_memory_during_prefill_names_the_settings_to_lower(decoder, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decoder.policy, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError,
                       match=r"prefill.*lower prefill_tokens \(now 8192\) or max_batch \(now 2\)"):
        decoder.generate([[1, 2]], max_new_tokens=2)


def test_public_names():
    assert Decoder.__module__ == "espo.engine.decoder"
    fields = {f.name for f in dataclasses.fields(espo.engine.decoder.Rollout)}
    assert {"prompt_index", "tokens", "logprobs", "raw_logprobs", "entropy", "regret", "values", "finish_reason",
            "length"} <= fields
    assert rollout_seed(0, 1) != rollout_seed(0, 2) != rollout_seed(1, 1)
    assert -(2**63) <= rollout_seed(2**64 - 1, 10**12) < 2**63


# -------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gpu_graphs_match_eager_and_report_prefix_rate(family):
    model = tiny(family, seed=17).cuda()
    prompts = prompts_for(12, seed=17)
    kw = dict(max_new_tokens=32, temperature=1.0, seed=5, eos_token_id=EOS)
    eager = Decoder(model, max_batch=8, max_seq_len=64, cuda_graphs=False).generate(prompts, 2, **kw)
    graphed_dec = Decoder(model, max_batch=8, max_seq_len=64, cuda_graphs=True)
    graphed = graphed_dec.generate(prompts, 2, **kw)
    assert graphed_dec.cuda_graphs, "graph capture failed"
    same = np.mean([a.tokens.tolist() == b.tokens.tolist() for a, b in zip(eager, graphed)])
    assert same >= 0.9, same  # float32 on the GPU: batch composition may move a logit by rounding
    greedy = graphed_dec.generate(prompts[:4], max_new_tokens=16, temperature=0.0, eos_token_id=EOS)
    model_cpu = tiny(family, seed=17)
    agree = np.mean([r.tokens.tolist() == hf_greedy(model_cpu, p, 16, EOS) for r, p in zip(greedy, prompts[:4])])
    assert agree >= 0.75, agree
    stopper = stopping_stopper(graphed_dec, prompts, kw, 8)
    ro = graphed_dec.generate(prompts, 2, stopper=stopper, **kw)
    prefix = [r.tokens.tolist() == b.tokens[: r.length].tolist() for r, b in zip(ro, graphed)
              if r.finish_reason == "stopped"]
    print(f"{family}: stopped {len(prefix)}/{len(ro)}, exact prefixes {np.mean(prefix) if prefix else 1.0:.3f}")
    assert not prefix or np.mean(prefix) >= 0.9


@pytest.mark.parametrize("layout", ["sdpa", "flash"])
def test_kv_cache_write_stores_each_row_at_its_slot_and_position(layout):
    from espo.engine.kv_cache import KVCache

    cache = KVCache(3, 5, 11, 2, 4, dtype=torch.float32, device=torch.device("cpu"), layout=layout)
    g = torch.Generator().manual_seed(0)
    pairs = torch.randperm(5 * 11, generator=g)[:9]
    slots, positions = pairs // 11, pairs % 11
    k, v = torch.randn(9, 2, 4, generator=g), torch.randn(9, 2, 4, generator=g)
    cache.write(1, cache.rows(slots, positions), k, v)
    for i in range(9):
        s, p = int(slots[i]), int(positions[i])
        got_k = cache.k[1, s, p] if layout == "flash" else cache.k[1, s, :, p]
        got_v = cache.v[1, s, p] if layout == "flash" else cache.v[1, s, :, p]
        assert torch.equal(got_k, k[i]) and torch.equal(got_v, v[i])
    assert int((cache.k != 0).sum()) == 9 * 2 * 4 and cache.k[0].eq(0).all() and cache.k[2].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 3])
def test_decode_mask_attends_exactly_as_sdpas_bool_mask(dtype, window):
    from espo.engine.kv_cache import decode_mask

    g = torch.Generator().manual_seed(1)
    seqlens, length, arange = torch.tensor([0, 4, 12, 7, 2]), 13, torch.arange(32)
    pos = arange[:length][None, :]
    sees = (pos <= seqlens[:, None]) & (True if window is None else pos > seqlens[:, None] - window)
    mask = decode_mask(seqlens, length, window, arange, dtype)
    assert mask.dtype == dtype and mask.shape == (5, 1, 1, length)
    assert torch.equal(mask[:, 0, 0] == 0, sees) and mask[:, 0, 0][~sees].eq(float("-inf")).all()
    q, k, v = (torch.randn(5, 2, n, 16, generator=g).to(dtype) for n in (3, length, length))
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None, None, :], scale=0.3)
    assert torch.equal(got, want)


@pytest.mark.gpu
@requires_gpu
def test_gpu_graph_refill_chunks_match_eager(monkeypatch):
    """Refills inside real CUDA graphs (the refill chunk read from the graph's static buffer) draw the rollouts
    that eager decoding draws, and the graphed run does refill inside its steps."""
    model = tiny("qwen2", seed=19).cuda()
    prompts = prompts_for(16, seed=19, lo=3, hi=12)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, eos_token_id=EOS)
    eager = Decoder(model, max_batch=8, max_seq_len=64, cuda_graphs=False).generate(prompts, 2, **kw)
    admissions = spy_admissions(monkeypatch)
    dec = Decoder(model, max_batch=8, max_seq_len=64, refill_batch=4, refill_tokens=32)
    graphed = dec.generate(prompts, 2, **kw)
    assert dec.cuda_graphs and dec.runner.refill_chunk is not None, "graph capture failed"
    assert sum(graphed_step for *_, graphed_step in admissions) >= 3
    same = np.mean([a.tokens.tolist() == b.tokens.tolist() for a, b in zip(eager, graphed)])
    print(f"rollouts with the same tokens, refills in graphs vs eager: {same:.3f}")
    assert same >= 0.9, same  # float32 on the GPU: batch composition may move a logit by rounding


@pytest.mark.gpu
@requires_gpu
def test_gpu_overlapped_steps_match_steps_in_turn(monkeypatch):
    """overlap_steps in real CUDA graphs with refill chunks and an ESPO stopper (finish codes read from pinned
    buffers behind events, the stopper rows of rollouts drawn once more restored): the rollouts and stopper report
    of steps in turn."""
    model = tiny("qwen2", seed=19).cuda()
    prompts = prompts_for(16, seed=19, lo=3, hi=12)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, eos_token_id=EOS, prompt_values=[0.2, 100.0] * 8)

    def decoder(overlap):
        return Decoder(model, max_batch=8, max_seq_len=64, refill_batch=4, refill_tokens=32, overlap_steps=overlap)

    stopper = stopping_stopper(decoder(False), prompts, kw, 8)
    twin = copy_stopper(stopper)
    in_turn = decoder(False).generate(prompts, 2, stopper=stopper, **kw)
    stepped_on = spy_stepped_on(monkeypatch)
    dec = decoder(True)
    overlapped = dec.generate(prompts, 2, stopper=twin, **kw)
    assert dec.cuda_graphs and dec.overlap_steps and sum(stepped_on) >= 3
    same = np.mean([a.tokens.tolist() == b.tokens.tolist() for a, b in zip(in_turn, overlapped)])
    print(f"rollouts with the same tokens, overlapped vs in turn: {same:.3f}")
    assert same >= 0.9, same  # float32 on the GPU: batch composition may move a logit by rounding
    if same == 1.0:  # then the stopper saw the same tokens too
        assert_same_run(in_turn, overlapped, (stopper, twin), atol=1e-4)


@pytest.mark.gpu
@requires_gpu
def test_gpu_overlapped_steps_never_wait_for_the_device(monkeypatch):
    """Between two graphed decode steps (launching one, reading the last one's codes, freeing and compacting slots,
    refills in the chunk, stopper rows reset and restored) nothing waits for the device's queue but the codes' own
    event: a copy from pageable memory, ``.item()`` or the like there would make overlap_steps wait for the step
    launched ahead. torch's sync debug mode names each such call."""
    model = tiny("qwen2", seed=19).cuda()
    prompts = prompts_for(16, seed=19, lo=3, hi=12)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, eos_token_id=EOS, prompt_values=[0.2, 100.0] * 8)
    dec = Decoder(model, max_batch=8, max_seq_len=64, refill_batch=4, refill_tokens=32, overlap_steps=True)
    stopper = stopping_stopper(dec, prompts, kw, 8)
    dec.generate(prompts, 2, stopper=stopper, **kw)  # captures the graphs: capturing syncs
    syncs = []

    def watched(fn):
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.extend(f"{fn.__name__}: {w.filename}:{w.lineno}" for w in caught
                             if "synchroniz" in str(w.message))
        return call

    for name in ("_launch", "_read", "_release"):
        monkeypatch.setattr(Scheduler, name, watched(getattr(Scheduler, name)))
    monkeypatch.setattr(Slots, "compact", watched(Slots.compact))
    ro = dec.generate(prompts, 2, stopper=stopper, **kw)
    assert ro.finish_counts["stopped"] >= 1 and len(ro) == 32
    assert not syncs, sorted(set(syncs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_padded_prompts_attend_as_one_prompt_at_a_time(dtype, window):
    """Several prefilled prompts in one SDPA over a padded batch: what attending to each prompt alone gives."""
    from espo.engine.kv_cache import padded_prompts, pads_well, prefill_attention

    lens = [3, 7, 1, 5]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    segments = [(int(s), n) for s, n in zip(starts, lens)]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens), h, 8, generator=g).to(dtype) for h in (4, 2, 2))
    one_long_many_short = [(0, 64)] + [(64 + i, 1) for i in range(9)]  # padding: 10x the attention of 64 alone
    assert pads_well(segments, 7) and not pads_well(segments[:1], 3) and not pads_well(one_long_many_short, 64)
    kw = dict(segments=segments, cu_seqlens=cu, max_len=7, window=window, scale=0.4, use_flash=False)
    alone = prefill_attention(q, k, v, **kw)
    padded = prefill_attention(q, k, v, **kw, padded=padded_prompts(cu, positions, 7, [window], dtype))
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(padded, alone, **tol)
