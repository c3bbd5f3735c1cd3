"""The grid command (benchmarks/grid.py): skips finished cells, resumes interrupted ones, shows failures, and
rebuilds its table and figure from the run folders; AutoAttack beside PGD in a defense's summary."""
import dataclasses
import json
import os

import pytest

from benchmarks import grid, grid_cells, grid_table
from conftest import NO_FIGURES, cli

PRESET = grid_cells.Preset(
    "tiny", {"synthetic": ("--dataset", "synthetic")}, {"synthetic": ("--test_subset", "50", *NO_FIGURES)},
    (("synthetic", [grid_cells.Attack("patch-all2one", ("--trigger_type", "patch"), 0),
                    grid_cells.Attack("patch-all2all", ("--trigger_type", "patch", "--attack_mode", "all2all"), None)]),),
    (grid_cells.Defense("aft", "pbe_main.py", ()), grid_cells.Defense("pud", "PUD.py", ()),
     grid_cells.Defense("pud-wrong-target", "PUD.py", (), wrong_target=True)), {"synthetic": 10})


class FakeRunner:
    """Stands in for the entry scripts: writes a finished run folder, or fails for the cells named in ``fail``."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cmd, env, log):
        out = cmd[cmd.index("--out_dir") + 1]
        name = os.path.relpath(out, os.path.dirname(os.path.dirname(out)))
        self.calls.append((name, cmd))
        with open(log, "a") as f:
            f.write("a log line\n")
        if name in self.fail:
            return 3
        os.makedirs(out, exist_ok=True)
        script = os.path.basename(cmd[1])
        defense = {"train_blend.py": None, "pbe_main.py": "aft", "PUD.py": "pud"}[script]
        summary = {"final": {"clean_acc": 0.9, "asr": 0.05 if defense else 0.97, "target_class_acc": 0.88},
                   "seconds": 12.0}
        if "--clean_model_from" in cmd:
            summary["clean_model_from"] = cmd[cmd.index("--clean_model_from") + 1]
        if defense:
            summary["defense"] = defense
            summary["final"]["robust_acc"] = 0.1
            summary["initial"] = {"robust_acc": 0.02}  # the infected model's RA, measured by its defenses
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"))
        json.dump({"dataset": "synthetic", "trigger_type": "patch", "attack_mode": "all2one"},
                  open(os.path.join(out, "args.json"), "w"))
        return 0


def test_only_runs_the_chosen_cells_and_their_attacks_alone(tmp_path):
    runner = FakeRunner()
    status = grid.run_grid(PRESET, "synthetic", str(tmp_path / "grid"), runner=runner, only=("*all2all/pud",))
    assert sorted(n for n, _ in runner.calls) == ["patch-all2all/attack", "patch-all2all/pud"]  # not the other attack
    assert set(status) == {"patch-all2all/attack", "patch-all2all/pud"}

def test_the_grid_runs_each_cell_once_skips_finished_ones_and_retries_failures(tmp_path):
    root = str(tmp_path / "grid")
    first = FakeRunner(fail={"patch-all2one/pud"})
    status = grid.run_grid(PRESET, "synthetic", root, jobs=2, runner=first)
    names = sorted(n for n, _ in first.calls)
    # two attacks; aft and pud on both; the wrong-target row only on the all2one cell
    assert names == sorted(["patch-all2one/attack", "patch-all2all/attack", "patch-all2one/aft", "patch-all2all/aft",
                            "patch-all2one/pud", "patch-all2all/pud", "patch-all2one/pud-wrong-target"])
    assert status["patch-all2one/pud"] == "failed" and status["patch-all2one/aft"] == "done"
    wrong = dict(first.calls)["patch-all2one/pud-wrong-target"]
    assert wrong[wrong.index("--target_label") + 1] == "1"  # the all2one target is 0: a class that is not it
    assert "--test_subset" in dict(first.calls)["patch-all2one/attack"]  # every row on the same test images
    failures = json.load(open(os.path.join(root, "grid_failures.json")))
    assert list(failures) == ["patch-all2one/pud"] and failures["patch-all2one/pud"]["rc"] == 3

    rows = grid_table.write_outputs(PRESET, "synthetic", root)
    table = open(os.path.join(root, "grid.md")).read()
    assert "pud (FAILED)" in table and os.path.getsize(os.path.join(root, "grid.png")) > 0
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["cell"], r["defense"]) for r in failed] == [("patch-all2one", "pud")]
    done = next(r for r in rows if r["cell"] == "patch-all2all" and r["defense"] == "aft")
    assert (done["acc"], done["asr"], done["tca"]) == (0.9, 0.05, 0.88)
    attack = next(r for r in rows if r["cell"] == "patch-all2all" and r["defense"] == "none")
    assert (attack["asr"], attack["ra"]) == (0.97, 0.02)  # the attack row's RA: its defenses' "before" figure

    second = FakeRunner()
    status = grid.run_grid(PRESET, "synthetic", root, runner=second)
    assert [n for n, _ in second.calls] == ["patch-all2one/pud"]  # finished cells are skipped, the failure retried
    assert all(s == "done" for s in status.values())
    assert not json.load(open(os.path.join(root, "grid_failures.json")))
    assert "FAILED" not in grid_table.markdown(grid_table.table_rows(PRESET, "synthetic", root))


def test_an_interrupted_cell_is_resumed_and_a_defense_without_its_attack_fails(tmp_path):
    root = str(tmp_path / "grid")
    cells = {c.name: c for c in grid_cells.cells_of(PRESET, "synthetic", root)}
    aft = cells["patch-all2one/aft"]
    os.makedirs(aft.folder)
    open(os.path.join(aft.folder, "state.pt"), "w").close()
    assert aft.command(PRESET, "synthetic")[-1] == "--resume"
    assert cells["patch-all2all/aft"].command(PRESET, "synthetic")[-1] != "--resume"
    runner = FakeRunner(fail={"patch-all2all/attack"})
    status = grid.run_grid(PRESET, "synthetic", root, runner=runner)
    assert status["patch-all2all/aft"] == "failed" and "patch-all2all/aft" not in dict(runner.calls)
    assert "did not finish" in json.load(open(os.path.join(root, "grid_failures.json")))["patch-all2all/aft"]["tail"]


@pytest.mark.slow
def test_a_defense_reports_autoattack_beside_pgd_on_the_same_images(tiny_attack_run, tmp_path):
    import pbe_main

    out = tmp_path / "aft"
    # 20 test images: PGD-20 and AutoAttack see the same ones
    assert cli(pbe_main.main, "--model_path", tiny_attack_run / "model.pt", "--aft_epochs", "1", "--adv_epochs", "0",
               "--test_subset", "20", "--autoattack_images", "20", "--device", "cpu", "--out_dir", out) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["autoattack_eval"]["images"] == 20 and s["autoattack_eval"]["reference_strength"]
    assert s["final"]["autoattack_acc"] <= s["final"]["robust_acc"]


def test_the_clean_model_row_retrains_the_attack_without_poisons_and_is_not_judged(tmp_path):
    root = str(tmp_path / "grid")
    preset = grid_cells.Preset("tiny", PRESET.datasets, PRESET.shared, PRESET.attacks,
                         (grid_cells.CLEAN_MODEL, grid_cells.Defense("aft", "pbe_main.py", ())), {"synthetic": 10})
    runner = FakeRunner(fail={"patch-all2all/attack"})
    status = grid.run_grid(preset, "synthetic", root, runner=runner)
    calls = dict(runner.calls)
    clean, attack = calls["patch-all2one/clean-model"], calls["patch-all2one/attack"]
    # the attack's own command (script, trigger, mode, test images) with --pc 0 added; no model to defend
    assert clean[1] == "train_blend.py" and "--model_path" not in clean
    assert clean[clean.index("--pc") + 1] == "0" and "--pc" not in attack
    assert clean[:clean.index("--pc")] == attack[:attack.index("--out_dir")]
    # it needs no infected model: it runs where the attack failed, while that attack's defense cannot
    assert status["patch-all2all/clean-model"] == "done" and status["patch-all2all/aft"] == "failed"
    rows = {(r["cell"], r["defense"]): r for r in grid_table.table_rows(preset, "synthetic", root)}
    assert rows["patch-all2one", "clean-model"]["asr"] == 0.97  # FakeRunner's attack-run summary
    assert rows["patch-all2one", "clean-model"]["misses"] is None and rows["patch-all2one", "aft"]["misses"] == ""


def test_clean_model_rows_with_the_same_training_share_it_and_score_it_with_their_own_triggers(tmp_path):
    # a clean model does not depend on the trigger: one training per schedule, the other rows score its weights
    attacks = [grid_cells.Attack("patch-all2one", ("--trigger_type", "patch"), 0),
               grid_cells.Attack("blend-all2all", ("--trigger_type", "blend", "--attack_mode", "all2all"), None),
               grid_cells.Attack("patch-longer", ("--trigger_type", "patch", "--n_iters", "9"), 0)]
    preset = grid_cells.Preset("tiny", PRESET.datasets, PRESET.shared, (("synthetic", attacks),),
                               (grid_cells.CLEAN_MODEL,), {"synthetic": 10})
    root = str(tmp_path / "grid")
    clean = {c.attack.name: c for c in grid_cells.cells_of(preset, "synthetic", root) if c.defense}
    assert clean["blend-all2all"].clean_from == clean["patch-all2one"].folder
    assert clean["patch-all2one"].clean_from is None and clean["patch-longer"].clean_from is None  # other epochs
    # before the shared training has finished the row would train itself
    assert "--clean_model_from" not in clean["blend-all2all"].command(preset, "synthetic")
    runner = FakeRunner()
    status = grid.run_grid(preset, "synthetic", root, jobs=2, runner=runner)
    assert set(status.values()) == {"done"}
    order = [n for n, _ in runner.calls]
    assert order.index("blend-all2all/clean-model") > order.index("patch-all2one/clean-model")
    calls = dict(runner.calls)
    shared = calls["blend-all2all/clean-model"]
    assert shared[shared.index("--clean_model_from") + 1] == os.path.join(clean["patch-all2one"].folder, "model.pt")
    assert shared[shared.index("--trigger_type") + 1] == "blend"  # scored with its own trigger
    assert "--clean_model_from" not in calls["patch-longer/clean-model"]
    # AutoAttack: the shared training's figure is the scoring rows' too (the same weights and images)
    aa = FakeAutoAttack()
    grid.autoattack_pass(preset, "synthetic", root, 200, jobs=2, runner=aa)
    attacked = sorted(os.path.relpath(folder, root) for folder, _, _ in aa.calls)
    assert os.path.join("blend-all2all", "clean-model") not in attacked and len(attacked) == 5
    figure = json.load(open(os.path.join(clean["blend-all2all"].folder, "autoattack.json")))
    assert figure["autoattack_acc"] == 0.01 and figure["autoattack_eval"]["shared_from"] == clean["patch-all2one"].folder
    # --only the clean-model rows: no attack is run for them (they need no infected model)
    runner = FakeRunner()
    grid.run_grid(preset, "synthetic", str(tmp_path / "only"), runner=runner, only=("*/clean-model",))
    assert sorted(n for n, _ in runner.calls) == sorted(f"{a.name}/clean-model" for a in attacks)
    # a shared training that failed: the row trains its own
    runner = FakeRunner(fail={"patch-all2one/clean-model"})
    grid.run_grid(preset, "synthetic", str(tmp_path / "again"), runner=runner)
    assert "--clean_model_from" not in dict(runner.calls)["blend-all2all/clean-model"]


def test_a_defended_cell_names_the_targets_it_misses():
    infected = {"defense": "none", "status": "done", "acc": 0.97, "asr": 0.98, "asr_late_max": None, "ra": 0.01,
                "tca": 0.96, "det_precision": None}
    good = {"defense": "pud", "status": "done", "acc": 0.95, "asr": 0.05, "asr_late_max": 0.08, "ra": 0.10,
            "tca": 0.90, "det_precision": 0.9}
    assert grid_table.misses(good, infected) == ""
    bad = dict(good, asr_late_max=0.2, tca=0.80, acc=0.90, ra=0.01, det_precision=0.5)
    assert grid_table.misses(bad, infected) == "late ASR, ACC, RA, target ACC, precision"
    assert grid_table.misses(dict(good, asr=0.11), infected) == "ASR"
    assert grid_table.misses(infected, infected) is None
    assert grid_table.misses(dict(good, status="failed"), infected) is None
    assert grid_table._cell_text({"misses": "", "status": "done"}, "misses", True) == "none"


def test_the_readme_block_is_written_once_and_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n## Results\n\nintro\n")
    grid_table.write_readme(str(readme), "quick-synthetic", "--preset quick", "| a |\n|---|\n| 1 |\n")
    first = readme.read_text()
    assert first.startswith("# title\n\n## Results\n\nintro\n\n<!-- grid quick-synthetic:") and "| 1 |" in first
    readme.write_text(first + "\n## More\n\ntail\n")
    grid_table.write_readme(str(readme), "quick-synthetic", "--preset quick", "| a |\n|---|\n| 2 |\n")
    second = readme.read_text()
    assert f"--preset quick --readme {readme} -->" in second  # the command that rewrites it names this file
    assert "| 1 |" not in second and "| 2 |" in second and second.endswith("<!-- /grid quick-synthetic -->\n\n## More\n\ntail\n")
    assert second.count("<!-- grid quick-synthetic:") == 1


class FakeAutoAttack:
    """Stands in for ``--autoattack_cell`` runs: records the cell and writes its autoattack.json."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, env, log):
        folder = cmd[cmd.index("--autoattack_cell") + 1]
        self.calls.append((folder, cmd, env))
        json.dump({"autoattack_acc": 0.01, "autoattack_eval": {"images": int(cmd[cmd.index("--autoattack") + 1])}},
                  open(os.path.join(folder, "autoattack.json"), "w"))
        return 0


