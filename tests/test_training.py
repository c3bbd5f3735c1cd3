"""utils/training.py: device-side epoch statistics and the deferred divergence check."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data.datasets import make_synthetic
from utils.training import DivergenceError, finetune_epoch, train_epoch


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, make_synthetic(200, seed=1)


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_stats_are_the_per_sample_mean_whatever_the_check_interval(check_every):
    model, opt, data = _setup()
    ref = copy.deepcopy(model)  # the expected stats, computed the old way (per-batch .item()) on a copy
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    loss_sum = correct = n = 0
    for _, x, y in data.batches(64):  # 64, 64, 64, 8: unequal last batch
        logits = ref(x)
        loss = F.cross_entropy(logits, y)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    stats = train_epoch(model, opt, data.batches(64), check_every=check_every)
    assert stats["loss"] == pytest.approx(loss_sum / n, rel=1e-6)
    assert stats["acc"] == correct / n and stats["images"] == n


@pytest.mark.parametrize("check_every", [1, 2, 16])
def test_non_finite_loss_raises_naming_the_first_bad_batch(check_every):
    model, opt, data = _setup()

    def poison_batch_2(i, x, y):
        return x * float("nan") if i == 2 else x

    with pytest.raises(DivergenceError, match=r"non-finite training loss \(nan\) at ft epoch 4, batch 2$"):
        train_epoch(model, opt, data.batches(32), transform=poison_batch_2, stage="ft", epoch=4, check_every=check_every)


@pytest.mark.parametrize("adv_batches, attacked", [(None, [0, 1, 2, 3]), (2, [0, 1]), (0, [])])
def test_finetune_epoch_attacks_exactly_the_first_adv_batches(adv_batches, attacked):
    """AFT's and PBE's partial epochs: batches with index < ``adv_batches`` are trained on the attack's examples
    (the model sees them, not the clean batch), the rest on the clean batch."""
    model, opt, data = _setup()
    calls, seen = [], []

    def attack(net, x, y, generator=None):
        assert net is model
        calls.append(len(calls))
        return torch.zeros_like(x)

    real_forward = model.forward
    model.forward = lambda x: (seen.append(bool(x.abs().sum() == 0)), real_forward(x))[1]
    finetune_epoch(model, opt, data.batches(64), attack, adv_batches)
    assert calls == list(range(len(attacked)))
    assert [i for i, zero in enumerate(seen) if zero] == attacked


def test_empty_epoch():
    model, opt, data = _setup()
    assert train_epoch(model, opt, iter(())) == {"loss": 0.0, "acc": 0.0, "images": 0}


def test_class_weight_lifts_a_rare_class_that_plain_cross_entropy_gives_up():
    """``class_weight`` reaches the loss: on overlapping 1-D classes of 900 and 100 samples, plain CE puts the
    boundary deep in the rare class; the balanced weights move it back (the rare class's recall rises)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(900, 1, generator=g), torch.randn(100, 1, generator=g) + 1.5])
    y = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])

    def rare_recall(weight):
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = [(None, x, y)]
        for _ in range(200):
            train_epoch(model, opt, batches, class_weight=weight)
        with torch.no_grad():
            return float((model(x[900:]).argmax(1) == 1).float().mean())

    plain, balanced = rare_recall(None), rare_recall(torch.tensor([1000 / (2 * 900), 1000 / (2 * 100)]))
    assert balanced > plain + 0.3, (plain, balanced)


def test_class_weight_with_a_loss_fn_is_refused():
    """A ``loss_fn`` brings its own weighting: a ``class_weight`` beside it would be silently ignored."""
    model, opt, data = _setup()
    with pytest.raises(ValueError, match="class_weight"):
        train_epoch(model, opt, data.batches(50), loss_fn=lambda i, x, y: (model(x).sum(), None),
                    class_weight=torch.ones(10))
