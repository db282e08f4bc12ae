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
    why = engine.default_config()[1]
    assert why == ("native: CUDA compute capability 8.0" if capability == (8, 0) else
                   "native: CUDA compute capability 9.0" if capability == (9, 0) else
                   f"no native bf16 below compute capability 8.0 (this GPU: {capability[0]}.{capability[1]})")


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


@pytest.mark.parametrize("capabilities, config, why", [
    ({"avx512_f": True, "avx512_bf16": True}, "zero3_cpu_bf16.json", "native: CPU avx512_bf16 via oneDNN"),
    ({"avx512_f": True, "amx_bf16": True, "avx512_fp16": True}, "zero3_cpu_bf16.json", "native: CPU amx_bf16 via oneDNN"),
    ({"avx512_f": True, "avx512_bf16": False}, "zero3_cpu.json", "no native bf16 on this CPU"),  # emulated only
    ({"avx2": True}, "zero3_cpu.json", "no native bf16 on this CPU"),
])
def test_cpu_default_is_bf16_only_where_native(capabilities, config, why, monkeypatch):
    """What every launcher's default config is (load_ds_config(None)), and the reason its
    start-up line and run_config.json give."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert Path(engine.default_config_path()).name == config
    cfg = engine.load_ds_config(None, micro_batch=2, grad_accum=1, grad_clip=1.0)
    assert Path(cfg["_source"]).name == config
    assert cfg["_precision"]["dtype"] == ("bfloat16" if "bf16" in config else "float32")
    assert cfg["_precision"]["why"].startswith(why) and cfg["_precision"]["why"].endswith("the default here")
    assert engine.precision_line(cfg).startswith(f"precision {cfg['_precision']['dtype']} ({why}")


def test_the_two_cpu_configs_differ_only_in_precision():
    """fp32 and bf16 runs on a CPU compare like with like: same buckets, sub-groups, persistence."""
    import json

    fp32 = json.loads((engine.CONFIG_DIR / "zero3_cpu.json").read_text())
    bf16 = json.loads((engine.CONFIG_DIR / "zero3_cpu_bf16.json").read_text())
    assert bf16.pop("bf16") == {"enabled": True} and bf16 == fp32


def test_a_given_config_is_named_as_the_reason():
    path = str(engine.CONFIG_DIR / "zero3_cpu.json")
    cfg = engine.load_ds_config(path, micro_batch=2, grad_accum=1, grad_clip=1.0)
    assert cfg["_precision"] == {"dtype": "float32", "why": f"--deepspeed {path}"}


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


def test_a_default_run_says_which_precision_and_why(tiny_bert, tmp_path, capsys):
    """No --deepspeed: the search trains in bf16 exactly where this machine computes it natively
    (asked of the device, not assumed), and says so in its start-up line and run_config.json."""
    import json

    from tamt_ds.search import main

    out = tmp_path / "out"
    assert main(["--model_name_or_path", tiny_bert, "--output_dir", str(out), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--max_seq_length", "32", "--validation_blocks", "2"]) == 0
    path, why = engine.default_config()
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["deepspeed"]["_source"] == path
    assert recorded["precision"] == {"dtype": "bfloat16" if engine.native_bf16("cpu") else "float32",
                                     "why": f"{why}; the default here"}
    assert f"precision {recorded['precision']['dtype']} ({why}; the default here)" in capsys.readouterr().out
