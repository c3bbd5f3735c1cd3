"""The run figures: a title, labelled axes, every metric in a legend drawn, legends off the data, no empty panel.

Read back from the matplotlib Figure objects the figure functions return (the fast tests draw them from
hand-made records shaped like a run's; the slow one catches the figures real tiny runs save).
"""
import math

import numpy as np
import pytest
import torch

import PUD
import pbe_main
from conftest import cli
from utils import figures
from utils.run import plots

RA_EVAL = {"steps": 20, "eps": 8 / 255}
TITLE = "run-x: blend all2one on synthetic/cnn"


def epoch(e, **kw):
    return {"epoch": e, "clean_acc": 0.9 - 0.01 * e, "target_class_acc": 0.8, "asr": max(0.0, 1.0 - 0.2 * e),
            "asr_incl_target": max(0.1, 1.0 - 0.2 * e), "loss": 1.0 / e, **kw}


def attack_run():
    recs = [epoch(e) for e in (1, 2, 3)]
    return recs, {"final": {**recs[-1], "robust_acc": 0.05, "robust_eval": RA_EVAL}}


def defense_summary(name, **kw):
    return {"defense": name, "initial": {"clean_acc": 0.91, "target_class_acc": 0.95, "asr": 1.0,
                                         "asr_incl_target": 1.0, "robust_acc": 0.01},
            "final": {"clean_acc": 0.85, "target_class_acc": 0.8, "asr": 0.02, "asr_incl_target": 0.1,
                      "robust_acc": 0.3}, "robust_eval": RA_EVAL, "settings": {}, **kw}


def aft_run():
    return [epoch(e, adversarial=e <= 2) for e in (1, 2, 3, 4)], defense_summary("aft")


ROUNDS = [{"round": r, "extra_poison_share": s, "detect_precision": p, "detect_recall": p, "detect_fpr": 0.01,
           "quarantine_precision": 0.5, "quarantine_recall": 0.4, "poison_still_backdoor": 0.9 - 0.3 * r,
           "clean_acc": 0.88, "asr": 0.5} for r, s, p in ((0, 0.003, 0.2), (1, 0.001, 0.6), (2, 0.0, 0.9))]


def pbe_run():
    recs = []
    for r in range(3):
        recs += [epoch(3 * r + e, round=r, adversarial=r == 0 or e == 1) for e in (1, 2, 3)]
        recs.append({"round_summary": ROUNDS[r], "epoch": 3 * r + 3})
    return recs, defense_summary("pbe", rounds=ROUNDS, settings={"detect_fraction": 0.1})


STEPS = [{"step": 0, "extra_poison_share": 0.002, "spectre": None, "poison_precision": 0.5, "poison_recall": 0.5,
          "clean_acc": 0.9, "asr": 0.8, "robust_acc": 0.1},
         {"step": 1, "extra_poison_share": 0.004, "extra_poison_share_after_spectre": 0.001,
          "spectre": {"considered": 20, "removed": 5, "precision": 0.8}, "poison_precision": 0.9, "poison_recall": 0.9},
         {"step": 2, "extra_poison_share": 0.0, "extra_poison_share_after_spectre": 0.0,
          "spectre": {"considered": 3, "removed": 0, "skipped": True}, "poison_precision": 1.0, "poison_recall": 1.0}]
SPECTRE_INITIAL = {"considered": 200, "filtered": 100, "filtered_precision": 0.9, "pool_poison_share": 0.003}


def pud_run():
    recs, e = [], 0
    for step in range(3):
        for i in range(2):
            e += 1
            recs.append(epoch(e, step=step, adversarial=i == 0, **({"robust_acc": 0.1 + 0.05 * step} if i else {})))
        recs.append({"step_summary": STEPS[step], "epoch": e})
    for stage in ("unlearning", "mean_teacher"):
        for _ in range(2):
            e += 1
            extra = {"clean_ce": 0.5, "poison_ce": 2.0 + e / 10} if stage == "unlearning" else {}
            recs.append(epoch(e, stage=stage, **extra))
    return recs, defense_summary("pud", steps=STEPS, spectre_initial=SPECTRE_INITIAL,
                                 mt_refresh={"extra_poison_share_after": 0.0})


