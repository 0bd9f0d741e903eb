"""espo inside TRL's GRPOTrainer: espo.Decoder rollouts, the ESPO stop, r_fail for stopped completions.

Runs on a CPU in seconds with a tiny random model and a character tokenizer built in memory (put your
own checkpoint and tokenizer in their place):

    pip install -c constraints/main.txt ".[trl]" && python examples/trl_grpo.py     # in a checkout
"""
import os
import random
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import espo  # noqa: E402
from espo.integrations.trl import ESPORollout  # noqa: E402

CHARS = "0123456789+="


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A random two-layer Qwen2 and a one-token-per-character tokenizer, both built in memory."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    chars.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=chars, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(config), tokenizer


def sums_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """Prompts "a+b=" with their answers, in memory."""
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def correct(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1 for a completion that starts with the answer, else 0 (the dataset's "answer" column arrives here)."""
    return [float(c.startswith(a)) for c, a in zip(completions, answer)]


def main(output_dir: str | None = None, steps: int = 3) -> GRPOTrainer:
    model, tokenizer = tiny_model_and_tokenizer()
    rollout = ESPORollout(espo.ESPOConfig(alpha_s=0.5, beta=2.0), measure_saved=True)
    args = GRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="espo-trl-"), max_steps=steps, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=16, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=sums_dataset(), processing_class=tokenizer,
        rollout_func=rollout, reward_funcs=[rollout.reward(correct)],  # stopped completions get config.r_fail
    )
    trainer.train()
    for log in trainer.state.log_history:
        if "espo/stop_rate" in log:
            print(f"step {log['step']}: stop rate {log['espo/stop_rate']:.2f}, "
                  f"rollout tokens {log['espo/rollout_tokens']:.0f}, "
                  f"tokens saved {log['espo/tokens_saved']:.0f}, decode {log['espo/decode_time_s']:.3f} s, "
                  f"clipped {log['completions/clipped_ratio']:.2f}, reward {log['reward']:.3f}")
    return trainer


if __name__ == "__main__":
    main()
