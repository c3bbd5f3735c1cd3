"""The evidence a defense weighs before it relies on one backdoor target (utils/defenses/filtering.py)."""
import csv
import io
import json

import pytest
import torch

from types import SimpleNamespace

from utils.defenses.filtering import (FilterSettings, apply_strong_splits, decide_target, decisive, filter_class,
                                     peel_strong, split_stages)
from utils.defenses.target import vote_result


def _vote(counts):
    return vote_result(torch.tensor(counts))


def test_a_decisive_vote_is_ahead_of_every_other_class():
    assert decisive(_vote([289, 18, 19, 15, 28, 2, 19, 14, 49, 47]))  # measured: blend, PreActResNet18
    assert not decisive(_vote([52, 25, 60, 52, 54, 17, 43, 49, 57, 91]))  # measured: patch, a spread vote
    assert not decisive(_vote([120, 100, 90, 80, 70, 60, 50, 40, 30, 20]))  # the winner is not weak-free / ahead
    assert not decisive(None) and not decisive({"estimate": None, "vote_share": None})


def test_the_target_is_confirmed_by_the_split_or_a_decisive_vote_else_the_defense_goes_class_agnostic():
    clear, spread = _vote([289, 18, 19, 15, 28, 2, 19, 14, 49, 47]), _vote([52, 25, 60, 52, 54, 17, 43, 49, 57, 91])
    d = decide_target(None, clear, [], 10)
    assert (d["mode"], d["target"]) == ("target", 0) and "decisive" in d["why"]
    d = decide_target(None, spread, [0], 10)  # the vote points at 9, the split found the poison cluster in 0
    assert (d["mode"], d["target"]) == ("agnostic", None)  # the vote's winner (9) is not confirmed
    # a weak vote (9 wins with 16.5 %) is noise: a split cluster in its winner's class does not make it the target
    assert spread["weak"] and not clear["weak"]
    d = decide_target(None, spread, [9], 10)
    assert (d["mode"], d["target"]) == ("agnostic", None) and "weak, its winner 9 no candidate" in d["why"]
    d = decide_target(0, spread, [0], 10)  # a given target with its poison cluster: confirmed
    assert (d["mode"], d["target"]) == ("target", 0) and "split" in d["why"]
    d = decide_target(3, clear, [0], 10)  # a wrong given target: replaced by the confirmed vote winner, and said so
    assert (d["mode"], d["target"]) == ("target", 0) and "given target 3 is not confirmed" in d["why"]
    d = decide_target(3, spread, [], 10)  # all2all-like: nothing confirmed
    assert (d["mode"], d["target"]) == ("agnostic", None) and d["given"] == 3 and not d["vote_decisive"]
    # clusters in many classes are all2all's (one per class), not one target's: the split no longer confirms
    d = decide_target(9, spread, [0, 4, 7, 9], 10)
    assert (d["mode"], d["target"]) == ("agnostic", None) and "no single target" in d["why"]
    d = decide_target(9, spread, [0, 9], 10)  # two of ten: a clean class may split too
    assert (d["mode"], d["target"]) == ("target", 9)
    d = decide_target(0, spread, [0, 19, 20, 38, 39], 43)  # the 43-class patch model: 5 of 43 classes
    assert (d["mode"], d["target"]) == ("target", 0)


def test_one_strong_split_confirms_its_class_however_many_classes_split_and_however_the_vote_went():
    """The 43-class patch model of attack seed 1: 11 of 43 classes split, the vote not decisive (its winner 23),
    class 0's cluster spread far beyond every class's: the target is 0, also when a wrong class is given."""
    vote = _vote([60] + [20] * 22 + [70] + [20] * 19)
    assert not vote["weak"] and not decisive(vote) and vote["estimate"] == 23
    splits = [0, 1, 5, 9, 12, 19, 20, 23, 30, 38, 39]
    assert decide_target(None, vote, splits, 43)["mode"] == "agnostic"  # without the strong class: 11 > 20 % of 43
    d = decide_target(None, vote, splits, 43, strong_classes=[0])
    assert (d["mode"], d["target"], d["strong_classes"]) == ("target", 0, [0]) and "far more" in d["why"]
    d = decide_target(1, _vote([52, 25, 60, 52, 54, 17, 43, 49, 57, 91]), [0, 1], 10, strong_classes=[0])
    assert (d["mode"], d["target"]) == ("target", 0), d  # the given class's ordinary split is one of the clean ones
    d = decide_target(None, vote, splits, 43, strong_classes=[0, 5])  # two strong classes: no single target
    assert d["mode"] == "agnostic"


