"""CharTokenizer: round trips through its file and batch padding."""
import pytest
import torch

from espo.engine.tokenizer import CharTokenizer
from espo.tasks import ChainArithmetic


def test_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer(ChainArithmetic.alphabet)
    text = "Q:3+4*7-5=3+4=7;7*7=9;9-5=4;A=4"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) >= 4 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    full = tok.encode(text, add_bos=True, add_eos=True)
    assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
    assert tok.decode(full) == text
    assert tok.decode(full, skip_special_tokens=False) == "<bos>" + text + "<eos>"
    assert tok.decode(tok.encode("A=4", add_eos=True) + tok.encode("99"), stop_at_eos=True) == "A=4"
    assert tok.decode(torch.tensor(ids)) == text
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4

    with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
        tok.encode("x")
    assert tok.encode("x", strict=False) == [tok.unk_token_id]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])

    saved = tok.save(tmp_path)
    assert saved.name == "char_tokenizer.json"
    again = CharTokenizer.load(tmp_path)
    assert again == tok and again.encode(text) == ids
    with pytest.raises(ValueError):
        CharTokenizer("aa")


def test_tokenizer_batch_padding():
    tok = CharTokenizer("0123456789")
    ids, mask = tok.batch_encode(["12", "3"])  # left padded, with BOS
    assert ids.tolist() == [[1, 5, 6], [0, 1, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    ids, mask = tok.batch_encode(["12", "3"], add_bos=False, padding_side="right")
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    assert tok(["1"])["input_ids"].tolist() == [[1, 5]]


