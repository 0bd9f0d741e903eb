"""The PPO update's passes (espo.rl.update): length-sorted micro-batches give the padded update's loss and gradients."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference_helpers import chi_square, chi_square_bound, kept_set

from espo.engine.models import load_builtin
from espo.engine.value_head import ValueHead
from espo.rl.config import TrainConfig
from espo.rl.losses import kl_penalty, policy_loss, value_loss
from espo.rl.update import Targets, build_batch, micro_batches, minibatch_backward, score_batch


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



@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_mask_keeps_the_smallest_likely_set_reaching_top_p(top_p):
    from espo.rl.update import top_p_mask

    g = torch.Generator().manual_seed(int(top_p * 1000))
    logits = torch.randn(7, 37, generator=g) * 3
    logits[0, :5] = 2.0  # ties at the threshold are kept together
    mask = top_p_mask(torch.softmax(logits / 0.7, dim=-1), top_p)
    for row, kept in zip(logits.numpy(), mask.numpy()):
        assert (kept == kept_set(row, 0.7, 0, top_p)).all()


def test_sampled_logprobs_are_the_probabilities_espo_sample_draws_with_top_p():
    """espo.sample with top_p draws only tokens of the kept set, at the renormalised tempered probabilities that
    sampled_logprobs gives (the update scores tokens under the distribution the rollouts came from)."""
    from espo import sample
    from espo.rl.update import sampled_logprobs

    V, T, top_p, draws = 24, 0.7, 0.8, 20000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    tokens = sample(logits.expand(draws, V).contiguous(), temperature=T, top_p=top_p, seed=torch.arange(draws),
                    offset=0).tokens
    kept = kept_set(logits[0].numpy(), T, 0, top_p)
    probs = sampled_logprobs(logits.expand(V, V), torch.arange(V), T, top_p).exp().double().numpy()
    probs[~kept] = 0.0  # (each stray token is scored as if kept; none is drawn)
    counts = np.bincount(tokens.numpy(), minlength=V)
    assert counts[~kept].sum() == 0 and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert chi_square(counts, probs) < chi_square_bound(int(kept.sum()))


def test_sampled_logprobs_without_top_p_are_the_tempered_log_softmax_and_a_stray_token_stays_finite():
    from espo.rl.update import sampled_logprobs

    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    full = torch.log_softmax(logits / 0.6, dim=-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.equal(sampled_logprobs(logits, tokens, 0.6), full)
    # a token outside the kept set (the update's forward rounded it out) is scored as if kept, never -inf
    rare = torch.softmax(logits / 0.6, dim=-1).argmin(-1)
    lp = sampled_logprobs(logits, rare, 0.6, top_p=0.5)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
