"""Adapters that embed espo in other engines and trainers, one module per host.

Each module imports its host library only when it is imported itself, so ``import espo`` never needs them:
``espo.integrations.vllm`` (a vLLM v1 logits processor), ``espo.integrations.verl`` (advantage estimators
and the absorbing-failure GAE for verl).
"""
