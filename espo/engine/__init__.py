"""The batched decoder: ``espo.Decoder`` and the parts it owns.

``decoder`` is the public face; ``scheduler`` decides which rollout runs in which slot and when;
``model_runner`` runs the model over the slots and draws the tokens; ``sequence`` holds the per-request state
and the finish codes every part shares; ``slots``, ``forward`` and ``kv_cache`` are the slotted KV cache and
the forward over it; ``models`` and ``tokenizer`` load checkpoints; ``value_head`` is the critic the decoder
evaluates at each token.
"""
