"""Tests for utils/unlearning.py and utils/mean_teacher.py (PUD §8.3, §8.4)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import frozen_copy
from utils.defenses.mean_teacher import ema_update, softmax_consistency
from utils.defenses.unlearning import l1_distance, unlearning_loss


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    xc, xp = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    return xc, torch.tensor([0, 1, 2, 0, 1]), xp, torch.tensor([2, 2, 2])


def test_l1_distance():
    model = _linear()
    ref = copy.deepcopy(model)
    assert l1_distance(model, ref).item() == 0.0
    with torch.no_grad():
        model.weight[0, 0] += 0.5
        model.bias[1] -= 0.25
    assert l1_distance(model, ref).item() == pytest.approx(0.75, abs=1e-6)
    with torch.no_grad():
        model.weight[1, 1] += 1.0
    assert l1_distance(model, ref).item() == pytest.approx(1.75, abs=1e-6)
    # gradient flows to the model only
    l1_distance(model, ref).backward()
    assert model.weight.grad is not None and ref.weight.grad is None
    with pytest.raises(KeyError):
        l1_distance(nn.Sequential(model), ref)  # names "0.weight" vs "weight"


def test_unlearning_loss_matches_hand_computation():
    model = _linear()
    ref = _linear(seed=5)
    xc, yc, xp, yp = _data()
    loss, parts = unlearning_loss(model(xc), yc, model(xp), yp, model, ref)
    ce_c, ce_p = F.cross_entropy(model(xc), yc), F.cross_entropy(model(xp), yp)
    l1 = sum((p - q).abs().sum() for p, q in zip(model.parameters(), ref.parameters()))
    expected = ce_c - 0.003 * ce_p + 1e-4 * l1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["clean_ce"] == pytest.approx(ce_c.item(), rel=1e-6)
    assert parts["poison_ce"] == pytest.approx(ce_p.item(), rel=1e-6)
    assert parts["l1"] == pytest.approx(l1.item(), rel=1e-6)
    assert parts["loss"] == pytest.approx(loss.item())
    assert parts["poison_clipped"] is False
    assert all(isinstance(parts[k], float) for k in ("clean_ce", "poison_ce", "l1", "loss"))


def test_unlearning_gradient_is_scaled_ascent_on_poison():
    model, ref = _linear(), _linear(seed=5)
    xc, yc, xp, yp = _data()
    logits_p = model(xp).detach().requires_grad_(True)
    loss, _ = unlearning_loss(model(xc), yc, logits_p, yp, model, ref, lam=0.003)
    (g,) = torch.autograd.grad(loss, logits_p)
    logits_p2 = logits_p.detach().clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits_p2, yp), logits_p2)
    assert torch.allclose(g, -0.003 * g_ce, atol=1e-9)
    assert g.abs().sum() > 0


def test_unlearning_bound_clips_ascent():
    model, ref = _linear(), _linear(seed=5)
    xc, yc, xp, yp = _data()
    logits_p = model(xp).detach().requires_grad_(True)
    ce_p = F.cross_entropy(logits_p, yp).item()
    loss, parts = unlearning_loss(model(xc), yc, logits_p, yp, model, ref, poison_loss_bound=ce_p - 0.1)
    assert parts["poison_clipped"] is True
    assert parts["poison_ce"] == pytest.approx(ce_p, rel=1e-6)
    (g,) = torch.autograd.grad(loss, logits_p, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0
    expected = parts["clean_ce"] - 0.003 * (ce_p - 0.1) + 1e-4 * parts["l1"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # below the bound nothing changes
    loss2, parts2 = unlearning_loss(model(xc), yc, logits_p, yp, model, ref, poison_loss_bound=ce_p + 1.0)
    assert parts2["poison_clipped"] is False
    (g2,) = torch.autograd.grad(loss2, logits_p)
    assert g2.abs().sum() > 0


def test_unlearning_empty_parts():
    model, ref = _linear(), _linear(seed=5)
    xc, yc, xp, yp = _data()
    empty_logits, empty_y = model(xp[:0]), yp[:0]
    loss, parts = unlearning_loss(model(xc), yc, empty_logits, empty_y, model, ref, poison_loss_bound=1.0)
    assert parts["poison_ce"] == 0.0 and parts["poison_clipped"] is False
    assert loss.item() == pytest.approx(parts["clean_ce"] + 1e-4 * parts["l1"], rel=1e-6)
    loss.backward()
    loss, parts = unlearning_loss(model(xc[:0]), yc[:0], model(xp), yp, model, ref)
    assert parts["clean_ce"] == 0.0 and torch.isfinite(loss)
    loss.backward()


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def _perturbed_pair():
    torch.manual_seed(0)
    student = _BNNet()
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(8, 3))  # changes BN running stats
    return teacher, student


def test_the_teacher_is_a_frozen_eval_mode_copy():
    student = _BNNet().train()
    teacher = frozen_copy(student)
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    assert teacher.fc.weight.data_ptr() != student.fc.weight.data_ptr()


@pytest.mark.parametrize("step,expected_decay", [(0, 0.0), (10, 1 - 1 / 11), (1000, 0.99)])
def test_ema_update_exact(step, expected_decay):
    teacher, student = _perturbed_pair()
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    d = ema_update(teacher, student, decay=0.99, step=step)
    assert d == pytest.approx(expected_decay, abs=0.0)
    for name, p in teacher.named_parameters():
        s = dict(student.named_parameters())[name]
        hand = expected_decay * before[name] + (1 - expected_decay) * s
        assert torch.allclose(p, hand, rtol=1e-6, atol=1e-7), name
        if step == 0:
            assert torch.equal(p, s)
        assert not p.requires_grad
    for name, b in teacher.named_buffers():
        assert torch.equal(b, dict(student.named_buffers())[name]), name


def test_ema_update_hand_numbers():
    t, s = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        t.weight.fill_(1.0)
        s.weight.fill_(3.0)
    assert ema_update(t, s, 0.5, step=10) == 0.5
    assert t.weight.item() == pytest.approx(2.0, abs=0)
    assert ema_update(t, s, 0.99, step=3) == 0.75  # min(1 − 1/4, 0.99)
    assert t.weight.item() == pytest.approx(0.75 * 2.0 + 0.25 * 3.0, abs=1e-7)
    with pytest.raises(ValueError):
        ema_update(t, s, 0.99, step=-1)


def test_softmax_consistency():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    assert softmax_consistency(s, s.detach().clone()).item() == 0.0
    loss = softmax_consistency(s, t)
    hand = (torch.softmax(s, 1) - torch.softmax(t, 1)).square().sum()
    assert loss.item() > 0 and loss.item() == pytest.approx(hand.item(), rel=1e-6)
    # sum, not mean: duplicating the batch doubles the value
    dbl = softmax_consistency(torch.cat([s, s]), torch.cat([t, t]))
    assert dbl.item() == pytest.approx(2 * loss.item(), rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_balanced_clean_term_weighs_each_class_alike():
    """One image of class 0 beside nine of class 1: the balanced clean CE is the mean of the two class means."""
    from utils.defenses.unlearning import balanced_class_weights, unlearning_loss

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 3, generator=g), torch.tensor([0] + [1] * 9)
    model = torch.nn.Linear(2, 2)
    empty = torch.zeros(0, 3)
    w = balanced_class_weights(y, 3)
    assert w[2] == 0 and w[0] == 9 * w[1]
    _, parts = unlearning_loss(logits, y, empty, torch.zeros(0, dtype=torch.long), model, model, class_weight=w)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert parts["clean_ce"] == pytest.approx(float((ce[0] + ce[1:].mean()) / 2), rel=1e-5)
    _, plain = unlearning_loss(logits, y, empty, torch.zeros(0, dtype=torch.long), model, model)
    assert plain["clean_ce"] == pytest.approx(float(ce.mean()), rel=1e-5)


def _image_set(n=10, seed=0):
    from utils.data.datasets import ImageSet

    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 2, 2), generator=g, dtype=torch.uint8),
                    torch.arange(n) % 3, 3)


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_ascent_objective_joins_every_clean_batch_with_the_next_poison_batch_and_restarts_the_poison_set():
    """Three poison samples and batches of two: the poison parts are 2, 1, 2 (a new shuffled pass), and each loss is
    CE(clean) - lam * min(CE(poison), bound), with no L1 term when mu is 0."""
    from utils.defenses.unlearning import AscentObjective

    data, model = _image_set(), _Flat()
    seen = []
    real = model.forward
    model.forward = lambda x: (seen.append(len(x)), real(x))[1]
    obj = AscentObjective(model, model, data, torch.tensor([7, 8, 9]), 2, torch.Generator().manual_seed(0),
                          lam=0.5, bound=0.7)
    xc, yc = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    before = dict(obj.sums)
    for i in range(3):
        loss, logits = obj(i, xc, yc)
        assert logits.shape == (4, 3)
        ce_c, ce_p = (obj.sums[k] - before[k] for k in ("clean_ce", "poison_ce"))
        assert ce_c == pytest.approx(F.cross_entropy(real(xc), yc).item(), rel=1e-5)
        assert loss.item() == pytest.approx(ce_c - 0.5 * min(ce_p, 0.7), rel=1e-5)
        before = dict(obj.sums)
    assert seen == [6, 5, 6] and obj.batches == 3
    assert set(obj.means()) == {"clean_ce", "poison_ce", "loss"}


def test_ascent_objective_without_the_ascent_draws_no_poison_batch():
    """lam 0: every forward is the clean batch alone (a poison batch would only move BatchNorm's statistics), the
    loss is the clean CE, and the records have no poison CE."""
    from utils.defenses.unlearning import AscentObjective

    data, model = _image_set(), _Flat()
    seen = []
    real = model.forward
    model.forward = lambda x: (seen.append(len(x)), real(x))[1]
    obj = AscentObjective(model, model, data, torch.tensor([7, 8, 9]), 2, torch.Generator().manual_seed(0), lam=0.0)
    xc, yc = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    for i in range(3):
        loss, logits = obj(i, xc, yc)
        assert loss.item() == pytest.approx(F.cross_entropy(real(xc), yc).item(), rel=1e-5)
    assert seen == [4, 4, 4] and obj.images == 0
    assert set(obj.means()) == {"clean_ce", "loss"}


def test_ascent_objective_drives_the_poison_set_away_from_its_labels():
    """A few SGD steps: with lam > 0 the poison samples' CE under their (backdoor) labels rises; with lam 0 (only
    the clean term) the same steps do not push it up as far."""
    from utils.defenses.unlearning import AscentObjective
    from utils.training import train_epoch

    data = _image_set(n=30)
    poison = torch.arange(20, 30)

    def poison_ce_after(lam):
        model = _Flat()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(20):
            obj = AscentObjective(model, model, data, poison, 5, torch.Generator().manual_seed(0), lam=lam, bound=50.0)
            train_epoch(model, opt, data.batches(5, indices=torch.arange(0, 20)), loss_fn=obj, check_every=1)
        with torch.no_grad():
            return F.cross_entropy(model(data.x[poison].float() / 255), data.y[poison]).item()

    assert poison_ce_after(1.0) > poison_ce_after(0.0) + 1.0


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


def test_a_held_classifier_layer_stays_while_the_ascent_moves_the_rest():
    """PUD's ascent with the classifier layer held: after SGD steps with momentum and weight decay the layer is
    exactly where it was, the rest has moved, the poisons' CE still rises (through the layers below), and
    ``release`` drops the optimiser's momentum for the held layer only."""
    from utils.defenses.unlearning import AscentObjective, HeldLayer, classifier_layer
    from utils.training import make_optimizer, train_epoch

    data, poison = _image_set(n=30), torch.arange(20, 30)
    model = _Body()
    assert classifier_layer(model) is model.fc
    head, body = [p.detach().clone() for p in model.fc.parameters()], model.body.weight.detach().clone()
    with torch.no_grad():
        ce_before = F.cross_entropy(model(data.x[poison].float() / 255), data.y[poison]).item()
    opt = make_optimizer(model, 0.5)
    held = HeldLayer(classifier_layer(model))
    for _ in range(10):
        obj = AscentObjective(model, model, data, poison, 5, torch.Generator().manual_seed(0), lam=1.0, bound=50.0)
        train_epoch(model, opt, data.batches(5, indices=torch.arange(0, 20)), loss_fn=obj, check_every=1,
                    after_step=held.restore)
    assert all(torch.equal(p, q) for p, q in zip(model.fc.parameters(), head))
    assert not torch.allclose(model.body.weight, body)
    with torch.no_grad():
        assert F.cross_entropy(model(data.x[poison].float() / 255), data.y[poison]).item() > ce_before + 0.5
    held.release(opt)
    assert all(p not in opt.state for p in model.fc.parameters()) and model.body.weight in opt.state


