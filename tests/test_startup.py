"""A command that only prints --help or an argument error starts about as fast as ``import torch``.

Parsing needs only the settings classes; torchvision (ResNet18, 1-2 s: it loads torch._dynamo), matplotlib
(the figures) and the algorithms' heavy imports stay out of that path. The test asserts that cause (what
parsing imports), not seconds: a wall-clock bound breaks on a loaded or slower machine.
"""
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_parsing_imports_neither_torchvision_nor_matplotlib():
    code = ("import sys, config\n"
            "for script in ('attack', 'pbe', 'pud'):\n"
            "    config.build_parser(script)\n"
            "import train_blend, pbe_main, PUD\n"
            "print(' '.join(m for m in ('torchvision', 'matplotlib', 'torch._dynamo') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
