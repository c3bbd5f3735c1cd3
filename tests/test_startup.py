"""A command that only prints --help or an argument error starts about as fast as ``import torch``.

Parsing needs only the settings classes; torchvision (ResNet18, 1-2 s: it loads torch._dynamo), matplotlib
(the figures) and the algorithms' heavy imports stay out of that path.
"""
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def seconds(*argv) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 2), r.stderr
    return time.perf_counter() - t0


def test_help_takes_little_more_than_importing_torch():
    torch_s, help_s = [], []
    for _ in range(3):  # interleaved, the fastest of each: the machine's load changes during the test
        torch_s.append(seconds("-c", "import torch"))
        help_s.append(seconds("train_blend.py", "--help"))
    t, h = min(torch_s), min(help_s)
    # measured on the 2-core test machine: torch 2.4-3.5 s, --help 0.3-0.8 s more (it was 2.7 s more with torchvision
    # and matplotlib imported on the way); generous for a loaded machine, where both take longer
    assert h - t < max(1.5, 0.5 * t), f"--help {h:.2f}s, import torch {t:.2f}s"


def test_parsing_imports_neither_torchvision_nor_matplotlib():
    code = ("import sys, config\n"
            "for script in ('attack', 'pbe', 'pud'):\n"
            "    config.build_parser(script)\n"
            "import train_blend, pbe_main, PUD\n"
            "print(' '.join(m for m in ('torchvision', 'matplotlib', 'torch._dynamo') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
