"""python -m utils.report: one results table from run folders (attack runs and defense runs)."""
import csv
import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli
from utils import report

ARGS = {"dataset": "cifar10", "trigger_type": "blend", "attack_mode": "all2one"}
FINAL = {"clean_acc": 0.9, "asr": 0.05, "asr_incl_target": 0.1, "robust_acc": 0.4}
DEFENSE_SUMMARIES = {
    "aft": {"defense": "aft", "initial": {"clean_acc": 0.93, "asr": 0.99}, "final": FINAL, "seconds": 55.2},
    "pbe": {"defense": "pbe", "initial": {"clean_acc": 0.93}, "final": FINAL, "seconds": 80,
            "rounds": [{"detect_precision": 0.2, "detect_recall": 0.3}, {"detect_precision": 0.75, "detect_recall": 0.5}]},
    "pud": {"defense": "pud", "initial": {"clean_acc": 0.93}, "final": FINAL, "seconds": 120,
            "steps": [{"poison_precision": 0.1, "poison_recall": 0.1}, {"poison_precision": 0.96, "poison_recall": 0.094}]},
}


def make_run(folder, summary, args=ARGS):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "args.json").write_text(json.dumps(args))
    return folder


@pytest.fixture
def runs(tmp_path, tiny_attack_run):
    out = [tiny_attack_run]  # a real attack run: summary has "final", no robust accuracy
    out += [make_run(tmp_path / name, s) for name, s in DEFENSE_SUMMARIES.items()]
    return out


def test_markdown_table_has_one_row_per_run(runs, capsys):
    assert cli(report.main, *runs) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| run | dataset | attack | defense | ACC % | ASR % | RA % | det. precision % | det. recall % "
                        "| seconds |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[3] for r in rows] == ["none", "aft", "pbe", "pud"]
    attack = rows[0]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert attack[1:3] == ["synthetic", "patch all2one"] and attack[4] == f"{100 * summary['final']['clean_acc']:.2f}"
    assert attack[6:9] == ["–", "–", "–"]
    assert rows[1][1:] == ["cifar10", "blend all2one", "aft", "90.00", "5.00", "40.00", "–", "–", "55"]
    assert rows[2][7:9] == ["75.00", "50.00"] and rows[3][7:9] == ["96.00", "9.40"]  # the last round / step


def test_csv_keeps_fractions(runs, capsys):
    assert cli(report.main, *runs[1:], "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["defense"] for r in rows] == ["aft", "pbe", "pud"]
    assert float(rows[2]["det_recall"]) == pytest.approx(0.094) and float(rows[0]["acc"]) == pytest.approx(0.9)
    assert rows[0]["det_precision"] == "" and float(rows[2]["seconds"]) == 120


def test_a_folder_without_summary_is_a_clear_error(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "state.pt").write_bytes(b"")
    assert cli(report.main, *runs, unfinished) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before every folder is checked
    assert captured.err.strip() == (f"error: '{unfinished}' has no summary.json, so it is not a finished run (it holds an "
                                    "interrupted run's state.pt: finish it with --resume); leave it out of the list")
    assert cli(report.main, tmp_path / "missing") == 2
    assert "no such directory" in capsys.readouterr().err
    broken = make_run(tmp_path / "broken", {"defense": "pud"})
    assert cli(report.main, broken) == 2
    assert "has no 'final' results" in capsys.readouterr().err


def test_report_runs_as_a_module_without_torch(runs):
    code = "import runpy, sys; sys.argv = ['report', *sys.argv[1:]]; runpy.run_module('utils.report', run_name='__main__'); " \
           "assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code, *map(str, runs[1:])], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 5


def test_runs_on_models_and_data_of_other_code_are_labelled(tmp_path):
    files = make_run(tmp_path / "files", {"defense": "pud", "final": {"clean_acc": 0.5, "robust_acc": 0.1}},
                     {"dataset": None, "train_data": "train.pt", "trigger_type": None, "attack_mode": None})
    bb = make_run(tmp_path / "bb", DEFENSE_SUMMARIES["aft"],
                  {"dataset": "cifar10", "from_backdoorbench": "attack_result.pt", "trigger_type": None})
    a, b = report.read_run(str(files)), report.read_run(str(bb))
    assert (a["dataset"], a["attack"], a["asr"]) == (None, "other code", None)
    assert (b["dataset"], b["attack"]) == ("cifar10", "backdoorbench")