def test_the_classifier_layer_of_every_architecture():
    from models import build_model
    from utils.defenses.unlearning import classifier_layer

    for arch, name in (("cnn", "fc"), ("preactresnet18", "linear"), ("resnet18", "fc")):
        model = build_model(arch, 10)
        layer = classifier_layer(model)
        assert layer.out_features == 10 and [n for n, m in model.named_modules() if m is layer][0].endswith(name)
    assert classifier_layer(nn.Sequential(nn.Conv2d(3, 4, 3))) is None


def test_a_shielded_classifier_layer_takes_the_clean_gradient_and_none_of_the_ascent():
    """PBE's ascent with ``--ascent_head shielded``: the joined forward gives the same logits; the poison rows' loss
    leaves the classifier layer's gradient at zero and still reaches the layers below; the clean rows' loss trains
    the layer as before; the hook is gone afterwards."""
    from utils.defenses.unlearning import joined_forward

    model = _Body()
    g = torch.Generator().manual_seed(3)
    xc, xp = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    plain_c, plain_p = joined_forward(model, xc, xp)
    shielded_c, shielded_p = joined_forward(model, xc, xp, shield=model.fc)
    assert torch.allclose(plain_c, shielded_c) and torch.allclose(plain_p, shielded_p)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return model.fc.weight.grad.clone(), model.fc.bias.grad.clone(), model.body.weight.grad.clone()

    fc_w, fc_b, body = grads(shielded_p.logsumexp(1).sum())
    assert not fc_w.any() and not fc_b.any() and body.abs().sum() > 0
    _, plain_p = joined_forward(model, xc, xp)
    assert grads(plain_p.logsumexp(1).sum())[0].abs().sum() > 0  # unshielded, the ascent reaches the layer
    shielded_c, _ = joined_forward(model, xc, xp, shield=model.fc)
    clean_w = grads(shielded_c.logsumexp(1).sum())[0]
    plain_c, _ = joined_forward(model, xc, xp)
    assert torch.allclose(clean_w, grads(plain_c.logsumexp(1).sum())[0]) and clean_w.abs().sum() > 0
    assert not model.fc._forward_hooks
