"""GAE and group advantages against plain loops; the PPO losses and the arming rule by hand."""
import math

import pytest
import torch

from espo.ops.stopper import CriticWarmup
from espo.rl.advantages import gae, group_advantages, response_gae, reverse_discounted_sum
from espo.rl.losses import kl_penalty, policy_loss, value_loss


def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook backward loop, one trajectory at a time (what verl-style trainers run)."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
@pytest.mark.parametrize("T", [1, 7, 64, 133])
def test_gae_matches_the_loop(gamma, lam, T):
    g = torch.Generator().manual_seed(T)
    B = 6
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage on padding must not matter
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, gae_loop(rewards, values, lengths, gamma, lam))
    torch.testing.assert_close(ret, (adv + values) * mask)
    assert (adv[~mask] == 0).all()


def test_a_stopped_trajectory_is_an_absorbing_failure():
    # Row 0 stopped at its 3rd token (r_fail = -1 there); row 1 is the same prefix, decoded on.
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0, 9.0], [0.5, 0.4, 0.3, 0.6, 0.7]])
    rewards = torch.tensor([[0.0, 0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # no bootstrap past the stop: the advantage at the stop token is r_fail - V, whatever V beyond says
    assert adv[0, 2].item() == pytest.approx(-1.0 - 0.3)
    assert adv[0, 0].item() == pytest.approx(-1.0 - 0.5)
    assert adv[1, 0].item() == pytest.approx(1.0 - 0.5)


def test_reverse_discounted_sum_has_no_time_loop_cost_surprise():
    x = torch.randn(3, 1000, dtype=torch.float64)
    want = torch.stack([sum(0.9**k * x[:, t + k] for k in range(1000 - t)) for t in (0, 500, 999)], dim=1)
    torch.testing.assert_close(reverse_discounted_sum(x, 0.9)[:, [0, 500, 999]], want)


def test_group_advantages_match_the_definition():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, -1.0, 0.0, 0.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 5, 5, 5, 5])
    adv = group_advantages(rewards, groups)
    for gid in (7, 3, 5):
        r = rewards[groups == gid].double()
        want = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
        torch.testing.assert_close(adv[groups == gid], want.float())
    assert (adv[groups == 3] == 0).all(), "an all-equal group carries no signal"
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, groups[:3])


def test_policy_loss_clips_and_masks():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2; token 1: min(-0.5, -0.8) = -0.8; token 2 masked
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert stats["clip_fraction"] == pytest.approx(1.0)


def test_value_and_kl_losses():
    v, r, m = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2)
    assert value_loss(v, r, m).item() == pytest.approx(0.5 * (1 + 4) / 2)
    old = torch.tensor([[0.9, 2.5]])
    # clipped at 0.2 around old: 1.0 stays 1.0 (err 1); 2.0 clips to 2.3 (err 5.29 > 4)
    assert value_loss(v, r, m, old_values=old, clip=0.2).item() == pytest.approx(0.5 * (1.0 + 5.29) / 2)
    lp = torch.tensor([[-1.0, -2.0]])
    assert kl_penalty(lp, lp, m).item() == 0.0
    assert kl_penalty(lp, lp - 0.5, m).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)


def test_critic_warmup_rules():
    w = CriticWarmup(total_steps=1000)
    assert [w.update(x, s) for s, x in enumerate([2.0, 0.4, 0.3, 0.8])] == [False, False, False, False]
    assert w.update(0.45, 4) is False and w.update(0.2, 5) is False and w.update(0.1, 6) is True
    settled = CriticWarmup(total_steps=1000)
    assert settled.update(3.0, 0) is False and settled.update(2.95, 1) is True
    forced = CriticWarmup(total_steps=50)
    assert [forced.update(10.0 * (s % 2), s) for s in range(5)] == [False] * 4 + [True]


def response_gae_loop(rewards, values, mask, gamma, lam):
    """A plain GAE over each row's response tokens only (mask 1), skipping masked ones as verl's loop does;
    NaN where the mask is 0 (a reference says nothing there)."""
    adv = torch.full(rewards.shape, float("nan"), dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t], next_v = last, values[b, t].item()
    return adv


def _holed_batch(B: int = 8, T: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    mask[:, T // 3 : T // 3 + 3] = 0  # a multi-turn loop's tool output inside the response: a hole
    mask[:, 0] = 1
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage where masked must not matter
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask


def test_response_gae_equals_a_plain_gae_on_response_tokens_and_writes_0_where_masked():
    rewards, values, mask = _holed_batch()
    adv, ret, kept = response_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref, m = response_gae_loop(rewards, values, mask, 0.99, 0.95), mask.bool()
    torch.testing.assert_close(adv[m], ref[m])
    torch.testing.assert_close(ret[m], (ref + values)[m])
    assert torch.equal(kept, mask)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()  # holes and padding: 0 (verl's loop leaves its estimate)


def test_a_stopped_row_keeps_its_per_token_rewards_up_to_the_stop_which_gets_r_fail():
    rewards, values, mask = _holed_batch(seed=1)
    mask[:] = 1  # each row runs on past its stop (a trainer that kept the tokens after it)
    kl = -0.01 * torch.rand(rewards.shape, dtype=torch.float64)  # a per-token KL penalty in the reward
    rewards = kl.clone()
    rewards[:, -1] += 1.0  # the task's outcome on the last token, which a stopped row never reaches
    stop = torch.tensor([4, -1, 10, -1, 0, 29, 7, -1])
    adv, ret, kept = response_gae(rewards, values, mask, gamma=1.0, lam=0.95, stop_index=stop, r_fail=-1.0)
    for b, s in enumerate(stop.tolist()):
        if s < 0:
            expected = response_gae_loop(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1], 1.0, 0.95)[0]
            torch.testing.assert_close(adv[b], expected)
            continue
        cut = kl[b : b + 1, : s + 1].clone()  # the row cut at its stop: its own rewards, r_fail on the stop
        cut[0, s] = -1.0
        expected = response_gae_loop(cut, values[b : b + 1, : s + 1], torch.ones(1, s + 1), 1.0, 0.95)[0]
        torch.testing.assert_close(adv[b, : s + 1], expected)
        assert adv[b, s].item() == pytest.approx(-1.0 - values[b, s].item())  # r_fail - V: nothing after the stop
        assert (adv[b, s + 1 :] == 0).all() and (ret[b, s + 1 :] == 0).all() and (kept[b, s + 1 :] == 0).all()
        if s > 0:  # the per-token rewards before the stop count: not zeroed
            zeroed = torch.zeros_like(cut)
            zeroed[0, s] = -1.0
            other = response_gae_loop(zeroed, values[b : b + 1, : s + 1], torch.ones(1, s + 1), 1.0, 0.95)[0]
            assert not torch.allclose(adv[b, : s + 1], other)


def test_response_gae_refuses_a_stop_index_of_another_length():
    rewards, values, mask = _holed_batch()
    with pytest.raises(ValueError, match=r"stop_index must hold one int per row \(8; -1 for no stop\), got \(3,\)"):
        response_gae(rewards, values, mask, stop_index=torch.tensor([1, 2, 3]))
