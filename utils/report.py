"""Gather finished runs into one results table, like the papers' tables: markdown, CSV or LaTeX.

    python -m utils.report runs/*              # markdown, one row per finished run, in the order given
    python -m utils.report runs/* --csv > results.csv
    python -m utils.report runs/* --latex > results.tex
    python -m utils.report runs/* --strict     # an unfinished folder is an error instead of skipped
    python -m utils.report runs/* --stages     # where each run's time went: seconds per stage, training share
    python -m utils.report runs/* --per_class  # each class's accuracy: is the target class's loss its own?

A row is read from the run folder's summary.json (plus args.json for dataset and attack): dataset,
attack (trigger and mode), defense (``none`` for an attack run; with its distinguishing settings, e.g.
``aft[window=5]``, ``pud[target=3]``), ACC, ASR, target-class accuracy and RA before -> after the defense
(``initial`` -> ``final``; an attack run has only its final numbers), poison-detection precision and recall
where the defense reports them (PBE: the last round's lowest-scored share; PUD: the last step's poison set)
and the run's seconds. Markdown and LaTeX show percentages, CSV keeps fractions (one column per number).

``--per_class`` prints instead, per run, the mean of the classes' clean accuracies before -> after, the
target class's accuracy and where its drop ranks among the classes' drops (1: the largest), and the three
largest drops of classes that lost accuracy (summary.json ``per_class_acc``; runs written before it show
dashes). A defense that costs the target class much more than the others suppresses the class rather than
removing the backdoor; a target drop that ranks among many similar ones is the defense's general cost.

``--stages`` prints instead, per run, its wall time, ``training_share`` (training-epoch seconds / wall
seconds) and the seconds of each stage (summary.json ``stages``, ``utils.run.stagetimer``); runs written
before stage timing show dashes.

Folders without a finished run (in progress, interrupted, diverged, not a run folder) are skipped and
listed on stderr; ``--strict`` makes the first of them an error (exit 2). Only json is read, so the report
needs neither torch nor the data.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys

from utils.run.describe import attack_label, defense_label
from utils.run.errors import OneLineParser, UserError, run_cli
from utils.run.runlock import holder
from utils.run.stagetimer import STAGE_ORDER

METRICS = (("acc", "clean_acc", "ACC"), ("asr", "asr", "ASR"), ("target_class_acc", "target_class_acc", "target-class ACC"),
           ("ra", "robust_acc", "RA"))  # (column, summary key, header)
COLUMNS = ("run", "dataset", "attack", "defense", *(c for c, _, _ in METRICS), "det_precision", "det_recall", "seconds")
HEADERS = {"run": "run", "dataset": "dataset", "attack": "attack", "defense": "defense",
           **{c: f"{h} %" for c, _, h in METRICS}, "det_precision": "det. precision %", "det_recall": "det. recall %",
           "seconds": "seconds"}
CSV_COLUMNS = ("run", "dataset", "attack", "defense", *(x for c, _, _ in METRICS for x in (f"{c}_before", c)),
               "det_precision", "det_recall", "seconds")
FRACTIONS = {c for c, _, _ in METRICS} | {"det_precision", "det_recall"} | {f"{c}_before" for c, _, _ in METRICS}


class NotFinished(Exception):
    """A folder without a finished run; the message says what it holds instead."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NotFinished(f"cannot read {os.path.basename(path)} ({e.__class__.__name__})") from None


def _detection(summary: dict) -> tuple:
    if summary.get("rounds"):  # PBE
        last = summary["rounds"][-1]
        return last.get("detect_precision"), last.get("detect_recall")
    if summary.get("steps"):  # PUD: the set unlearning used, where it replaced the last step's
        last = {**summary["steps"][-1], **(summary.get("unlearning") or {}).get("ascent", {})}
        return last.get("poison_precision"), last.get("poison_recall")
    return None, None


def _unfinished(folder: str) -> str:
    """What a folder without summary.json holds (a run in progress, an interrupted run, ...)."""
    running = holder(folder)
    if running is not None:
        return f"a run in progress ({running})"
    if os.path.exists(os.path.join(folder, "failure.json")):
        return "a run that stopped on a non-finite loss (failure.json)"
    if os.path.exists(os.path.join(folder, "state.pt")):
        return "an interrupted run (state.pt; finish it with --resume)"
    return "no summary.json, so no finished run of this toolkit"


