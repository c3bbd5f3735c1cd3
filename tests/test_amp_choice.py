"""--amp auto: bf16 only where it is native (CUDA, a CPU with AMX-BF16 or AVX512-BF16), decided at run time and
recorded."""
import torch

from models import speed
from models.speed import amp_choice, amp_dtype

CPU = torch.device("cpu")


def test_auto_is_off_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    c = amp_choice("auto", CPU)
    assert c["amp"] == "off" and "no native bf16" in c["why"] and c["cpu_bf16"] == []
    assert amp_dtype("auto", CPU) is None
    # AVX-512 BF16 dot products without AMX (AMD Zen 4): native too, measured faster than fp32
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert amp_choice("auto", CPU)["amp"] == "bf16" and amp_choice("auto", CPU)["cpu_bf16"] == ["avx512_bf16"]


def test_auto_is_on_on_a_cpu_with_amx_bf16_and_the_flags_decide_not_the_machine(monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    c = amp_choice("auto", CPU)
    assert c["amp"] == "bf16" and "amx_bf16" in c["why"] and c["cpu_bf16"] == ["amx_bf16", "avx512_bf16"]
    assert amp_dtype("auto", CPU) is torch.bfloat16
    assert amp_choice("off", CPU) == {"amp": "off", "why": "--amp off"}  # an explicit choice wins
    assert amp_choice("auto", torch.device("cuda"))["amp"] == "bf16"


def test_on_and_off_are_what_they_say_and_the_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    assert amp_choice("on", CPU)["amp"] == "bf16" and amp_choice("off", CPU)["amp"] == "off"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert {"avx2", "amx_bf16"} <= speed.cpu_flags(str(info))
    assert speed.cpu_flags(str(tmp_path / "missing")) == set()