def _cut_poisons(n_classes=10, per_class=120, genuine=60, poisons=(150, 150), sub_mode=False, seed=0):
    """Samples of a 10-class infected model whose target class 0 holds two far-apart blobs of triggered images of
    classes 1-9 (the second beside the genuine images): 2-means cuts the poisons, not the class. Clean classes
    are one Gaussian blob each, confidently like two neighbours (spread about 2). ``sub_mode``: the genuine target
    images in two groups, like three neighbours and like one. Returns data, reps, logits."""
    g = torch.Generator().manual_seed(seed)
    labels, reps, logits, truth = [], [], [], []
    for c in range(n_classes):
        n = genuine + sum(poisons) if c == 0 else per_class
        x = torch.randn(n, 16, generator=g)
        z = torch.zeros(n, n_classes)
        z[:, c] = 10.0
        runner = (c + 1 + torch.randint(0, 2, (n,), generator=g)) % n_classes  # genuine images: two neighbours
        z[torch.arange(n), runner] = 2.0
        t = torch.zeros(n, dtype=torch.bool)
        if c == 0 and sub_mode:  # the genuine images: half like three neighbours alike, apart from half like one
            half = genuine // 2
            z[:genuine, 1:4] = 0.0
            z[torch.arange(half), 1 + torch.randint(0, 3, (half,), generator=g)] = 2.0
            z[half:genuine, 1] = 2.0
            x[:half] += 6.0
        if c == 0:
            t[genuine:] = True
            x[:genuine + poisons[1]] -= 20.0  # the genuine images and the second blob of poisons
            x[:genuine] += 3.0  # the genuine images a little apart from the poisons beside them
            x[genuine + poisons[1]:] += 20.0
            own = 1 + torch.randint(0, n_classes - 1, (int(t.sum()),), generator=g)  # the poisons' own classes
            z[t] = 0.0
            z[t, 0] = 10.0
            z[torch.nonzero(t).flatten(), own] = 5.0
        labels.append(torch.full((n,), c))
        reps.append(x)
        logits.append(z)
        truth.append(t)
    data = SimpleNamespace(truth=torch.cat(truth), train_labels=torch.cat(labels))
    return data, torch.cat(reps), torch.cat(logits)


def test_a_split_refused_between_two_halves_of_the_poisons_is_applied_when_it_stands_out_against_the_classes():
    data, reps, logits = _cut_poisons()
    settings = FilterSettings(spectre_layer="net")
    per_class = [filter_class(None, data, c, settings, logits, 0, 64, spectre=False,
                              reps=reps[data.train_labels == c]) for c in range(10)]
    target = per_class[0]
    assert not target["split_applied"]  # the two halves of the poisons spread alike: the check refuses
    cand = target["candidate"]
    assert len(cand) == 150 and bool(data.truth[cand].all())
    assert sum(f["split_applied"] for f in per_class) == 0
    off = [dict(f, record={k: dict(v) if isinstance(v, dict) else v for k, v in f["record"].items()}) for f in per_class]
    assert apply_strong_splits(off, 0.0, data.truth)[0] == [] and not off[0]["split_applied"]  # 0: off
    strong, baseline = apply_strong_splits(per_class, 2.0, data.truth)
    assert strong == [0] and 1.5 < baseline < 3, baseline
    assert target["split_applied"] and torch.equal(target["split"], cand)
    rec = target["record"]["split"]
    assert rec["strong"] and rec["applied"] and rec["removed"] == 150 and rec["precision"] == 1.0
    d = decide_target(None, None, [f["class"] for f in per_class if f["split_applied"]], 10, strong_classes=strong)
    assert (d["mode"], d["target"]) == ("target", 0)
    # what the split kept holds the other half of the poisons: split once more, its strong sub-cluster goes too
    peel_strong(target, logits, settings, baseline, 0, data.truth)
    assert rec["peeled"]["applied"] and rec["peeled"]["removed"] == 150 and rec["peeled"]["precision"] == 1.0
    assert torch.equal(target["split"], torch.nonzero(data.truth).flatten()) and rec["removed"] == 300
    # both leave the pool; the poison set is drawn from the split's own cluster only (the peeled one holds genuine
    # images on real models)
    stages = split_stages([target])
    assert torch.equal(stages["class_split"], cand) and len(stages["class_split_peeled"]) == 150
    assert "class_split_peeled" not in split_stages(per_class[1:])


def test_a_genuine_sub_mode_left_by_the_split_is_not_peeled():
    """All poisons in one cluster (the split applied as usual); the genuine images left hold a sub-mode that
    passes the split's own check (spread 3 against 1) but is not strong against the other classes: it stays."""
    data, reps, logits = _cut_poisons(poisons=(300, 0), sub_mode=True)
    settings = FilterSettings(spectre_layer="net")
    per_class = [filter_class(None, data, c, settings, logits, 0, 64, spectre=False,
                              reps=reps[data.train_labels == c]) for c in range(10)]
    target = per_class[0]
    assert target["split_applied"] and torch.equal(target["split"], torch.nonzero(data.truth).flatten())
    strong, baseline = apply_strong_splits(per_class, 2.0, data.truth)
    peel_strong(target, logits, settings, baseline, 0, data.truth)
    peeled = target["record"]["split"]["peeled"]
    assert sorted(peeled["cluster_sizes"]) == [30, 30] and max(peeled["cluster_spread"]) > 2.5
    assert not peeled["applied"] and len(target["split"]) == 300


