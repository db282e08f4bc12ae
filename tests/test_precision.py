"""Which precision the machine gets: native bf16 per device, the default DeepSpeed config, fp16 refusal."""
import platform
from pathlib import Path

import pytest
import torch

from tamt_ds import engine


@pytest.mark.parametrize("capability, config", [
    ((7, 0), "zero3_fp16.json"),  # V100: bf16 only emulated
    ((7, 5), "zero3_fp16.json"),  # T4
    ((8, 0), "zero3_bf16.json"),  # A100
    ((9, 0), "zero3_bf16.json"),  # H100
])
def test_gpu_default_is_bf16_only_where_native(capability, config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # what a V100 says
    assert Path(engine.default_config_path()).name == config
    assert engine.native_bf16("cuda:0") == (capability >= (8, 0))


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (lscpu's "Flags"; "Features" on Arm)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    raise AssertionError("no flags line in /proc/cpuinfo")


def test_cpu_native_bf16_matches_the_cpu_flags():
    bf16_flags = {"x86_64": {"avx512_bf16", "amx_bf16"}, "aarch64": {"bf16", "svebf16"}}[platform.machine()]
    expect = torch.backends.mkldnn.is_available() and bool(cpu_flags() & bf16_flags)
    assert engine.native_bf16("cpu") == expect, sorted(cpu_flags() & bf16_flags)
    assert engine.native_bf16(torch.device("cpu")) == expect


def test_cpu_emulated_bf16_is_not_native(monkeypatch):
    """An AVX512 core without bf16 instructions: oneDNN accepts bf16 there (emulated), native_bf16 does not."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_bf16": False})
    assert not engine.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "amx_bf16": True})
    assert engine.native_bf16("cpu")


def test_cpu_default_stays_fp32(monkeypatch):
    """Even on a CPU with native bf16: switching the CPU default is a separate decision (issue 16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (False, True):
        monkeypatch.setattr(engine, "native_bf16", lambda device, native=native: native)
        assert Path(engine.default_config_path()).name == "zero3_cpu.json"


@pytest.mark.parametrize("supported", [False, True])
def test_fp16_config_refused_only_where_unsupported(supported, monkeypatch):
    monkeypatch.setattr(engine, "_fp16_supported", lambda: supported)
    path = str(engine.CONFIG_DIR / "zero3_fp16.json")
    if supported:
        cfg = engine.load_ds_config(path, micro_batch=2, grad_accum=1, grad_clip=1.0)
        assert cfg["fp16"]["enabled"] and engine.precision(cfg) == torch.float16
    else:
        with pytest.raises(engine.EngineError, match="asks for fp16, which this device does not support") as e:
            engine.load_ds_config(path, micro_batch=2, grad_accum=1, grad_clip=1.0)
        assert "\n" not in str(e.value) and "zero3_bf16.json" in str(e.value)