def test_the_autoattack_pass_runs_every_finished_cell_without_a_result_once_several_at_a_time(tmp_path):
    root = str(tmp_path / "grid")
    grid.run_grid(PRESET, "synthetic", root, runner=FakeRunner(fail={"patch-all2one/pud"}))
    cells = {c.name: c for c in grid_cells.cells_of(PRESET, "synthetic", root)}
    json.dump({"autoattack_acc": 0.02}, open(os.path.join(cells["patch-all2all/aft"].folder, "autoattack.json"), "w"))
    fake = FakeAutoAttack()
    grid.autoattack_pass(PRESET, "synthetic", root, 200, jobs=2, runner=fake)
    done = {c.folder for n, c in cells.items() if n not in ("patch-all2one/pud", "patch-all2all/aft")}
    assert sorted(f for f, _, _ in fake.calls) == sorted(done)  # not the failed cell, not the one with a result
    assert all(cmd[cmd.index("--autoattack") + 1] == "200" and env["OMP_NUM_THREADS"] == cmd[-1]
               for _, cmd, env in fake.calls)
    rows = {(r["cell"], r["defense"]): r for r in grid_table.table_rows(PRESET, "synthetic", root)}
    assert rows[("patch-all2all", "aft")]["aa"] == 0.02 and rows[("patch-all2one", "aft")]["aa"] == 0.01
    again = FakeAutoAttack()
    grid.autoattack_pass(PRESET, "synthetic", root, 200, jobs=2, runner=again)
    assert again.calls == []


