"""The ESPO stop state: step by step against a plain transcription of the spec, on every backend."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import backend_device_pairs
from reference_helpers import SpecStopper

import espo
from espo.ops.reference import stop_update_reference

BACKENDS = backend_device_pairs() + [pytest.param("torch", "cpu", id="torch-cpu")]
CFG = espo.ESPOConfig(beta=0.6, beta_min=0.1, eta_beta=0.5, min_tokens=2, alpha_s=0.7)


def run_batches(backend, device, cfg=CFG, batches=3, B=4, V=60, steps=8, resets=True):
    """Drive the stopper and the spec side by side; return both and the stop masks seen."""
    stopper = espo.EarlyStopper(cfg, B, device)
    spec = SpecStopper(cfg, B)
    g = torch.Generator().manual_seed(0)
    seen = []
    for batch in range(batches):
        if batch == 1:
            stopper.arm()
            spec.armed = True
        for step in range(steps):
            logits = (torch.randn(B, V, generator=g) * 2.5).to(device)
            values = torch.rand(B, generator=g).to(device)
            out = espo.sample(logits, temperature=1.3, seed=batch, offset=step, stopper=stopper, values=values,
                              backend=backend)
            expected = spec.step(out.regret.tolist(), values.tolist())
            assert out.stop.tolist() == expected, f"batch {batch} step {step}"
            np.testing.assert_allclose(stopper.z.cpu().numpy(), spec.z, rtol=1e-5, atol=1e-6)
            seen.append(out.stop.cpu())
            if resets and step == steps // 2:
                mask = torch.tensor([True, False] * (B // 2), device=device)
                stopper.reset_rows(mask)
                for b in np.flatnonzero(mask.cpu().numpy()):
                    spec.reset(b)
        report = stopper.end_batch()
        spec.end_batch()
        assert stopper.ready and spec.ready
        np.testing.assert_allclose([stopper.mean, stopper.var, stopper.beta], [spec.mean, spec.var, spec.beta],
                                   rtol=1e-5)
        assert 0.0 <= report["stop_rate"] <= 1.0
    return stopper, spec, torch.stack(seen)

def assert_same_stop_history(ours, theirs, same_outputs) -> None:
    """Two runs of (output, stopper rows) per step: outputs alike by ``same_outputs(a, b, step)``, the same stop
    masks, counts, positions and stopped flags, and the float state within 1e-5; some stop must happen."""
    stops = 0
    for step, ((a, ra), (b, rb)) in enumerate(zip(ours, theirs)):
        same_outputs(a, b, step)
        assert torch.equal(a.stop, b.stop), f"step {step}"
        stops += int(a.stop.sum())
        for k in ("count", "position", "stopped"):
            assert torch.equal(ra[k], rb[k]), f"step {step}: {k}"
        for k in ("z", "sum_g", "sum_g2"):
            torch.testing.assert_close(ra[k], rb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {k}: {m}")
    assert stops > 0, "the test must exercise stops"



@pytest.mark.parametrize("backend, device", BACKENDS)
def test_stop_rule_follows_the_spec_step_by_step(backend, device):
    _, _, seen = run_batches(backend, device)
    assert seen[:8].sum() == 0, "nothing may stop before the stopper is armed and the statistics exist"
    assert seen.any(), "the test must exercise stops"
    assert not seen.all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_stopped_row_stays_stopped_and_counts_for_nothing(backend, device):
    stopper = espo.EarlyStopper(espo.ESPOConfig(beta=0.5, beta_min=0.5), 2, device)
    stopper.scalars[:] = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0])  # mean 0, var 1, beta 0.5, armed, ready
    stopper.rows["z"][0] = 10.0  # row 0 is far above its threshold
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1)).to(device)
    first = espo.sample(logits, temperature=1.0, stopper=stopper, backend=backend)
    assert first.stop.tolist()[0] is True
    frozen = {k: v.clone() for k, v in stopper.rows.items()}
    for step in range(3):
        out = espo.sample(logits, temperature=1.0, offset=step + 1, stopper=stopper, backend=backend)
        assert out.stop[0]
        for k in frozen:
            assert torch.equal(stopper.rows[k][0], frozen[k][0]), k
    stopper.reset_rows(torch.tensor([True, False], device=device))
    assert not stopper.stopped[0] and stopper.count[0] == 0 and stopper.z[0] == 0


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_nothing_stops_unarmed_or_before_statistics(backend, device):
    cfg = espo.ESPOConfig(beta=0.5, beta_min=0.5)
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).to(device) * 4
    for armed, ready in [(0.0, 1.0), (1.0, 0.0)]:
        stopper = espo.EarlyStopper(cfg, 3, device)
        stopper.scalars[:] = torch.tensor([0.0, 1e-4, 0.5, armed, ready])
        for step in range(5):
            assert not espo.sample(logits, temperature=2.0, offset=step, stopper=stopper, backend=backend).stop.any()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_stopper_rows_update_only_the_named_rows(backend, device):
    cfg = CFG
    full = espo.EarlyStopper(cfg, 5, device)
    part = espo.EarlyStopper(cfg, 5, device)
    for s in (full, part):
        s.scalars[:] = torch.tensor([0.5, 0.3, 0.6, 1.0, 1.0])
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3)).to(device) * 3
    rows = torch.tensor([4, 0, 2], device=device)
    for step in range(4):
        a = espo.sample(logits, temperature=1.2, offset=step, stopper=full, backend=backend)
        b = espo.sample(logits[rows], temperature=1.2, offset=step, stopper=part, stopper_rows=rows, backend=backend)
        assert torch.equal(a.stop[rows], b.stop)
    for k in full.rows:
        torch.testing.assert_close(part.rows[k][rows], full.rows[k][rows])
        assert not part.rows[k][[1, 3]].any(), f"untouched rows changed: {k}"


def test_end_batch_statistics_by_hand():
    s = espo.EarlyStopper(espo.ESPOConfig(alpha_ema=0.5, eta_beta=1.0, target_rate=0.5), 2)
    s.rows["sum_g"][:] = torch.tensor([3.0, 1.0])
    s.rows["sum_g2"][:] = torch.tensor([5.0, 1.0])
    s.rows["count"][:] = torch.tensor([2, 1])
    s.rows["stopped"][0] = True
    s.arm()
    report = s.end_batch()  # first batch: tokens g = {1, 2} and {1} -> mean 4/3, population var 6/3 - 16/9
    assert report["stop_rate"] == 0.5
    assert s.mean == pytest.approx(4 / 3) and s.var == pytest.approx(2 - 16 / 9)
    assert s.beta == pytest.approx(7.0)  # stop rate equals the target: beta stays
    assert not s.stopped.any() and (s.count == 0).all()
    s.rows["sum_g"][:] = torch.tensor([2.0, 0.0])
    s.rows["sum_g2"][:] = torch.tensor([4.0, 0.0])
    s.rows["count"][:] = torch.tensor([1, 0])
    s.rows["stopped"][0] = True
    report = s.end_batch()  # one sequence, stopped: rate 1; row 1 held no sequence
    assert report["sequences"] == 1 and report["stop_rate"] == 1.0
    assert s.mean == pytest.approx(0.5 * 4 / 3 + 0.5 * 2.0)
    assert s.var == pytest.approx(0.5 * (2 - 16 / 9) + 0.5 * 0.0)
    assert s.beta == pytest.approx(7.5)


def test_a_sequence_stopped_is_counted_once_across_resets():
    s = espo.EarlyStopper(espo.ESPOConfig(), 1)
    s.rows["count"][0] = 3
    s.rows["stopped"][0] = True
    s.reset_rows(torch.tensor([True]))
    s.reset_rows(torch.tensor([True]))  # an empty row is no sequence
    s.rows["count"][0] = 2
    assert s.end_batch()["stop_rate"] == 0.5


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_state_round_trip_continues_identically(backend, device, tmp_path):
    stopper, _, _ = run_batches(backend, device, batches=2)
    path = tmp_path / "stopper.pt"
    torch.save(stopper.state_dict(), path)
    restored = espo.EarlyStopper(CFG, 4, device)
    restored.load_state_dict(torch.load(path))
    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(9)).to(device) * 3
    for step in range(4):
        a = espo.sample(logits, temperature=1.4, offset=step, stopper=stopper, backend=backend)
        b = espo.sample(logits, temperature=1.4, offset=step, stopper=restored, backend=backend)
        assert torch.equal(a.stop, b.stop)
    assert stopper.end_batch() == restored.end_batch()
    assert torch.equal(stopper.scalars, restored.scalars)


def test_load_state_from_another_config_is_refused():
    state = espo.EarlyStopper(espo.ESPOConfig(beta=3.0), 2).state_dict()
    target = espo.EarlyStopper(espo.ESPOConfig(), 2)
    before = {k: v.clone() for k, v in target.rows.items()}
    with pytest.raises(ValueError, match="config"):
        target.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        espo.EarlyStopper(espo.ESPOConfig(beta=3.0), 3).load_state_dict(state)
    assert all(torch.equal(before[k], target.rows[k]) for k in before)


@pytest.mark.parametrize(
    "field, value", [("alpha_s", 1.5), ("target_rate", -0.1), ("clip", -1.0), ("beta", 100.0), ("min_tokens", -1)]
)
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        espo.ESPOConfig(**{field: value})


def test_bad_stopper_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        espo.EarlyStopper(espo.ESPOConfig(), 0)
    s = espo.EarlyStopper(espo.ESPOConfig(), 2)
    with pytest.raises(ValueError, match="bool tensor"):
        s.reset_rows(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="distinct"):
        espo.sample(torch.zeros(2, 4), stopper=s, stopper_rows=torch.tensor([1, 1]))
    assert dataclasses.asdict(s.config) == dataclasses.asdict(espo.ESPOConfig())


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_the_stop_state_never_holds_an_autograd_graph(backend, device):
    stopper = espo.EarlyStopper(CFG, 3, device)
    stopper.set_statistics(0.0, 1.0)
    stopper.arm()
    logits = torch.randn(3, 50, device=device, requires_grad=True)  # no torch.no_grad(), as in the README's snippet
    for step in range(3):
        espo.sample(logits * 1.0, seed=step, offset=step, stopper=stopper, values=torch.ones(3, device=device,
                    requires_grad=True), backend=backend)
    held = [stopper.scalars, stopper._batch, *stopper.rows.values()]
    assert not any(t.requires_grad or t.grad_fn is not None for t in held)
    stopper.end_batch()
    assert not any(t.requires_grad for t in [stopper.scalars, stopper._batch, *stopper.rows.values()])


def _state_with(**changes):
    state = espo.EarlyStopper(espo.ESPOConfig(), 2).state_dict()
    rows = {**state["rows"], **changes.pop("rows", {})}
    return {**state, "rows": rows, **changes}


@pytest.mark.parametrize("call, error, words", [
    (lambda: espo.EarlyStopper({"beta": 1.0}), TypeError, "config must be an espo.ESPOConfig"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), True), TypeError, "batch_size must be an int"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2.0), TypeError, "batch_size must be an int"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2, "tpu"), ValueError, "device must be a device such as 'cpu'"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2, "cuda:99"), ValueError, "device is 'cuda:99'"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2).load_state_dict(None), TypeError, "needs the dict"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2).load_state_dict({"rows": {}}), ValueError, "lacks config"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2).load_state_dict(_state_with(rows={"z": torch.zeros(3)})),
     ValueError, r"rows\['z'\] must be a tensor of shape \(2,\), got \(3,\)"),
    (lambda: espo.EarlyStopper(espo.ESPOConfig(), 2).load_state_dict(_state_with(scalars=torch.zeros(4))),
     ValueError, r"scalars must be a tensor of shape \(5,\)"),
])
def test_bad_stopper_arguments_name_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_a_setting_that_can_never_fire_says_so():
    """z averages clipped values, so z < clip: a stop needs clip > beta * max(V, value_floor). The default clip
    lets the paper's beta fire; a setting that cannot fire for any value warns, naming what to change."""
    paper = espo.ESPOConfig()
    assert paper.never_fires() is None and paper.stoppable_below() > 1.0  # beta 7 fires at every V <= 1
    with pytest.warns(UserWarning, match="can never stop a rollout.*lower beta_min"):
        espo.ESPOConfig(clip=3.0, beta=20.0, beta_min=20.0)
    with pytest.warns(UserWarning, match="lower beta$"):
        espo.ESPOConfig(clip=1.0, beta=5.0, eta_beta=0.0)
    assert espo.ESPOConfig(clip=3.0).stoppable_below() == pytest.approx(3 / 7)  # the old default: V >= 3/7 never stops


