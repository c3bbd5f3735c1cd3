"""AutoAttack wrapper (utils.autoattack): not above our PGD, names its settings, seeded subset, model state kept.

A tiny CNN (width 8) trained for a few seconds; attacks cut down through the explicit ``n_iter`` /
``n_queries`` arguments (the defaults are the reference strength, checked without running it).
"""
import inspect
import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

from models.normalize import Normalize, NormalizedModel
from models.small_cnn import SmallCNN
from utils.adversarial import PGD, robust_accuracy
from utils.autoattack import (REFERENCE, VERSIONS, _build, _frozen_parameters, _keep_trace, autoattack_accuracy,
                              subset_indices)
from utils.run import interrupt
from utils.data.datasets import make_synthetic
from utils.run.errors import Interrupted

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 2 / 255  # small enough that PGD leaves the tiny model some robust images
FAST = dict(n_iter=5, n_queries=30, batch_size=64)


def _tiny_model(seed=0, epochs=3):
    """A width-8 SmallCNN; 3 epochs of Adam on 2,000 synthetic images (about 1 s each): clean accuracy about 0.9."""
    torch.manual_seed(seed)
    model = NormalizedModel(Normalize((0.5,) * 3, (0.25,) * 3), SmallCNN(num_classes=10, width=8))
    train = make_synthetic(2000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for _, x, y in train.batches(32, shuffle=True, generator=g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def test_set():
    return make_synthetic(200, seed=2)


N, SEED = 16, 3  # the main run: 16 images of the seed-3 subset


@pytest.fixture(scope="module")
def main_run(tiny, test_set):
    return autoattack_accuracy(tiny, test_set, eps=EPS, n_images=N, seed=SEED, **FAST)


def _pgd_acc(model, test, idx, eps):
    return robust_accuracy(model, test.subset(idx), PGD(eps, eps / 4, 20),
                           generator=torch.Generator().manual_seed(1))["robust_acc"]


def test_not_above_pgd_and_record_names_settings(tiny, test_set, main_run):
    n, seed = N, SEED
    idx = subset_indices(len(test_set), n, seed)
    with torch.no_grad():
        clean = (tiny(test_set.subset(idx).x.float() / 255).argmax(1) == test_set.subset(idx).y).float().mean().item()
    pgd = _pgd_acc(tiny, test_set, idx, EPS)
    assert pgd < clean, "precondition: PGD must break some images, else the comparison says nothing"
    r = main_run
    rec = r["autoattack_eval"]
    assert r["autoattack_acc"] <= pgd
    assert rec["images"] == n and rec["eps"] == pytest.approx(EPS) and rec["norm"] == "linf" and rec["seed"] == seed
    assert rec["library"].startswith("pyautoattack ") and rec["version"] == "standard"
    assert [a["name"] for a in rec["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [a.get("iterations") for a in rec["attacks"]] == [5, 5, 5, None]
    assert rec["attacks"][0]["restarts"] == 1 and rec["attacks"][3]["queries"] == 30
    assert [a.get("target_classes") for a in rec["attacks"]] == [None, 9, 9, None]
    assert rec["reference_strength"] is False  # cut down: the record must say so
    counts = [rec["clean_correct"]] + [a["robust_after"] for a in rec["attacks"]]
    assert rec["clean_correct"] == round(clean * n)
    assert counts == sorted(counts, reverse=True), "survivors can only shrink along the chain"
    assert counts[-1] == round(r["autoattack_acc"] * n)
    assert all(a["seconds"] >= 0 for a in rec["attacks"])


def test_chain_equals_the_library_one_call(tiny, test_set, main_run):
    """Our component-by-component chain leaves as many robust images as the library's own one-call chain."""
    sub = test_set.subset(subset_indices(len(test_set), N, SEED))
    x, y = sub.x.float() / 255, sub.y
    aa, _ = _build(tiny, EPS, SEED, torch.device("cpu"), 10, FAST["n_iter"], FAST["n_queries"])
    with torch.random.fork_rng(devices=[]), _frozen_parameters(tiny), _keep_trace():
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=FAST["batch_size"])
    with torch.no_grad():
        robust = int((tiny(x_adv).argmax(1) == y).sum())
    assert robust == main_run["autoattack_eval"]["attacks"][-1]["robust_after"]


def test_defaults_are_the_reference_strength(tiny):
    sig = inspect.signature(autoattack_accuracy).parameters
    assert sig["eps"].default == 8 / 255 and sig["version"].default == "standard"
    assert sig["n_iter"].default is None and sig["n_queries"].default is None  # None: REFERENCE
    assert REFERENCE == {"n_iter": 100, "n_queries": 5000, "target_classes": 9}
    assert VERSIONS["standard"] == ("apgd-ce", "apgd-t", "fab-t", "square")
    aa, targets = _build(tiny, 8 / 255, 0, torch.device("cpu"), 10, REFERENCE["n_iter"], REFERENCE["n_queries"])
    assert targets == 9
    assert aa.apgd.n_iter == 100 and aa.apgd.n_restarts == 1 and aa.apgd.n_iter_2 == 22
    assert aa.apgd_targeted.n_iter == 100 and aa.apgd_targeted.n_target_classes == 9
    assert aa.fab.n_iter == 100 and aa.fab.n_target_classes == 9
    assert aa.square.n_queries == 5000
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa.epsilon == 8 / 255


def test_seeded_subset_and_deterministic(tiny, test_set):
    a, b = subset_indices(len(test_set), 20, 5), subset_indices(len(test_set), 20, 5)
    assert torch.equal(a, b) and len(set(a.tolist())) == 20
    assert not torch.equal(a, subset_indices(len(test_set), 20, 6))
    kw = dict(eps=EPS, n_images=12, seed=5, version="quick", n_iter=5, batch_size=64)
    torch.manual_seed(123)
    r1 = autoattack_accuracy(tiny, test_set, **kw)
    after = torch.rand(3)  # the caller's random stream is not reseeded by the library
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    r2 = autoattack_accuracy(tiny, test_set, **kw)
    other = autoattack_accuracy(_tiny_model(seed=1, epochs=0), test_set, **kw)  # another model, same seed
    assert r1["autoattack_eval"]["subset"] == r2["autoattack_eval"]["subset"] == other["autoattack_eval"]["subset"]
    assert r1["autoattack_acc"] == r2["autoattack_acc"]
    assert [a["robust_after"] for a in r1["autoattack_eval"]["attacks"]] == \
        [a["robust_after"] for a in r2["autoattack_eval"]["attacks"]]
    changed = autoattack_accuracy(tiny, test_set, **{**kw, "seed": 6})
    assert changed["autoattack_eval"]["subset"] != r1["autoattack_eval"]["subset"]


def test_model_state_restored(test_set):
    model = _tiny_model(seed=2, epochs=0)
    model.train()
    model.net.features[0].eval()  # mixed flags: each one must come back as it was
    flags = [m.training for m in model.modules()]
    bn = model.net.features[2][1]  # a BatchNorm in train mode: attacking it in train mode would move its statistics
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    calls = []

    def tracer(frame, event, arg):  # a debugger's / coverage's tracer must survive the library's settrace(None)
        calls.append(event)

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        autoattack_accuracy(model, test_set, eps=EPS, n_images=8, n_iter=3, n_queries=10, batch_size=64)
        restored = sys.gettrace()
    finally:
        sys.settrace(old)
    assert restored is tracer
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "FAB's backward must not touch weights"


def test_low_clean_accuracy_and_bf16(test_set):
    model = _tiny_model(seed=3, epochs=0)  # untrained: about chance, possibly no correct image at all
    model.amp_dtype = torch.bfloat16
    r = autoattack_accuracy(model, test_set, eps=EPS, n_images=8, n_iter=2, n_queries=10, batch_size=64)
    rec = r["autoattack_eval"]
    assert rec["clean_correct"] <= 8 and round(r["autoattack_acc"] * 8) == rec["attacks"][-1]["robust_after"]
    assert [a["robust_after"] for a in rec["attacks"]] == sorted((a["robust_after"] for a in rec["attacks"]), reverse=True)
    assert rec["attacks"][0]["robust_after"] <= rec["clean_correct"] and len(rec["attacks"]) == 4


def test_a_signal_stops_the_pass_before_the_next_component(tiny, test_set):
    with interrupt.handle_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        with pytest.raises(Interrupted, match="AutoAttack, before apgd-ce"):
            autoattack_accuracy(tiny, test_set, eps=EPS, n_images=4, n_iter=1, n_queries=1)
    assert tiny.training is False


def test_bad_input(tiny, test_set):
    with pytest.raises(ValueError, match="version"):
        autoattack_accuracy(tiny, test_set, version="plus")
    with pytest.raises(ValueError, match="eps"):
        autoattack_accuracy(tiny, test_set, eps=0)
    for kw, name in ((dict(n_images=0), "n_images"), (dict(batch_size=True), "batch_size"),
                     (dict(n_iter=2.0), "n_iter"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            autoattack_accuracy(tiny, test_set, **kw)

    class Scaled:  # 0..255 pixels instead of [0,1]
        def __len__(self):
            return len(test_set)

        def batches(self, bs, indices=None):
            for i, x, y in test_set.batches(bs, indices=indices):
                yield i, x * 255, y

    with pytest.raises(ValueError, match=r"\[0,1\]"):
        autoattack_accuracy(tiny, Scaled(), n_images=4)