def panels(fig):
    """The figure's panels (its axes but the top stage axes, which belong to a panel)."""
    return [ax for ax in fig.get_axes() if ax.get_label() != "<colorbar>"]


def drawn(ax) -> dict:
    """Label -> x values where the artist of that label has a finite value (lines, markers and shaded spans)."""
    out = {}
    for line in ax.get_lines():
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if not line.get_label().startswith("_"):
            out[line.get_label()] = list(x[np.isfinite(y)])
    for patch in ax.patches:
        if not patch.get_label().startswith("_"):
            out.setdefault(patch.get_label(), []).append(patch.get_bbox().x0)
    return out


def legend_texts(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def check_figure(fig) -> dict:
    """A title, labelled axes, every legend entry drawn (with at least one value) and every drawn series in the
    legend, each legend inside the figure and over no panel, no empty panel; returns title -> legend entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    assert fig.get_suptitle().strip()
    canvas = FigureCanvasAgg(fig)  # a saved (closed) figure has lost its canvas
    canvas.draw()
    r = canvas.get_renderer()
    fig_box = fig.bbox
    boxes = [ax.get_window_extent(r) for ax in panels(fig)]
    out = {}
    for ax in panels(fig):
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel())
        shown, texts = drawn(ax), legend_texts(ax)
        assert texts, f"panel '{ax.get_title()}' has no legend"
        assert set(texts) == set(shown), (ax.get_title(), texts, shown)
        for text in texts:
            assert shown[text], f"'{text}' is in the legend of '{ax.get_title()}' but has no value"
        leg = ax.get_legend().get_window_extent(r)
        assert fig_box.x0 <= leg.x0 and leg.x1 <= fig_box.x1 + 1 and fig_box.y0 <= leg.y0 and leg.y1 <= fig_box.y1 + 1
        assert not any(leg.overlaps(b) for b in boxes), f"the legend of '{ax.get_title()}' covers a panel"
        out[ax.get_title()] = texts
    return out


def stage_names(ax) -> list[str]:
    tops = [c for c in ax.child_axes]
    return [t.get_text() for t in tops[0].get_xticklabels()] if tops else []


def test_attack_curves_show_every_metric_the_summary_reports():
    recs, summary = attack_run()
    fig = figures.attack_curves(recs, summary, TITLE)
    legends = check_figure(fig)
    assert fig.get_suptitle() == TITLE
    assert legends["test accuracy"] == ["ACC", "target-class ACC", "RA (PGD-20, ε 8/255)"]
    assert legends["attack success on triggered test images"] == ["ASR", "ASR incl. target-class images"]
    assert legends["training loss (per epoch, its mean)"] == ["training loss"]
    acc = panels(fig)[0]
    assert drawn(acc)["RA (PGD-20, ε 8/255)"] == [3.0]  # measured once, at the end: a point, not a line
    assert acc.get_ylabel() == "accuracy" and acc.get_xlabel() == "epoch"


def test_attack_curves_join_the_epochs_that_were_evaluated():
    recs, summary = attack_run()
    recs[1] = {"epoch": 2, "loss": 0.4}  # --eval_every 2: epoch 2 trained, not evaluated
    fig = figures.attack_curves(recs, summary, TITLE)
    check_figure(fig)
    acc = next(l for l in panels(fig)[0].get_lines() if l.get_label() == "ACC")
    assert list(acc.get_xdata()) == [1, 3]  # one line through the measured epochs, not two isolated points
    loss = next(l for l in panels(fig)[2].get_lines() if l.get_label() == "training loss")
    assert list(loss.get_xdata()) == [1, 2, 3]


def test_the_loss_axis_is_logarithmic_when_pgd_epochs_dwarf_the_clean_ones():
    recs, summary = aft_run()
    for r, loss in zip(recs, (7.3, 7.1, 0.05, 0.04)):
        r["loss"] = loss
    loss_ax = panels(figures.defense_curves(recs, summary, TITLE))[2]
    assert loss_ax.get_yscale() == "log" and "log scale" in loss_ax.get_ylabel()
    assert panels(figures.defense_curves(*aft_run(), TITLE))[2].get_yscale() == "linear"


@pytest.mark.parametrize("run", [aft_run, pbe_run, pud_run], ids=["aft", "pbe", "pud"])
def test_defense_curves_mark_before_after_stages_and_adversarial_epochs(run):
    recs, summary = run()
    fig = figures.defense_curves(recs, summary, TITLE + ", defense x")
    legends = check_figure(fig)
    acc, asr = panels(fig)[:2]
    last = recs[-1]["epoch"]
    assert {"ACC", "target-class ACC", "RA (PGD-20, ε 8/255)", "before: the infected model",
            "after: the final evaluation", "adversarial (PGD) epochs"} <= set(legends["test accuracy"])
    on = drawn(acc)
    assert on["ACC"][0] == 0 and on["ACC"][-1] == last  # from the infected model (epoch 0) to the last epoch
    assert set(on["before: the infected model"]) == {0} and set(on["after: the final evaluation"]) == {last}
    assert on["RA (PGD-20, ε 8/255)"][0] == 0 and on["RA (PGD-20, ε 8/255)"][-1] == last
    adversarial = [r["epoch"] for r in recs if r.get("adversarial")]
    assert len(on["adversarial (PGD) epochs"]) >= 1
    spans = [p for p in acc.patches if p.get_label() == "adversarial (PGD) epochs" or p.get_label().startswith("_")]
    covered = {e for p in spans for e in range(math.ceil(p.get_bbox().x0), math.floor(p.get_bbox().x1) + 1)}
    assert covered == set(adversarial)
    assert drawn(asr)["ASR"][-1] == last
    stages = stage_names(acc)
    assert stages[0] == ""  # epoch 0: the infected model, named by the x label and the "before" markers
    if run is pbe_run:
        assert stages[1:] == ["round 0", "round 1", "round 2"]
    if run is pud_run:
        assert stages[1:] == ["step 0", "step 1", "step 2", "unlearning", "mean teacher"]
        assert "unlearning: poison CE" in legends["training loss (per epoch, its mean)"]


def test_pud_per_stage_row_reaches_the_final_model_and_breaks_where_nothing_was_measured():
    recs, summary = pud_run()
    fig = figures.defense_curves(recs, summary, TITLE)
    check_figure(fig)
    axes = panels(fig)
    assert len(axes) == 7  # 3 per-epoch panels, 4 per-stage panels: none empty (check_figure)
    stage_ax, share_ax, poison_ax, spectre_ax = axes[3:]
    names = [t.get_text() for t in stage_ax.get_xticklabels()]
    assert names == ["before", "step 0", "step 1", "step 2", "unlearning", "mean teacher", "final"]
    on = drawn(stage_ax)
    assert on["ASR"][-1] == names.index("final") and on["RA (PGD-20, ε 8/255)"][-1] == names.index("final")
    assert on["RA (PGD-20, ε 8/255)"] == [0, 1, 2, 3, 6]  # measured before, after every step and at the end
    removed = next(l for l in spectre_ax.get_lines() if l.get_label() == "removed share of the target-labelled")
    y = np.asarray(removed.get_ydata(), float)
    assert y[:2].tolist() == [0.5, 0.25] and math.isnan(y[2])  # step 2's SPECTRE was skipped: no point, no line to it
    assert "skipped\n(too few)" in [t.get_text() for t in spectre_ax.texts]
    assert share_ax.get_ylim()[1] < 0.01  # shares of 0-0.4 %: the axis is zoomed, not 0-1
    trained_on = next(l for l in share_ax.get_lines() if l.get_label() == "extra set trained on")
    assert list(trained_on.get_ydata()) == [0.002, 0.001, 0.0, 0.0]  # after each step's SPECTRE; the mean teacher's
    precision = next(l for l in spectre_ax.get_lines() if l.get_label() == "precision of the removed")
    assert list(precision.get_ydata())[:2] == [0.9, 0.8]  # step 0: the initial filtering (SPECTRE and class split)
    assert [t.get_text() for t in share_ax.get_xticklabels()][-1] == "mean teacher"


def test_rounds_tell_precision_from_recall_and_zoom_on_small_shares():
    fig = figures.pbe_rounds(ROUNDS, defense_summary("pbe", settings={"detect_fraction": 0.1}), TITLE)
    legends = check_figure(fig)
    share, detect, _ = panels(fig)
    assert share.get_ylim() == pytest.approx((0, 1.25 * 0.003))
    prec, rec = (next(l for l in detect.get_lines() if l.get_label().startswith(k)) for k in ("precision", "recall"))
    assert np.array_equal(prec.get_ydata(), rec.get_ydata())  # equal here: the two must still both be visible
    assert (prec.get_linestyle(), prec.get_marker()) != (rec.get_linestyle(), rec.get_marker())
    assert rec.get_markersize() > prec.get_markersize()
    assert "recall (equal to precision here)" in legends["detected poison (the lowest-scored 10 %)"]


def test_samples_show_labels_and_the_predictions_of_both_models():
    clean = torch.rand(4, 3, 8, 8)
    trig = (clean + 0.1).clamp(0, 1)
    labels, bd = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0])
    preds = {"infected": (torch.tensor([1, 2, 3, 5]), torch.tensor([0, 0, 0, 4])),
             "repaired": (torch.tensor([1, 2, 9, 4]), torch.tensor([1, 0, 3, 4]))}
    fig = figures.samples_figure(clean, trig, labels, bd, preds, TITLE)
    assert TITLE in fig.get_suptitle() and "infected → repaired" in fig.get_suptitle()
    axes = panels(fig)
    assert len(axes) == 12 and all(len(ax.get_images()) == 1 for ax in axes)
    assert [ax.get_ylabel().split("\n")[0] for ax in axes[::4]] == ["clean", "triggered", "|difference|"]
    assert [ax.get_title() for ax in axes[:4]] == ["1 | 1→1", "2 | 2→2", "3 | 3→9", "4 | 5→4"]
    assert [ax.get_title() for ax in axes[4:8]] == ["0 | 0→1", "0 | 0→0", "0 | 0→3", "0 | 4→4"]
    red = [ax.title.get_color() == "tab:red" for ax in axes[4:8]]
    assert red == [False, True, False, False]  # red: the repaired model still predicts the backdoor label


def test_redraw_writes_the_curves_of_a_run_folder(tmp_path):
    import json

    recs, summary = pbe_run()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "args.json").write_text(json.dumps({"dataset": "synthetic", "arch": "cnn", "trigger_type": "blend",
                                                    "attack_mode": "all2one"}))
    figs = figures.redraw(str(tmp_path))
    assert sorted(figs) == ["curves.png", "rounds.png"]
    assert figs["curves.png"].get_suptitle() == f"{tmp_path.name}: blend all2one on synthetic/cnn, defense pbe"
    for name in figs:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_figures_real_runs_save(tiny_attack_run, tmp_path, monkeypatch):
    """AFT, PBE and PUD on the tiny attack: every figure they save passes the checks, samples.png included."""
    saved = {}
    save = plots.save

    def keep(fig, path):
        saved[path] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    ck = tiny_attack_run / "model.pt"
    fast = ("--device", "cpu", "--test_subset", "100", "--eval_steps", "1", "--target_images", "100")
    runs = {"aft": (pbe_main.main, "--aft_epochs", "2", "--adv_epochs", "1"),
            "pbe": (pbe_main.main, "--progressive", "--rounds", "2", "--round_epochs", "1", "--top_rates", "0.5"),
            "pud": (PUD.main, "--steps", "2", "--step_epochs", "1", "1", "--step_adv_epochs", "1", "0",
                    "--step_partial", "0", "0", "--step_eps", "6/255", "4/255", "--step_alpha_div", "5", "6",
                    "--step_pgd_steps", "1", "--top_rates", "0.5", "--spectre_min", "5", "--unlearn_epochs", "1",
                    "--mt_epochs", "1")}
    for name, (main, *extra) in runs.items():
        assert cli(main, "--model_path", ck, "--out_dir", tmp_path / name, *fast, *extra) == 0
    expected = {"aft": ["curves.png", "samples.png"], "pbe": ["curves.png", "rounds.png", "samples.png"],
                "pud": ["curves.png", "samples.png"]}
    for name, files in expected.items():
        assert sorted(p.name for p in (tmp_path / name).glob("*.png")) == files
        for f in files:
            fig = saved[str(tmp_path / name / f)]
            assert name in fig.get_suptitle() and "patch all2one on synthetic/cnn" in fig.get_suptitle()
            if f == "samples.png":
                assert "infected → repaired" in fig.get_suptitle()
                assert all(len(ax.get_images()) == 1 for ax in panels(fig))
            else:
                check_figure(fig)