def test_no_state_at_or_above_the_stoppable_value_ever_stops():
    """Whatever the regret, a row whose value is at least clip / beta never stops; just below it, one can."""
    cfg = espo.ESPOConfig(alpha_s=0.0, beta=2.0, clip=3.0)
    for value, stops in ((cfg.stoppable_below(), False), (cfg.stoppable_below() * 0.99, True)):
        stopper = espo.EarlyStopper(cfg, 4)
        stopper.scalars[1] = 1.0  # var
        stopper.scalars[3:] = 1.0  # armed, ready
        state = stopper.state(values=torch.full((4,), value))
        stop = stop_update_reference(torch.full((4,), 1e6), torch.ones(4, dtype=torch.bool), state)
        assert bool(stop.all()) is stops


# ------------------------------------------------------------------------------------------- the value rule


def value_rule_replay(values: np.ndarray, level: float, min_tokens: int) -> np.ndarray:
    """Where the value rule stops each row [B] of per-step values [B, T]: the first t >= min_tokens with V_t < level."""
    hit = values[:, min_tokens:] < level
    return np.where(hit.any(1), hit.argmax(1) + min_tokens, -1)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("regret_rule", [False, True])
def test_the_value_rule_stops_where_its_replay_does(backend, device, regret_rule):
    cfg = espo.ESPOConfig(value_rule=True, value_stop=0.2, regret_rule=regret_rule, min_tokens=3, beta=0.6,
                          beta_min=0.1, alpha_s=0.7)
    B, T = 16, 12
    stopper = espo.EarlyStopper(cfg, B, device)
    stopper.set_statistics(0.5, 1.0)
    stopper.arm()
    g = torch.Generator().manual_seed(1)
    values = torch.rand(B, T, generator=g)
    at = torch.full((B,), -1)
    z_spec = SpecStopper(cfg, B)
    z_spec.armed, z_spec.ready, z_spec.mean, z_spec.var = True, True, 0.5, 1.0
    regret_at = torch.full((B,), -1)
    for t in range(T):
        logits = (torch.randn(B, 50, generator=g) * 2.5).to(device)
        out = espo.sample(logits, seed=t, offset=t, stopper=stopper, values=values[:, t].to(device), backend=backend)
        at = torch.where(out.stop.cpu() & (at < 0), t, at)
        if regret_rule:  # the spec of the regret rule alone, for the union below
            fired = z_spec.step(out.regret.tolist(), values[:, t].tolist())
            regret_at = torch.where(torch.tensor(fired) & (regret_at < 0), t, regret_at)
    expected = value_rule_replay(values.numpy(), 0.2, 3)
    if regret_rule:
        both = np.where(regret_at.numpy() < 0, expected, np.where(expected < 0, regret_at.numpy(),
                                                                  np.minimum(expected, regret_at.numpy())))
        assert at.tolist() == both.tolist()
    else:
        assert at.tolist() == expected.tolist() and (expected >= 0).any() and (expected < 0).any()
        assert stopper.end_batch()["beta"] == float("inf")  # no regret rule: the controller moves nothing


