import json

import pytest
import torch

from conftest import run_script
from utils.defense import bottom_fraction, consistency_scores, detection_stats, top_fraction

FAST = ("--test_subset", "200", "--eval_steps", "2", "--device", "cpu")


def test_aft_runs_from_the_checkpoint_alone_and_writes_its_outputs(infected_run, tmp_path):
    out = tmp_path / "aft"
    r = run_script("pbe_main.py", "--model_path", str(infected_run / "model.pt"), "--aft_epochs", "2", "--adv_epochs", "1",
                   "--extra_ratio", "0.1", "--out_dir", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["defense"] == "aft" and s["settings"]["extra_size"] == 200
    for part in ("initial", "final"):
        assert {"clean_acc", "asr", "asr_incl_target", "robust_acc"} <= set(s[part])
    assert s["robust_eval"]["steps"] == 2 and s["robust_eval"]["eps"] == pytest.approx(8 / 255)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["adversarial"] for r in recs] == [True, False]
    assert (out / "model.pt").exists() and (out / "curves.png").exists()


def test_aft_patch_shaped_examples_are_used_and_recorded(infected_run, tmp_path):
    """--adv_window / --adv_eps_outside reach the fine-tuning PGD and are stored with the run's settings."""
    out = tmp_path / "aft-window"
    r = run_script("pbe_main.py", "--model_path", str(infected_run / "model.pt"), "--aft_epochs", "1", "--adv_epochs", "1",
                   "--adv_window", "5", "--adv_eps", "1", "--adv_alpha", "1/4", "--adv_random_start",
                   "--adv_eps_outside", "6/255", "--out_dir", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    pgd = json.loads((out / "summary.json").read_text())["settings"]["pgd"]
    assert (pgd["window"], pgd["eps"], pgd["alpha"], pgd["random_start"]) == (5, 1.0, 0.25, True)
    assert pgd["eps_outside"] == pytest.approx(6 / 255)


def test_progressive_pbe_reports_rounds(infected_run, tmp_path):
    out = tmp_path / "pbe"
    r = run_script("pbe_main.py", "--model_path", str(infected_run / "model.pt"), "--progressive", "--rounds", "2",
                   "--round_epochs", "1", "--top_rates", "0.5", "--out_dir", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert len(s["rounds"]) == 2 and s["rounds"][0]["next_extra_size"] == 1000
    for rd in s["rounds"]:
        assert 0 <= rd["extra_poison_share"] <= 1 and 0 <= rd["detect_precision"] <= 1


def test_consistency_scores_and_selection():
    ref = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    cur = torch.tensor([[5.0, 0, 0], [0, 4.0, 1.0], [0, 5.0, 0]])
    s = consistency_scores(ref, cur)
    assert s[0] == pytest.approx(1.0) and s[2] == pytest.approx(0.5) and s[0] > s[1] > s[2]
    pen = consistency_scores(ref, cur, argmax_penalty=True)
    assert pen[2] == pytest.approx(0.0) and pen[1] == pytest.approx(s[1])
    assert top_fraction(s, 1 / 3).tolist() == [0] and bottom_fraction(s, 1 / 3).tolist() == [2]
    det = detection_stats(torch.tensor([2, 1]), torch.tensor([False, False, True, False]))
    assert det["precision"] == 0.5 and det["recall"] == 1.0 and det["fpr"] == pytest.approx(1 / 3)
