"""Tests for utils/adversarial.py (PGD, robust accuracy, the robust-accuracy evaluation settings).

A small MLP is trained once per module (a couple of seconds) on a separable 4-class task of 8x8
RGB images: class c brightens quadrant c by a per-image amount s ~ U(0.02, 0.2). An L∞ attack of
size ε can flip roughly the images with s < 2ε, so accuracy drops gradually with ε.
"""
import copy
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from utils.adversarial import PGD, pgd, robust_accuracy
from utils.data.datasets import ImageSet
from utils.run import interrupt
from utils.run.errors import Interrupted, UserError
from utils.adversarial import RobustEvalSettings, robust_eval

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _quadrant_task(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = 0.5 + 0.03 * torch.randn(n, 3, 8, 8, generator=g)
    s = 0.02 + 0.18 * torch.rand(n, generator=g)
    for c in range(NUM_CLASSES):
        r, q = divmod(c, 2)
        m = y == c
        x[m, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += s[m].view(-1, 1, 1, 1)
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y, NUM_CLASSES)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, NUM_CLASSES))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train, test = _quadrant_task(2000, 1), _quadrant_task(300, 2)
    _, xtr, ytr = next(train.batches(len(train)))
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(train), (256,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    _, x, y = next(test.batches(len(test)))
    return model, test, x, y


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _no_grads(model) -> bool:
    return all(p.grad is None for p in model.parameters())


def test_clean_accuracy_is_high(trained):
    model, _, x, y = trained
    assert _acc(model, x, y) >= 0.97


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_or_steps_zero_returns_x(trained, norm):
    torch.manual_seed(0)
    model, _, x, y = trained
    for kw in (dict(eps=0.0, alpha=0.01, steps=5), dict(eps=0.1, alpha=0.01, steps=0)):
        out = pgd(model, x, y, norm=norm, random_start=True, restarts=3, **kw)
        assert torch.equal(out, x)
        assert not out.requires_grad
        assert _acc(model, out, y) == _acc(model, x, y)
    # out-of-range input: clamped by default, returned as is with clamp=False
    x_out = x.clone()
    x_out[:, 0, 0, 0] = 1.5
    x_out[:, 1, 0, 0] = -0.5
    assert torch.equal(pgd(model, x_out, y, 0.0, 0.01, 5, norm=norm), x_out.clamp(0, 1))
    assert torch.equal(pgd(model, x_out, y, 0.0, 0.01, 5, norm=norm, clamp=False), x_out)


def _extreme_inputs(x):
    """Test images with a quarter of the pixels pushed to 0 or 1 and some to just inside the bounds."""
    g = torch.Generator().manual_seed(3)
    x = x.clone()
    u = torch.rand(x.shape, generator=g)
    x[u < 0.1] = 0.0
    x[(u >= 0.1) & (u < 0.2)] = 1.0
    x[(u >= 0.2) & (u < 0.25)] = 1e-3
    x[(u >= 0.25) & (u < 0.3)] = 1 - 1e-3
    return x


def _dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm,eps,alpha,tol", [("linf", 0.1, 0.04, 1e-6), ("l2", 1.0, 0.4, 1e-5)])
def test_result_in_range_and_within_eps(trained, norm, eps, alpha, tol):
    torch.manual_seed(0)
    model, _, x, y = trained
    for inputs in (x, _extreme_inputs(x)):
        for rs in (True, False):
            out = pgd(model, inputs, y, eps, alpha, 5, norm=norm, random_start=rs, restarts=2,
                      generator=torch.Generator().manual_seed(1))
            assert out.shape == inputs.shape and out.dtype == inputs.dtype
            assert out.min() >= 0 and out.max() <= 1
            assert _dist(out, inputs, norm).max() <= eps + tol
            assert _dist(out, inputs, norm).max() > 0.5 * eps  # it did move
    # without the clamp the ε constraint still holds but pixels at the bounds leave [0, 1]
    xe = _extreme_inputs(x)
    out = pgd(model, xe, y, eps, alpha, 5, norm=norm, clamp=False, generator=torch.Generator().manual_seed(1))
    assert _dist(out, xe, norm).max() <= eps + tol
    assert out.min() < 0 or out.max() > 1


def test_l2_random_start_radius_and_zero_gradient():
    """alpha = 0 leaves only the random start: within the ball, and a constant model (zero gradient) is safe."""
    torch.manual_seed(0)
    x = torch.full((16, 3, 8, 8), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    const = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    nn.init.zeros_(const[1].weight)  # logits do not depend on x: the input gradient is exactly 0
    for model, alpha in ((_mlp(), 0.0), (const, 0.2)):
        out = pgd(model, x, y, 0.5, alpha, 3, norm="l2", generator=torch.Generator().manual_seed(0))
        r = _dist(out, x, "l2")
        assert torch.isfinite(out).all()
        assert (r <= 0.5 + 1e-5).all() and (r > 0.3).all()  # uniform in a 192-dim ball: radius close to ε
        assert torch.equal(out, pgd(model, x, y, 0.5, alpha, 3, norm="l2", generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("norm,small,large", [("linf", 0.03, 0.12), ("l2", 0.3, 1.2)])
def test_accuracy_falls_as_eps_grows(trained, norm, small, large):
    torch.manual_seed(0)
    model, _, x, y = trained
    accs = [_acc(model, pgd(model, x, y, e, e / 4, 10, norm=norm, generator=torch.Generator().manual_seed(0)), y)
            for e in (0.0, small, large)]
    assert accs[0] >= 0.97
    assert accs[0] - accs[1] >= 0.1, accs
    assert accs[1] - accs[2] >= 0.3, accs
    assert accs[2] <= 0.2, accs


class _Probe(nn.Module):
    """Records the training flag of every forward call."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.seen, self.fail_after = [], fail_after

    def forward(self, x):
        self.seen.append(self.training)
        if self.fail_after is not None and len(self.seen) > self.fail_after:
            raise RuntimeError("boom")
        return x


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_mode_restored_and_no_param_grads(trained, start):
    torch.manual_seed(0)
    _, test, x, y = trained
    model = nn.Sequential(_Probe(), build_model("cnn", NUM_CLASSES, 3))  # BatchNorm: train mode would change stats
    model.train(start != "eval")
    if start == "mixed":
        model[1].net.features[0].eval()
    before, bn = _modes(model), model[1].net.features[0][1]
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    out = pgd(model, x[:32], y[:32], 8 / 255, 2 / 255, 3, restarts=2)
    assert not out.requires_grad and out.grad_fn is None
    assert model[0].seen and not any(model[0].seen)  # every forward of the attack ran in eval mode
    assert _modes(model) == before
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert _no_grads(model)
    res = robust_accuracy(model, test, PGD(8 / 255, 2 / 255, 2), batch_size=100, max_images=150)
    assert res["robust_eval"]["images"] == 150
    assert _modes(model) == before and _no_grads(model)
    # an exception inside the attack still restores the modes
    model[0].fail_after, model[0].seen = 2, []
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x[:8], y[:8], 8 / 255, 2 / 255, 5)
    assert _modes(model) == before and _no_grads(model)


def test_existing_param_grads_untouched(trained):
    model, _, x, y = trained
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pgd(model, x[:16], y[:16], 0.05, 0.01, 3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@pytest.mark.parametrize("norm,eps", [("linf", 0.06), ("l2", 0.6)])
def test_targeted_raises_target_share(trained, norm, eps):
    torch.manual_seed(0)
    model, _, x, y = trained
    target = (y + 1) % NUM_CLASSES
    share = lambda xa: _acc(model, xa, target)  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    clean = share(x)
    tgt = share(pgd(model, x, target, eps, eps / 5, 10, norm=norm, targeted=True, generator=gen()))
    untgt = share(pgd(model, x, y, eps, eps / 5, 10, norm=norm, generator=gen()))
    assert clean <= 0.03
    assert tgt >= clean + 0.2, (clean, tgt, untgt)
    assert tgt > untgt + 0.1, (clean, tgt, untgt)  # it aims at the target, not just away from y


def _objective(model, xa, y, targeted):
    with torch.no_grad():
        logits = model(xa)
    ce = F.cross_entropy(logits, y, reduction="none")
    return (logits.argmax(1) == y) if targeted else (logits.argmax(1) != y), (-ce if targeted else ce)


@pytest.mark.parametrize("norm,eps,targeted", [("linf", 0.04, False), ("l2", 0.4, False), ("linf", 0.05, True)])
def test_restarts_never_worse(trained, norm, eps, targeted):
    torch.manual_seed(0)
    model, _, x, y = trained
    labels = (y + 2) % NUM_CLASSES if targeted else y
    one = pgd(model, x, labels, eps, eps / 2, 2, norm=norm, targeted=targeted, generator=torch.Generator().manual_seed(5))
    many = pgd(model, x, labels, eps, eps / 2, 2, norm=norm, targeted=targeted, restarts=4,
               generator=torch.Generator().manual_seed(5))
    ok1, obj1 = _objective(model, one, labels, targeted)
    okn, objn = _objective(model, many, labels, targeted)
    assert not (ok1 & ~okn).any()  # every sample fooled by one restart is fooled by four
    both_fail = ~ok1 & ~okn
    assert (objn[both_fail] >= obj1[both_fail] - 1e-6).all()
    assert okn.sum() > ok1.sum()  # and with these settings restarts actually help
    # the 4 restarts are 4 single runs drawn in sequence from the generator: the kept example per sample
    # is a successful one if any run succeeded, else the run with the highest objective
    g = torch.Generator().manual_seed(5)
    runs = [_objective(model, pgd(model, x, labels, eps, eps / 2, 2, norm=norm, targeted=targeted, generator=g),
                       labels, targeted) for _ in range(4)]
    any_ok = torch.stack([r[0] for r in runs]).any(0)
    best_obj = torch.stack([r[1] for r in runs]).amax(0)
    assert torch.equal(okn, any_ok)
    assert torch.allclose(objn[~any_ok], best_obj[~any_ok], atol=1e-5)
    assert (~any_ok).sum() > 0
    assert _dist(many, x, norm).max() <= eps + 1e-5 and many.min() >= 0 and many.max() <= 1


def _reference_pgd(model, x, y, eps, alpha, steps, norm):
    """A straightforward per-batch PGD without random start, written independently of utils.adversarial."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        loss = nn.CrossEntropyLoss()(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            else:
                gn = torch.sqrt((grad ** 2).sum(dim=(1, 2, 3), keepdim=True))
                x_adv = x_adv + alpha * grad / torch.where(gn > 0, gn, torch.ones_like(gn))
                d = x_adv - x
                dn = torch.sqrt((d ** 2).sum(dim=(1, 2, 3), keepdim=True))
                x_adv = x + d * torch.where(dn > eps, eps / dn, torch.ones_like(dn))
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


@pytest.mark.parametrize("norm,eps", [("linf", 0.04), ("l2", 0.4)])
def test_robust_accuracy_matches_reference(trained, norm, eps):
    torch.manual_seed(0)
    model, test, _, _ = trained
    bs, n_max, steps, alpha = 64, 250, 5, eps / 4
    attack = PGD(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False)
    res = robust_accuracy(model, test, attack, batch_size=bs, max_images=n_max)
    correct = n = 0
    model.eval()
    for _, x, y in test.batches(bs):
        x, y = x[:n_max - n], y[:n_max - n]
        if len(y) == 0:
            break
        x_ref = _reference_pgd(model, x, y, eps, alpha, steps, norm)
        assert torch.allclose(attack(model, x, y), x_ref, atol=1e-5)
        with torch.no_grad():
            correct += (model(x_ref).argmax(1) == y).sum().item()
        n += len(y)
    assert res["robust_eval"] == {**attack.settings(), "images": 250}
    assert res["robust_acc"] == correct / n
    assert 0.2 < res["robust_acc"] < 0.95  # a case where the attack matters but does not win everything
    # channels_last input gives the same number
    assert robust_accuracy(model, test, attack, batch_size=bs, max_images=n_max, channels_last=True) == res


def test_pgd_class_settings_and_generator(trained):
    model, _, x, y = trained
    atk = PGD(eps=0.05, alpha=0.01, steps=3, norm="l2", restarts=2, clamp=False)
    assert atk.settings() == {"eps": 0.05, "alpha": 0.01, "steps": 3, "norm": "l2", "random_start": True,
                              "restarts": 2, "targeted": False, "clamp": False, "window": 0,
                              "eps_outside": 0.0}
    a = atk(model, x[:20], y[:20], generator=torch.Generator().manual_seed(7))
    b = atk(model, x[:20], y[:20], generator=torch.Generator().manual_seed(7))
    c = atk(model, x[:20], y[:20], generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # callable from no-grad / inference-mode code (e.g. inside an evaluation loop)
    with torch.inference_mode():
        xi = x[:20].clone()
        d = PGD(0.05, 0.01, 3, random_start=False)(model, xi, y[:20])
    assert torch.equal(d, PGD(0.05, 0.01, 3, random_start=False)(model, x[:20], y[:20]))


@pytest.mark.parametrize("kw", [dict(eps=-0.1), dict(alpha=-1.0), dict(steps=-1), dict(norm="l1"), dict(restarts=0),
                                dict(eps=float("nan")), dict(steps=2.5), dict(window=-1), dict(window=1.5)])
def test_bad_arguments_raise(trained, kw):
    model, _, x, y = trained
    args = {**dict(eps=0.03, alpha=0.01, steps=2), **kw}
    with pytest.raises(ValueError):
        pgd(model, x[:4], y[:4], **args)
    with pytest.raises(ValueError):
        PGD(**args)


def test_robust_eval_uses_its_settings_and_a_seeded_start(trained):
    model, test, _, _ = trained
    settings = RobustEvalSettings(eval_eps=0.04, eval_alpha=0.01, eval_steps=4)
    res = robust_eval(model, test, settings, seed=3, batch_size=128, channels_last=True)
    ev = res["robust_eval"]
    assert (ev["eps"], ev["alpha"], ev["steps"], ev["images"], ev["norm"]) == (0.04, 0.01, 4, len(test), "linf")
    assert res == robust_eval(model, test, settings, seed=3, batch_size=128, channels_last=True)  # reproducible
    assert _acc(model, *next(test.batches(len(test)))[1:]) > res["robust_acc"]
    # the defaults are the standard evaluation: L-inf 8/255, step 2/255, 20 steps, random start
    ev = robust_eval(model, test, RobustEvalSettings(eval_steps=2), seed=0, batch_size=512)["robust_eval"]
    assert (ev["eps"], ev["alpha"], ev["steps"], ev["random_start"]) == (8 / 255, 2 / 255, 2, True)
    assert RobustEvalSettings().eval_steps == 20
    with pytest.raises(UserError):
        RobustEvalSettings(eval_eps=-1.0).check()


# ----- window: patch-shaped perturbations ------------------------------------------------------

def _changed_box(out, x):
    """Per image: the changed pixels (any channel) as a (N, H, W) mask and its bounding-box height / width."""
    changed = (out != x).any(1)
    rows, cols = changed.any(2), changed.any(1)
    idx_h = torch.arange(changed.shape[1]).expand_as(rows)
    idx_w = torch.arange(changed.shape[2]).expand_as(cols)
    big = 10 ** 6
    height = torch.where(rows, idx_h, -big).amax(1) - torch.where(rows, idx_h, big).amin(1) + 1
    width = torch.where(cols, idx_w, -big).amax(1) - torch.where(cols, idx_w, big).amin(1) + 1
    return changed, height, width


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 1.0, 0.25), ("l2", 2.0, 0.5)])
@pytest.mark.parametrize("random_start", [True, False])
def test_window_changes_only_one_kxk_window_per_image(trained, norm, eps, alpha, random_start):
    model, _, x, y = trained
    k = 3
    for inputs in (x, _extreme_inputs(x)):
        out = pgd(model, inputs, y, eps, alpha, 6, norm=norm, random_start=random_start, restarts=2, window=k,
                  generator=torch.Generator().manual_seed(5))
        assert out.min() >= 0 and out.max() <= 1
        assert _dist(out, inputs, norm).max() <= eps + 1e-5
        changed, height, width = _changed_box(out, inputs)
        moved = changed.flatten(1).any(1)
        assert moved.float().mean() > 0.9  # nearly every image was perturbed ...
        assert (height[moved] <= k).all() and (width[moved] <= k).all()  # ... inside one k x k window only
        # the windows are drawn per image: they are not all at one place
        centres = {(int(r), int(c)) for r, c in zip(changed.float().flatten(1).argmax(1) // 8,
                                                    changed.float().flatten(1).argmax(1) % 8)}
        assert len(centres) > 5


def test_window_linf_eps_one_is_a_strong_patch_attack(trained):
    """ε = 1 inside a 4x4 window (a quadrant's size) beats the ε = 0.03 whole-image attack by far;
    restarts (other windows) never do worse; the window is part of the settings and the result is seeded."""
    model, _, x, y = trained
    whole = _acc(model, pgd(model, x, y, 0.03, 0.01, 10, generator=torch.Generator().manual_seed(0)), y)
    one = pgd(model, x, y, 1.0, 0.25, 10, random_start=False, window=4, generator=torch.Generator().manual_seed(0))
    acc_one = _acc(model, one, y)
    acc_three = _acc(model, pgd(model, x, y, 1.0, 0.25, 10, random_start=False, restarts=3, window=4,
                                generator=torch.Generator().manual_seed(0)), y)
    assert acc_one < whole - 0.2
    assert acc_three <= acc_one
    atk = PGD(1.0, 0.25, 10, random_start=False, window=4)
    assert atk.settings()["window"] == 4
    assert torch.equal(atk(model, x, y, generator=torch.Generator().manual_seed(0)), one)
    # window = the image size is the whole image: the same as window = 0 up to the (unused) window draw
    full = pgd(model, x, y, 0.03, 0.01, 5, random_start=False, window=8)
    assert torch.equal(full, pgd(model, x, y, 0.03, 0.01, 5, random_start=False))


def test_window_larger_than_the_image_raises(trained):
    model, _, x, y = trained
    with pytest.raises(ValueError, match="window 9 is larger"):
        pgd(model, x[:4], y[:4], 1.0, 0.25, 2, window=9)


@pytest.mark.parametrize("random_start", [True, False])
def test_window_with_eps_outside_budgets(trained, random_start):
    """L∞ ε = 1 in the window and eps_outside everywhere else: each part stays within its own budget and in [0, 1]."""
    model, _, x, y = trained
    k, eps_out = 3, 0.03
    for inputs in (x, _extreme_inputs(x)):
        gen = torch.Generator().manual_seed(11)
        out = pgd(model, inputs, y, 1.0, 0.25, 6, random_start=random_start, window=k, eps_outside=eps_out, generator=gen)
        assert out.min() >= 0 and out.max() <= 1
        diff = (out - inputs).abs().amax(1)  # (N, H, W)
        big = diff > eps_out + 1e-6  # pixels that moved more than the outside budget: only inside the window
        _, height, width = _changed_box(big.unsqueeze(1).float(), torch.zeros_like(big.unsqueeze(1).float()))
        moved = big.flatten(1).any(1)
        assert moved.float().mean() > 0.9
        assert (height[moved] <= k).all() and (width[moved] <= k).all()
        # outside the window the image moved too (by at most eps_outside, most pixels by about that much)
        outside = ~big & (diff > 0)
        assert outside.flatten(1).sum(1).float().mean() > 0.5 * (64 - k * k)
        assert diff.max() > 0.5
    # the same draw of windows with eps_outside = 0 leaves the outside untouched
    only = pgd(model, x, y, 1.0, 0.25, 6, random_start=random_start, window=k, generator=torch.Generator().manual_seed(11))
    _, height, width = _changed_box(only, x)
    assert (height <= k).all() and (width <= k).all()


@pytest.mark.parametrize("kw", [dict(eps_outside=0.03), dict(eps_outside=0.03, window=3, norm="l2"),
                                dict(eps_outside=0.5, window=3, eps=0.1), dict(eps_outside=-0.01, window=3)])
def test_eps_outside_needs_a_linf_window_and_at_most_eps(trained, kw):
    model, _, x, y = trained
    args = {**dict(eps=1.0, alpha=0.25, steps=2), **kw}
    with pytest.raises(ValueError):
        PGD(**args)
    with pytest.raises(ValueError):
        pgd(model, x[:4], y[:4], **args)


@pytest.mark.parametrize("kw", [dict(norm="linf"), dict(norm="l2"), dict(norm="linf", restarts=3),
                                dict(norm="linf", window=3, eps=1.0, eps_outside=0.02), dict(norm="l2", window=3),
                                dict(norm="linf", random_start=False, window=3, restarts=2)])
def test_skip_leaves_the_generator_where_the_attack_does(trained, kw):
    """``PGD.skip`` (a batch another rank attacks) makes exactly the attack's random draws."""
    model, _, x, y = trained
    attack = PGD(**{"eps": 0.05, "alpha": 0.01, "steps": 2, **kw})
    g_attack, g_skip = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    start = g_skip.get_state()
    attack(model, x[:20], y[:20], generator=g_attack)
    attack.skip(x[:20], g_skip)
    assert not torch.equal(g_skip.get_state(), start)  # the attack draws something: the check below can fail
    assert torch.equal(g_skip.get_state(), g_attack.get_state())
    # nothing to attack: neither draws
    for atk, xs in ((PGD(eps=0.0, steps=2), x[:20]), (attack, x[:0])):
        atk(model, xs, y[:len(xs)], generator=g_attack)
        atk.skip(xs, g_skip)
    assert torch.equal(g_skip.get_state(), g_attack.get_state())


def test_sharded_robust_accuracy_sums_to_the_one_process_number(trained, monkeypatch):
    """Under torchrun each rank attacks every world-th batch from the random start one process would draw."""
    import utils.run.distributed as dist

    model, test, _, _ = trained
    attack = PGD(eps=0.04, alpha=0.01, steps=3, restarts=2)  # random starts: skipped batches must advance the generator
    kw = dict(batch_size=40, max_images=250)
    one = robust_accuracy(model, test, attack, generator=torch.Generator().manual_seed(3), **kw)
    correct = n = 0
    for r in range(3):
        monkeypatch.setattr(dist, "owns_batch", lambda b, r=r: b % 3 == r)  # rank r of 3; the sum is done here
        part = robust_accuracy(model, test, attack, generator=torch.Generator().manual_seed(3), **kw)
        n_r = part["robust_eval"]["images"]
        assert n_r == (90, 80, 80)[r]  # batches 0, 3, 6 (the last 10 images) | 1, 4 | 2, 5
        correct += round(part["robust_acc"] * n_r)
        n += n_r
    assert n == one["robust_eval"]["images"] == 250
    assert correct == round(one["robust_acc"] * 250)
    assert 0.1 < one["robust_acc"] < 0.95


def test_a_signal_stops_the_robust_evaluation_at_the_next_batch(trained):
    """A long PGD evaluation is a batch loop like training: SIGINT/SIGTERM stop it there, not at the next save."""
    model, test, _, _ = trained
    with interrupt.handle_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        with pytest.raises(Interrupted, match="robust evaluation, batch 0"):
            robust_accuracy(model, test, PGD(eps=0.04, alpha=0.01, steps=2), batch_size=50)
    assert robust_accuracy(model, test, PGD(eps=0.04, alpha=0.01, steps=2), batch_size=50)["robust_eval"]["images"] == 300


def test_robust_eval_key_names_the_weights_the_images_and_the_settings(trained):
    import copy

    from utils.adversarial import reusable_robust, robust_eval_key
    model, test, _, _ = trained
    s = RobustEvalSettings(eval_steps=2)
    key = robust_eval_key(model, test, s, 0, 128, False, "off")
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the same weights in another layout
    assert robust_eval_key(cl, test, s, 0, 128, False, "off") == key
    other = [robust_eval_key(model, test, RobustEvalSettings(eval_steps=3), 0, 128, False, "off"),
             robust_eval_key(model, test, s, 1, 128, False, "off"),
             robust_eval_key(model, test, s, 0, 64, False, "off"),
             robust_eval_key(model, test, s, 0, 128, True, "off"),
             robust_eval_key(model, test, s, 0, 128, False, "bf16"),
             robust_eval_key(model, test.subset(torch.arange(len(test) - 1)), s, 0, 128, False, "off")]
    with torch.no_grad():
        next(cl.parameters()).add_(1e-3)
    other.append(robust_eval_key(cl, test, s, 0, 128, False, "off"))
    assert len({key, *other}) == len(other) + 1
    res = robust_eval(model, test, s, seed=0, batch_size=128, amp="off")
    assert res["robust_eval"]["key"] == key
    assert reusable_robust(res, key) == {"robust_acc": res["robust_acc"], "robust_eval": {**res["robust_eval"],
                                                                                          "reused": True}}
    assert reusable_robust(res, other[0]) is None and reusable_robust(None, key) is None
    assert robust_eval_key(model, object(), s, 0, 128, False, "off") is None  # a split not held as tensors
