"""Gather finished runs into one results table, like the papers' tables: a markdown table or CSV.

    python -m utils.report runs/*              # markdown, one row per run, in the order given
    python -m utils.report runs/* --csv > results.csv

A row is read from the run folder's summary.json (plus args.json for dataset and attack): dataset,
attack (trigger and mode), defense (``none`` for an attack run), ACC / ASR / RA after the run
(``final``; a defense's ``initial`` numbers are the attacked model's), poison-detection precision and
recall where the defense reports them (PBE: the last round's lowest-scored share; PUD: the last
step's poison set) and the run's seconds. Markdown shows percentages; CSV keeps the fractions.
Only json is read, so the report needs neither torch nor the data.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys

from utils.run.errors import OneLineParser, UserError, run_cli

COLUMNS = ("run", "dataset", "attack", "defense", "acc", "asr", "ra", "det_precision", "det_recall", "seconds")
HEADERS = {"run": "run", "dataset": "dataset", "attack": "attack", "defense": "defense", "acc": "ACC %", "asr": "ASR %",
           "ra": "RA %", "det_precision": "det. precision %", "det_recall": "det. recall %", "seconds": "seconds"}
FRACTIONS = ("acc", "asr", "ra", "det_precision", "det_recall")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}' ({e.__class__.__name__}); is it a run folder written by this toolkit?") from None


def _detection(summary: dict) -> tuple:
    if summary.get("rounds"):  # PBE
        last = summary["rounds"][-1]
        return last.get("detect_precision"), last.get("detect_recall")
    if summary.get("steps"):  # PUD
        last = summary["steps"][-1]
        return last.get("poison_precision"), last.get("poison_recall")
    return None, None


def read_run(folder: str) -> dict:
    """One table row from a finished run folder; a folder that is not one is a ``UserError``."""
    if not os.path.isdir(folder):
        raise UserError(f"'{folder}' is not a run folder (no such directory)")
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        hint = (" (it holds an interrupted run's state.pt: finish it with --resume)"
                if os.path.exists(os.path.join(folder, "state.pt")) else "")
        raise UserError(f"'{folder}' has no summary.json, so it is not a finished run{hint}; leave it out of the list")
    summary = _read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("final"), dict):
        raise UserError(f"'{path}' has no 'final' results; it is not a summary written by this toolkit")
    args_path = os.path.join(folder, "args.json")
    args = _read_json(args_path) if os.path.isfile(args_path) else {}
    final = summary["final"]
    precision, recall = _detection(summary)
    attack = " ".join(str(args[k]) for k in ("trigger_type", "attack_mode") if args.get(k))
    if not attack and (args.get("from_backdoorbench") or args.get("train_data")):  # a model and data of other code
        attack = "backdoorbench" if args.get("from_backdoorbench") else "other code"
    return {"run": os.path.basename(os.path.normpath(folder)), "dataset": args.get("dataset", ""), "attack": attack,
            "defense": summary.get("defense", "none"), "acc": final.get("clean_acc"), "asr": final.get("asr"),
            "ra": final.get("robust_acc"), "det_precision": precision, "det_recall": recall,
            "seconds": summary.get("seconds")}


def _cell(row: dict, key: str, percent: bool) -> str:
    v = row[key]
    if v is None:
        return "–" if percent else ""
    if key in FRACTIONS:
        return f"{100 * v:.2f}" if percent else f"{v:.6g}"
    if key == "seconds":
        return f"{v:.0f}" if percent else f"{v:g}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS[k] for k in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, True) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r, k, False) for k in COLUMNS])
    return out.getvalue()


def main(argv: list[str] | None = None) -> str:
    p = OneLineParser(prog="python -m utils.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each with a summary.json)")
    p.add_argument("--csv", action="store_true", help="CSV with fractions instead of a markdown table")
    args = p.parse_args(argv)
    rows = [read_run(f) for f in args.runs]  # every folder is checked before anything is printed
    text = to_csv(rows) if args.csv else markdown(rows)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    run_cli(main)
