"""One run per run folder (utils/runlock.py): an OS lock held for the run's life, released when the holder dies."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_ATTACK, run_script
from utils.run.errors import UserError
from utils.run.runlock import LOCK_FILE, RunFolderLock, lock_run_folder, release_all

ATTACK = ("train_blend.py", *TINY_ATTACK, "--n_iters", "2")


def test_a_held_folder_refuses_a_second_lock_and_is_free_again_after_release(tmp_path):
    folder = tmp_path / "run"
    first = lock_run_folder(str(folder))
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"'{folder}' is in use by pid {os.getpid()}"):
        RunFolderLock(str(folder)).acquire()  # another open file description: flock conflicts even in one process
    assert lock_run_folder(str(folder)) is first  # this process already holds it
    release_all()
    assert not folder.exists()  # it created the folder and wrote nothing else: nothing is left behind
    second = RunFolderLock(str(folder)).acquire()
    (folder / "args.json").write_text("{}")
    second.release()
    assert sorted(os.listdir(folder)) == ["args.json"]  # the lock file goes, the run's files stay


def test_a_lock_file_left_by_a_dead_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))  # SIGKILLed: the file, no lock
    lock = RunFolderLock(str(folder)).acquire()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_stops_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PUD_INJECT_BATCH_SLEEP="3")  # the first run sits in epoch 1 for 15 s, writing nothing
    first = subprocess.Popen([sys.executable, *ATTACK, "--out_dir", str(out)], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not ((out / "state.pt").exists() and (out / "args.json").exists()):  # set-up saved, lock held
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        before = _files(out)
        # --overwrite: without the lock this run would clear the first run's state and take over its folder
        second = run_script(*ATTACK, "--out_dir", str(out), "--overwrite")
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: run folder '{out}' is in use by pid {first.pid}"), lines
        assert first.poll() is None and _files(out) == before  # the first run goes on, its files untouched
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / LOCK_FILE).exists()  # SIGKILL leaves the file, but not the lock
    third = run_script(*ATTACK, "--out_dir", str(out), "--resume")
    assert third.returncode == 0, third.stderr
    assert (out / "summary.json").exists() and not (out / LOCK_FILE).exists()