def test_autoattack_only_runs_the_pass_and_no_cell(tmp_path, monkeypatch):
    root = str(tmp_path / "grid")
    grid.run_grid(PRESET, "synthetic", root, runner=FakeRunner(fail={"patch-all2one/pud"}))  # one cell unfinished
    calls = []
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: calls.append("cells") or {})
    monkeypatch.setattr(grid, "autoattack_pass", lambda preset, ds, r, n, jobs, seed: calls.append(("aa", r, n)) or 1.0)
    assert grid.main(["--preset", "quick", "--root", root, "--autoattack", "200", "--autoattack_only"]) == 0
    assert calls == [("aa", root, 200)]
    assert json.loads(open(os.path.join(root, "grid_runs.jsonl")).readline())["what"] == "autoattack 200"
    calls.clear()
    grid.main(["--preset", "quick", "--root", root, "--autoattack", "200"])  # without it: the cells first
    assert calls == ["cells", ("aa", root, 200)]
    with pytest.raises(SystemExit):
        grid.parse(["--autoattack_only"])


def test_another_seed_runs_the_defenses_with_it_on_seed_0s_infected_models_and_the_seeds_table_shows_both(tmp_path):
    root = str(tmp_path / "grid")
    first = FakeRunner()
    grid.run_grid(PRESET, "synthetic", root, runner=first, only=("patch-all2one/*",))  # seed 0: one attack
    runner = FakeRunner(fail={"patch-all2one/pud"})
    status = grid.run_grid(PRESET, "synthetic", root, runner=runner, seed=1)
    here = grid_cells.seed_root(root, 1)
    ran = dict(runner.calls)
    assert not any(name.endswith("/attack") for name in ran)  # the infected models are seed 0's, never retrained
    cmd = ran["patch-all2one/aft"]
    assert cmd[cmd.index("--seed") + 1] == "1" and cmd[cmd.index("--out_dir") + 1].startswith(here + os.sep)
    assert cmd[cmd.index("--model_path") + 1] == os.path.join(root, "patch-all2one", "attack", "model.pt")
    assert status["patch-all2all/aft"] == "failed" and "patch-all2all/aft" not in ran  # seed 0 has no such attack
    assert "seed-0 grid" in json.load(open(os.path.join(here, "grid_failures.json")))["patch-all2all/aft"]["tail"]
    assert "--seed" not in dict(first.calls)["patch-all2one/aft"]  # seed 0: the scripts' default
    json.dump({"final": {"clean_acc": 0.9, "asr": 0.30, "target_class_acc": 0.88, "robust_acc": 0.1},
               "initial": {"robust_acc": 0.02}, "defense": "aft", "seconds": 3.0},
              open(os.path.join(here, "patch-all2one", "aft", "summary.json"), "w"))  # seed 1 misses the ASR
    rows = {(r["cell"], r["defense"]): r for r in grid_table.write_outputs(PRESET, "synthetic", root, seed=1)}
    assert rows[("patch-all2one", "aft")]["misses"] == "ASR" and os.path.exists(os.path.join(here, "grid.md"))
    assert rows[("patch-all2one", "none")]["status"] == "done"  # seed 0's infected model, read from its folder
    fake = FakeAutoAttack()
    grid.autoattack_pass(PRESET, "synthetic", root, 200, runner=fake, seed=1)
    assert fake.calls and all(f.startswith(here + os.sep) for f, _, _ in fake.calls)  # no seed-0 attack folder
    quick = {seed: {c.name for c in grid_cells.cells_of(grid_cells.PRESETS["quick"], "synthetic", root, seed)}
             for seed in (0, 1)}
    assert "blend-all2one/clean-model" in quick[0] and not any(n.endswith("/clean-model") for n in quick[1])
    readme = tmp_path / "README.md"
    readme.write_text("# t\n")
    assert grid.main(["--preset", "quick", "--root", root, "--seeds", "0", "1", "--readme", str(readme)]) == 0
    assert "<!-- grid quick-synthetic-seeds: written by python -m benchmarks.grid" in readme.read_text()
    text = open(os.path.join(root, "grid_seeds.md")).read()
    table = {tuple(c.strip() for c in line.split("|")[1:3]): line
             for line in text.splitlines() if line.startswith("| ")}
    assert table[("patch-all2one", "aft")].split("|")[4].strip() == "5.0 / 30.0"  # ASR %, seed 0 / seed 1
    assert table[("patch-all2one", "aft")].rstrip(" |").endswith("1 of 2")
    assert "none; ASR" in table[("patch-all2one", "aft")]
    assert table[("patch-all2one", "pud")].split("|")[4].strip() == "5.0 / ·"  # seed 1's run failed


