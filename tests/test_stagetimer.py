"""Stage timing: every second of a run charged to one stage, the stages adding up to the run's wall time."""
import json
import time

import pytest

import PUD
import pbe_main
from benchmarks.bench_defense import TINY_DEFENSES
from conftest import cli
from utils.run.stagetimer import TRAINING_STAGES, StageTimer, activate, stage

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_nested_stages_are_charged_once_and_resume_from_saved_seconds():
    clock = Clock()
    timer = StageTimer(clock=clock)
    with timer.stage("train"):
        clock.t += 2
        with timer.stage("train_pgd"):
            clock.t += 3
            with timer.stage("train_pgd"):  # the same name nested: still once
                clock.t += 1
        clock.t += 4
    clock.t += 5  # outside every stage
    rec = timer.record(wall=clock.t)
    assert rec["seconds"] == {"train": 6.0, "train_pgd": 4.0}
    assert rec["unattributed"] == 5.0 and rec["training_share"] == pytest.approx(10 / 15, abs=1e-4)
    resumed = StageTimer(dict(timer.seconds), clock=clock)  # what state.pt carries
    with resumed.stage("train"):
        clock.t += 1
    assert resumed.seconds == {"train": 7.0, "train_pgd": 4.0}


def test_stage_without_an_active_timer_does_nothing():
    prev = activate(None)
    try:
        with stage("scoring"):
            pass
    finally:
        activate(prev)


MAINS = {"pbe_main.py": pbe_main.main, "PUD.py": PUD.main}
EXPECTED = {"aft": {"train", "train_pgd", "eval_clean", "eval_robust", "saving", "figures"},
            "pbe": {"target_estimate", "filtering", "train", "train_pgd", "scoring", "eval_clean", "eval_robust"},
            "pud": {"target_estimate", "filtering", "train", "train_pgd", "scoring", "eval_clean", "eval_robust",
                    "unlearning", "mean_teacher", "saving"}}


@pytest.mark.parametrize("name", sorted(TINY_DEFENSES))
def test_the_stage_seconds_of_a_defense_add_up_to_its_wall_time(tiny_attack_run, tmp_path, name):
    script, *flags = TINY_DEFENSES[name]  # the defense benchmark's --tiny runs
    t = time.time()
    assert cli(MAINS[script], "--model_path", tiny_attack_run / "model.pt", "--out_dir", tmp_path / name, "--device",
               "cpu", *flags) == 0
    outside = time.time() - t  # the run's wall time lies inside this
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["amp"]["amp"] in ("bf16", "off") and summary["amp"]["why"]  # the --amp decision, recorded
    st = summary["stages"]
    assert EXPECTED[name] <= set(st["seconds"]) and all(v >= 0 for v in st["seconds"].values())
    total = sum(st["seconds"].values())
    assert st["wall"] <= outside + 0.01
    assert total <= st["wall"] + 0.01, st  # nothing charged twice
    # nothing large left out: set-up and logging lines only
    assert st["unattributed"] <= 0.1 * st["wall"] + 0.5, st
    train = sum(st["seconds"].get(k, 0.0) for k in TRAINING_STAGES)
    assert st["training_share"] == pytest.approx(train / st["wall"], abs=1e-3)
