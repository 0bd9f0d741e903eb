"""espo inside transformers' generate, against the real library and espo's torch reference."""
import os
import runpy
from pathlib import Path

import pytest
import torch

import espo

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from espo.integrations.transformers import ESPOSampler, generate_rollouts  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers_generate.py"
EOS, PAD, V = 2, 0, 96
PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14]]


def tiny_lm(family: str = "qwen2", seed: int = 0):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if family == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    return cls(cfg(**sizes)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


class Recorder(LogitsProcessor):
    """Keeps the scores that reach ESPOSampler (it runs right before it)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def run_recorded(model, sampler, ids, max_new_tokens, **kwargs):
    rec = Recorder()
    kw = sampler.generate_kwargs()
    kw["logits_processor"].insert(0, rec)
    sequences = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, **kw, **kwargs)
    return sequences, sampler.rollouts(), rec.scores


def replay(scores, B, *, seeds, stopper=None, values=None, **params):
    """espo's torch reference over the recorded scores: per row the tokens, stats and how it ended."""
    live = list(range(B))
    rows = {r: {"tokens": [], "logprobs": [], "raw": [], "entropy": [], "regret": [], "end": "length"}
            for r in range(B)}
    for t, s in enumerate(scores):
        if not live:
            break
        idx = torch.tensor(live)
        out = espo.sample(
            s[idx], seed=torch.tensor(seeds)[idx], offset=t, backend="torch", stopper=stopper,
            values=None if values is None else values[idx], stopper_rows=None if stopper is None else idx, **params,
        )
        for j, r in enumerate(live):
            for key, field in (("tokens", out.tokens), ("logprobs", out.logprobs), ("raw", out.raw_logprobs),
                               ("entropy", out.entropy), ("regret", out.regret)):
                rows[r][key].append(field[j].item())
            if out.stop is not None and out.stop[j]:
                rows[r]["end"] = "stopped"
            elif out.tokens[j] == EOS:
                rows[r]["end"] = "eos"
        live = [r for r in live if rows[r]["end"] == "length"]
    return rows


def left_padded(prompts, n):
    width = max(map(len, prompts))
    return torch.tensor([[PAD] * (width - len(p)) + p for p in prompts for _ in range(n)])


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.9), dict(temperature=0.0),
], ids=["T1", "T0.7-k5", "T1.3-p0.8", "k8-p0.9", "greedy"])
def test_forced_tokens_and_statistics_equal_espo_sample(model, params):
    ids = left_padded(PROMPTS, 2)
    B, seeds = ids.shape[0], [espo.rollout_seed(11, i) for i in range(ids.shape[0])]
    sequences, rollouts, scores = run_recorded(model, ESPOSampler(seed=11, **params), ids, 10)
    ref = replay(scores, B, seeds=seeds, **params)
    assert scores[0].dtype == torch.float32  # generate hands custom processors float32 logits
    for r in rollouts:
        want = ref[r.rollout_id]
        assert r.tokens.tolist() == want["tokens"] and r.finish_reason == want["end"]
        assert sequences[r.rollout_id, ids.shape[1]: ids.shape[1] + r.length].tolist() == want["tokens"]
        for got, key in ((r.logprobs, "logprobs"), (r.raw_logprobs, "raw"), (r.entropy, "entropy"),
                         (r.regret, "regret")):
            assert got.tolist() == torch.tensor(want[key], dtype=torch.float32).tolist(), key
        assert (sequences[r.rollout_id, ids.shape[1] + r.length:] == PAD).all()  # an ended row is padded


def test_hf_sampling_settings_are_bypassed(model):
    """The model's own temperature/top_k (HF's warpers under do_sample) do not touch what espo draws."""
    model.generation_config.temperature, model.generation_config.top_k = 0.3, 2
    try:
        ids = left_padded(PROMPTS, 4)
        _, rollouts, scores = run_recorded(model, ESPOSampler(seed=5), ids, 8)
    finally:
        model.generation_config.temperature, model.generation_config.top_k = 1.0, 50
    ranks = [(scores[t][r.rollout_id] > scores[t][r.rollout_id, tok]).sum().item()
             for r in rollouts for t, tok in enumerate(r.tokens.tolist())]
    assert max(ranks) >= 2, "every draw was in HF's top-2: the warper may have run"
    ref = replay(scores, ids.shape[0], seeds=[espo.rollout_seed(5, i) for i in range(ids.shape[0])])
    assert [r.tokens.tolist() for r in rollouts] == [ref[i]["tokens"] for i in range(ids.shape[0])]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_same_rollouts_as_espo_decoder(family):
    model = tiny_lm(family, seed=1)
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=4, eos_token_id=EOS)
    got = generate_rollouts(model, PROMPTS, 3, **kw)
    want = espo.Decoder(model, max_batch=9, max_seq_len=32).generate(PROMPTS, 3, **kw)
    assert isinstance(got, espo.Rollouts) and len(got) == len(want) == 9
    assert got.prompts == PROMPTS and got.tokens_generated == want.tokens_generated
    for a, b in zip(got, want):
        assert (a.rollout_id, a.prompt_index, a.sample_index, a.seed) == (b.rollout_id, b.prompt_index,
                                                                          b.sample_index, b.seed)
        assert a.tokens.tolist() == b.tokens.tolist() and a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.raw_logprobs, b.raw_logprobs, atol=1e-4, rtol=0)


