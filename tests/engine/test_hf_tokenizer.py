"""Hugging Face tokenizers through the training path (issue 22): chat-template prompts, end-of-turn stop tokens,
special tokens dropped before rewards, and a few training steps of a tiny random Llama with a real
PreTrainedTokenizerFast (built here from a `tokenizers` WordLevel model: no downloads)."""

import pytest
from model_folders import make_model_folder, make_tokenizer

from espo.engine.models import load_model
from espo.rl.trainer import TrainConfig, train
from espo.tasks import task_from_checkpoint
from espo.tasks.prompting import encode_prompt, stop_token_ids
from espo.tasks.word_problems import WordProblems


def test_prompts_go_through_the_chat_template(tmp_path):
    tok = make_tokenizer()
    ids = encode_prompt(tok, "Tom has 3 apples .")
    tokens = tok.convert_ids_to_tokens(ids)  # special tokens as themselves, not split; no second BOS
    assert tokens == ["<|im_start|>", "user", "Tom", "has", "3", "apples", ".", "<|im_end|>", "<|im_start|>",
                      "assistant"]
    plain = make_tokenizer(chat_template=False)
    assert plain.convert_ids_to_tokens(encode_prompt(plain, "Tom has 3 apples ."))[-4:] == ["has", "3", "apples", "."]


def test_stop_tokens_are_the_eos_and_the_end_of_turn_token(tmp_path):
    make_model_folder(tmp_path)
    model, tok = load_model(tmp_path)
    stops = stop_token_ids(tok, model)
    assert stops[0] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert tok.unk_token_id not in stops and len(set(stops)) == len(stops)


def test_special_tokens_are_dropped_before_the_reward():
    tok = make_tokenizer()
    task = WordProblems()
    p = task.problems(1, seed=0)[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode(f"The answer is {p.answer} .", add_special_tokens=False) + [end]
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in text and task.reward(p, text) == 1.0


@pytest.mark.parametrize("algo, top_p", [("grpo", 1.0), ("espo", 0.9)])
def test_training_a_chat_model_with_a_hf_tokenizer_runs(tmp_path, algo, top_p):
    folder = tmp_path / "model"
    make_model_folder(folder, card={"task": WordProblems(max_new_tokens=12).config()})
    assert task_from_checkpoint(folder) == WordProblems(max_new_tokens=12)
    cfg = TrainConfig(algo=algo, model=str(folder), steps=2, prompts_per_step=2, group_size=2, num_problems=4,
                      eval_problems=2, eval_every=2, max_batch=4, ppo_epochs=1, minibatches=1, top_p=top_p,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    assert len(result.history) == 2
    assert 0.0 <= result.history[-1]["eval_accuracy"] <= 1.0
    assert all(h["rollouts"] == 4 and h["tokens"] > 0 for h in result.history)


def test_success_rate_samples_chat_prompts_as_the_trainer_does(tmp_path):
    """success_rate draws what espo.Decoder draws from the chat-template prompts, ending at the end-of-turn
    token, and scores the text without special tokens."""
    from espo import Decoder
    from espo.tasks import success_rate

    make_model_folder(tmp_path)
    model, tok = load_model(tmp_path)
    task = WordProblems(max_new_tokens=6)
    rate, texts = success_rate(model, tok, task, n=5, seed=3, top_p=0.9, return_completions=True)
    problems = task.problems(5, seed=3)
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    out = Decoder(model, max_batch=5, max_seq_len=64).generate(prompts, 1, max_new_tokens=6, top_p=0.9, seed=3,
                                                               eos_token_id=stop_token_ids(tok, model))
    assert texts == [tok.decode(r.tokens.tolist(), skip_special_tokens=True) for r in out]
    assert rate == sum(task.reward(p, t) for p, t in zip(problems, texts)) / 5
    assert not any("<|im_end|>" in t or "<|im_start|>" in t for t in texts)
