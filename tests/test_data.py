import torch

from utils.data.augment import Augment
from utils.data.datasets import make_synthetic, seeded_subset
from utils.data.poison import BackdoorSpec, PoisonedTrainSet, draw_poison_indices
from utils.data.triggers import build_trigger


def test_synthetic_is_seeded_balanced_and_not_separable_by_mean_colour():
    a, b = make_synthetic(2000, seed=1), make_synthetic(2000, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.dtype == torch.uint8 and a.x.shape == (2000, 3, 32, 32)
    counts = torch.bincount(a.y, minlength=10)
    assert counts.min() > 150
    # nearest class-centroid on the mean colour is close to chance
    feat = a.x.float().mean(dim=(2, 3))
    cent = torch.stack([feat[a.y == c].mean(0) for c in range(10)])
    test = make_synthetic(1000, seed=2)
    tf = test.x.float().mean(dim=(2, 3))
    pred = torch.cdist(tf, cent).argmin(1)
    assert (pred == test.y).float().mean() < 0.2


def test_poisoned_fraction_equals_pc_and_indices_are_seeded():
    for n, pc in ((5000, 0.1), (1234, 0.02), (100, 0.3)):
        p, q = draw_poison_indices(n, pc, seed=3, cross_ratio=2)
        assert len(p) == round(pc * n) and len(q) == round(2 * pc * n)
        assert len(set(p.tolist()) & set(q.tolist())) == 0
        assert torch.equal(p, draw_poison_indices(n, pc, seed=3, cross_ratio=2)[0])
    assert not torch.equal(draw_poison_indices(1000, 0.1, 1)[0], draw_poison_indices(1000, 0.1, 2)[0])


def _poisoned(mode, pc=0.1):
    data = make_synthetic(200, seed=1)
    bd = BackdoorSpec(build_trigger("patch", (3, 32, 32)), "all2one", 7, 10)
    pidx, _ = draw_poison_indices(len(data), pc, seed=0)
    return data, PoisonedTrainSet(data, bd, mode, pc, pidx if mode == "fixed" else None)


def test_fixed_poisoning_applies_trigger_and_label_to_exactly_the_saved_indices():
    data, ps = _poisoned("fixed")
    seen_poison = 0
    for idx, x, y in ps.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        clean = data.x[idx].float() / 255
        is_p = ps.is_poison[idx]
        changed = (x != clean).flatten(1).any(1)
        assert torch.equal(changed, is_p)
        assert (y[is_p] == 7).all() and torch.equal(y[~is_p], data.y[idx][~is_p])
        seen_poison += int(is_p.sum())
    assert seen_poison == 20
    assert (ps.train_labels[ps.poison_idx] == 7).all()


def test_batch_mode_poisons_the_first_k_of_every_batch():
    data, ps = _poisoned("batch")
    idx, x, y = next(ps.batches(50, shuffle=False))
    clean = data.x[idx].float() / 255
    changed = (x != clean).flatten(1).any(1)
    assert changed[:5].all() and not changed[5:].any()
    assert (y[:5] == 7).all()


def test_augment_crop_shifts_whole_pixels_and_keeps_shape():
    x = torch.rand(8, 3, 32, 32)
    out = Augment(crop_pad=3, p_crop=1.0)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every output pixel is either padding (0) or an input pixel value of the same image
    for i in range(8):
        vals = set(torch.round(x[i] * 1e5).flatten().tolist()) | {0.0}
        assert set(torch.round(out[i] * 1e5).flatten().tolist()) <= vals
    assert not torch.equal(out, x)
    assert torch.equal(Augment()(x), x)


def test_seeded_subset():
    a = seeded_subset(100, 10, seed=0)
    assert torch.equal(a, seeded_subset(100, 10, seed=0)) and len(a) == 10 and len(set(a.tolist())) == 10
    assert seeded_subset(100, None, 0) is None and seeded_subset(100, 500, 0) is None


def test_clean_label_poisons_only_target_class_images_and_keeps_their_labels():
    import pytest

    from utils.data.build import build_poisoned_train
    from utils.run.errors import UserError

    data = make_synthetic(600, seed=1)
    bd = BackdoorSpec(build_trigger("sig", (3, 32, 32)), "all2one", 3, 10)
    target_n = int((data.y == 3).sum())
    clean = build_poisoned_train(data, bd, "fixed", 0.05, 0.0, seed=0, clean_label=True)
    dirty = build_poisoned_train(data, bd, "fixed", 0.05, 0.0, seed=0)
    assert len(clean.poison_idx) == len(dirty.poison_idx) == 30 < target_n
    assert bool((data.y[clean.poison_idx] == 3).all())  # only target-class images ...
    assert torch.equal(clean.train_labels, data.y)  # ... and every label is kept
    assert not bool((data.y[dirty.poison_idx] == 3).all()) and not torch.equal(dirty.train_labels, data.y)
    _, x, y = next(clean.batches(600, shuffle=False))
    triggered = bd.trigger(data.x.float().div(255))
    assert torch.equal(x[clean.poison_idx], triggered[clean.poison_idx]) and torch.equal(y, data.y)
    with pytest.raises(UserError, match="the target class has only"):
        build_poisoned_train(data, bd, "fixed", 0.5, 0.0, seed=0, clean_label=True)
