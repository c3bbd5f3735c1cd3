import json
import os

import pytest
import torch

from conftest import run_script
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


def _bad(tmp_path, *extra):
    out = tmp_path / "out"
    r = run_script("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--n_iters", "1",
                   "--train_subset", "100", "--test_subset", "50", "--out_dir", str(out), *extra)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists(), "a failed run must write nothing"
    return err


@pytest.mark.parametrize("extra, message", [
    (("--dataset", "svhn"), "unknown dataset 'svhn'"),
    (("--trigger_type", "laser"), "unknown trigger 'laser'"),
    (("--arch", "vgg99"), "unknown arch 'vgg99'"),
    (("--attack_mode", "some2some"), "unknown attack mode"),
    (("--pc", "0"), "--pc must be in (0, 1)"),
    (("--pc", "1.5"), "--pc must be in (0, 1)"),
    (("--target_label", "10"), "--target_label 10 is not a class"),
    (("--blend_image", "/nonexistent/kitty.png"), "--blend_image"),
    (("--pc", "abc"), "not a number"),
    (("--poison_mode", "sometimes"), "--poison_mode"),
])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, extra, message):
    assert message in _bad(tmp_path, *extra)


def test_unreadable_blend_image(tmp_path):
    bad = tmp_path / "kitty.png"
    bad.write_text("this is not an image")
    assert "cannot read --blend_image" in _bad(tmp_path, "--trigger_type", "blend", "--blend_image", str(bad))


def test_missing_data_folder_offline_names_the_folder(tmp_path):
    missing = tmp_path / "nodata"
    err = _bad(tmp_path, "--dataset", "cifar10", "--data_root", str(missing), "--download", "never")
    assert str(missing) in err


def test_gtsrb_missing_offline_names_download_script(tmp_path, monkeypatch):
    import torchvision

    from utils.datasets import load_split
    from utils.errors import UserError

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.GTSRB, "__init__", offline)
    with pytest.raises(UserError, match="gtsrb_download.sh"):
        load_split("gtsrb", str(tmp_path), train=True)


def test_finished_run_is_not_overwritten(infected_run):
    before = (infected_run / "model.pt").stat().st_mtime
    r = run_script("train_blend.py", "--dataset", "synthetic", "--arch", "cnn", "--n_iters", "1",
                   "--train_subset", "100", "--out_dir", str(infected_run))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (infected_run / "model.pt").stat().st_mtime == before
