"""Progress: every long loop has a bar with a total (so an ETA), bars show under a terminal of size 0, --threads."""
import os
import pty
import struct
import subprocess
import sys

import fcntl
import pytest
import termios
import torch

import train_blend
from conftest import ROOT, TINY_ATTACK, cli
from config import parse_args
from models import build_model
from utils import adversarial, evaluation, training
from utils.adversarial import PGD, robust_accuracy
from utils.data.build import DataSettings, build_backdoor, build_poisoned_train
from utils.data.datasets import make_synthetic
from utils.data.triggers import TriggerSettings
from utils.defenses import filtering, target
from utils.defenses.target import TargetSettings, estimate_target
from utils.evaluation import all_logits, evaluate
from utils.run import distributed as dist
from utils.run.progress import progress
from utils.training import make_optimizer, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bars(monkeypatch):
    """Every bar the loops open: [description, its total, how many items the loop went through]."""
    opened = []

    def spy(iterable, desc="", total=None, **kw):
        bar = progress(iterable, desc, total, **kw)
        opened.append([desc, bar.total, 0])
        for item in bar:
            yield item
            opened[-1][2] += 1  # counted when the loop comes back for the next one: an item it broke off at is not

    for module in (training, evaluation, adversarial, target, filtering):
        monkeypatch.setattr(module, "progress", spy)
    return opened


def test_every_long_loop_has_a_bar_with_its_total(bars):
    torch.manual_seed(0)
    data = DataSettings(dataset="synthetic").resolve()
    train, test = make_synthetic(70, seed=1), make_synthetic(50, seed=2)
    backdoor = build_backdoor(TriggerSettings(trigger_type="patch"), "all2one", 0, data, 0)
    poisoned = build_poisoned_train(train, backdoor, "fixed", 0.1, 0.0, 0)
    model = build_model("cnn", 10)
    gen = torch.Generator().manual_seed(0)

    train_epoch(model, make_optimizer(model, 0.01), dist.epoch_batches(poisoned, 32, gen), desc="epoch 1")
    evaluate(model, test, backdoor, batch_size=16)
    robust_accuracy(model, test, PGD(eps=8 / 255, alpha=2 / 255, steps=1), batch_size=16, max_images=40)
    estimate_target(model, train, TargetSettings(target_images=40), 10, 16, gen, False)
    all_logits(model, poisoned, 32)
    filtering.class_representations(model, poisoned, "net.features", torch.arange(35), 16)
    assert bars == [["epoch 1", 3, 3], ["evaluate", 4, 4], ["robust accuracy (PGD-1)", 3, 3],
                    ["target estimate (PGD)", 3, 3], ["training-set logits", 3, 3], ["SPECTRE representations", 3, 3]]


@pytest.mark.slow
def test_bars_show_under_a_terminal_that_reports_zero_columns():
    """tqdm draws nothing there on its own (a 0-wide bar, and every position >= 0 rows is hidden)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    code = ("import time\nfrom utils.run.progress import progress\n"
            "for _ in progress(range(5), 'work', leave=True):\n    time.sleep(0.02)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=60) == 0
    os.close(master)
    text = out.decode(errors="replace")
    assert "work: 100%" in text and "5/5" in text, text


def test_threads_option_sets_torch_threads(tmp_path):
    for script, base in (("attack", ()), ("pbe", ("--model_path", "m.pt")), ("pud", ("--model_path", "m.pt"))):
        assert parse_args(script, [*base, "--threads", "3", "--out_dir", str(tmp_path / script)]).run.threads == 3
        assert parse_args(script, [*base, "--out_dir", str(tmp_path / script)]).run.threads is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli(train_blend.main, *TINY_ATTACK, "--n_iters", "1", "--threads", "1", "--out_dir", tmp_path / "a") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
