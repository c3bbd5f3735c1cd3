"""python -m utils.report: one results table from run folders (attack runs and defense runs)."""
import csv
import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli
from utils import report
from utils.run.runlock import lock_run_folder

ARGS = {"dataset": "cifar10", "trigger_type": "blend", "attack_mode": "all2one"}
FINAL = {"clean_acc": 0.9, "asr": 0.05, "asr_incl_target": 0.1, "robust_acc": 0.4, "target_class_acc": 0.85}
INITIAL = {"clean_acc": 0.93, "asr": 0.99, "robust_acc": 0.01, "target_class_acc": 0.95}
DEFENSE_SUMMARIES = {
    "aft": {"defense": "aft", "initial": INITIAL, "final": FINAL, "seconds": 55.2,
            "settings": {"pgd": {"window": 0}}},
    "aft_window": {"defense": "aft", "initial": INITIAL, "final": FINAL, "seconds": 50,
                   "settings": {"pgd": {"window": 5}}},
    "pbe": {"defense": "pbe", "initial": {"clean_acc": 0.93}, "final": FINAL, "seconds": 80,
            "settings": {"target_label": "auto"},
            "rounds": [{"detect_precision": 0.2, "detect_recall": 0.3}, {"detect_precision": 0.75, "detect_recall": 0.5}]},
    "pud": {"defense": "pud", "initial": {"clean_acc": 0.93}, "final": FINAL, "seconds": 120,
            "settings": {"target_label": 3, "model_repair": False},
            "steps": [{"poison_precision": 0.1, "poison_recall": 0.1}, {"poison_precision": 0.96, "poison_recall": 0.094}]},
}


def make_run(folder, summary, args=ARGS):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "args.json").write_text(json.dumps(args))
    return folder


def rows_of(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.strip().splitlines()[2:]]


@pytest.fixture
def runs(tmp_path, tiny_attack_run):
    out = [tiny_attack_run]  # a real attack run: summary has "final" with its robust accuracy
    out += [make_run(tmp_path / name, s) for name, s in DEFENSE_SUMMARIES.items()]
    return out


def test_markdown_table_has_one_row_per_run_with_before_and_after(runs, capsys):
    assert cli(report.main, *runs) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("| run | dataset | attack | defense | ACC % | ASR % | target-class ACC % | RA % | "
                                   "det. precision % | det. recall % | seconds |")
    rows = rows_of(out)
    assert [r[3] for r in rows] == ["none", "aft", "aft[window=5]", "pbe", "pud[target=3]"]
    attack = rows[0]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert attack[1:3] == ["synthetic", "patch all2one"] and attack[4] == f"{100 * summary['final']['clean_acc']:.2f}"
    assert attack[6] == f"{100 * summary['final']['target_class_acc']:.2f}"  # an attack run: its final numbers only
    assert attack[7] == f"{100 * summary['final']['robust_acc']:.2f}" and attack[8:10] == ["–", "–"]
    assert rows[1][1:] == ["cifar10", "blend all2one", "aft", "93.00 → 90.00", "99.00 → 5.00", "95.00 → 85.00",
                           "1.00 → 40.00", "–", "–", "55"]
    assert rows[3][4] == "93.00 → 90.00" and rows[3][5] == "5.00"  # no initial ASR recorded: the final one alone
    assert rows[3][8:10] == ["75.00", "50.00"] and rows[4][8:10] == ["96.00", "9.40"]  # the last round / step


