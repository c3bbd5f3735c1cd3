"""Defending a model and data the toolkit did not make: state dicts, tensor files, image folders, BackdoorBench.

A model trained here is exported as other code would hand it over (a bare state dict, the poisoned training set
as a tensor file and as an image folder, the ground-truth indices, a clean and a triggered test set); the
external path must then give exactly the native path's result. Every file is written by the test itself.
"""
import csv
import json
import os

import pytest
import torch
from PIL import Image

import PUD
import pbe_main
import train_blend
import utils.data.external as ext
from conftest import NO_FIGURES, TINY_ATTACK, built_once, cli
from test_external import Payload, foreign_preact, write_attack_result
from models import build_model
from utils.data.build import (DataSource, backdoor_from_checkpoint, data_from_checkpoint, load_data,
                              poisoned_train_from_checkpoint)
from utils.data.datasets import ImageSet
from utils.defenses.infected import DefenseInput, load_infected, read_infected
from utils.defenses.selection import suspect_scores
from utils.evaluation import evaluate
from utils.run.checkpoint import load_checkpoint
from models.speed import SpeedSettings

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACK = (*TINY_ATTACK, "--n_iters", "6", "--schedulerC_milestones", "5")
TEST_N = 100  # the test subset every run here evaluates on
PUD_TINY = ("--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0", "0",
            "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6", "--step_pgd_steps", "2", "--top_rates", "0.5",
            "--spectre_min", "5", "--unlearn_epochs", "1", "--mt_epochs", "1", "--target_images", "100",
            "--test_subset", str(TEST_N), "--eval_steps", "1", "--device", "cpu", *NO_FIGURES)
AFT_TINY = ("--aft_epochs", "2", "--adv_epochs", "1", "--extra_ratio", "0.2", "--test_subset", str(TEST_N),
            "--eval_steps", "1", "--device", "cpu", *NO_FIGURES)


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    """A patch-infected CNN on 300 synthetic images (6 epochs), trained once a session for every worker."""
    return built_once(tmp_path_factory, "external_attack", _train_attack)


def _train_attack(out):
    assert cli(train_blend.main, *ATTACK, "--out_dir", out) == 0