def test_the_value_rule_waits_to_be_armed_and_needs_values():
    stopper = espo.EarlyStopper(espo.ESPOConfig(value_rule=True, regret_rule=False), 2)
    logits = torch.randn(2, 10)
    assert not espo.sample(logits, stopper=stopper, values=torch.zeros(2)).stop.any()  # not armed
    stopper.arm()
    assert not espo.sample(logits, stopper=stopper).stop.any()  # no critic value: nothing to read
    assert espo.sample(logits, offset=1, stopper=stopper, values=torch.zeros(2)).stop.all()


def test_a_rule_needs_one_rule_and_a_stopper_saved_before_the_value_rule_loads():
    with pytest.raises(ValueError, match="regret_rule or value_rule"):
        espo.ESPOConfig(regret_rule=False)
    state = espo.EarlyStopper(CFG, 2).state_dict()
    for name in ("regret_rule", "value_rule", "value_stop"):
        del state["config"][name]
    espo.EarlyStopper(CFG, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved config differs"):
        espo.EarlyStopper(dataclasses.replace(CFG, value_rule=True), 2).load_state_dict(state)


def test_restore_rows_puts_back_the_named_rows_as_saved():
    stopper = espo.EarlyStopper(CFG, 5)
    with pytest.raises(RuntimeError, match="save_rows"):
        stopper.restore_rows(torch.tensor([0]))
    g = torch.Generator().manual_seed(3)
    stopper.set_statistics(0.5, 1.0)
    stopper.arm()
    for step in range(3):
        espo.sample(torch.randn(5, 40, generator=g) * 3, seed=1, offset=step, stopper=stopper, backend="torch")
    saved = {k: v.clone() for k, v in stopper.rows.items()}
    stopper.save_rows()
    for step in range(3, 5):
        espo.sample(torch.randn(5, 40, generator=g) * 3, seed=1, offset=step, stopper=stopper, backend="torch")
    moved = {k: v.clone() for k, v in stopper.rows.items()}
    stopper.restore_rows(torch.tensor([1, 4]))
    for k, now in stopper.rows.items():
        assert torch.equal(now[[1, 4]], saved[k][[1, 4]]), k
        assert torch.equal(now[[0, 2, 3]], moved[k][[0, 2, 3]]), k
    assert not torch.equal(moved["position"], saved["position"]), "the rows must have moved since the save"
