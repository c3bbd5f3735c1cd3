import pytest
import json
import torch

from conftest import NO_FIGURES, run_script

FAST = ("--test_subset", "200", "--eval_steps", "2", "--device", "cpu", *NO_FIGURES)
TINY = ("--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0", "--step_partial", "0", "0",
        "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6", "--top_rates", "0.5", "--unlearn_epochs", "1",
        "--mt_epochs", "1", "--target_images", "200")


@pytest.mark.slow
def test_pud_runs_end_to_end_and_writes_its_outputs(infected_run, tmp_path):
    out = tmp_path / "pud"
    r = run_script("PUD.py", "--model_path", str(infected_run / "model.pt"), "--out_dir", str(out), *TINY, *FAST,
                   "--figures")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["defense"] == "pud"
    assert s["target"]["estimate"] == 0 and s["target"]["used"] == 0 and 0 < s["target"]["vote_share"] <= 1
    assert s["spectre_initial"]["removed"] > 0 and 0 <= s["spectre_initial"]["precision"] <= 1
    split = s["spectre_initial"]["class_split"]  # the patch poisons are the target class's majority: one cluster
    assert split["precision"] >= 0.9 and split["recall"] >= 0.9, split
    assert s["spectre_initial"]["pool_poison_share"] < 0.01
    assert s["spectre_initial"]["poison_candidates"] == "split"  # the poison set is drawn from the split's cluster
    assert [st["step"] for st in s["steps"]] == [0, 1]
    for st in s["steps"]:
        assert 0 <= st["extra_poison_share"] <= 1 and 0 <= st["poison_precision"] <= 1 and "robust_acc" in st
    # top half of the pool, per label (--balanced_selection 1, PUD's default): each label rounds on its own
    assert abs(s["steps"][0]["next_extra_size"] - 0.5 * s["spectre_initial"]["pool_size"]) <= 10 / 2
    assert s["unlearning"]["epochs"] == 1 and isinstance(s["unlearning"]["clipped"], bool)
    assert s["mt_refresh"]["dropped"] >= s["mt_refresh"]["dropped_poison"] >= 0
    for part in ("initial", "final"):
        assert {"clean_acc", "asr", "robust_acc"} <= set(s[part])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("step_summary" in rec for rec in recs) == 2
    from matplotlib.image import imread

    h, w = imread(out / "curves.png").shape[:2]
    assert h > 0.3 * w, (h, w)  # two rows of panels: per epoch, then per stage (one row is about 0.24 w high)
    assert (out / "samples.png").exists()

    from models import model_from_checkpoint
    from utils.run.checkpoint import load_checkpoint

    ck = load_checkpoint(str(out / "model.pt"))
    model = model_from_checkpoint(ck, "cpu")
    assert ck["defense"]["name"] == "pud" and model is not None

    # suspects.csv: the planted poisons (the attack's poisoned indices) come first
    import csv

    planted = set(load_checkpoint(str(infected_run / "model.pt"))["poisoned_indices"].tolist())
    with open(out / "suspects.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    hit = [int(r["index"]) in planted for r in rows]
    agreed = [h for r, h in zip(rows, hit) if ";" in r["stages"]]  # flagged by two stages or more
    shown = "".join("P" if h else "." for h in hit)
    # SPECTRE now runs on what the split kept, so two stages agree where the poison set (drawn from the split's
    # cluster: 1 % of 2,000 samples) meets the split
    assert len(agreed) >= 20 and sum(agreed) >= 0.9 * len(agreed), shown
    assert all(hit[:50]), shown  # the planted poisons come first
    assert s["suspects"]["count"] == len(rows) and s["suspects"]["recall"] > 0.9
    assert {r["stages"] for r in rows} <= {";".join(c) for c in (("spectre",), ("class_split",), ("poison_set",),
            ("spectre", "class_split"), ("spectre", "poison_set"), ("class_split", "poison_set"),
            ("spectre", "class_split", "poison_set"))}


def test_poison_set_is_drawn_from_target_labelled_samples_by_default():
    """The bottom fraction counts over all samples but picks from the target-labelled ones (``all``: paper code)."""
    import torch

    from utils.defenses.selection import bottom_fraction, poison_candidates

    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    scores = torch.tensor([0.9, 0.1, 0.2, 0.0, 0.8, 0.3, 0.5, 0.4, 0.6, 0.7])
    among = poison_candidates("target", labels, 0)
    assert torch.equal(bottom_fraction(scores, 0.2, among), torch.tensor([2, 6]))
    assert poison_candidates("all", labels, 0) is None
    assert torch.equal(bottom_fraction(scores, 0.2), torch.tensor([1, 3]))


def test_without_a_confirmed_target_the_poison_set_is_ranked_by_its_own_labels_probability():
    """Two suspects labelled 0: a poison (an image of class 1 the infected model gave its backdoor label 0, which the
    current model now calls 1 but still finds close to 0) and a clean image the fine-tuning merely moved (now
    unsure). Consistency ranks the moved clean image lower; the label's probability ranks the poison lower."""
    from utils.defenses.selection import POISON_SCORES, bottom_fraction, consistency_scores, resolve_poison_score

    ref = torch.tensor([[5.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    cur = torch.tensor([[4.0, 5.0, 0.0], [0.4, 0.5, 0.0]])
    labels = torch.tensor([0, 0])
    consistency = consistency_scores(ref, cur, argmax_penalty=True)
    pick = {name: bottom_fraction(score(consistency, cur, labels), 0.5).tolist()
            for name, score in POISON_SCORES.items()}
    assert pick == {"consistency": [1], "label": [0]}
    assert resolve_poison_score("auto", None) == "label" and resolve_poison_score("auto", 3) == "consistency"
    assert resolve_poison_score("consistency", None) == "consistency"


def test_a_confirmed_split_cluster_gives_a_poison_set_of_half_of_it():
    """--split_poison_share 0.5: from a confirmed target's split cluster the poison set is at least half of it; from
    any other candidates (or with the share 0) it is --poison_fraction of all samples."""
    from utils.defenses.pud import PUDSettings, poison_set_fraction

    cluster = torch.arange(500)
    pud = PUDSettings(poison_fraction=0.02)
    assert poison_set_fraction(pud, "split", cluster, 5000) == pytest.approx(0.05)  # 250 of the 500
    assert poison_set_fraction(pud, "split", cluster[:100], 5000) == pytest.approx(0.02)  # a fifth would be fewer
    assert poison_set_fraction(pud, "filtered", cluster, 5000) == pytest.approx(0.02)
    assert poison_set_fraction(PUDSettings(poison_fraction=0.02, split_poison_share=0), "split", cluster, 5000) == \
        pytest.approx(0.02)


def test_the_mean_teacher_goes_on_ascending_on_the_poison_set(tiny_attack_run, tmp_path, monkeypatch):
    """--mt_ascent 1 (default): every mean-teacher batch is joined by a poison-set batch whose clipped CE is
    subtracted, with unlearning's weight (clean epochs alone let the backdoor back)."""
    import PUD
    from conftest import cli
    from utils.defenses import pud as pud_module

    calls, real = [], pud_module.bounded_poison_ce

    def spy(logits, y, bound=None):
        calls.append((len(y), bound))
        return real(logits, y, bound)

    monkeypatch.setattr(pud_module, "bounded_poison_ce", spy)
    restored = []

    class CountedHeldLayer(pud_module.HeldLayer):
        def restore(self, _i=None):
            restored.append(1)
            super().restore()

    monkeypatch.setattr(pud_module, "HeldLayer", CountedHeldLayer)
    out = tmp_path / "pud"
    # --unlearn_where always: unlearning ascends whatever this one-epoch model's class split finds
    assert cli(PUD.main, "--model_path", tiny_attack_run / "model.pt", "--out_dir", out, *TINY, *FAST,
               "--unlearn_where", "always", "--unlearn_lambda", "0.3") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["mean_teacher"]["ascent"]["used"] and s["mean_teacher"]["ascent"]["lambda"] == 0.3
    poison_size = s["steps"][-1]["poison_set_size"]
    assert calls and all(0 < n <= poison_size and bound == 10 for n, bound in calls)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    images = sum(r["images"] for r in recs if r.get("stage") == "mean_teacher")
    assert len(calls) == -(-images // 128)  # one poison batch joined to every mean-teacher batch (--bs 128)
    # --hold_head 1 (default): the classifier layer is put back after every step of both ascending stages
    assert s["unlearning"]["classifier_layer"] == "held" and s["mean_teacher"]["ascent"]["classifier_layer"] == "held"
    assert len(restored) == s["unlearning"]["batches"] + len(calls)


def test_the_classifier_layer_is_held_only_where_a_stage_ascends():
    """Held where the stage ascends and --hold_head is 1; a model without an nn.Linear layer is trained whole, and
    the record says why."""
    from models import build_model
    from utils.defenses.pud import PUDSettings, head_use

    cnn, ascends = build_model("cnn", 10), {"used": True, "lambda": 0.3}
    assert head_use(PUDSettings(), ascends, cnn) == "held"
    assert head_use(PUDSettings(), {"used": False}, cnn) == "trained"
    assert head_use(PUDSettings(hold_head=0), ascends, cnn) == "trained"
    assert "no nn.Linear" in head_use(PUDSettings(), ascends, torch.nn.Conv2d(3, 10, 1))


def test_the_mean_teacher_ascends_only_where_unlearning_did():
    """Unlearning's weight where it ascended on a non-empty poison set; nothing with --mt_ascent 0 or where it did
    not ascend (all2all, clean-label: no confirmed target)."""
    from utils.defenses.pud import PUDSettings, PUDState, teacher_ascent

    ascended = PUDState(unlearning={"ascent": {"used": True, "lambda": 0.3}}, poison_set=torch.arange(5))
    decision = teacher_ascent(PUDSettings(), ascended)
    assert decision["used"] and decision["lambda"] == 0.3
    assert not teacher_ascent(PUDSettings(mt_ascent=0), ascended)["used"]
    assert not teacher_ascent(PUDSettings(), PUDState(unlearning={"ascent": {"used": False}},
                                                      poison_set=torch.arange(5)))["used"]
    assert teacher_ascent(PUDSettings(), PUDState(unlearning={"ascent": {"used": False}}))["lambda"] == 0.0


def test_balanced_selection_keeps_each_labels_top_share():
    import torch

    from utils.defenses.selection import top_fraction

    scores = torch.tensor([0.9, 0.1, 0.2, 0.0, 0.8, 0.3, 0.5, 0.4, 0.6, 0.7])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    assert torch.equal(top_fraction(scores, 0.4, labels=labels), torch.tensor([0, 4, 7, 9]))
    assert torch.equal(top_fraction(scores, 0.4, among=torch.tensor([1, 2, 3, 4, 5]), labels=labels), torch.tensor([4, 5]))


def test_refresh_drops_target_labelled_samples_no_longer_predicted_as_target():
    import torch

    from utils.defenses.pud import refresh_extra

    labels = torch.tensor([0, 0, 0, 1, 1, 0])          # target 0; samples 1 and 5 are poisoned (labelled 0)
    truth = torch.tensor([False, True, False, False, False, True])
    preds = torch.tensor([0, 2, 0, 1, 0, 0])            # after unlearning: sample 1 flips away from 0, 5 does not
    extra, info = refresh_extra(torch.tensor([0, 1, 3, 4, 5]), labels, truth, 0, preds)
    assert torch.equal(extra, torch.tensor([0, 3, 4, 5]))  # 4 is labelled 1: kept although predicted 0
    assert info["dropped"] == 1 and info["dropped_poison"] == 1
    assert abs(info["extra_poison_share_before"] - 0.4) < 1e-6 and abs(info["extra_poison_share_after"] - 0.25) < 1e-6


@pytest.mark.slow
def test_a_single_step_needs_no_top_rate(infected_run):
    """--steps 1 has no next extra set to choose, so --top_rates is given empty (it used to need >= 1 value)."""
    from config import parse_args
    from utils.run.errors import UserError

    one = ["--model_path", str(infected_run / "model.pt"), "--steps", "1", "--step_epochs", "1", "--step_adv_epochs", "1",
           "--step_partial", "0", "--step_eps", "6/255", "--step_alpha_div", "5"]
    assert parse_args("pud", [*one, "--top_rates"]).pud.top_rates == ()
    try:
        parse_args("pud", [*one, "--top_rates", "0.5"])
    except UserError as e:
        assert "--top_rates needs one value per step but the last (0 for --steps 1)" in str(e)
    else:
        raise AssertionError("a top rate for a single step was accepted")


def test_vote_result_reports_the_winner_and_flags_a_spread_vote():
    from utils.defenses.target import vote_result

    # measured votes of 500 PGD examples (K = 10): a PreActResNet18 with a patch backdoor (target 0), then with blend
    spread = vote_result(torch.tensor([52, 25, 60, 52, 54, 17, 43, 49, 57, 91]))
    assert spread["estimate"] == 9 and spread["vote_share"] == 91 / 500 and spread["weak"]
    clear = vote_result(torch.tensor([289, 18, 19, 15, 28, 2, 19, 14, 49, 47]))
    assert clear["estimate"] == 0 and clear["vote_share"] == 289 / 500 and not clear["weak"]
    assert clear["votes"][0] == 289 and sum(clear["votes"]) == 500
    assert not vote_result(torch.tensor([21, 79]))["weak"] and vote_result(torch.tensor([20, 19, 21]))["weak"]


@pytest.mark.parametrize("balanced", [1, 0])
def test_steps_weigh_the_labels_of_their_extra_set_alike(tiny_attack_run, tmp_path, monkeypatch, balanced):
    """--step_balanced 1 (default): each step's cross-entropy weighs every label of the extra set it trains on alike
    (weight x count the same for every present label), so a class the filtering thinned is not outweighed."""
    import PUD
    from conftest import cli
    from utils.defenses import pud as pud_module

    seen, real = [], pud_module.finetune_epoch

    def spy(model, opt, batches, *args, **kwargs):
        labels = []

        def recorded():
            for b in batches:
                labels.append(b[2].cpu())
                yield b
        stats = real(model, opt, recorded(), *args, **kwargs)
        seen.append((kwargs.get("class_weight"), torch.cat(labels)))
        return stats

    monkeypatch.setattr(pud_module, "finetune_epoch", spy)
    assert cli(PUD.main, "--model_path", tiny_attack_run / "model.pt", "--out_dir", tmp_path / "pud", *TINY, *FAST,
               "--step_balanced", balanced) == 0
    assert len(seen) == 2  # one epoch in each of the 2 steps
    for weight, labels in seen:
        if not balanced:
            assert weight is None
            continue
        counts = torch.bincount(labels, minlength=10).float()
        assert int((counts > 0).sum()) >= 2 and counts.max() > counts[counts > 0].min()  # an uneven extra set
        mass = weight.cpu() * counts
        assert torch.allclose(mass[counts > 0], mass[counts > 0].mean()) and bool((weight.cpu()[counts == 0] == 0).all())


def _disowned_case():
    """12 samples, target 0: 0-2 are dirty-label poisons the current model gives classes 1 and 2 (the infected one
    gave 0), 3-5 genuine target images it keeps, 6-11 clean images of classes 1 and 2."""
    from types import SimpleNamespace

    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    cur = torch.nn.functional.one_hot(torch.tensor([1, 2, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2]), 3).float() * 5
    ref = torch.nn.functional.one_hot(labels, 3).float() * 5
    truth = torch.arange(12) < 3
    s = SimpleNamespace(logits=lambda model: cur, history=[{}], run=SimpleNamespace(log=lambda *a, **k: None),
                        inf=SimpleNamespace(model=None, poisoned=SimpleNamespace(train_labels=labels), truth=truth))
    st = SimpleNamespace(spectre_initial={"poison_candidates": "target", "poison_score": "consistency"},
                         poison_set=torch.tensor([0, 1, 2]), target={"used": 0}, pool=torch.arange(12), steps=[],
                         step_info={}, epoch_global=0)
    return s, st, labels, ref, truth


def test_a_confirmed_targets_poison_set_the_model_disowns_is_ascended_on_and_one_it_keeps_is_not():
    """No split cluster, a confirmed target: the poison set holds target-labelled samples. Unlearning ascends only
    when the model after the steps gives at least --disowned_poisons of them another label (dirty-label poisons),
    then on every target sample it disowns; a set of the class's own images (clean-label SIG) it keeps is not
    unlearned; other modes ignore the share."""
    from types import SimpleNamespace

    from utils.defenses.pud import PUDSettings, decide_ascent
    from utils.defenses.unlearning import ascent_decision

    s, st, _, _, _ = _disowned_case()
    s.job = SimpleNamespace(pud=PUDSettings(unlearn_lambda=0.3))
    st.poison_set = torch.tensor([0, 1, 2, 3])  # 3 of 4 disowned: every target sample the model disowns is the set
    ascent = decide_ascent(s, st, None)
    assert ascent["used"] and ascent["lambda"] == 0.3 and st.poison_set.tolist() == [0, 1, 2]  # not 6-11
    assert ascent["poison_precision"] == 1.0 and ascent["poison_recall"] == 1.0  # the set unlearning used, reported
    st.poison_set = torch.tensor([0, 1, 3])  # 2 of 3, under 0.75: kept, no ascent, the set untouched
    assert not decide_ascent(s, st, None)["used"] and st.poison_set.tolist() == [0, 1, 3]
    st.spectre_initial["poison_candidates"], st.poison_set = "split", torch.tensor([3, 4])
    assert decide_ascent(s, st, None)["used"] and st.poison_set.tolist() == [3, 4]  # the split's cluster stays

    used = ascent_decision(0.003, "target", disowned=0.82, disowned_min=0.5)
    assert used["used"] is True and used["lambda"] == 0.003 and used["disowned"] == 0.82
    kept = ascent_decision(0.003, "target", disowned=0.24, disowned_min=0.5)
    assert kept["used"] is False and "24%" in kept["why"]
    assert ascent_decision(0.003, "target", disowned=0.82, disowned_min=0.0)["used"] is False  # 0: never
    assert ascent_decision(0.003, "filtered", disowned=1.0, disowned_min=0.5)["used"] is False  # all2all: no target
    assert ascent_decision(0.003, "split", disowned=0.0, disowned_min=0.5)["used"] is True  # the split: always


def test_from_step_1_the_target_samples_the_model_disowns_stay_out_of_the_next_extra_set():
    """The poison set (the least consistent target samples) is disowned by the model, so the target samples it
    disowns are kept out of the next extra set from step 1 on (step 0's PGD epochs suppress the target class: not
    then), and the step's record says how many; with --disowned_poisons 0 they are not."""
    from types import SimpleNamespace

    from utils.defenses.pud import PUDSettings, score_step

    for disowned_min, step, kept_out in ((0.75, 1, True), (0.75, 0, False), (0.0, 1, False)):
        s, st, labels, ref, truth = _disowned_case()
        s.job = SimpleNamespace(pud=PUDSettings(steps=3, top_rates=[1.0, 1.0], poison_fraction=0.25,
                                                disowned_poisons=disowned_min))
        score_step(s, st, step, ref, torch.arange(6), truth, labels)
        assert st.poison_set.tolist() == [0, 1, 2]
        assert (st.extra.tolist() == list(range(3, 12))) == kept_out and len(st.extra) >= 9
        assert ("disowned" in st.steps[-1]) == kept_out
        if kept_out:
            assert st.steps[-1]["disowned"] == {"share": 1.0, "kept_out": 3, "kept_out_poison": 3}
