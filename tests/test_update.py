"""The PPO update's passes (espo.update): length-sorted micro-batches give the padded update's loss and gradients."""
from types import SimpleNamespace

import pytest
import torch

from espo.config import TrainConfig
from espo.losses import kl_penalty, policy_loss, value_loss
from espo.models import load_builtin
from espo.update import Targets, build_batch, micro_batches, minibatch_backward, score_batch
from espo.value_head import ValueHead


def _padded_minibatch_loss(model, value_head, batch, rows, old_logprobs, old_values, advantages, returns, ref_logprobs,
                           cfg):
    """The update as it was: one forward over the minibatch padded to the whole batch's longest row."""
    out = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], output_hidden_states=True)
    pos = batch.positions[rows]
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1).gather(2, batch.tokens[rows][..., None])[..., 0]
    hidden = out.hidden_states[-1]
    values = value_head(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))
    m = batch.mask[rows]
    loss, _ = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, clip=cfg.clip)
    loss = loss + cfg.vf_coef * value_loss(values, returns[rows], m, old_values=old_values[rows], clip=cfg.value_clip)
    return loss + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs[rows], m)


def test_micro_batched_update_has_the_padded_update_s_loss_and_gradients(tmp_path):
    """Length-sorted micro-batches, each padded to its own longest row, give the loss and gradients of one
    forward over the minibatch padded to the batch's longest row (the update before micro-batching)."""
    torch.manual_seed(0)
    model, _ = load_builtin()
    head = ValueHead(model.config.hidden_size)
    prompts = [[1, 5, 6, 7, 8], [1, 9, 3], [1, 4, 4, 4, 4, 4, 4]]
    lengths = [1, 40, 3, 17, 2, 33, 9, 25, 5, 12, 40, 7]
    rollouts = [SimpleNamespace(prompt_index=i % 3, length=L, tokens=torch.randint(3, 20, (L,)))
                for i, L in enumerate(lengths)]
    rewards = [float(i % 2) for i in range(len(lengths))]
    batch = build_batch(prompts, rollouts, rewards, [0, 1, 2], pad_id=0, device="cpu")
    cfg = TrainConfig(update_tokens=60, kl_coef=0.1, value_clip=0.2)
    old_logprobs, old_values = score_batch(model, head, batch, cfg.temperature, cfg.update_tokens)
    N, T = batch.mask.shape
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(N, T, generator=g) * batch.mask
    returns = torch.randn(N, T, generator=g) * batch.mask
    ref_logprobs = old_logprobs + 0.1 * torch.randn(N, T, generator=g) * batch.mask
    rows = torch.tensor([0, 1, 3, 5, 6, 8, 10, 11])
    assert len(micro_batches(batch, rows, cfg.update_tokens)) > 2  # the test exercises several micro-batches
    params = list(model.parameters()) + list(head.parameters())
    # the update's own old logprobs equal the padded forward's (they are its ratio's denominator)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits.gather(1, batch.positions[..., None].expand(-1, -1, out.logits.shape[-1]))
        padded_old = torch.log_softmax(logits, -1).gather(2, batch.tokens[..., None])[..., 0] * batch.mask
    torch.testing.assert_close(old_logprobs * batch.mask, padded_old, rtol=1e-5, atol=1e-6)

    loss = _padded_minibatch_loss(model, head, batch, rows, old_logprobs, old_values, advantages, returns,
                                  ref_logprobs, cfg)
    loss.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    targets = Targets(batch, old_logprobs, old_values, advantages, returns, ref_logprobs)
    terms = minibatch_backward(model, head, targets, rows, cfg)
    total = terms["policy_loss"] + cfg.vf_coef * terms["value_loss"] + cfg.kl_coef * terms["kl"]
    assert total == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
