"""The streamed ImageNet-style path (utils/streaming.py): class selection, subsets, device batches, a tiny attack run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NO_FIGURES, run_script
from utils.run.errors import UserError
from utils.data.streaming import StreamingSplit, resolve_classes

CLASSES = ["n003", "n001", "n004", "n002"]  # sorted: n001 n002 n003 n004


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    rng = np.random.default_rng(0)
    for split, per in (("train", 6), ("val", 2)):
        for c in CLASSES:
            d = root / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(per):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{c}_{i}.JPEG")
            (d / "notes.txt").write_text("not an image")
    return root


def test_first_n_sorted_classes_and_list_file(tree, tmp_path):
    assert resolve_classes(str(tree), 2) == ["n001", "n002"]
    f = tmp_path / "classes.txt"
    f.write_text("# mine\nn004\nn001\n")
    assert resolve_classes(str(tree), None, str(f)) == ["n004", "n001"]
    f.write_text("n004\nn999\n")
    with pytest.raises(UserError, match="missing"):
        resolve_classes(str(tree), None, str(f))
    with pytest.raises(UserError, match="has only 4 class folders"):
        resolve_classes(str(tree), 5)


def test_split_yields_device_batches_with_selected_labels(tree):
    s = StreamingSplit(str(tree), True, 32, 0, "cpu", ["n004", "n001"])
    assert len(s) == 12 and s.num_classes == 2 and sorted(set(s.y.tolist())) == [0, 1]
    seen = []
    for idx, x, y in s.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(s.y[idx], y)
        seen += idx.tolist()
    assert sorted(seen) == list(range(12))
    sub = StreamingSplit(str(tree), False, 32, 0, "cpu", ["n004", "n001"], keep=torch.tensor([0, 3]))
    assert len(sub) == 2 and [i for i, _, _ in sub.batches(8)][0].tolist() == [0, 1]


@pytest.mark.slow
def test_attack_runs_on_a_class_subset_and_records_the_classes(tree, tmp_path):
    out = tmp_path / "run"
    r = run_script("train_blend.py", "--dataset", "imagenet", "--data_root", str(tree), "--imagenet_classes", "3",
                   "--arch", "cnn", "--n_iters", "1", "--bs", "8", "--num_workers", "2", "--pc", "0.2",
                   "--device", "cpu", *NO_FIGURES, "--out_dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    args = json.loads((out / "args.json").read_text())
    assert args["num_classes"] == 3 and args["imagenet_class_names"] == ["n001", "n002", "n003"]
    ck = torch.load(out / "model.pt", weights_only=False)
    assert ck["num_classes"] == 3 and ck["state_dict"]["net.fc.weight"].shape[0] == 3


@pytest.mark.slow
def test_the_224px_path_runs_the_attack_and_every_defense_with_resnet18(tmp_path):
    """A generated ImageNet-style tree at 224 px: attack (resnet18, streamed), AFT, PBE and PUD end to end."""
    import PUD
    import pbe_main
    import train_blend
    from conftest import cli
    from utils.data.streaming import write_synthetic_folders

    names = write_synthetic_folders(str(tmp_path / "data"), num_classes=3, train_per_class=4, val_per_class=1)
    common = ("--device", "cpu", "--num_workers", "0", "--bs", "6", "--eval_bs", "6", "--eval_steps", "1",
              *NO_FIGURES)
    attack = tmp_path / "attack"
    assert cli(train_blend.main, "--dataset", "imagenet", "--data_root", tmp_path / "data", "--imagenet_classes", "3",
               "--trigger_type", "patch", "--pc", "0.2", "--n_iters", "1", *common, "--out_dir", attack) == 0
    ck = torch.load(attack / "model.pt", weights_only=False)
    assert ck["arch"] == "resnet18" and ck["input_size"] == [3, 224, 224] and ck["args"]["imagenet_class_names"] == names
    model = ("--model_path", attack / "model.pt", "--data_root", tmp_path / "data", *common)
    assert cli(pbe_main.main, *model, "--aft_epochs", "1", "--adv_epochs", "1", "--adv_steps", "1", "--extra_ratio", "0.5",
               "--out_dir", tmp_path / "aft") == 0
    assert cli(pbe_main.main, *model, "--progressive", "--rounds", "2", "--round_epochs", "1", "--top_rates", "0.5",
               "--adv_steps", "1", "--init_ratio", "0.3", "--target_images", "3", "--out_dir", tmp_path / "pbe") == 0
    assert cli(PUD.main, *model, "--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0",
               "--step_partial", "0", "0", "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6",
               "--step_pgd_steps", "1", "--top_rates", "0.5", "--init_ratio", "0.3", "--unlearn_epochs", "1",
               "--mt_epochs", "1", "--target_images", "3", "--spectre_min", "2", "--out_dir", tmp_path / "pud") == 0
    for d in ("aft", "pbe", "pud"):
        s = json.loads((tmp_path / d / "summary.json").read_text())
        assert {"clean_acc", "asr", "robust_acc"} <= set(s["final"]), d
