import json

import pytest
import torch

from dataloader import backdoor_from_checkpoint
from models import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.datasets import make_synthetic, seeded_subset
from utils.evaluation import evaluate


def test_tiny_attack_learns_the_backdoor_and_writes_every_output(infected_run):
    summary = json.loads((infected_run / "summary.json").read_text())
    final = summary["final"]
    assert final["clean_acc"] >= 0.8
    assert final["asr"] >= 0.9
    assert 0 <= final["asr_incl_target"] <= 1
    lines = (infected_run / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["epoch"] == 4
    for f in ("model.pt", "args.json", "curves.png", "samples.png"):
        assert (infected_run / f).stat().st_size > 0
    assert json.loads((infected_run / "args.json").read_text())["trigger_type"] == "patch"


def test_checkpoint_round_trips_and_re_evaluates_to_the_same_accuracy(infected_run):
    ck = load_checkpoint(str(infected_run / "model.pt"))
    assert ck["arch"] == "cnn" and ck["dataset"] == "synthetic" and ck["num_classes"] == 10
    assert ck["input_size"] == [3, 32, 32] and ck["attack_mode"] == "all2one" and ck["target_label"] == 0
    assert len(ck["poisoned_indices"]) == round(0.1 * 2000) and ck["seed"] == 0
    model = model_from_checkpoint(ck)
    backdoor = backdoor_from_checkpoint(ck)
    test = make_synthetic(1000, seed=2)
    test = test.subset(seeded_subset(1000, 500, ck["seed"] + 1))
    again = evaluate(model, test, backdoor)
    assert again["clean_acc"] == pytest.approx(ck["metrics"]["clean_acc"], abs=1e-9)
    assert again["asr"] == pytest.approx(ck["metrics"]["asr"], abs=1e-9)


def test_gtsrb_missing_offline_names_download_script(tmp_path, monkeypatch):
    import torchvision

    from utils.datasets import load_split
    from utils.errors import UserError

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.GTSRB, "__init__", offline)
    with pytest.raises(UserError, match="gtsrb_download.sh"):
        load_split("gtsrb", str(tmp_path), train=True)
