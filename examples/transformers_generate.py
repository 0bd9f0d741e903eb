"""espo inside transformers' ``generate``: espo draws every token, the ESPO stopper ends rows early.

Runs on a CPU in seconds with a tiny random model (put your own checkpoint in its place):

    python examples/transformers_generate.py
"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import espo
from espo.integrations.transformers import ESPOSampler, generate_rollouts

torch.manual_seed(0)
config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
model = Qwen2ForCausalLM(config).eval()  # or AutoModelForCausalLM.from_pretrained(your_checkpoint)
prompts = [[1, 5, 6, 7], [1, 9, 10]]

# 1. The helper: n rollouts per prompt in espo.Decoder's shape, the ESPO stopper inside generate.
stopper = espo.EarlyStopper(espo.ESPOConfig(alpha_s=0.5, beta=2.0), batch_size=len(prompts) * 4)
for step in range(3):
    rollouts = generate_rollouts(model, prompts, n=4, max_new_tokens=24, temperature=1.0, seed=step,
                                 stopper=stopper, prompt_values=[0.5, 0.5])  # per-prompt success estimates
    report = stopper.end_batch()  # once per rollout batch: token statistics and threshold
    stopper.arm()                 # nothing stops before the first end_batch; arm when your rule says so
    print(f"batch {step}: {rollouts.finish_counts}, {rollouts.tokens_generated} tokens, "
          f"stop rate {report['stop_rate']:.2f}")
for r in rollouts.for_prompt(0):
    print(r.finish_reason, r.tokens.tolist(), f"sum logprob {r.logprobs.sum():.2f}, max regret {r.regret.max():.2f}")

# 2. The two halves in your own generate call (do_sample=False: the processor forces espo's token).
sampler = ESPOSampler(temperature=0.8, top_p=0.9, seed=7)
sequences = model.generate(torch.tensor([prompts[0]] * 2), max_new_tokens=8, **sampler.generate_kwargs())
records = sampler.rollouts()
print(sequences[:, 4:].tolist(), [r.raw_logprobs.sum().item() for r in records])
