"""The run figures, meant to go into a paper or a slide as they are.

- ``curves.png``: per epoch, test accuracy (ACC, target-class ACC, WaNet noise ACC, robust accuracy where it
  was measured, as points), attack success (ASR, ASR including target-class images) and the training loss.
  A defense's curves start at epoch 0, the infected model ("before"), and end with the final evaluation
  ("after"); its stages (AFT, PBE's rounds, PUD's steps, unlearning and mean teacher) are named on top and
  separated by dashed lines, and its adversarial (PGD) epochs are shaded. PUD adds a row per stage: the
  accuracies at the end of every step, after unlearning and at the end, the poisoned share of each step's
  extra set (a zoomed percent axis: it is often under 1 %), the poison set's precision and recall, and
  SPECTRE's precision and removed share (a step whose SPECTRE was skipped has no point).
- ``rounds.png`` (PBE): per round, the poisoned share of the extra set, the detector's precision, recall and
  false-positive rate (and the quarantine's), and how many poisoned training images still get their
  backdoor label.
- ``samples.png``: test images clean, triggered and their amplified difference, each with its label (the
  backdoor label for triggered ones) and the infected model's prediction (a defense: infected -> repaired).

Every figure is built from the run's records and summary (plain dicts), so ``redraw`` can re-draw the
curves of a finished run folder from its json files:

    python -m utils.figures runs/*      # curves.png (and rounds.png) again, e.g. for runs of an older version
"""
from __future__ import annotations

import json
import os

import torch

from models import eval_mode
from utils.run import plots
from utils.run.describe import run_title
from utils.run.distributed import is_main
from utils.settings import show

LABELS = {"clean_acc": "ACC", "target_class_acc": "target-class ACC", "noise_acc": "noise ACC (WaNet)", "asr": "ASR", "asr_incl_target": "ASR incl. target-class images",
          "loss": "training loss", "clean_ce": "unlearning: clean CE", "poison_ce": "unlearning: poison CE"}
STYLE = {"clean_acc": {"color": "tab:blue"}, "target_class_acc": {"color": "tab:green"},
         "noise_acc": {"color": "tab:olive"},
         "asr": {"color": "tab:red"}, "asr_incl_target": {"color": "tab:orange", "linestyle": "--", "ms": 2},
         "loss": {"color": "0.25"}, "clean_ce": {"color": "tab:cyan"}, "poison_ce": {"color": "tab:pink"}}
RA_STYLE = {"color": "tab:purple", "marker": "D", "ms": 6}
ACCURACIES = ("clean_acc", "target_class_acc", "noise_acc")
ATTACK_SUCCESS = ("asr", "asr_incl_target")
LOSSES = ("loss", "clean_ce", "poison_ce")
STAGE_NAMES = {"unlearning": "unlearning", "mean_teacher": "mean teacher"}


def ra_label(robust_eval: dict | None) -> str:
    """``RA (PGD-20, ε 8/255)``: robust accuracy with the attack it was measured with."""
    if not robust_eval:
        return "RA"
    return f"RA (PGD-{robust_eval['steps']}, ε {show(float(robust_eval['eps']))})"


def epoch_records(records: list[dict]) -> list[dict]:
    """The per-epoch lines of metrics.jsonl (not PBE's round or PUD's step summaries)."""
    return [r for r in records if "epoch" in r and "round_summary" not in r and "step_summary" not in r]


def _present(recs: list[dict], keys) -> list[str]:
    return [k for k in keys if any(r.get(k) is not None for r in recs)]


def _values(recs, key):
    return [r.get(key) for r in recs]


# ----- curves.png ---------------------------------------------------------------------------------------------

def stage_of(rec: dict) -> str:
    """The stage an epoch record belongs to: ``round 2``, ``step 0``, ``unlearning``, ... or the defense itself."""
    if "round" in rec:
        return f"round {rec['round']}"
    if "step" in rec:
        return f"step {rec['step']}"
    if "stage" in rec:
        return STAGE_NAMES[rec["stage"]]
    return ""


def stage_groups(recs: list[dict], defense: str) -> list[tuple[str, float, float]]:
    """(name, first epoch, last epoch) of each stage in order; a stage-less defense (AFT) is one group."""
    groups: list[list] = []
    for r in recs:
        name = stage_of(r) or defense.upper()
        if groups and groups[-1][0] == name:
            groups[-1][2] = r["epoch"]
        else:
            groups.append([name, r["epoch"], r["epoch"]])
    return [tuple(g) for g in groups]