def export(model_pt, out) -> dict:
    """The attack's model and data as other code would hand them over; returns the paths."""
    ck = load_checkpoint(str(model_pt))
    data = data_from_checkpoint(ck, DataSource(test_subset=TEST_N))
    train, test, _ = load_data(data, ck["args"]["seed"], "cpu", train_indices=ck["train_indices"])
    backdoor = backdoor_from_checkpoint(ck)
    poisoned = poisoned_train_from_checkpoint(ck, train, backdoor)
    x, y = poisoned.poison(torch.arange(len(train)), train.x.float() / 255, train.y)  # as the model was trained on
    x = (x * 255).round().to(torch.uint8)
    p = {k: str(out / f) for k, f in (("weights", "weights.pt"), ("train", "train.pt"), ("dir", "train_dir"),
                                      ("truth", "poisoned.txt"), ("test", "test.pt"), ("test_bd", "test_bd.pt"))}
    torch.save(ck["state_dict"], p["weights"])
    torch.save({"x": x, "y": y}, p["train"])
    for i in range(len(y)):  # <label>/<index>.png: the stems keep the training order
        os.makedirs(os.path.join(p["dir"], str(int(y[i]))), exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(os.path.join(p["dir"], str(int(y[i])), f"{i}.png"))
    with open(p["truth"], "w") as f:
        f.write("".join(f"{i}\n" for i in ck["poisoned_indices"].tolist()))
    torch.save({"x": test.x.permute(0, 2, 3, 1).contiguous(), "y": test.y}, p["test"])  # NHWC, as numpy code keeps it
    yb = backdoor.labels(test.y)
    keep = test.y != yb  # ASR's denominator: images whose label is not already the backdoor label
    torch.save({"x": (backdoor.trigger(test.x[keep].float() / 255) * 255).round().to(torch.uint8), "y": yb[keep]},
               p["test_bd"])
    return p


@pytest.fixture(scope="module")
def exported(attack, tmp_path_factory):
    return export(attack / "model.pt", tmp_path_factory.mktemp("exported"))


def files_args(p, train="train"):
    return ("--model_path", p["weights"], "--train_data", p[train], "--test_data", p["test"], "--test_bd_data",
            p["test_bd"], "--poison_indices", p["truth"], "--arch", "cnn", "--num_classes", "10")


# ----- fast: the external source reads back what the native path builds ------------------------------------

def test_the_exported_files_read_back_as_the_native_run(attack, exported):
    """Same weights, same training batches (images as floats, labels), same ground truth, same test images; and
    ASR from the triggered test set equals ASR from the trigger."""
    native_inp = DefenseInput(model_path=str(attack / "model.pt"))
    src = DataSource(test_subset=TEST_N)
    speed = SpeedSettings(channels_last="off")
    nat = load_infected(read_infected(native_inp, src), src, speed, torch.device("cpu"))
    for train in ("train", "dir"):
        inp = DefenseInput(**dict(zip(("model_path", "train_data", "test_data", "test_bd_data", "poison_indices"),
                                      (exported["weights"], exported[train], exported["test"], exported["test_bd"],
                                       exported["truth"]))), arch="cnn", num_classes=10)
        inp.check()
        ext_run = load_infected(read_infected(inp, src), src, speed, torch.device("cpu"))
        for k, v in nat.model.state_dict().items():
            assert torch.equal(v, ext_run.model.state_dict()[k]), k
        (i1, x1, y1), = nat.poisoned.batches(1000, shuffle=False)
        (i2, x2, y2), = ext_run.poisoned.batches(1000, shuffle=False)
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(nat.truth, ext_run.truth) and ext_run.true_target == nat.true_target == 0
        assert torch.equal(nat.test.x, ext_run.test.x) and torch.equal(nat.test.y, ext_run.test.y)
        a = evaluate(nat.model, nat.test, nat.backdoor)
        b = evaluate(ext_run.model, ext_run.test, None, triggered=ext_run.test_bd)
        assert a["clean_acc"] == b["clean_acc"] and a["asr"] == b["asr"] and set(b) == {"clean_acc", "asr"}
    assert ext_run.paths[5].endswith(os.path.join(str(int(y1[5])), "5.png"))


def test_kuangliu_weights_and_a_folder_of_other_sizes_load_without_edits(tmp_path):
    """A kuangliu-style {'net': DataParallel state dict} PreActResNet18 with BackdoorBench's CIFAR-10 normalisation
    from --dataset, a folder of 36x36 images resized by --image_size, a test subset."""
    torch.manual_seed(0)
    ours = build_model("preactresnet18", 10, 3, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    torch.save({"net": foreign_preact(ours, "module."), "acc": 93.0, "epoch": 10}, tmp_path / "ckpt.pth")
    g = torch.Generator().manual_seed(1)
    for i in range(12):
        os.makedirs(tmp_path / "train" / f"class_{i % 3}", exist_ok=True)
        img = torch.randint(0, 256, (36, 36, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(img).save(tmp_path / "train" / f"class_{i % 3}" / f"img{i}.png")
    torch.save({"x": torch.zeros(30, 3, 32, 32, dtype=torch.uint8), "y": torch.arange(30) % 3}, tmp_path / "test.pt")
    inp = DefenseInput(model_path=str(tmp_path / "ckpt.pth"), train_data=str(tmp_path / "train"),
                       test_data=str(tmp_path / "test.pt"), dataset="cifar10", image_size=32)
    inp.check()
    src = DataSource(test_subset=10)
    source = read_infected(inp, src)
    run = load_infected(source, src, SpeedSettings(channels_last="off"), torch.device("cpu"))
    assert inp.resolve(source).input_shape == (3, 32, 32) and run.meta["arch"] == "preactresnet18"
    for k, v in ours.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k
    assert run.poisoned.data.x.shape == (12, 3, 32, 32) and run.poisoned.data.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(run.test) == 10 and run.truth is None and run.backdoor is None and run.augment.flip  # cifar10's
    assert set(run.not_measurable()) == {"asr", "detection"}


def test_suspects_rank_agreeing_stages_first_then_the_most_changed():
    consistency = torch.tensor([1.0, -0.5, 0.9, 0.2, 1.0, 0.6])
    order, scores, members = suspect_scores({"a": torch.tensor([1, 2, 3]), "b": torch.tensor([3, 5]),
                                             "c": None}, consistency)
    # weights: a 1/3 of its flags confirmed by b, b 1/2; 3: both stages; then 1 (prediction changed), 5, 2
    assert order.tolist() == [3, 1, 5, 2]
    assert scores.tolist() == pytest.approx([1 / 3 + 1 / 2 + 0.25 * 0.8 / 1.5, 1 / 3 + 0.25, 1 / 2 + 0.25 * 0.4 / 1.5,
                                             1 / 3 + 0.25 * 0.1 / 1.5])
    lone, _, _ = suspect_scores({"a": torch.tensor([1, 2])}, consistency)  # a lone stage weighs 1: movement orders
    assert lone.tolist() == [1, 2]
    assert members == {"a": {1, 2, 3}, "b": {3, 5}}


MALICIOUS_FLAGS = ("--model_path", "--train_data", "--test_data", "--test_bd_data", "--poison_indices",
                   "--extra_data", "--from_backdoorbench")


@pytest.mark.parametrize("flag", MALICIOUS_FLAGS)
def test_a_malicious_file_in_any_external_format_is_refused_unrun(exported, tmp_path, capsys, flag):
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "y": torch.zeros(2, dtype=torch.long),
                "state_dict": {"w": torch.zeros(1)}, "hook": Payload(marker)}, evil)
    argv = [*files_args(exported), "--device", "cpu"]
    if flag == "--from_backdoorbench":
        argv = [flag, str(evil), "--device", "cpu"]
    elif flag in argv:
        argv[argv.index(flag) + 1] = str(evil)
    else:
        argv += [flag, str(evil)]
    out = tmp_path / "out"
    assert cli(pbe_main.main, *argv, "--out_dir", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds pickled Python objects (io.open)" in err[0], err
    assert not marker.exists() and not out.exists()


def test_a_whole_pickled_module_needs_the_opt_in(exported, attack, tmp_path, capsys):
    whole = tmp_path / "module.pt"
    model = build_model("cnn", 10)
    model.load_state_dict(load_checkpoint(str(attack / "model.pt"))["state_dict"])
    torch.save(model, whole)
    argv = [*files_args(exported), "--device", "cpu", "--out_dir", tmp_path / "out"]
    argv[argv.index("--model_path") + 1] = whole
    assert cli(PUD.main, *argv) == 2
    assert "--allow_pickle" in capsys.readouterr().err


# ----- slow: whole defenses through the external path ------------------------------------------------------

def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def summary(out):
    return json.loads((out / "summary.json").read_text())


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = ("clean_acc", "asr", "robust_acc")


def assert_same_defense(native, external):
    """The same flagged samples (suspects.csv but the path column), the same final and per-epoch figures."""
    a, b = read_csv(native / "suspects.csv"), read_csv(external / "suspects.csv")
    assert a and [{k: r[k] for k in r if k != "path"} for r in a] == [{k: r[k] for k in r if k != "path"} for r in b]
    sa, sb = summary(native), summary(external)
    for part in ("initial", "final"):
        assert {k: sa[part][k] for k in COMMON} == {k: sb[part][k] for k in COMMON}
    assert sa["suspects"] == sb["suspects"]
    ra, rb = records(native), records(external)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in set(x) & set(y):
            if k in ("step_summary", "round_summary"):
                continue
            assert x[k] == y[k], k


@pytest.mark.slow
def test_pud_on_exported_files_equals_the_native_run(attack, exported, tmp_path):
    runs = {}
    for name, argv in (("native", ("--model_path", attack / "model.pt")), ("tensor", files_args(exported)),
                       ("folder", files_args(exported, "dir"))):
        runs[name] = tmp_path / name
        assert cli(PUD.main, *argv, *PUD_TINY, "--out_dir", runs[name]) == 0
    for name in ("tensor", "folder"):
        assert_same_defense(runs["native"], runs[name])
        s, n = summary(runs[name]), summary(runs["native"])
        assert s["target"] == n["target"] and s["steps"] == n["steps"]
        assert {k: v for k, v in s["spectre_initial"].items()} == n["spectre_initial"]
        assert s["input"]["origin"] == "files" and s["not_measurable"] == {}
    rows = read_csv(runs["folder"] / "suspects.csv")
    assert all(r["path"].endswith(f"{r['index']}.png") for r in rows)
    ck = load_checkpoint(str(runs["tensor"] / "model.pt"))  # the defended model is a toolkit checkpoint
    assert ck["trigger"] is None and ck["external"]["train"] == exported["train"] and ck["arch"] == "cnn"


@pytest.mark.slow
def test_aft_and_pbe_on_exported_files_equal_the_native_runs(attack, exported, tmp_path):
    for script, extra in ((pbe_main.main, AFT_TINY),
                          (pbe_main.main, ("--progressive", "--rounds", "2", "--round_epochs", "1", "--top_rates", "0.5",
                                           "--target_images", "100", "--test_subset", str(TEST_N), "--eval_steps", "1",
                                           "--device", "cpu"))):
        native, external = tmp_path / f"n{len(extra)}", tmp_path / f"e{len(extra)}"
        assert cli(script, "--model_path", attack / "model.pt", *extra, "--out_dir", native) == 0
        assert cli(script, *files_args(exported), *extra, "--out_dir", external) == 0
        if "--progressive" in extra:
            assert_same_defense(native, external)
            assert summary(native)["rounds"] == summary(external)["rounds"]
        else:  # AFT flags nothing: no suspects.csv
            assert not (native / "suspects.csv").exists() and not (external / "suspects.csv").exists()
            for part in ("initial", "final"):
                assert {k: summary(native)[part][k] for k in COMMON} == {k: summary(external)[part][k] for k in COMMON}
    # the model-repair setting with a clean set of the defender's own (here: the clean test images), used whole
    own = tmp_path / "own"
    assert cli(pbe_main.main, *files_args(exported), *AFT_TINY, "--extra_data", exported["test"], "--out_dir", own) == 0
    s = summary(own)["settings"]
    assert (s["extra_size"], s["extra_data"], s["extra_ratio"]) == (TEST_N, exported["test"], None)


@pytest.mark.slow
def test_without_ground_truth_or_triggered_test_set_the_run_says_what_it_cannot_measure(exported, tmp_path, capsys):
    out = tmp_path / "pud"
    argv = ("--model_path", exported["weights"], "--train_data", exported["dir"], "--test_data", exported["test"],
            "--arch", "cnn", "--num_classes", "10")
    assert cli(PUD.main, *argv, *PUD_TINY, "--out_dir", out) == 0
    log = capsys.readouterr().out
    assert "note: ASR is not measurable" in log and "note: poison detection is not measurable" in log
    s = summary(out)
    assert set(s["not_measurable"]) == {"asr", "detection"}
    assert set(s["final"]) == {"clean_acc", "robust_acc", "per_class_acc"}  # test labels give each class's accuracy
    assert s["target_class"] is None  # no trigger and no triggered test set: no target class to name
    assert s["suspects"]["precision"] is None and s["steps"][0]["poison_precision"] is None
    assert read_csv(out / "suspects.csv")


# ----- BackdoorBench ----------------------------------------------------------------------------------------

BB_TRAIN, BB_TEST = 40, 20


@pytest.fixture
def backdoorbench(tmp_path, monkeypatch):
    """A synthetic attack_result.pt in BackdoorBench v2's layout (PNG poisons beside it), a random PreActResNet18,
    and the clean 'CIFAR-10' it names served without torchvision."""
    g = torch.Generator().manual_seed(4)
    train = ImageSet(torch.randint(0, 256, (BB_TRAIN, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.arange(BB_TRAIN) % 10, 10)
    test = ImageSet(torch.randint(0, 256, (BB_TEST, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(BB_TEST) % 10, 10)
    torch.manual_seed(0)
    f, test_idx = write_attack_result(tmp_path / "badnet_0_1", (train, test), build_model("preactresnet18", 10),
                                      on_disk=True)

    def load_split(name, root, is_train, download=True):
        s = train if is_train else test
        return ImageSet(s.x.clone(), s.y.clone(), 10)

    monkeypatch.setattr(ext, "load_split", load_split)
    return f, test_idx


BB_PUD = ("--steps", "1", "--step_epochs", "1", "--step_adv_epochs", "1", "--step_partial", "0", "--step_eps",
          "4/255", "--step_alpha_div", "5", "--step_pgd_steps", "1", "--top_rates", "--spectre_min", "5",
          "--unlearn_epochs", "1", "--mt_epochs", "1", "--target_images", "20", "--eval_steps", "1", "--bs", "32",
          "--device", "cpu", *NO_FIGURES)


@pytest.mark.slow
def test_a_backdoorbench_result_runs_through_pud_and_aft(backdoorbench, tmp_path):
    f, test_idx = backdoorbench
    out = tmp_path / "pud"
    assert cli(PUD.main, "--from_backdoorbench", f, *BB_PUD, "--out_dir", out) == 0
    s = summary(out)
    assert s["input"] == {"origin": "backdoorbench", "files": {"backdoorbench": str(f), "data_root": "./data"}}
    assert s["not_measurable"] == {} and {"clean_acc", "asr", "robust_acc"} <= set(s["final"])
    assert s["target"]["true"] == 0 and s["steps"][0]["poison_precision"] is not None
    assert read_csv(out / "suspects.csv")
    aft = tmp_path / "aft"
    assert cli(pbe_main.main, "--from_backdoorbench", f, "--aft_epochs", "1", "--adv_epochs", "1", "--extra_ratio",
               "0.2", "--eval_steps", "1", "--bs", "32", "--device", "cpu", "--out_dir", aft) == 0
    assert summary(aft)["settings"]["extra_size"] == 8 and "asr" in summary(aft)["final"]
