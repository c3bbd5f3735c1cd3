import json

import pytest
import torch

import pbe_main
from conftest import NO_FIGURES, cli, run_script
from utils.defenses.selection import bottom_fraction, consistency_scores, detection_stats, top_fraction

FAST = ("--test_subset", "200", "--eval_steps", "2", "--device", "cpu", *NO_FIGURES)


@pytest.mark.slow
def test_aft_runs_from_the_checkpoint_alone_and_writes_its_outputs(infected_run, tmp_path):
    out = tmp_path / "aft"
    r = run_script("pbe_main.py", "--model_path", str(infected_run / "model.pt"), "--aft_epochs", "2", "--adv_epochs", "1",
                   "--extra_ratio", "0.1", "--out_dir", str(out), *FAST, "--figures")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["defense"] == "aft" and s["settings"]["extra_size"] == 200
    assert s["asr_late_max"] >= s["final"]["asr"] and s["asr_late_epochs"] == 1
    for part in ("initial", "final"):
        assert {"clean_acc", "asr", "asr_incl_target", "robust_acc"} <= set(s[part])
    assert s["robust_eval"]["steps"] == 2 and s["robust_eval"]["eps"] == pytest.approx(8 / 255)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["adversarial"] for r in recs] == [True, False]
    assert (out / "model.pt").exists() and (out / "curves.png").exists()


@pytest.mark.slow
def test_aft_patch_shaped_examples_are_used_and_recorded(infected_run, tmp_path):
    """--adv_window / --adv_eps_outside reach the fine-tuning PGD and are stored with the run's settings."""
    out = tmp_path / "aft-window"
    assert cli(pbe_main.main, "--model_path", infected_run / "model.pt", "--aft_epochs", "1", "--adv_epochs", "1",
               "--adv_window", "5", "--adv_eps", "1", "--adv_alpha", "1/4", "--adv_random_start",
               "--adv_eps_outside", "6/255", "--out_dir", out, *FAST) == 0
    pgd = json.loads((out / "summary.json").read_text())["settings"]["pgd"]
    assert (pgd["window"], pgd["eps"], pgd["alpha"], pgd["random_start"]) == (5, 1.0, 0.25, True)
    assert pgd["eps_outside"] == pytest.approx(6 / 255)


PAPER = ("--init_pool", "all", "--argmax_penalty", "0", "--poison_candidates", "all", "--quarantine", "0",
         "--later_pool", "all", "--balanced_selection", "0", "--unlearn_lambda", "0")


def run_pbe(infected_run, out, *extra):
    assert cli(pbe_main.main, "--model_path", infected_run / "model.pt", "--progressive", "--rounds", "2",
               "--round_epochs", "2", "--top_rates", "0.5", "--ft_lr", "0.01", "--later_lr", "0.002",
               "--target_images", "200", "--out_dir", out, *extra, *FAST) == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), [rec for rec in recs if "round" in rec and "lr" in rec]