def _epoch_panels(row, recs: list[dict], xs: list, before: dict | None, after: dict | None, ra_xs: list, ra_ys: list,
                  ra_name: str, groups: list | None, adversarial: list, xlabel: str) -> None:
    """The per-epoch row: accuracies, attack success, losses; ``before``/``after`` at the first/last position."""
    panels = ((row[0], ACCURACIES, "test accuracy", "accuracy"),
              (row[1], ATTACK_SUCCESS, "attack success on triggered test images", "attack success rate"))
    for ax, keys, title, ylabel in panels:
        if adversarial:
            plots.shade(ax, adversarial, "adversarial (PGD) epochs")
        shown = _present(recs, keys)
        for k in shown:  # through the epochs it was measured in (--eval_every), from the infected model's value
            start = [(0, before[k])] if before is not None and k in before else []
            pts = start + [(r["epoch"], r[k]) for r in recs if r.get(k) is not None]
            plots.series(ax, [x for x, _ in pts], [y for _, y in pts], LABELS[k], **STYLE[k])
        if ax is row[0]:
            plots.points(ax, ra_xs, ra_ys, ra_name, **RA_STYLE)
        if before is not None:
            vals = [before[k] for k in shown if k in before]
            if ax is row[0] and before.get("robust_acc") is not None:
                vals.append(before["robust_acc"])
            plots.points(ax, [0] * len(vals), vals, "before: the infected model", marker="o", ms=10,
                         markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.0, zorder=1.5)
        if after is not None and xs:
            vals = [after[k] for k in shown if k in after]
            if ax is row[0] and after.get("robust_acc") is not None:
                vals.append(after["robust_acc"])
            plots.points(ax, [xs[-1]] * len(vals), vals, "after: the final evaluation", marker="s", ms=10,
                         markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.0, zorder=1.5)
        plots.fraction_axis(ax, ylabel)
        if groups:
            plots.stages(ax, groups)
        plots.finish_panel(ax, title, xlabel)
    ax = row[2]
    if adversarial:
        plots.shade(ax, adversarial, "adversarial (PGD) epochs")
    losses = []
    for k in _present(recs, LOSSES):
        plots.series(ax, xs, _values(recs, k), LABELS[k], **STYLE[k])
        losses += [v for v in _values(recs, k) if v is not None]
    wide = bool(losses) and min(losses) > 0 and max(losses) > 30 * min(losses)  # e.g. PGD epochs next to clean ones
    if wide:
        ax.set_yscale("log")
    ax.set_ylabel("cross-entropy" + (" (log scale)" if wide else ""))
    if groups:
        plots.stages(ax, groups[1:])  # no loss before the defense
    plots.finish_panel(ax, "training loss (per epoch, its mean)", xlabel)


def attack_curves(records: list[dict], summary: dict, title: str):
    """curves.png of an attack run: per epoch ACC, target-class ACC, ASR, loss; RA at the end if measured."""
    recs = epoch_records(records)
    xs = [r["epoch"] for r in recs]
    final = summary["final"]
    ra = final.get("robust_acc")
    fig, (row,) = plots.rows_figure(title, [3])
    _epoch_panels(row, recs, xs, None, None, [xs[-1]] if ra is not None else [], [ra] if ra is not None else [],
                  ra_label(final.get("robust_eval")), None, [], "epoch")
    return fig


def defense_curves(records: list[dict], summary: dict, title: str):
    """curves.png of a defense run (AFT, PBE, PUD): see the module docstring."""
    recs = epoch_records(records)
    xs = [r["epoch"] for r in recs]
    initial, final = summary["initial"], summary["final"]
    name = summary["defense"]
    groups = [("", 0, 0), *stage_groups(recs, name)]  # epoch 0, the infected model: a boundary, no name (too narrow)
    adversarial = [r["epoch"] for r in recs if r.get("adversarial")]
    ra_xs, ra_ys = [0], [initial.get("robust_acc")]
    for r in recs[:-1]:  # PUD measures RA at the end of every step
        if r.get("robust_acc") is not None:
            ra_xs.append(r["epoch"])
            ra_ys.append(r["robust_acc"])
    ra_xs.append(xs[-1] if xs else 1)
    ra_ys.append(final.get("robust_acc"))
    is_pud = name == "pud" and bool(summary.get("steps"))
    fig, rows = plots.rows_figure(title, [3, 4] if is_pud else [3])
    _epoch_panels(rows[0], recs, xs, initial, final, ra_xs, ra_ys, ra_label(summary.get("robust_eval")), groups,
                  adversarial, "epoch (0: the infected model)")
    if is_pud:
        pud_stage_panels(rows[1], recs, summary)
    return fig