def test_spectre_takes_its_share_from_what_the_split_left_in_the_class():
    """Once the split removed the poison majority, SPECTRE's share comes out of the rest, not out of everything."""
    g = torch.Generator().manual_seed(0)
    n, poisons = 400, torch.arange(300)  # 300 poisons (the split's cluster) and 100 genuine images, all labelled 0
    truth = torch.zeros(n, dtype=torch.bool)
    truth[poisons] = True
    data = SimpleNamespace(truth=truth, train_labels=torch.zeros(n, dtype=torch.long))
    reps = torch.randn(n, 16, generator=g)
    settings = FilterSettings(spectre_layer="net", spectre_remove=0.25)
    out = filter_class(None, data, 0, settings, None, 0, 64, split=False, reps=reps, exclude=poisons)
    assert not torch.isin(out["spectre"], poisons).any()
    assert out["record"]["spectre"]["considered"] == 100 and 15 <= len(out["spectre"]) <= 35
    whole = filter_class(None, data, 0, settings, None, 0, 64, split=False, reps=reps)
    assert whole["record"]["spectre"]["considered"] == 400

@pytest.mark.slow
def test_the_43_class_set_runs_attack_aft_and_pud_end_to_end(tmp_path):
    """synthetic43 (GTSRB's class count and imbalance): the many-class path through the attack, AFT and PUD."""
    import PUD
    import pbe_main
    import train_blend
    from conftest import NO_FIGURES, cli

    common = ("--device", "cpu", "--bs", "64", "--eval_steps", "1", "--test_subset", "100", *NO_FIGURES)
    attack = tmp_path / "attack"
    assert cli(train_blend.main, "--dataset", "synthetic43", "--arch", "cnn", "--trigger_type", "patch",
               "--train_subset", "900", "--n_iters", "1", "--lr_C", "0.05", *common, "--out_dir", attack) == 0
    ck = torch.load(attack / "model.pt", weights_only=True)
    assert ck["num_classes"] == 43 and ck["dataset"] == "synthetic43"
    model = ("--model_path", attack / "model.pt", *common)
    assert cli(pbe_main.main, *model, "--aft_epochs", "1", "--adv_epochs", "1", "--adv_steps", "1",
               "--out_dir", tmp_path / "aft") == 0
    assert cli(PUD.main, *model, "--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0",
               "--step_partial", "0", "0", "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6",
               "--step_pgd_steps", "1", "--top_rates", "0.5", "--init_ratio", "0.3", "--unlearn_epochs", "1",
               "--mt_epochs", "1", "--target_images", "86",
               "--out_dir", tmp_path / "pud") == 0
    s = json.loads((tmp_path / "pud" / "summary.json").read_text())
    assert len(s["target"]["votes"]) == 43 and s["target"]["decision"]["mode"] in ("target", "agnostic")
    split_on = [c["class"] for c in s["spectre_initial"]["classes"] if "split" in c]
    assert len(split_on) >= 40, split_on  # the split ran on (nearly) every one of the 43 classes, not one target
    for d in ("aft", "pud"):
        f = json.loads((tmp_path / d / "summary.json").read_text())["final"]
        assert {"clean_acc", "asr", "robust_acc"} <= set(f), d
    # every class's accuracy before and after, to read the target class against the others (the attack's too)
    for summary in (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("attack", "aft", "pud")):
        for part in [summary["final"]] + ([summary["initial"]] if "initial" in summary else []):
            acc = part["per_class_acc"]
            assert len(acc) == 43 and all(a is None or 0 <= a <= 1 for a in acc)
            assert any(a is not None for a in acc)
            # the target class's entry is the target-class accuracy measured on its own (the attack's target, 0)
            assert acc[0] == pytest.approx(part["target_class_acc"])
    assert [json.loads((tmp_path / d / "summary.json").read_text())["target_class"] for d in ("aft", "pud")] == [0, 0]
    from utils import report
    table = report.main([str(tmp_path / d) for d in ("attack", "aft", "pud")] + ["--per_class", "--csv"])
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [(r["classes"], r["target_class"]) for r in rows] == [("43", "0")] * 3
    assert rows[0]["target_drop_rank"] == ""  # an attack run: nothing before it to drop from
    for r, d in zip(rows[1:], ("aft", "pud")):  # ranked among the classes with test images (100 images: not all 43)
        s = json.loads((tmp_path / d / "summary.json").read_text())
        shown = sum(a is not None and b is not None
                    for a, b in zip(s["initial"]["per_class_acc"], s["final"]["per_class_acc"]))
        rank, of = map(int, r["target_drop_rank"].split("/"))
        assert of == shown and 1 <= rank <= of, (r, shown)