@pytest.mark.slow
def test_progressive_pbe_keeps_target_labelled_samples_out_of_round_0_and_quarantines_flagged(infected_run, tmp_path):
    s, recs = run_pbe(infected_run, tmp_path / "pbe")
    assert s["target"]["estimate"] == 0 and s["target"]["used"] == 0
    r0, r1 = s["rounds"]
    assert r0["extra_size"] == 100 and r0["extra_poison_share"] == 0.0  # 5 % of 2,000, none labelled as the target
    assert r0["quarantine_flagged"] == 200 and r1["quarantine_flagged"] >= 200  # 10 % of 2,000, and it only grows
    # the detector ranks among the target-labelled samples only: with 200 poisons among them it is not blind
    assert r0["detect_precision"] > 0.3 and r0["poison_still_backdoor"] is not None
    # the next extra set is half of every label's samples, none of it quarantined or removed by the filter
    assert 800 <= r0["next_extra_size"] <= 1000 and r0["next_extra_poison_share"] < r0["quarantine_precision"]
    assert r0["next_extra_filter_removed"] == 0 and s["filtering"]["removed"] > 0
    assert [(rec["round"], rec["adversarial"], rec["lr"]) for rec in recs] == [(0, True, 0.01), (0, True, 0.01),
                                                                            (1, True, 0.002), (1, False, 0.002)]
    assert s["settings"]["init_pool"] == "auto" and s["settings"]["later_lr"] == 0.002
    # round 1 (its first epoch on PGD examples too) ascends on everything round 0 flagged; round 0 does not
    assert not any("ascent_set" in rec for rec in recs[:2])
    assert [rec["ascent_set"] for rec in recs[2:]] == [r0["quarantine_flagged"]] * 2
    assert all(rec["poison_ce"] > 0 for rec in recs[2:]) and s["settings"]["unlearn_lambda"] == 0.1
    # each batch of 128 is joined by at most --ascent_bs 32 flagged samples, not a second batch of 128
    assert all(0 < rec["ascent_images"] <= 32 * -(-rec["images"] // 128) for rec in recs[2:])
    assert s["filtering"]["poison_candidates"] == "split" and s["filtering"]["ascent"]["used"] is True
    assert s["filtering"]["poison_score"] == "consistency" and s["settings"]["poison_score"] == "auto"
    # the patch target is confirmed (the split finds its poison cluster): round 0 from the non-target samples
    assert s["target"]["decision"]["mode"] == "target" and s["filtering"]["init_pool"] == "non_target"


@pytest.mark.slow
def test_progressive_pbe_paper_settings_start_from_a_random_share_with_poisons(infected_run, tmp_path):
    s, recs = run_pbe(infected_run, tmp_path / "pbe", *PAPER)
    r0, r1 = s["rounds"]
    assert not any("ascent_set" in rec for rec in recs)  # plain fine-tuning in every round
    assert r0["extra_size"] == 100 and r0["extra_poison_share"] > 0
    assert "quarantine_flagged" not in r0 and r0["next_extra_size"] == 1000
    for rd in s["rounds"]:
        assert 0 <= rd["extra_poison_share"] <= 1 and 0 <= rd["detect_precision"] <= 1


def test_initial_extra_is_drawn_from_the_init_pool():
    from utils.defenses.pbe import initial_extra

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    for pool, allowed in (("non_target", {1, 2, 4, 5, 7, 8}), ("all", set(range(10)))):
        got = initial_extra(labels, 0, pool, 0.4, torch.Generator().manual_seed(0))
        assert len(got) == 4 and set(got.tolist()) <= allowed and torch.equal(got, got.sort().values)
    assert len(initial_extra(labels, 0, "non_target", 0.9, torch.Generator().manual_seed(0))) == 6  # capped by the pool
    from utils.run.errors import UserError

    with pytest.raises(UserError, match="leaves no training sample"):
        initial_extra(torch.zeros(5, dtype=torch.long), 0, "non_target", 0.9, torch.Generator().manual_seed(0))


def test_top_share_outside_never_picks_an_excluded_sample_and_stays_a_share_of_all():
    from utils.defenses.pbe import top_share_outside

    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert torch.equal(top_share_outside(scores, 0.3, torch.zeros(0, dtype=torch.long)), torch.tensor([0, 1, 2]))
    assert torch.equal(top_share_outside(scores, 0.3, torch.tensor([0, 2])), torch.tensor([1, 3, 4]))
    assert torch.equal(top_share_outside(scores, 0.9, torch.tensor([0, 2, 5])), torch.tensor([1, 3, 4, 6, 7, 8, 9]))
    # per label (--balanced_selection 1): 40 % of each label's samples, so label 1's best are kept too
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert torch.equal(top_share_outside(scores, 0.4, torch.tensor([0]), labels), torch.tensor([1, 2, 5, 6]))


def test_later_rounds_never_select_what_the_filter_removed():
    from utils.defenses.pbe import later_excluded, top_share_outside

    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    quarantine, removed = torch.tensor([4]), torch.tensor([0, 5])
    assert torch.equal(later_excluded(quarantine, removed, "kept"), torch.tensor([0, 4, 5]))
    assert torch.equal(later_excluded(quarantine, removed, "all"), quarantine)  # the paper code
    got = top_share_outside(scores, 0.4, later_excluded(quarantine, removed, "kept"), labels)
    assert torch.equal(got, torch.tensor([1, 2, 6, 7]))  # each label's best two outside the excluded


def test_the_full_ascent_is_used_only_on_a_confirmed_targets_split_cluster_unless_always():
    from utils.defenses.unlearning import ascent_decision

    full = ascent_decision(0.1, "split")
    assert full["used"] is True and full["lambda"] == 0.1 and "split cluster" in full["why"]
    assert ascent_decision(0.1, "split", lam_unconfirmed=0.03)["lambda"] == 0.1
    for mode in ("target", "filtered", "all"):  # all2all, clean-label, no split cluster: flags may be clean images
        assert ascent_decision(0.1, mode)["used"] is False
        assert ascent_decision(0.1, mode, "always")["lambda"] == 0.1  # the papers' unlearning
        weak = ascent_decision(0.1, mode, lam_unconfirmed=0.03)  # PBE: a weaker ascent there
        assert weak["used"] is True and weak["lambda"] == 0.03 and "unconfirmed" in weak["why"]
    assert ascent_decision(0.0, "split") == {"used": False, "why": "--unlearn_lambda 0"}
    assert ascent_decision(0.0, "filtered", lam_unconfirmed=0.03)["used"] is False


def test_round_lr():
    from utils.defenses.pbe import round_lr

    assert [round_lr(0.01, 0.001, r) for r in range(3)] == [0.01, 0.001, 0.001]
    assert [round_lr(0.01, None, r) for r in range(2)] == [0.01, 0.01]


def test_consistency_scores_and_selection():
    ref = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    cur = torch.tensor([[5.0, 0, 0], [0, 4.0, 1.0], [0, 5.0, 0]])
    s = consistency_scores(ref, cur)
    assert s[0] == pytest.approx(1.0) and s[2] == pytest.approx(0.5) and s[0] > s[1] > s[2]
    pen = consistency_scores(ref, cur, argmax_penalty=True)
    assert pen[2] == pytest.approx(0.0) and pen[1] == pytest.approx(s[1])
    assert top_fraction(s, 1 / 3).tolist() == [0] and bottom_fraction(s, 1 / 3).tolist() == [2]
    det = detection_stats(torch.tensor([2, 1]), torch.tensor([False, False, True, False]))
    assert det["precision"] == 0.5 and det["recall"] == 1.0 and det["fpr"] == pytest.approx(1 / 3)


def test_round_eps_sets_each_rounds_pgd_radius_and_scales_the_step():
    from utils.defenses.aft import FinetuneSettings

    ft = FinetuneSettings(adv_eps=6 / 255, adv_alpha=1.2 / 255, adv_steps=7, adv_norm="linf", adv_random_start=False,
                          adv_window=0, adv_eps_outside=0.0)
    default, small = ft.pgd(), ft.pgd(2 / 255)
    assert default.settings()["eps"] == pytest.approx(6 / 255) and default.settings()["alpha"] == pytest.approx(1.2 / 255)
    assert small.settings()["eps"] == pytest.approx(2 / 255) and small.settings()["alpha"] == pytest.approx(0.4 / 255)
    # patch-shaped examples: the window's budget follows the round's radius, the outside budget in proportion
    ft = ft.replace(adv_window=5, adv_eps=1.0, adv_alpha=0.25, adv_eps_outside=6 / 255)
    half = ft.pgd(0.5).settings()
    assert (half["window"], half["eps"], half["alpha"]) == (5, 0.5, 0.125) and half["eps_outside"] == pytest.approx(3 / 255)
    # --adv_restarts: every example keeps the worst of that many runs (each with its own window)
    assert half["restarts"] == 1 and ft.replace(adv_restarts=4).pgd().settings()["restarts"] == 4


def test_the_late_asr_is_the_maximum_over_the_last_quarter_of_the_epochs():
    from utils.defenses.session import late_asr

    hist = [{"epoch": e, "asr": a} for e, a in enumerate([0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.15], 1)]
    hist.insert(3, {"epoch": 3, "step": 0, "poison_precision": 0.5})  # a record without ASR does not count
    assert late_asr(hist) == {"asr_late_max": 0.15, "asr_late_epochs": 2}
    assert late_asr(hist[:2]) == {"asr_late_max": 0.0, "asr_late_epochs": 1}
    assert late_asr([]) == {}