def warmed_stopper(model, config, B):
    """A stopper that has seen one batch (its token statistics exist) and is armed."""
    stopper = espo.EarlyStopper(config, batch_size=B)
    generate_rollouts(model, PROMPTS, B // len(PROMPTS), max_new_tokens=12, seed=99, stopper=stopper)
    stopper.end_batch()
    stopper.arm()
    return stopper


def test_armed_stopper_ends_exactly_the_rows_whose_mask_fired(model):
    config = espo.ESPOConfig(alpha_s=0.5, beta=2.0)
    ids = left_padded(PROMPTS, 4)
    B = ids.shape[0]
    stopper = warmed_stopper(model, config, B)
    values = torch.linspace(0.1, 0.9, B)
    twin = espo.EarlyStopper(config, batch_size=B)
    twin.load_state_dict(stopper.state_dict())
    twin.reset_rows(torch.ones(B, dtype=torch.bool))
    sequences, rollouts, scores = run_recorded(model, ESPOSampler(seed=3, stopper=stopper, values=values), ids, 16)
    ref = replay(scores, B, seeds=[espo.rollout_seed(3, i) for i in range(B)], stopper=twin, values=values)
    stopped = [r.rollout_id for r in rollouts if r.finish_reason == "stopped"]
    assert 0 < len(stopped) < B, "the test needs some rows stopped and some not"
    assert stopped == [i for i in range(B) if ref[i]["end"] == "stopped"]
    for r in rollouts:
        assert r.tokens.tolist() == ref[r.rollout_id]["tokens"]  # a stopped row keeps the token that fired
        assert (sequences[r.rollout_id, ids.shape[1] + r.length:] == PAD).all()
    assert bool(stopper.stopped[stopped].all()) and stopper.end_batch()["stop_rate"] == len(stopped) / B


def test_stopper_that_never_fires_draws_the_tokens_of_none(model):
    B = 3 * len(PROMPTS)
    never = warmed_stopper(model, espo.ESPOConfig(beta=50.0), B)
    with_stopper = generate_rollouts(model, PROMPTS, 3, max_new_tokens=14, seed=8, stopper=never,
                                     prompt_values=[1e3] * 3)
    without = generate_rollouts(model, PROMPTS, 3, max_new_tokens=14, seed=8)
    assert with_stopper.finish_counts["stopped"] == 0 and int(never.count.sum()) > 0  # it ran and did not fire
    assert [r.tokens.tolist() for r in with_stopper] == [r.tokens.tolist() for r in without]
    assert all(r.values.tolist() == [1e3] * r.length for r in with_stopper)


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True), "do_sample=False"),
    (dict(do_sample=True, temperature=0.5, top_k=4), "do_sample=False"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.0"),
    (dict(min_new_tokens=3), "min_new_tokens=None"),
    (dict(suppress_tokens=[5]), "suppress_tokens=None"),
    (dict(num_beams=2), "num_beams=1"),
])
def test_generate_settings_that_change_the_forced_scores_are_refused(model, kwargs, match):
    sampler = ESPOSampler(seed=1)
    kw = {**sampler.generate_kwargs(), **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(left_padded(PROMPTS, 1), max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, **kw)


def test_bad_input_names_the_setting(model):
    wide = tiny_lm()
    wide.lm_head = torch.nn.Linear(32, V + 4, bias=False)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        generate_rollouts(wide, PROMPTS, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"vocab_size=100"):
        wide.generate(left_padded(PROMPTS, 1), max_new_tokens=2, **ESPOSampler(vocab_size=V).generate_kwargs())
    with pytest.raises(ValueError, match="do_sample"):
        generate_rollouts(model, PROMPTS, max_new_tokens=4, do_sample=True)
    with pytest.raises(ValueError, match="batch_size"):
        generate_rollouts(model, PROMPTS, 2, max_new_tokens=4, stopper=espo.EarlyStopper(batch_size=4))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_rollouts(model, [[1, 2], []], max_new_tokens=4)
    sampler = ESPOSampler()
    with pytest.raises(RuntimeError, match="stopping_criteria"):
        model.generate(left_padded(PROMPTS, 1), max_new_tokens=3, logits_processor=[sampler.logits_processor],
                       do_sample=False)


def test_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "batch 2:" in out and "stopped" in out


def test_a_stopper_of_the_wrong_size_is_told_what_generate_accepts(model):
    """The hint names what works with do_sample=False (one input row per rollout), not num_return_sequences."""
    ids = torch.randint(3, 50, (2, 4))
    sampler = ESPOSampler(seed=1, stopper=espo.EarlyStopper(espo.ESPOConfig(), batch_size=3))
    with pytest.raises(ValueError, match="repeat each prompt n times in input_ids"):
        model.generate(input_ids=ids, max_new_tokens=2, **sampler.generate_kwargs())