def test_csv_keeps_fractions_in_one_column_per_number(runs, capsys):
    assert cli(report.main, *runs[1:], "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["defense"] for r in rows] == ["aft", "aft[window=5]", "pbe", "pud[target=3]"]
    assert float(rows[3]["det_recall"]) == pytest.approx(0.094) and float(rows[0]["acc"]) == pytest.approx(0.9)
    assert float(rows[0]["acc_before"]) == pytest.approx(0.93) and float(rows[0]["target_class_acc"]) == 0.85
    assert rows[2]["asr_before"] == "" and rows[0]["det_precision"] == "" and float(rows[3]["seconds"]) == 120


def test_latex_table(runs, capsys):
    assert cli(report.main, *runs, "--latex") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == r"\begin{tabular}{llllrrrrrrr}" and lines[1] == r"\toprule" and lines[-1] == r"\end{tabular}"
    assert lines[2].startswith(r"run & dataset & attack & defense & ACC (\%) & ASR (\%)")
    body = lines[4:-2]
    assert len(body) == 5 and all(line.endswith(r" \\") for line in body)
    assert body[1].split(" & ")[4] == r"93.00 $\to$ 90.00"
    assert r"aft[window=5]" in body[2] and r"pud[target=3]" in body[4] and "--" in body[0]
    assert all(c not in line.replace(r"\_", "").replace(r"\%", "") for line in body for c in "_%")


def test_an_unfinished_folder_is_skipped_and_listed(runs, tmp_path, capsys):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "state.pt").write_bytes(b"")
    running = tmp_path / "running"
    running.mkdir()
    (running / "state.pt").write_bytes(b"")  # a run in progress has a state.pt too: it is not "interrupted"
    lock = lock_run_folder(running)
    try:
        info = json.loads((running / ".run.lock").read_text())
        assert cli(report.main, runs[1], interrupted, running, tmp_path / "missing") == 0
    finally:
        lock.release()
    captured = capsys.readouterr()
    assert [r[0] for r in rows_of(captured.out)] == ["aft"]
    assert captured.err.splitlines() == [
        f"skipped '{interrupted}': an interrupted run (state.pt; finish it with --resume)",
        f"skipped '{running}': a run in progress (pid {info['pid']} on {info['host']}, started {info['started']}: "
        f"{' '.join(info['command'])})",
        f"skipped '{tmp_path / 'missing'}': no such folder"]


def test_strict_makes_an_unfinished_folder_an_error(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "state.pt").write_bytes(b"")
    assert cli(report.main, *runs, unfinished, "--strict") == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before every folder is checked
    assert captured.err.strip() == (f"error: '{unfinished}' holds no finished run: an interrupted run (state.pt; "
                                    "finish it with --resume); leave it out of the list, or drop --strict to skip it")
    broken = make_run(tmp_path / "broken", {"defense": "pud"})
    assert cli(report.main, broken, "--strict") == 2
    assert "has no 'final' results" in capsys.readouterr().err
    assert cli(report.main, broken) == 2  # nothing finished at all: an error, not an empty table
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped '{broken}'") and err[1].startswith("error: none of the 1 folder(s)")


def test_report_runs_as_a_module_without_torch(runs):
    code = "import runpy, sys; sys.argv = ['report', *sys.argv[1:]]; runpy.run_module('utils.report', run_name='__main__'); " \
           "assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code, *map(str, runs[1:])], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 6


def test_runs_on_models_and_data_of_other_code_are_labelled(tmp_path):
    files = make_run(tmp_path / "files", {"defense": "pud", "final": {"clean_acc": 0.5, "robust_acc": 0.1}},
                     {"dataset": None, "train_data": "train.pt", "trigger_type": None, "attack_mode": None})
    bb = make_run(tmp_path / "bb", DEFENSE_SUMMARIES["aft"],
                  {"dataset": "cifar10", "from_backdoorbench": "attack_result.pt", "trigger_type": None})
    a, b = report.read_run(str(files)), report.read_run(str(bb))
    assert (a["dataset"], a["attack"], a["asr"]) == (None, "other code", None)
    assert (b["dataset"], b["attack"]) == ("cifar10", "backdoorbench")


def test_stages_shows_each_runs_split_and_training_share(runs, tmp_path, capsys):
    stages = {"seconds": {"train": 40.0, "train_pgd": 20.0, "eval_robust": 25.0, "target_estimate": 5.0},
              "wall": 100.0, "unattributed": 10.0, "training_share": 0.6}
    timed = make_run(tmp_path / "timed", {**DEFENSE_SUMMARIES["aft"], "stages": stages})
    assert cli(report.main, runs[0], timed, runs[1], "--stages") == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    # the real attack run brings "setup"; the columns follow the run order of the stages
    assert head.startswith("| run | defense | wall | training_share | setup | target_estimate | train | train_pgd |")
    rows = {r[0]: r for r in rows_of(out)}
    cols = [c.strip() for c in head.strip("|").split("|")]
    row = dict(zip(cols, rows["timed"]))
    assert (row["wall"], row["training_share"], row["train"], row["eval_robust"]) == ("100.0", "0.60", "40.0", "25.0")
    assert dict(zip(cols, rows["aft"]))["train"] == "–"  # a summary written before stage timing
    assert float(dict(zip(cols, rows[runs[0].name]))["wall"]) > 0  # the real attack run is timed too
    assert cli(report.main, timed, "--stages", "--csv") == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert parsed[0]["train_pgd"] == "20.0" and parsed[0]["training_share"] == "0.6"