def test_an_attack_seed_trains_other_infected_models_in_their_own_grid_and_the_table_shows_both(tmp_path, monkeypatch):
    preset = dataclasses.replace(PRESET, defenses=(grid_cells.CLEAN_MODEL, *PRESET.defenses))
    monkeypatch.setitem(grid_cells.PRESETS, "tiny", preset)  # for grid.main's --preset tiny
    assert grid_cells.with_attack_seed(preset, 0) is preset
    root = str(tmp_path / "grid")  # attack seed 0's grid; seed 2's is <root>-attack2
    here = grid_cells.attack_root(root, 2)
    assert here == root + "-attack2" and grid_cells.attack_root(root, 0) == root
    grid.run_grid(preset, "synthetic", root, runner=FakeRunner(), only=("patch-all2one/*",))
    runner = FakeRunner()
    grid.run_grid(grid_cells.with_attack_seed(preset, 2), "synthetic", here, runner=runner, only=("patch-all2one/*",))
    ran = dict(runner.calls)
    for name in ("patch-all2one/attack", "patch-all2one/clean-model"):  # the trainings: --seed 2
        assert ran[name][ran[name].index("--seed") + 1] == "2", name
        assert ran[name][ran[name].index("--out_dir") + 1].startswith(here + os.sep)
    assert "--seed" not in ran["patch-all2one/aft"]  # the defense: its own seed (the grid's --seed, here 0)
    assert ran["patch-all2one/aft"][ran["patch-all2one/aft"].index("--model_path") + 1] == os.path.join(
        here, "patch-all2one", "attack", "model.pt")
    quick = grid_cells.PRESETS["quick"]
    keys = {seed: grid_cells.clean_training_key(grid_cells.with_attack_seed(quick, seed), "synthetic",
                                                quick.attacks[0][1][0], grid_cells.CLEAN_MODEL) for seed in (0, 1)}
    assert keys[0] != keys[1]  # a clean model of another seed is never shared with seed 0's rows
    json.dump({"final": {"clean_acc": 0.9, "asr": 0.30, "target_class_acc": 0.88, "robust_acc": 0.1},
               "initial": {"robust_acc": 0.02}, "defense": "aft", "seconds": 3.0},
              open(os.path.join(here, "patch-all2one", "aft", "summary.json"), "w"))  # seed 2's model: a miss
    readme = tmp_path / "README.md"
    readme.write_text("# t\n")
    assert grid.main(["--preset", "tiny", "--attack_seed", "2", "--root", root, "--report_only",
                      "--readme", str(readme)]) == 0
    assert os.path.exists(os.path.join(here, "grid.md"))
    assert ("<!-- grid tiny-synthetic-attack2: written by python -m benchmarks.grid --preset tiny --dataset "
            "synthetic --attack_seed 2 --root ") in readme.read_text()
    assert grid.main(["--preset", "tiny", "--attack_seed", "2", "--root", root, "--seeds", "0"]) == 0
    assert "on the infected models of attack seed 2" in open(os.path.join(here, "grid_seeds.md")).read()
    assert grid.main(["--preset", "tiny", "--root", root, "--attack_seeds", "0", "2", "--readme", str(readme)]) == 0
    assert "<!-- grid tiny-synthetic-attack-seeds: written by" in readme.read_text()
    table = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")
             for line in open(os.path.join(root, "grid_attack_seeds.md")) if line.startswith("| ")}
    assert table[("patch-all2one", "aft")][4].strip() == "5.0 / 30.0"  # ASR %, attack seed 0 / 2
    assert table[("patch-all2one", "aft")][-3].strip() == "none; ASR"
    assert table[("patch-all2one", "aft")][-2].strip() == "1 of 2"
    assert table[("patch-all2one", "none")][4].strip() == "97.0 / 97.0"  # the infected models are rows too
    assert table[("patch-all2one", "pud")][4].strip() == "5.0 / 5.0"
    assert table[("patch-all2all", "aft")][3].strip() == "· / ·"  # never run


