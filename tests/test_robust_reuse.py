"""A defense takes the infected model's robust accuracy from its attack run when nothing it depends on differs."""
import json

import pytest
import torch

import pbe_main
from conftest import NO_FIGURES, cli

pytestmark = pytest.mark.usefixtures("one_thread")

AFT = ("--aft_epochs", "1", "--adv_epochs", "1", "--extra_ratio", "0.2", "--test_subset", "100", "--device", "cpu",
       *NO_FIGURES)


def test_the_attack_reports_robust_accuracy_and_the_defense_reuses_it(tiny_attack_run, tmp_path):
    metrics = torch.load(tiny_attack_run / "model.pt", weights_only=False)["metrics"]
    assert 0 <= metrics["robust_acc"] <= 1 and len(metrics["robust_eval"]["key"]) == 64
    assert cli(pbe_main.main, "--model_path", tiny_attack_run / "model.pt", "--out_dir", tmp_path / "same", *AFT) == 0
    same = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert same["initial"]["robust_acc"] == metrics["robust_acc"]
    assert same["initial_robust_eval"]["reused"] is True
    # --no-figures: no figure drawn, no figures stage timed; the run's other files are there
    assert not list((tmp_path / "same").glob("*.png")) and "figures" not in same["stages"]["seconds"]
    assert (tmp_path / "same" / "model.pt").exists()
    # another PGD strength: the attack's figure does not apply, the defense attacks the model itself
    assert cli(pbe_main.main, "--model_path", tiny_attack_run / "model.pt", "--out_dir", tmp_path / "other", *AFT,
               "--eval_steps", "2") == 0
    other = json.loads((tmp_path / "other" / "summary.json").read_text())
    assert "reused" not in other["initial_robust_eval"] and other["initial_robust_eval"]["steps"] == 2