PER_CLASS_BEFORE = [0.9, 0.8, 0.95, None, 0.7]
PER_CLASS_AFTER = [0.85, 0.5, 0.75, None, 0.9]  # drops 0.05, 0.3, 0.2, -, -0.2


def test_per_class_view_ranks_the_target_drop_among_the_classes(tmp_path, tiny_attack_run, capsys):
    with_target = make_run(tmp_path / "aft", {**DEFENSE_SUMMARIES["aft"], "target_class": 2,
                                              "initial": {**INITIAL, "per_class_acc": PER_CLASS_BEFORE},
                                              "final": {**FINAL, "per_class_acc": PER_CLASS_AFTER}})
    # a PUD summary written before ``target_class``: the target record's true class
    older = make_run(tmp_path / "pud", {**DEFENSE_SUMMARIES["pud"], "target": {"true": 1, "estimate": 1},
                                        "initial": {"clean_acc": 0.93, "per_class_acc": PER_CLASS_BEFORE},
                                        "final": {**FINAL, "per_class_acc": PER_CLASS_AFTER}})
    bare = make_run(tmp_path / "pbe", DEFENSE_SUMMARIES["pbe"])  # no per-class figures: dashes
    assert cli(report.main, tiny_attack_run, with_target, older, bare, "--per_class") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| run | attack | defense | classes | mean class ACC % | target class |")
    attack, aft, pud, pbe = rows_of(out)
    summary = json.loads((tiny_attack_run / "summary.json").read_text())
    # an attack run: its target from args.json, its class accuracies after only (no drop to rank)
    acc = [a for a in summary["final"]["per_class_acc"] if a is not None]
    assert attack[3:6] == [str(len(summary["final"]["per_class_acc"])), f"{100 * sum(acc) / len(acc):.1f}", "0"]
    assert attack[6] == f"{100 * summary['final']['target_class_acc']:.1f}" and attack[7:] == ["–", "–"]
    # the mean over the classes with test images; class 2 dropped 20 points, second to class 1's 30
    assert aft[3:] == ["5", "83.8 → 75.0", "2", "95.0 → 75.0", "2 of 4",
                       "1: 80.0 → 50.0, 2: 95.0 → 75.0, 0: 90.0 → 85.0"]
    assert pud[5:8] == ["1", "80.0 → 50.0", "1 of 4"]
    assert pbe[3:] == ["–"] * 6
    assert cli(report.main, with_target, older, "--per_class", "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["target_drop_rank"] == "2/4" and float(rows[0]["mean_class_acc_before"]) == pytest.approx(0.8375)
    assert rows[0]["largest_drops"] == "1:0.8:0.5;2:0.95:0.75;0:0.9:0.85" and rows[1]["target_class"] == "1"


def test_per_class_ties_share_the_better_rank_and_gains_are_not_drops():
    row = {"per_class": [0.5, 0.5, 0.9], "per_class_before": [0.7, 0.7, 0.9], "target_class": 1}
    assert report.per_class_summary(row)["rank"] == (1, 3)
    gains = report.per_class_summary({"per_class": [0.8, 0.9], "per_class_before": [0.7, 0.9], "target_class": 0})
    assert gains["rank"] == (2, 2) and gains["largest"] == []  # class 0 gained: no drop to list


def test_per_class_refuses_latex_and_stages(runs, capsys):
    assert cli(report.main, *runs, "--per_class", "--latex") == 2
    assert "--per_class prints markdown or --csv" in capsys.readouterr().err
    assert cli(report.main, *runs, "--per_class", "--stages") == 2


def test_a_file_is_named_as_a_file_not_a_missing_folder(runs, tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("")
    assert cli(report.main, runs[1], log) == 0
    assert capsys.readouterr().err.strip() == f"skipped '{log}': a file, not a run folder"