def read_run(folder: str) -> dict:
    """One table row from a finished run folder; ``NotFinished`` says why a folder has none."""
    if not os.path.isdir(folder):
        raise NotFinished("a file, not a run folder" if os.path.exists(folder) else "no such folder")
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        raise NotFinished(_unfinished(folder))
    summary = _read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("final"), dict):
        raise NotFinished("its summary.json has no 'final' results; it is not a summary written by this toolkit")
    args_path = os.path.join(folder, "args.json")
    args = _read_json(args_path) if os.path.isfile(args_path) else {}
    final, initial = summary["final"], summary.get("initial") or {}
    precision, recall = _detection(summary)
    row = {"run": os.path.basename(os.path.normpath(folder)), "dataset": args.get("dataset", ""),
           "attack": attack_label(args), "defense": defense_label(summary), "det_precision": precision,
           "det_recall": recall, "seconds": summary.get("seconds"), "stages": summary.get("stages") or {}}
    for column, key, _ in METRICS:
        row[column], row[f"{column}_before"] = final.get(key), initial.get(key)
    row["per_class"], row["per_class_before"] = final.get("per_class_acc"), initial.get("per_class_acc")
    row["target_class"] = _target_class(summary, args)
    return row


def _target_class(summary: dict, args: dict) -> int | None:
    """The attack's all2one target: a defense's summary names it (older PUD/PBE runs: the target record's
    ``true``), an attack run's args.json holds it."""
    if "target_class" in summary:
        return summary["target_class"]
    if isinstance(summary.get("target"), dict) and summary["target"].get("true") is not None:
        return summary["target"]["true"]
    attack_run = summary.get("defense") is None
    if attack_run and args.get("attack_mode") == "all2one" and isinstance(args.get("target_label"), int):
        return args["target_label"]
    return None


def read_runs(folders: list[str], strict: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """The rows of the finished runs and the (folder, reason) of the others; ``strict``: the first is an error."""
    rows, skipped = [], []
    for folder in folders:
        try:
            rows.append(read_run(folder))
        except NotFinished as e:
            if strict:
                raise UserError(f"'{folder}' holds no finished run: {e}; leave it out of the list, or drop --strict "
                                "to skip it") from None
            skipped.append((folder, str(e)))
    return rows, skipped


def _number(v, percent: bool) -> str:
    return f"{100 * v:.2f}" if percent else f"{v:.6g}"


def _cell(row: dict, key: str, arrow: str = " → ") -> str:
    """A cell with percentages; a defense's metrics as ``before → after``."""
    v = row[key]
    if key in FRACTIONS:
        before = row.get(f"{key}_before")
        if v is None:
            return "–"
        return (f"{_number(before, True)}{arrow}" if before is not None else "") + _number(v, True)
    if v is None:
        return "–"
    if key == "seconds":
        return f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS[k] for k in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow(["" if r[k] is None else _number(r[k], False) if k in FRACTIONS else
                    f"{r[k]:g}" if k == "seconds" else r[k] for k in CSV_COLUMNS])
    return out.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}


