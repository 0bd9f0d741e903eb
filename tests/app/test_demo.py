"""The main job, shortened: `espo demo --quick` trains all four algorithms and writes its report."""
import json

import pytest
import torch

from espo.app.cli import main


def test_quick_demo_writes_its_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "espo vs ppo" in printed and "grpo-cero vs grpo" in printed and "false-stop rate" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["summaries"]) == {"ppo", "espo", "grpo", "grpo-cero"}
    espo, ppo = report["summaries"]["espo"], report["summaries"]["ppo"]
    assert espo["stop_rate"] > 0, "the demo's stop settings must make ESPO stop"
    assert espo["rollout_tokens"] < ppo["rollout_tokens"]
    assert 0 < ppo["doomed_fraction"] < 1 and "A perfect stopper" in printed  # the oracle ceiling is reported
    assert "A perfect stopper" in (tmp_path / "report.md").read_text()
    for name in ("report.md", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0
    for algo in report["summaries"]:
        assert (tmp_path / algo / "metrics.jsonl").is_file() and (tmp_path / algo / "checkpoint.pt").is_file()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    """A checkpoint that names no task: exit code 2 and the reason, no traceback."""
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["train", "--model", str(bare), "--steps", "1", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("espo train: error: model folder") and "config.json" in err and "Traceback" not in err


def test_demo_runs_on_a_chat_model_with_its_preset(tmp_path, capsys):
    """`espo demo --model DIR --preset smollm2`: the four algorithms on a Hugging Face tokenizer and chat template,
    the task from the folder's card, the preset's nucleus sampling."""
    from model_folders import make_model_folder

    from espo.tasks.word_problems import WordProblems

    make_model_folder(tmp_path / "model", card={"task": WordProblems(max_new_tokens=8).config()})
    argv = ["demo", "--model", str(tmp_path / "model"), "--preset", "smollm2", "--quick", "--steps", "2",
            "--out", str(tmp_path / "demo")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["config"]["model"] == str(tmp_path / "model") and report["config"]["top_p"] == 0.95
    assert set(report["summaries"]) == {"ppo", "espo", "grpo", "grpo-cero"}
    assert all(s["steps"] == 2 for s in report["summaries"].values())


def _without_times(report: dict) -> dict:
    """The report's metrics: everything but the seconds, which differ between any two runs."""
    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.endswith("time_s") and k not in ("time_per_step_s", "per_step")}

    return {"summaries": {a: keep(s) for a, s in report["summaries"].items()},
            "histories": {a: [keep(h) for h in hist] for a, hist in report["histories"].items()}}


def test_an_interrupted_demo_resumes_to_the_report_of_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    tiny = dict(preset="quick", steps=2, eval_problems=8, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does on a busy machine: torch's one thread per core is slower there
    try:
        _interrupt_and_resume(tmp_path, capsys, monkeypatch, tiny)
    finally:
        torch.set_num_threads(threads)


def _interrupt_and_resume(tmp_path, capsys, monkeypatch, tiny: dict) -> None:
    import espo.app.demo
    from espo.app.demo import run_demo

    run_demo(tmp_path / "whole", **tiny)
    real_step, calls = espo.app.demo.train_step, []

    def interrupted_after_five_steps(run, step):  # step 0 of all four, then step 1 of ppo, then Ctrl-C
        calls.append((run.cfg.algo, step))
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(espo.app.demo, "train_step", interrupted_after_five_steps)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "cut", **tiny)
    assert not (tmp_path / "cut" / "report.json").exists()
    line = _one_line(capsys, ["demo", "--quick", "--out", str(tmp_path / "cut")])
    assert "already holds a demo" in line and "continue it with --resume" in line, line
    line = _one_line(capsys, ["demo", "--quick", "--out", str(tmp_path / "cut"), "--resume", "--overwrite"])
    assert "pass one of them" in line, line
    monkeypatch.setattr(espo.app.demo, "train_step", real_step)
    run_demo(tmp_path / "cut", resume=True, **tiny)
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert _without_times(cut) == _without_times(whole)
    monkeypatch.setattr(espo.app.demo, "train_step", None)  # a finished demo: its runs are reused, no step is run
    run_demo(tmp_path / "cut", resume=True, **tiny)
    again = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert _without_times(again) == _without_times(whole)


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_a_time_saving_is_given_with_its_interval_and_one_inside_its_noise_is_none():
    """Paired steps: a run slower or faster at random (the same work under a varying load) saves nothing beyond
    noise, however large its total; one faster at every step does."""
    from espo.app.demo import _time_saved, savings
    from espo.stats import paired_saving

    base = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    same_work = [4.0, 14.0, 5.0, 13.0, 4.5, 12.0]  # 13% "saved" in total
    saving, (lo, hi) = paired_saving(base, same_work)
    assert saving == pytest.approx(1 - 52.5 / 60) and lo < 0 < hi
    saving, (lo, hi) = paired_saving(base, [7.0, 7.5, 6.5, 7.2, 7.1, 6.9])
    assert saving == pytest.approx(1 - 42.2 / 60) and 0.25 < lo <= saving <= hi < 0.35
    assert paired_saving(base[:1], [5.0]) == (0.5, None)  # one pair: no interval

    def summary(times: list[float]) -> dict:
        return {"rollout_tokens": 100, "rollout_time_s": sum(times), "step_time_s": sum(times),
                "per_step": {"rollout_time_s": times, "step_time_s": times}}

    sv = savings(summary(base), summary(same_work))
    assert not sv["rollout_time_beyond_noise"] and _time_saved(sv, "rollout_time").startswith("none beyond noise")
    sv = savings(summary(base), summary([7.0, 7.5, 6.5, 7.2, 7.1, 6.9]))
    assert sv["step_time_beyond_noise"] and _time_saved(sv, "step_time").startswith("29.7% [")


def test_a_saving_over_too_few_pairs_says_so_and_the_headline_states_its_pool():
    from espo.app.demo import _time_saved, headline, savings
    from espo.stats import MIN_PAIRS, paired_saving

    four = [10.0, 10.0, 10.0, 10.0]
    assert paired_saving(four, [5.0, 5.0, 6.0, 5.0]) == (pytest.approx(0.475), None)  # 35 distinct resamples only

    def summary(times: list[float], slots: int) -> dict:
        return {"algo": "x", "slots": slots, "steps": len(times), "rollouts": 128 * len(times), "rollout_tokens": 100,
                "rollout_time_s": sum(times), "step_time_s": sum(times),
                "per_step": {"rollout_time_s": times, "step_time_s": times}}

    sv = savings(summary(four, 32), summary([5.0, 5.0, 6.0, 5.0], 32))
    assert _time_saved(sv, "step_time") == f"47.5% (no interval: 4 paired steps, fewer than {MIN_PAIRS})"
    full = headline({"ppo": summary(four, 32), "espo": summary([5.0] * 4, 32)})
    assert full.startswith("ESPO vs PPO (32 slots for 128 rollouts a step: a full pool): ")
    one_each = headline({"ppo": summary(four, 128), "espo": summary([5.0] * 4, 128)})
    assert "128 slots for 128 rollouts a step: every rollout has a slot from the start" in one_each
