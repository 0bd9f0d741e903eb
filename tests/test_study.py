"""studies/study_espo.py (verdicts, table, resume, stop overrides), studies/regret_at_mistake.py and
studies/study_real_training.py, without a full study (imported as a package from the repository root)."""
import json
import sys

import pytest

from espo.engine.models import builtin_model_path
from studies import regret_at_mistake as regret
from studies import study_espo as study
from studies import study_real_training as training


def summary(tokens, accuracy, stopped=0.0, false_stops=None, informative=0.5, doomed=None):
    return {"rollout_tokens": tokens, "final_accuracy": accuracy, "stop_rate": stopped, "false_stop_rate": false_stops,
            "informative_fraction": informative, "doomed_fraction": doomed, "rollout_time_s": tokens / 100,
            "update_time_s": tokens / 200, "step_time_s": tokens / 100 + tokens / 200 + 1.0}


def seed(ppo_tokens, espo_tokens, espo_false=0.02, ceiling=0.25):
    return {"ppo": summary(ppo_tokens, 0.80, doomed=ceiling),
            "espo": summary(espo_tokens, 0.81, 0.2, espo_false, doomed=0.05),
            "grpo": summary(1000, 0.70, informative=0.6), "grpo-cero": summary(1000, 0.72, informative=0.7)}


def test_verdicts_compare_the_saving_with_the_target_and_the_ceiling():
    per_seed = [seed(1000, 780), seed(1000, 820)]
    lines = study.verdicts(per_seed, study.aggregate(per_seed))
    assert lines[0].startswith("ESPO rollout tokens vs PPO: 20.0% fewer (per seed 22.0%, 18.0%); target >= 20%: met")
    assert "perfect stopper would have cut 25.0%" in lines[0] and "80% of that ceiling" in lines[0]
    assert lines[2] == "ESPO false-stop rate: 2.0% (of stopped rollouts); target <= 5%: met"
    assert lines[4].startswith("GRPO+CERO") and lines[4].endswith("met")
    assert lines[3].startswith("ESPO vs PPO: 20.0% tokens saved, 20.0% rollout time saved (1.00x the tokens saved; "
                               "target >= 0.8x: met)")


def test_a_study_of_ppo_and_espo_alone_has_no_cero_verdict():
    per_seed = [{k: v for k, v in seed(1000, 780).items() if k in ("ppo", "espo")}]
    lines = study.verdicts(per_seed, study.aggregate(per_seed))
    assert len(lines) == 4 and not any("CERO" in line for line in lines)
    assert set(study.seed_savings(per_seed)) == {"espo"}


def test_a_run_without_stops_or_oracle_still_reports():
    per_seed = [seed(1000, 1000, espo_false=None, ceiling=None)]
    agg = study.aggregate(per_seed)
    lines = study.verdicts(per_seed, agg)
    assert "ceiling" not in lines[0] and lines[0].endswith("MISSED")
    assert lines[2] == "ESPO false-stop rate: - (no stops); target <= 5%: MISSED"
    env = {"name": "x", "seeds": 1, "settings": "s", "device_name": "cpu", "torch": "t", "date": "d", "minutes": 1.0,
           "command": "c"}
    table = study.markdown(agg, lines, env)
    assert "| espo | 1000 ± 0 | 10.0 ± 0.0 | 5.0 ± 0.0 | 16.0 ± 0.0 | 81.0% ± 0.0% | 20.0% ± 0.0% | - |" in table
    assert "![study](x.png)" in table


def test_the_committed_results_have_every_metric():
    for name in ("study", "study-paper-stops"):
        data = json.loads((study.RESULTS / f"{name}.json").read_text())
        assert set(data["aggregate"]["ppo"]) == set(study.METRICS)
        assert set(data["savings"]["espo"]) >= {*study.SAVINGS, "false_stop_rate"}


def test_resume_reuses_only_a_seed_finished_with_the_same_settings(tmp_path):
    settings = dict(seed=1, device="cpu", model=None, steps=3, prompts_per_step=2, num_problems=4, eval_problems=4)
    assert study.finished_seed(tmp_path, settings) is None
    config = study.TrainConfig(**{**study.DEMO, **settings}).to_dict()
    (tmp_path / "report.json").write_text(json.dumps({"config": config, "summaries": {}, "histories": {}}))
    assert study.finished_seed(tmp_path, settings) is not None
    assert study.finished_seed(tmp_path, {**settings, "steps": 4}) is None


