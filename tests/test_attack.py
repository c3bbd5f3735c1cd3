import json

import pytest
import torch

from dataloader import backdoor_from_checkpoint
from models import model_from_checkpoint
from models.speed import SpeedSettings, prepare_model
from conftest import TINY_ATTACK, cli
from utils.run.checkpoint import load_checkpoint
from utils.data.datasets import make_synthetic, seeded_subset
from utils.evaluation import evaluate
from utils.run.describe import attack_label


@pytest.mark.slow
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


@pytest.mark.slow
def test_checkpoint_round_trips_and_re_evaluates_to_the_same_accuracy(infected_run):
    ck = load_checkpoint(str(infected_run / "model.pt"))
    assert ck["arch"] == "cnn" and ck["dataset"] == "synthetic" and ck["num_classes"] == 10
    assert ck["input_size"] == [3, 32, 32] and ck["attack_mode"] == "all2one" and ck["target_label"] == 0
    assert len(ck["poisoned_indices"]) == round(0.1 * 2000) and ck["seed"] == 0
    # the run's own evaluation set-up (the default channels_last and --amp auto): bf16 logits on a CPU with native
    # bf16 differ from fp32 ones on a few borderline images, so an fp32 re-evaluation need not match
    model = prepare_model(model_from_checkpoint(ck), SpeedSettings(), torch.device("cpu"))
    backdoor = backdoor_from_checkpoint(ck)
    test = make_synthetic(1000, seed=2)
    test = test.subset(seeded_subset(1000, 500, ck["seed"] + 1))
    again = evaluate(model, test, backdoor, channels_last=SpeedSettings().use_channels_last)
    assert again["clean_acc"] == pytest.approx(ck["metrics"]["clean_acc"], abs=1e-9)
    assert again["asr"] == pytest.approx(ck["metrics"]["asr"], abs=1e-9)


def test_pc_0_trains_a_clean_model_that_keeps_the_trigger_and_reports_its_asr(tmp_path):
    # the grid's clean-model row: what the trigger does to a model that never saw a poisoned image
    import train_blend

    out = tmp_path / "clean"
    assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "1", "--pc", "0", "--no-eval_robust", "--out_dir", out) == 0
    ck = load_checkpoint(str(out / "model.pt"))
    assert len(ck["poisoned_indices"]) == 0 and ck["args"]["pc"] == 0
    assert backdoor_from_checkpoint(ck).trigger.name == "patch"
    final = json.loads((out / "summary.json").read_text())["final"]
    assert 0 <= final["asr"] <= 1 and final["clean_acc"] > 0
    assert attack_label(json.loads((out / "args.json").read_text())) == "patch all2one (no poisoned image)"