# ----- PUD's per-stage row -----------------------------------------------------------------------------------

def pud_stage_panels(row, recs: list[dict], summary: dict) -> None:
    """Accuracies after each stage, the extra sets' poisoned share, the poison sets, SPECTRE (one panel each)."""
    steps = summary["steps"]
    initial, final = summary["initial"], summary["final"]
    last: dict[str, dict] = {}  # the last epoch record of every stage, in order
    for r in recs:
        last[stage_of(r)] = r
    names = ["before", *last, "final"]
    values = [initial, *last.values(), final]
    ax = row[0]
    xs = plots.categorical_x(ax, names)
    for k in _present(values, ("clean_acc", "target_class_acc", "noise_acc", "asr")):
        plots.series(ax, xs, _values(values, k), LABELS[k], **STYLE[k])
    plots.points(ax, xs, _values(values, "robust_acc"), ra_label(summary.get("robust_eval")), **RA_STYLE)
    plots.fraction_axis(ax, "accuracy / attack success")
    plots.finish_panel(ax, "after each stage", "stage", integer_x=False)

    sp_initial = summary.get("spectre_initial") or {}
    step_names = [f"step {s['step']}" for s in steps]
    ax = row[1]
    shares = [s.get("extra_poison_share_after_spectre", s["extra_poison_share"]) for s in steps]
    share_names = list(step_names)
    if summary.get("mt_refresh"):
        share_names.append("mean teacher")
        shares.append(summary["mt_refresh"]["extra_poison_share_after"])
    xs = plots.categorical_x(ax, share_names)
    plots.series(ax, xs, shares, "extra set trained on", color="tab:brown")
    if sp_initial.get("pool_poison_share") is not None:
        ax.axhline(sp_initial["pool_poison_share"], color="0.5", linestyle=":", linewidth=1,
                   label="pool after the initial filtering")
    plots.share_axis(ax, [*shares, sp_initial.get("pool_poison_share")], "poisoned share")
    plots.finish_panel(ax, "poisoned share of the training sets", "set trained on", integer_x=False)

    ax = row[2]
    xs = plots.categorical_x(ax, step_names)
    prec, rec = _values(steps, "poison_precision"), _values(steps, "poison_recall")
    plots.series(ax, xs, prec, "precision", color="tab:blue")
    plots.series(ax, xs, rec, "recall", color="tab:red", linestyle="--", marker="s", ms=6, markerfacecolor="none")
    plots.fraction_axis(ax, "fraction")
    plots.finish_panel(ax, "each step's poison set (for unlearning)", "step", integer_x=False)

    ax = row[3]
    names, precision, removed = [], [], []
    for s in steps:
        if s["step"] == 0:  # the initial filtering of the target class: SPECTRE and the class split together
            names.append("initial")
            precision.append(sp_initial.get("filtered_precision"))
            n, considered = sp_initial.get("filtered"), sp_initial.get("considered")
        else:
            sp = s.get("spectre") or {}
            names.append(f"step {s['step']}")
            precision.append(sp.get("precision"))
            n, considered = sp.get("removed"), sp.get("considered")
            if sp.get("skipped"):
                n = None
        removed.append(n / considered if n is not None and considered else None)
    xs = plots.categorical_x(ax, names)
    plots.series(ax, xs, precision, "precision of the removed", color="tab:blue")
    plots.series(ax, xs, removed, "removed share of the target-labelled", color="tab:gray", linestyle="--",
                 marker="s", ms=5, markerfacecolor="none")
    for x, s in zip(xs, steps):
        if (s.get("spectre") or {}).get("skipped"):
            ax.text(x, 0.5, "skipped\n(too few)", ha="center", va="center", fontsize=7, color="0.4")
    plots.fraction_axis(ax, "fraction")
    plots.finish_panel(ax, "SPECTRE on the target-labelled samples", "filtering", integer_x=False)


# ----- rounds.png (PBE) --------------------------------------------------------------------------------------

