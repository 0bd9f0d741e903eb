"""Adapters that embed espo in the trainers and engines its users already run, one module per host.

* ``espo.integrations.transformers``: transformers' ``generate`` (a logits processor that samples with
  ``espo.sample`` and forces the token, a stopping criterion for the ESPO stop, ``generate_rollouts``).
* ``espo.integrations.trl``: TRL's ``GRPOTrainer(rollout_func=...)`` (``espo.Decoder`` rollouts, a reward
  wrapper that gives ESPO-stopped completions ``r_fail``, ESPO metrics in TRL's logs).
* ``espo.integrations.vllm``: a vLLM logits processor for both model runners (espo draws each token; an
  ESPO stop is a forced EOS).
* ``espo.integrations.verl``: verl's advantage estimator for critic-free ESPO, the absorbing-failure GAE,
  and an agent loop that seeds requests and reads their stops.

Nothing here imports a host library: ``import espo`` and ``import espo.integrations`` stay light, and each
host is imported only when its module is.
"""

HOSTS = ("transformers", "trl", "verl", "vllm")

__all__ = ["HOSTS"]