def test_stop_settings_override_the_demo_and_reject_unknown_keys():
    import argparse

    parser = argparse.ArgumentParser()
    assert study.stop_settings(["eta_beta=1.5", "min_tokens=3"], parser) == {**study.DEMO_ESPO, "eta_beta": 1.5,
                                                                             "min_tokens": 3}
    with pytest.raises(SystemExit):
        study.stop_settings(["eta=1"], parser)


def test_regret_at_mistakes_on_the_shipped_model():
    rate, r = regret.regrets_at_mistakes(builtin_model_path(), n=40, seed=3)
    assert 0 < rate < 1 and 0 < len(r) <= 40 * (1 - rate) + 1e-9
    assert bool((r >= 0).all()) and float(r.median()) > 1  # the shipped model's mistakes are unlikely tokens


def test_study_real_training_runs_resumes_and_reports(tmp_path, monkeypatch):
    """studies/study_real_training.py (the training stage of scripts/gpu_study.sh) on the tiny model: every
    algorithm pair runs, a rerun reuses the finished runs, and the report pairs each algorithm with its ESPO form."""
    argv = ["study_real_training.py", "--preset", "quick", "--algos", "grpo", "grpo-espo", "--steps", "1",
            "--seeds", "0", "--eval-problems", "4", "--out", str(tmp_path / "rt")]
    monkeypatch.setattr(sys, "argv", argv)
    training.main()
    first = json.loads((tmp_path / "rt.json").read_text())["results"]
    assert set(first) == {"grpo", "grpo-espo"}
    assert all(0 <= r["pooled_accuracy"] <= 1 for r in first.values())
    assert "grpo-espo vs grpo" in (tmp_path / "rt.md").read_text()
    assert (tmp_path / "rt.png").stat().st_size > 0
    assert len((tmp_path / "rt-runs" / "load.jsonl").read_text().splitlines()) == 2  # one line per step run
    training.main()  # the finished runs are read back, not trained again
    assert json.loads((tmp_path / "rt.json").read_text())["results"] == first


def test_study_real_training_pairs_steps_and_calls_a_saving_inside_its_noise_none():
    def step(k, tokens, rollout, stopped=0):
        return {"step": k, "tokens": tokens, "rollout_time_s": rollout, "update_time_s": 10.0,
                "step_time_s": rollout + 10.0, "stopped": stopped}

    base = {0: [step(0, 100, 10.0), step(1, 100, 10.0), step(2, 100, 10.0)],
            1: [step(0, 100, 10.0), step(1, 100, 12.0), step(2, 100, 10.0)]}
    faster = {0: [step(0, 100, 10.5), step(1, 50, 6.0, 5), step(2, 60, 7.0, 4)],
              1: [step(0, 100, 9.8), step(1, 50, 7.0, 5), step(2, 60, 6.5, 4)]}
    p = training.paired_savings(base, faster)
    assert p["tokens"] == pytest.approx(1 - 420 / 600)
    assert p["rollout_time_s"] == pytest.approx(1 - 46.8 / 62)
    assert p["per_seed"][1]["rollout_time_s"] == pytest.approx(1 - 23.3 / 32)
    assert p["same_work_noise"]["rollout_time_s"] == pytest.approx(0.05)
    assert p["beyond_noise"]["rollout_time_s"] and p["interval"]["rollout_time_s"][0] > 0
    assert not p["beyond_noise"]["update_time_s"]  # every update took the same time
    noisy = {0: [step(0, 100, 10.0), step(1, 50, 6.0, 5), step(2, 60, 15.0, 4)],
             1: [step(0, 100, 10.0), step(1, 50, 13.0, 5), step(2, 60, 7.0, 4)]}
    assert not training.paired_savings(base, noisy)["beyond_noise"]["rollout_time_s"]


def test_a_rerun_keeps_the_reports_hand_written_notes(tmp_path):
    """A benchmark or study rewriting its .md keeps the "About these numbers" section README links to, once."""
    from bench.common import NOTES, write_report

    path = tmp_path / "r.md"
    path.write_text(f"# Old\n\nold table\n\n{NOTES}\n\nMeasured under load 3.\n\n## Later\n\nkept out\n")
    write_report(path, "# New\n\nnew table\n")
    write_report(path, "# Newer\n\nnewer table\n")
    text = path.read_text()
    assert text.startswith("# Newer\n\nnewer table\n") and "old table" not in text and "kept out" not in text
    assert text.count(NOTES) == 1 and text.count("Measured under load 3.") == 1 and text.count("Carried over") == 1
    write_report(path, f"# Own\n\n{NOTES}\n\nnew notes\n")  # a report with its own notes replaces them
    assert "Measured under load 3." not in path.read_text()