def pbe_rounds(rounds: list[dict], summary: dict, title: str):
    """rounds.png: the extra sets' poisoned share, detection, and the backdoor on the poisoned samples, per round."""
    xs = [r["round"] for r in rounds]
    fig, (row,) = plots.rows_figure(title, [3])
    ax = row[0]
    shares = _values(rounds, "extra_poison_share")
    plots.series(ax, xs, shares, "extra set trained on", color="tab:brown")
    plots.share_axis(ax, shares, "poisoned share")
    plots.finish_panel(ax, "poisoned share of each round's extra set", "round")

    ax = row[1]
    prec, rec = _values(rounds, "detect_precision"), _values(rounds, "detect_recall")
    equal = all(p == r for p, r in zip(prec, rec)) and any(prec)  # flagged as many as there are poisons
    fraction = (summary.get("settings") or {}).get("detect_fraction")
    plots.series(ax, xs, prec, "precision", color="tab:blue")
    plots.series(ax, xs, rec, "recall" + (" (equal to precision here)" if equal else ""),
                 color="tab:red", linestyle="--", marker="s", ms=7, markerfacecolor="none")
    plots.series(ax, xs, _values(rounds, "detect_fpr"), "false-positive rate", color="0.5", linestyle=":")
    for k, label, style in (("quarantine_precision", "quarantine precision", {"color": "tab:cyan"}),
                            ("quarantine_recall", "quarantine recall", {"color": "tab:pink", "linestyle": "--"})):
        if any(r.get(k) is not None for r in rounds):
            plots.series(ax, xs, _values(rounds, k), label, ms=2, **style)
    plots.fraction_axis(ax, "fraction")
    share = f" {100 * fraction:g} %" if fraction is not None else ""
    plots.finish_panel(ax, f"detected poison (the lowest-scored{share})", "round")

    ax = row[2]
    plots.series(ax, xs, _values(rounds, "poison_still_backdoor"), "poisoned training images\ngiven the backdoor label",
                 color="tab:red")
    plots.series(ax, xs, _values(rounds, "asr"), "ASR (test)", color="tab:red", linestyle=":", ms=2)
    plots.series(ax, xs, _values(rounds, "clean_acc"), "ACC (test)", color="tab:blue", linestyle=":", ms=2)
    plots.fraction_axis(ax, "fraction")
    plots.finish_panel(ax, "the backdoor at the end of each round", "round")
    return fig


# ----- samples.png -------------------------------------------------------------------------------------------

@torch.no_grad()
def predictions(model, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    with eval_mode(model):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x).argmax(1).cpu()


def pick_samples(test, backdoor, n: int = 8, batch_size: int = 256):
    """The first ``n`` test images whose label is not already their backdoor label (a triggered copy then shows
    the backdoor at work); returns (clean, triggered, labels, backdoor labels)."""
    xs, ys = [], []
    for _, x, y in test.batches(batch_size):
        keep = backdoor.labels(y) != y
        xs.append(x[keep])
        ys.append(y[keep])
        if sum(len(v) for v in ys) >= n:
            break
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    return x, backdoor.trigger(x), y.cpu(), backdoor.labels(y).cpu()


def clean_samples_figure(clean, labels, preds: dict[str, torch.Tensor], title: str):
    """One row of test images titled ``label | prediction(s)``: a run on data of other code knows no trigger."""
    names = list(preds)
    fig, rows = plots.rows_figure(f"{title}\nlabel | prediction of the " + " → ".join(names)
                                  + " model (no trigger known: clean test images only)", [clean.shape[0]],
                                  panel_size=(1.35, 1.55))
    for i, ax in enumerate(rows[0]):
        p = [int(preds[m][i]) for m in names]
        plots.image(ax, clean[i], "clean\n(true label)" if i == 0 else None, f"{int(labels[i])} | " + "→".join(map(str, p)),
                    "black" if p[-1] == int(labels[i]) else "tab:orange")
    return fig