@pytest.mark.slow
def test_a_clean_model_is_the_same_for_every_trigger_and_is_reused_instead_of_trained_again(tmp_path, capsys):
    # the grid's clean-model rows share one training per schedule: the weights of a --pc 0 run must not depend
    # on the trigger, and --clean_model_from scores them with another trigger as that trigger's own run would
    import train_blend

    clean = ("--train_subset", "1000", "--n_iters", "2", "--pc", "0")
    warp = ("--trigger_type", "warp", "--attack_mode", "all2all")
    patch, other = tmp_path / "patch", tmp_path / "warp"
    assert cli(train_blend.main, *TINY_ATTACK, *clean, "--out_dir", patch) == 0
    assert cli(train_blend.main, *TINY_ATTACK, *clean, *warp, "--out_dir", other) == 0
    a, b = (load_checkpoint(str(d / "model.pt"))["state_dict"] for d in (patch, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    reused = tmp_path / "reused"
    assert cli(train_blend.main, *TINY_ATTACK, *clean, *warp, "--clean_model_from", patch / "model.pt",
               "--figures", "--out_dir", reused) == 0
    s, trained = (json.loads((d / "summary.json").read_text()) for d in (reused, other))
    assert s["clean_model_from"] == str(patch / "model.pt") and "clean_model_from" not in trained
    # the trained run's figures (warp's ASR and noise-mode accuracy, RA); no training loss: no training; the PGD
    # figure is the clean model's own (the same weights, images and settings), not attacked again
    assert {k: v for k, v in s["final"].items() if k != "robust_eval"} == {
        k: v for k, v in trained["final"].items() if k not in ("loss", "robust_eval")}
    assert s["final"]["robust_eval"]["reused"]
    assert trained["final"]["clean_acc"] > 0.3  # (a model that learnt something: 10 classes)
    ck = load_checkpoint(str(reused / "model.pt"))
    assert backdoor_from_checkpoint(ck).trigger.name == "warp" and ck["attack_mode"] == "all2all"
    assert all(torch.equal(ck["state_dict"][k], a[k]) for k in a)
    assert (reused / "curves.png").stat().st_size > 0
    # a model trained otherwise, or a run that would poison, is refused with the reason
    capsys.readouterr()
    assert cli(train_blend.main, *TINY_ATTACK, *clean, "--n_iters", "3", "--clean_model_from", patch / "model.pt",
               "--out_dir", tmp_path / "longer") == 2
    assert "--n_iters 3 (the run used 2)" in capsys.readouterr().err
    assert cli(train_blend.main, *TINY_ATTACK, *clean, "--pc", "0.1", "--clean_model_from", patch / "model.pt",
               "--out_dir", tmp_path / "poisoned") == 2
    assert "needs --pc 0" in capsys.readouterr().err


def test_gtsrb_missing_offline_names_download_script(tmp_path, monkeypatch):
    import torchvision

    from utils.data.datasets import load_split
    from utils.run.errors import UserError

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.GTSRB, "__init__", offline)
    with pytest.raises(UserError, match="gtsrb_download.sh"):
        load_split("gtsrb", str(tmp_path), train=True)


class _FixedClassifier(torch.nn.Module):
    """Predicts the true class of the (single, in-order) test batch, trigger or not, except never ``never``."""

    def __init__(self, labels: torch.Tensor, never: int, instead: int, n_classes: int = 10):
        super().__init__()
        self.labels, self.never, self.instead, self.n = labels, never, instead, n_classes

    def forward(self, x):
        y = self.labels[:len(x)]
        y = torch.where(y == self.never, torch.full_like(y, self.instead), y)
        return torch.nn.functional.one_hot(y, self.n).float()


class _WrongFirst(torch.nn.Module):
    """Right on every image of an in-order test stream except its first ``k`` (predicted one class off)."""

    def __init__(self, labels: torch.Tensor, k: int, n_classes: int = 10):
        super().__init__()
        self.labels, self.k, self.n, self.seen = labels, k, n_classes, 0

    def forward(self, x):
        pos = torch.arange(self.seen, self.seen + len(x))
        self.seen += len(x)
        y = self.labels[pos]
        y = torch.where(pos < self.k, (y + 1) % self.n, y)
        return torch.nn.functional.one_hot(y, self.n).float()


def test_per_class_accuracy_counts_every_batch_and_leaves_absent_classes_empty():
    """``num_classes`` adds each class's accuracy, summed over batches; a class with no test image is None."""
    test = make_synthetic(300, seed=5)
    labels = torch.cat([y for _, _, y in test.batches(300)])
    out = evaluate(_WrongFirst(labels, k=100), test, None, batch_size=64, num_classes=12)
    total = torch.bincount(labels, minlength=12)
    wrong = torch.bincount(labels[:100], minlength=12)
    expected = [1 - w / t if t else None for w, t in zip(wrong.tolist(), total.tolist())]
    assert out["per_class_acc"][:10] == pytest.approx(expected[:10])
    assert out["per_class_acc"][10:] == [None, None]
    assert sum(a * n for a, n in zip(out["per_class_acc"][:10], total.tolist())) / 300 == pytest.approx(out["clean_acc"])
    assert "per_class_acc" not in evaluate(_WrongFirst(labels, k=100), test, None, batch_size=64)


def test_target_class_accuracy_exposes_a_model_that_never_predicts_the_target():
    """ASR 0 alone cannot tell a removed backdoor from a suppressed target class: evaluate reports both."""
    from utils.data.poison import BackdoorSpec
    from utils.data.triggers import build_trigger

    test = make_synthetic(200, seed=5)
    labels = torch.cat([y for _, _, y in test.batches(200)])
    backdoor = BackdoorSpec(build_trigger("patch", (3, 32, 32)), "all2one", 0, 10)
    suppressed = evaluate(_FixedClassifier(labels, never=0, instead=1), test, backdoor, batch_size=200)
    assert suppressed["asr"] == 0.0 and suppressed["target_class_acc"] == 0.0
    assert suppressed["clean_acc"] == pytest.approx(1 - float((labels == 0).float().mean()))
    fine = evaluate(_FixedClassifier(labels, never=-1, instead=1), test, backdoor, batch_size=200)
    assert fine["target_class_acc"] == 1.0 and fine["clean_acc"] == 1.0
    # all2all has no single target class, so no such figure
    assert "target_class_acc" not in evaluate(_FixedClassifier(labels, -1, 1), test,
                                              BackdoorSpec(backdoor.trigger, "all2all", 0, 10), batch_size=200)
