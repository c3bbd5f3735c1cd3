"""The target-class split (utils.defenses.class_split) and PUD's 'filtered' poison candidates."""
import pytest
import torch

from utils.defenses.class_split import effective_classes, non_target_confidence, split_target_class, two_means
from utils.defenses.selection import auto_candidates, poison_candidates, resolve_candidates
from utils.run.errors import UserError

TARGET = 0
CLASSES = 10


def planted(n_clean=120, n_poison=150, dim=32, evidence_on_poison=True, concentrated=None, seed=0):
    """Target-labelled samples: a genuine cluster and a poison cluster (by default the larger, as at pc = 0.1).

    Every sample's logits favour the target. The poisons are images of the other classes, so their non-target
    logits peak strongly on their own (random) source class; genuine images lean weakly to one neighbouring
    class (1). ``evidence_on_poison=False`` swaps the two logit patterns between the clusters; ``concentrated``
    (a cluster's truth value) makes that cluster's strong evidence point at class 2 only.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_clean + n_poison
    truth = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    reps = torch.randn(n, dim, generator=g)
    reps[truth] += 8.0 * torch.randn(dim, generator=g) / dim ** 0.5
    logits = torch.randn(n, CLASSES, generator=g)
    logits[:, TARGET] += 12.0
    strong = torch.nonzero(truth == evidence_on_poison).flatten()
    weak = torch.nonzero(truth != evidence_on_poison).flatten()
    src = torch.randint(1, CLASSES, (len(strong),), generator=g)
    if concentrated is not None and concentrated == evidence_on_poison:
        src[:] = 2
    logits[strong, src] += 6.0
    logits[weak, 1] += 3.0
    perm = torch.randperm(n, generator=g)  # the split must not depend on the order
    return reps[perm], logits[perm], truth[perm]


def test_split_flags_the_poison_majority_cluster():
    reps, logits, truth = planted()
    res = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    flagged = res.flagged_mask
    precision = (flagged & truth).sum() / flagged.sum()
    recall = (flagged & truth).sum() / truth.sum()
    assert precision >= 0.95 and recall >= 0.95
    assert res.confidence[res.flagged_cluster] > res.confidence[1 - res.flagged_cluster]
    assert sorted(res.sizes) == sorted([int(flagged.sum()), int((~flagged).sum())])
    assert res.applied and res.spread[res.flagged_cluster] >= 1.25 * res.spread[1 - res.flagged_cluster]
    assert res.separation > 1.0


def test_split_is_not_applied_when_the_confident_cluster_spreads_over_few_classes():
    """A sub-mode of one class confidently like a single other class (not images of many classes): nothing flagged."""
    reps, logits, truth = planted(concentrated=True)
    res = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    assert not res.applied and not res.flagged_mask.any()
    assert res.spread[res.flagged_cluster] < res.spread[1 - res.flagged_cluster]
    assert (res.assign == res.assign[truth][0]).eq(truth).float().mean() >= 0.95  # the clusters themselves were found


def test_a_genuine_sub_mode_cut_off_first_leaves_the_poisons_to_the_second_level():
    """2-means may first cut off a sub-mode of the genuine images, confidently like one neighbour class (a blend model
    of another seed: 202 of 964 images, 177 genuine); the poisons are then found inside the other cluster."""
    reps, logits, truth = planted(n_clean=200, n_poison=150, seed=3)
    genuine = torch.nonzero(~truth).flatten()
    mode = genuine[:80]  # the sub-mode: far away in the representations, strongly like class 1
    g = torch.Generator().manual_seed(4)
    reps[mode] += 16.0 * torch.randn(reps.shape[1], generator=g) / reps.shape[1] ** 0.5
    logits[mode, 1] += 6.0
    first = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1), second_level=False)
    in_mode = torch.zeros(len(truth), dtype=torch.bool)
    in_mode[mode] = True
    assert not first.applied and (first.assign == first.assign[mode][0]).eq(in_mode).float().mean() >= 0.95
    res = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    assert res.applied and res.level == 2
    flagged = res.flagged_mask
    assert (flagged & truth).sum() / flagged.sum() >= 0.95 and (flagged & truth).sum() / truth.sum() >= 0.9


def test_split_follows_the_content_signal_not_the_cluster_size():
    """Which cluster is flagged is decided by the other-class evidence alone: move it and the flag moves."""
    reps, logits, truth = planted(evidence_on_poison=False)
    res = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    assert (res.flagged_mask == ~truth).float().mean() >= 0.95


def test_non_target_confidence_ignores_the_target_logit():
    logits = torch.tensor([[100.0, 2.0, 0.0], [100.0, 0.0, 3.0], [-5.0, 1.0, 1.0]])
    conf, pred = non_target_confidence(logits, 0)
    expected = torch.sigmoid(torch.tensor([2.0, 3.0, 0.0]))
    assert torch.allclose(conf, expected, atol=1e-6) and pred[:2].tolist() == [1, 2]


def test_effective_classes_counts_how_many_classes_predictions_spread_over():
    assert effective_classes(torch.tensor([3, 3, 3]), 5) == pytest.approx(1.0)
    assert effective_classes(torch.tensor([1, 2, 3, 4]), 5) == pytest.approx(4.0)
    assert effective_classes(torch.tensor([1, 1, 2, 2]), 5) == pytest.approx(2.0)


def test_two_means_recovers_two_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(40, 3, generator=g), torch.randn(60, 3, generator=g) + 10.0])
    a = two_means(z, torch.Generator().manual_seed(5))
    assert len(set(a[:40].tolist())) == 1 and len(set(a[40:].tolist())) == 1 and a[0] != a[40]
    assert torch.equal(a, two_means(z, torch.Generator().manual_seed(5)))


def test_split_rejects_mismatched_inputs_and_skips_tiny_sets():
    with pytest.raises(ValueError, match="same samples"):
        split_target_class(torch.zeros(5, 4), torch.zeros(6, 3), 0)
    res = split_target_class(torch.randn(3, 4), torch.randn(3, 3), 0)
    assert not res.flagged_mask.any()


def test_filtered_poison_candidates_are_the_removed_samples():
    labels = torch.tensor([0, 1, 0, 0])
    removed = torch.tensor([0, 3])
    assert torch.equal(poison_candidates("filtered", labels, 0, removed), removed)
    with pytest.raises(UserError, match="removed none"):
        poison_candidates("filtered", labels, 0, torch.zeros(0, dtype=torch.long))


def test_auto_candidates_prefer_the_targets_split_cluster():
    labels, split = torch.tensor([0, 1, 0, 0]), torch.tensor([2, 3])
    assert auto_candidates(0, split) == "split" and auto_candidates(0, split[:0]) == "target"
    assert auto_candidates(0, None) == "target" and auto_candidates(None, split) == "filtered"
    assert torch.equal(poison_candidates("split", labels, 0, None, split), split)
    # without a confirmed target the split's clusters are every class's, not a target's: what the filter removed
    removed = torch.tensor([1, 2])
    assert resolve_candidates("auto", labels, None, removed, split)[0] == "filtered"
    with pytest.raises(UserError, match="split needs a cluster"):
        resolve_candidates("split", labels, None, removed, split)
    mode, cands = resolve_candidates("auto", labels, 0, removed, split)
    assert mode == "split" and torch.equal(cands, split)
    with pytest.raises(UserError, match="split needs a cluster"):
        poison_candidates("split", labels, 0, None, split[:0])

def test_tied_confidences_leave_the_choice_to_the_spread():
    """An overconfident model: genuine images get a runner-up class as confident as the poisons' own classes."""
    reps, logits, truth = planted()
    logits[~truth, 1] += 3.0  # genuine: class 1 at +6, as strong as a poison's source class (slightly more confident)
    tied = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    assert abs(tied.confidence[0] - tied.confidence[1]) <= 0.05  # the case under test
    assert tied.applied and (tied.flagged_mask == truth).float().mean() >= 0.95
    # without the tie rule the (marginally) more confident genuine cluster is the candidate, and the spread check
    # refuses it: nothing is removed at the first level
    strict = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1), confidence_tie=0.0,
                                second_level=False)
    assert not strict.applied and not strict.flagged_mask.any()
    assert strict.confidence[strict.flagged_cluster] > strict.confidence[1 - strict.flagged_cluster]
    # the refused candidate is narrower: the second level splits the wide (poison) cluster again, and what it flags is
    # poison only
    second = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1), confidence_tie=0.0)
    assert second.applied and second.level == 2 and not (second.flagged_mask & ~truth).any()


def test_a_wider_cluster_slightly_less_confident_is_still_the_candidate():
    """Many classes: genuine images with one confident neighbour class (up to 0.1 more confident than the poisons,
    which spread over all their source classes) do not hide the poison cluster; a far less confident one is not
    flagged however wide it spreads (a clean class cut in two)."""
    reps, logits, truth = planted()
    logits[~truth, 1] += 6.0  # genuine: class 1 at +9
    poison = torch.nonzero(truth).flatten()
    src = logits[poison, 1:].argmax(1) + 1
    logits[poison, src] -= 0.5  # the poisons' own class at about +5.5
    res = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    gap = res.confidence[1 - res.flagged_cluster] - res.confidence[res.flagged_cluster]
    assert 0.05 < gap <= 0.1  # the case under test: the genuine cluster is the more confident one
    assert res.applied and (res.flagged_mask == truth).float().mean() >= 0.95
    narrow = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1), confidence_tie=0.05,
                                second_level=False)
    assert not narrow.applied  # the earlier tie of 0.05 refused it
    logits[poison, src] -= 2.0  # now far less confident than the genuine images
    far = split_target_class(reps, logits, TARGET, generator=torch.Generator().manual_seed(1))
    assert not far.applied and not far.flagged_mask.any()