def samples_figure(clean, triggered, labels, bd_labels, preds: dict[str, tuple], title: str, amplify: float = 5.0):
    """Rows: clean, triggered, |difference| x ``amplify``. ``preds``: model name -> (clean, triggered) predictions;
    each image's title is ``label | prediction`` (``label | infected→repaired`` for two models), red where the
    prediction is the backdoor label."""
    n = clean.shape[0]
    names = list(preds)
    fig, rows = plots.rows_figure(f"{title}\nlabel | prediction of the " + " → ".join(names)
                                  + " model; red: the backdoor label", [n] * 3, panel_size=(1.35, 1.55))
    diff = ((triggered - clean).abs() * amplify).clamp(0, 1)
    for row, imgs, kind in ((rows[0], clean, 0), (rows[1], triggered, 1), (rows[2], diff, None)):
        for i, ax in enumerate(row):
            ylabel = None
            if i == 0:
                ylabel = ("clean\n(true label)", "triggered\n(backdoor label)", f"|difference|\nx {amplify:g}")[
                    kind if kind is not None else 2]
            if kind is None:
                plots.image(ax, imgs[i], ylabel)
                continue
            shown = labels[i] if kind == 0 else bd_labels[i]
            p = [int(preds[m][kind][i]) for m in names]
            hit = p[-1] == int(bd_labels[i])
            plots.image(ax, imgs[i], ylabel, f"{int(shown)} | " + "→".join(map(str, p)),
                        "tab:red" if hit else "black")
    return fig


def write_samples(path: str, title: str, test, backdoor, models: dict, channels_last: bool) -> object:
    """samples.png of the given models (name -> model; the infected one first); without a trigger (``backdoor``
    None: data of other code) the clean test images only."""
    if backdoor is None:
        x, y = next(iter(test.batches(8, shuffle=False)))[1:]
        fig = clean_samples_figure(x.cpu(), y.cpu(), {name: predictions(m, x, channels_last) for name, m in models.items()},
                                   title)
        plots.save(fig, path)
        return fig
    clean, triggered, labels, bd_labels = pick_samples(test, backdoor)
    preds = {name: (predictions(m, clean, channels_last), predictions(m, triggered, channels_last))
             for name, m in models.items()}
    fig = samples_figure(clean.cpu(), triggered.cpu(), labels, bd_labels, preds, title)
    plots.save(fig, path)
    return fig


# ----- the figures of a run folder ---------------------------------------------------------------------------

def curve_figures(records: list[dict], summary: dict, title: str) -> dict:
    """File name -> Figure of the curve figures of a run (``curves.png``, PBE's ``rounds.png``)."""
    if summary.get("defense") is None:
        return {"curves.png": attack_curves(records, summary, title)}
    out = {"curves.png": defense_curves(records, summary, title)}
    if summary.get("rounds"):
        out["rounds.png"] = pbe_rounds(summary["rounds"], summary, title)
    return out


def write_curves(folder: str, records: list[dict], summary: dict, args: dict) -> dict:
    """Draw and save the curve figures of the run in ``folder``; returns them by file name."""
    figs = curve_figures(records, summary, run_title(os.path.basename(os.path.normpath(folder)), args, summary))
    for name, fig in figs.items():
        plots.save(fig, os.path.join(folder, name))
    return figs


def write_figures(folder: str, records: list[dict], summary: dict, args: dict, test, backdoor, models: dict,
                  channels_last: bool) -> dict:
    """Every figure of a finished run: the curves (``write_curves``) and samples.png of ``models`` (name -> model,
    the infected one first). Under torchrun rank 0 draws."""
    if not is_main():
        return {}
    figs = write_curves(folder, records, summary, args)
    title = run_title(os.path.basename(os.path.normpath(folder)), args, summary)
    figs["samples.png"] = write_samples(os.path.join(folder, "samples.png"), title, test, backdoor, models,
                                        channels_last)
    return figs


def read_folder(folder: str) -> tuple[list[dict], dict, dict]:
    """(records, summary, args) of a finished run folder."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "args.json")) as f:
        args = json.load(f)
    return records, summary, args


def redraw(folder: str) -> dict:
    """Re-draw the curve figures of a finished run folder from its json files."""
    return write_curves(folder, *read_folder(folder))


def main(argv: list[str] | None = None) -> None:
    from utils.run.errors import OneLineParser, UserError

    p = OneLineParser(prog="python -m utils.figures", description="Re-draw curves.png (and rounds.png) of finished "
                                                                   "run folders from their json files.")
    p.add_argument("runs", nargs="+", help="run folders with a summary.json")
    for folder in p.parse_args(argv).runs:
        if not os.path.isfile(os.path.join(folder, "summary.json")):
            raise UserError(f"'{folder}' has no summary.json (not a finished run); give finished run folders")
        print(f"{folder}: " + ", ".join(redraw(folder)), flush=True)


if __name__ == "__main__":
    from utils.run.errors import run_cli

    run_cli(main)
