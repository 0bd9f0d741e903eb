"""ESPO stopping inside vLLM: sample rollouts of a tiny random Qwen2 with espo's logits processor.

    python examples/vllm_espo.py            (needs vLLM: `bash scripts/host_envs.sh vllm` makes an env with it)

The engine runs in its own process (vLLM's default), so the processor is named by module path and told
its settings through ``additional_config``; each request carries its own seed in ``extra_args``; the
stops come back through the record folder.
"""
from __future__ import annotations

import os
import tempfile
import time


def make_tiny_model(folder: str, vocab_size: int = 64, seed: int = 0, hidden_size: int = 64,
                    layers: int = 2) -> tuple[str, str]:
    """A random-initialised Qwen2 in ``folder/model`` and a word-level tokenizer (EOS = 1) in ``folder/tokenizer``.

    Heads are 32 wide (a size vLLM's CPU attention supports). The tokenizer lives apart because
    transformers 5 ignores ``tokenizer_class`` in a qwen2 model folder.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    model_dir, tok_dir = os.path.join(folder, "model"), os.path.join(folder, "tokenizer")
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    vocab = {"<bos>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            unk_token="t2").save_pretrained(tok_dir)
    return model_dir, tok_dir


def main() -> None:
    from vllm import LLM, SamplingParams

    import espo
    from espo.integrations import vllm as espo_vllm

    work = tempfile.mkdtemp(prefix="espo-vllm-example-")
    model_dir, tok_dir = make_tiny_model(work)
    records = os.path.join(work, "records")
    prompts, n, run_seed = [[0, 5, 6, 7], [0, 9, 3], [0, 11, 12, 13, 14]], 4, 0
    # Starting statistics make stopping possible at once; a trainer passes its own stopper's here.
    engine = espo_vllm.engine_kwargs(update_every=len(prompts) * n, state={"mean": 0.0, "var": 1.0, "beta": 2.0},
                                     record_dir=records)  # a new run, with its own run_id in every record
    llm = LLM(model=model_dir, tokenizer=tok_dir, dtype="float32", max_num_seqs=4, max_model_len=128,
              enforce_eager=True, kv_cache_memory_bytes=64 << 20, **engine)
    requests, params = [], []
    for r in range(len(prompts) * n):  # one request per rollout, seeded as espo.Decoder seeds rollout r
        requests.append({"prompt_token_ids": prompts[r // n]})
        params.append(SamplingParams(max_tokens=32, temperature=1.0, logprobs=0,
                                     extra_args=espo_vllm.request_args(espo.rollout_seed(run_seed, r),
                                                                       id=f"rollout-{r}")))
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    stops = espo_vllm.read_stops(engine)  # this run's stops
    generated = 0
    for r, out in enumerate(outputs):
        tokens, stopped = espo_vllm.keep_tokens(out.outputs[0].token_ids, stops.get(f"rollout-{r}"))
        generated += len(out.outputs[0].token_ids)
        print(f"rollout {r:2d}: {'stopped' if stopped else out.outputs[0].finish_reason:7s} "
              f"{len(tokens):2d} tokens {tokens[:10]}")
    print(f"{len(stops)} of {len(outputs)} rollouts stopped; {generated} tokens in {elapsed:.2f} s = "
          f"{generated / elapsed:.0f} tokens/s")


if __name__ == "__main__":
    main()
