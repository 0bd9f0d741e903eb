"""The shipped tiny model and the one model loader: its assets, its generation and success rate, and clear errors
for bad checkpoints."""
import json

import pytest
import torch

from espo.engine.models import builtin_model_path, load_builtin, load_model
from espo.engine.tokenizer import CharTokenizer
from espo.tasks import ChainArithmetic, builtin_task, success_rate


@pytest.fixture(scope="module")
def builtin():
    torch.manual_seed(0)
    return load_builtin()


def test_shipped_assets_are_small_and_described():
    path = builtin_model_path()
    files = {f.name for f in path.iterdir()}
    assert {"config.json", "model.safetensors", "char_tokenizer.json", "card.json"} <= files
    assert sum(f.stat().st_size for f in path.iterdir()) < 5_000_000
    card = json.loads((path / "card.json").read_text())
    assert 0.3 <= card["success"]["sampled_t1"] <= 0.6
    assert builtin_task() == ChainArithmetic(**card["task"])


def test_shipped_model_generates(builtin):
    model, tok = builtin
    assert isinstance(tok, CharTokenizer) and model.config.vocab_size == tok.vocab_size
    task = builtin_task()
    p = task.problems(1, seed=99)[0]
    ids, mask = tok.batch_encode([p.prompt])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=task.max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], stop_at_eos=True)
    assert text.startswith(p.prompt[2:4]) and "A=" in text  # well-formed: first step opens with the start value


def test_shipped_model_success_rate(builtin):
    model, tok = builtin
    task = builtin_task()
    rate, texts = success_rate(model, tok, task, n=200, seed=2024, temperature=1.0, return_completions=True)
    assert 0.2 <= rate <= 0.7, rate
    # failures are wrong answers or a lost thread (clauses ending with ':' up to the limit), not broken formats
    assert task.lost_thread and sum("A=" in t or ":" in t for t in texts) >= 190
    greedy = success_rate(model, tok, task, n=100, seed=2024, temperature=0.0)
    assert greedy >= rate


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not attempt hub downloads"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not attempt hub downloads"):
        load_model("someone/some-model-that-is-not-cached")
