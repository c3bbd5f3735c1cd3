"""The defenses' evaluation schedule (--eval_every): fewer evaluations, the same training and the same late ASR."""
import json

import pytest
import torch

import pbe_main
import train_blend
from conftest import NO_FIGURES, TINY_ATTACK, cli
from utils.defenses.session import EvalSchedule, late_asr

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_schedule_keeps_every_epoch_of_the_last_quarter_and_each_stage_end():
    every5 = EvalSchedule(eval_every=5)
    assert [e for e in range(1, 21) if every5.due(e, 20)] == [5, 10, 15, 16, 17, 18, 19, 20]
    assert every5.due(3, 20, stage_end=True) and not every5.due(3, 20)
    assert all(EvalSchedule(eval_every=1).due(e, 7) for e in range(1, 8))
    assert [e for e in range(1, 4) if EvalSchedule(eval_every=100).due(e, 3)] == [3]  # at least the last epoch


def test_late_asr_reads_the_last_quarter_of_the_epochs_not_of_the_evaluations():
    full = [{"epoch": e, "asr": a} for e, a in enumerate([0.9, 0.5, 0.1, 0.0, 0.0, 0.3, 0.2, 0.1], 1)]
    sparse = [r if r["epoch"] % 4 == 0 or r["epoch"] > 6 else {"epoch": r["epoch"]} for r in full]
    assert late_asr(full) == {"asr_late_max": 0.2, "asr_late_epochs": 2}
    assert late_asr(sparse) == late_asr(full)  # epoch 4's evaluation is not part of the last quarter


def test_evaluating_less_often_leaves_the_defense_unchanged(tmp_path):
    """WaNet: its noise images draw random numbers; they come from their own generator, not the run's."""
    attack = tmp_path / "attack"
    argv = [a if a != "patch" else "warp" for a in TINY_ATTACK]
    assert cli(train_blend.main, *argv, "--n_iters", "1", "--no-eval_robust", "--out_dir", attack) == 0
    runs = {}
    for every in (1, 100):
        out = tmp_path / f"every{every}"
        assert cli(pbe_main.main, "--model_path", attack / "model.pt", "--aft_epochs", "8", "--adv_epochs", "2",
                   "--extra_ratio", "0.2", "--test_subset", "100", "--eval_steps", "1", "--device", "cpu",
                   "--eval_every", str(every), *NO_FIGURES, "--out_dir", out) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[every] = (torch.load(out / "model.pt", weights_only=False)["state_dict"],
                       json.loads((out / "summary.json").read_text()),
                       [r["epoch"] for r in records if "epoch" in r and "noise_acc" in r])
    dense, sparse = runs[1], runs[100]
    assert dense[2] == list(range(1, 9)) and sparse[2] == [7, 8]  # the last quarter of 8 epochs
    assert all(torch.equal(dense[0][k], sparse[0][k]) for k in dense[0])  # the same training, bit for bit
    for key in ("asr_late_max", "asr_late_epochs"):
        assert dense[1][key] == sparse[1][key]
    assert dense[1]["final"] == sparse[1]["final"]
    # the thread count a run computed with is on record (float sums in another order give another result)
    attack_summary = json.loads((attack / "summary.json").read_text())
    assert attack_summary["torch_threads"] == dense[1]["torch_threads"] == torch.get_num_threads()