def _tex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex(rows: list[dict]) -> str:
    """A booktabs table (``\\usepackage{booktabs}``); numbers in percent, ``before $\\to$ after``."""
    numeric = [k for k in COLUMNS if k in FRACTIONS or k == "seconds"]
    spec = "".join("r" if k in numeric else "l" for k in COLUMNS)
    lines = [f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_tex(HEADERS[k].replace(" %", " (%)")) for k in COLUMNS) + r" \\", r"\midrule"]
    for r in rows:
        cells = [_cell(r, k, " $\\to$ ") if k in numeric else _tex(_cell(r, k)) for k in COLUMNS]
        lines.append(" & ".join(c.replace("–", "--") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


PER_CLASS_HEAD = ("run", "attack", "defense", "classes", "mean class ACC %", "target class", "target-class ACC %",
                  "target drop rank", "largest drops (class: before → after %)")
PER_CLASS_CSV = ("run", "attack", "defense", "classes", "mean_class_acc_before", "mean_class_acc", "target_class",
                 "target_class_acc_before", "target_class_acc", "target_drop_rank", "largest_drops")
LARGEST = 3


def per_class_summary(row: dict) -> dict:
    """The per-class figures of one run: mean class accuracy (over classes with test images), the target's
    accuracy and the rank of its drop (1 = the largest; ties share the better rank), the largest drops (classes
    that lost accuracy only)."""
    after, before, t = row["per_class"], row["per_class_before"], row["target_class"]
    out = {"classes": None, "mean": None, "mean_before": None, "target": t, "target_acc": None, "target_before": None,
           "rank": None, "largest": []}
    if after is None:
        return out
    mean = lambda v: sum(v) / len(v) if v else None
    out["classes"] = len(after)
    out["mean"] = mean([a for a in after if a is not None])
    if t is not None and 0 <= t < len(after):
        out["target_acc"] = after[t]
    if before is None or len(before) != len(after):
        return out
    both = {c: (b, a) for c, (b, a) in enumerate(zip(before, after)) if a is not None and b is not None}
    out["mean_before"] = mean([b for b, _ in both.values()])
    drops = {c: b - a for c, (b, a) in both.items()}
    if t in both:
        out["target_before"] = both[t][0]
        out["rank"] = (1 + sum(d > drops[t] for d in drops.values()), len(drops))
    out["largest"] = [(c, *both[c]) for c in sorted(drops, key=lambda c: (-drops[c], c))[:LARGEST] if drops[c] > 0]
    return out


def per_class_table(rows: list[dict], as_csv: bool) -> str:
    """One row per run (``per_class_summary``); markdown in percent, or CSV with fractions."""
    table = [(r, per_class_summary(r)) for r in rows]
    if as_csv:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(PER_CLASS_CSV)
        v = lambda x: "" if x is None else _number(x, False)
        for r, p in table:
            w.writerow([r["run"], r["attack"], r["defense"], v(p["classes"]), v(p["mean_before"]), v(p["mean"]),
                        v(p["target"]), v(p["target_before"]), v(p["target_acc"]),
                        f"{p['rank'][0]}/{p['rank'][1]}" if p["rank"] else "",
                        ";".join(f"{c}:{_number(b, False)}:{_number(a, False)}" for c, b, a in p["largest"])])
        return out.getvalue()
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"
    arrow = lambda b, a: "–" if a is None else (f"{pct(b)} → " if b is not None else "") + pct(a)
    lines = ["| " + " | ".join(PER_CLASS_HEAD) + " |", "|" + "---|" * len(PER_CLASS_HEAD)]
    for r, p in table:
        cells = [r["run"], r["attack"], r["defense"], "–" if p["classes"] is None else str(p["classes"]),
                 arrow(p["mean_before"], p["mean"]), "–" if p["target"] is None else str(p["target"]),
                 arrow(p["target_before"], p["target_acc"]),
                 f"{p['rank'][0]} of {p['rank'][1]}" if p["rank"] else "–",
                 ", ".join(f"{c}: {pct(b)} → {pct(a)}" for c, b, a in p["largest"]) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_table(rows: list[dict], as_csv: bool) -> str:
    """One row per run: wall seconds, training share and the seconds of every stage any run has."""
    seen = {k for r in rows for k in r["stages"].get("seconds", {})}
    names = [k for k in STAGE_ORDER if k in seen] + sorted(seen - set(STAGE_ORDER))
    head = ["run", "defense", "wall", "training_share", *names, "unattributed"]
    table = []
    for r in rows:
        st = r["stages"]
        sec = st.get("seconds", {})
        table.append([r["run"], r["defense"], st.get("wall"), st.get("training_share"),
                      *(sec.get(k) for k in names), st.get("unattributed")])
    if as_csv:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(head)
        w.writerows([["" if v is None else v for v in row] for row in table])
        return out.getvalue()
    cell = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) and v < 1 else \
        f"{v:.1f}" if isinstance(v, (int, float)) else str(v)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = OneLineParser(prog="python -m utils.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each with a summary.json)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="CSV with fractions instead of a markdown table")
    form.add_argument("--latex", action="store_true", help="a LaTeX (booktabs) table instead of markdown")
    p.add_argument("--stages", action="store_true", help="where each run's time went (seconds per stage, training "
                                                         "share) instead of the results (markdown or --csv)")
    p.add_argument("--per_class", action="store_true", help="each run's class accuracies instead of the results: the "
                                                            "mean, the target class and the rank of its drop, the "
                                                            "largest drops (markdown or --csv)")
    p.add_argument("--strict", action="store_true", help="fail on a folder without a finished run instead of "
                                                         "skipping it")
    args = p.parse_args(argv)
    if args.stages and args.per_class:
        p.error("--stages and --per_class are two different tables: ask for one")
    if (args.stages or args.per_class) and args.latex:
        p.error(f"{'--stages' if args.stages else '--per_class'} prints markdown or --csv, not --latex")
    rows, skipped = read_runs(args.runs, args.strict)  # every folder is read before anything is printed
    for folder, reason in skipped:
        print(f"skipped '{folder}': {reason}", file=sys.stderr)
    if not rows:
        raise UserError(f"none of the {len(args.runs)} folder(s) given holds a finished run (see above)")
    text = (stage_table(rows, args.csv) if args.stages else per_class_table(rows, args.csv) if args.per_class
            else to_csv(rows) if args.csv else latex(rows) if args.latex
            else markdown(rows))
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    run_cli(main)