def test_the_readme_note_gives_the_recorded_wall_time_of_the_grid_runs(tmp_path):
    root = str(tmp_path / "grid")
    readme = tmp_path / "README.md"
    readme.write_text("# t\n")
    grid.run_grid(PRESET, "synthetic", root, runner=FakeRunner())
    grid.record_run(root, "cells", 600.0, 2, 7)
    grid.record_run(root, "cells", 300.0, 2, 1)
    grid.record_run(root, "autoattack 200", 120.0, 2, 0)
    assert [r["seconds"] for r in grid.recorded_runs(root)] == [600.0, 300.0, 120.0]
    assert grid.main(["--preset", "quick", "--root", root, "--report_only", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "15 min for the cells, 2 min for the AutoAttack pass (`--jobs 2`" in text


@pytest.mark.slow
def test_one_cells_autoattack_writes_its_result_on_the_seeded_images(tiny_attack_run):
    assert grid.main(["--autoattack", "4", "--autoattack_cell", str(tiny_attack_run)]) == 0
    res = json.load(open(tiny_attack_run / "autoattack.json"))
    assert res["autoattack_eval"]["images"] == 4 and res["autoattack_eval"]["reference_strength"]
    assert 0 <= res["autoattack_acc"] <= res["autoattack_eval"]["clean_correct"] / 4


def test_quick_grid_scores_enough_target_class_images():
    """Target-class accuracy is held to a 10-point bound, so one test image of the target class must move it by
    well under that: on 43 classes 1,000 scored images held 24 of the target class (4.2 points each)."""
    from utils.data.datasets import DATASETS, LOADERS, seeded_subset

    preset = grid_cells.PRESETS["quick"]
    for dataset, attacks in preset.attacks:
        shared = dict(zip(preset.shared[dataset][::2], preset.shared[dataset][1::2]))
        n = int(shared["--test_subset"]) if "--test_subset" in shared else None
        test = LOADERS[dataset](DATASETS[dataset], "", False, False)
        idx = seeded_subset(len(test), n, 0 + 1)  # the attack's seed 0, as the runs draw it
        y = test.y if idx is None else test.y[idx]
        for attack in attacks:
            if attack.target is not None:
                assert int((y == attack.target).sum()) >= 45, (dataset, attack.name)


def _readme_quickstart_commands():
    """The README's quickstart commands that name a grid row (``# -> <cell> / <row>``), continuation lines joined."""
    text = open(os.path.join(grid_cells.ROOT, "README.md")).read()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out, current = [], ""
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        current += " " + code.rstrip().rstrip("\\")
        if not code.rstrip().endswith("\\"):
            if "->" in comment and current.split():
                out.append((current.split(), comment.split("->", 1)[1].split("/")[-1].strip()))
            current = ""
    return out


def _flags(argv):
    """Flag -> its values (everything up to the next flag)."""
    flags, key = {}, None
    for tok in argv:
        if tok.startswith("--"):
            key = tok
            flags[key] = []
        elif key is not None:
            flags[key].append(tok)
    return flags


def test_the_readmes_defense_commands_are_the_quick_grids_rows():
    """A quickstart command that says it is a grid row runs that row's defense arguments, no more and no fewer
    (beside the paths and the test subset): changing the grid's setting and not the README fails here."""
    defenses = {d.name: d for d in grid_cells.PRESETS["quick"].defenses}
    checked = 0
    for argv, row in _readme_quickstart_commands():
        if row not in defenses:
            continue  # the attacks' rows (`none`)
        d = defenses[row]
        assert argv[1] == d.script, (row, argv[1])
        readme = {k: v for k, v in _flags(argv).items() if k not in ("--model_path", "--out_dir", "--test_subset")}
        assert readme == _flags(d.args), row
        checked += 1
    assert checked == 4  # aft, aft-window, pbe, pud
