"""Bad input: one line naming the fix, non-zero exit, nothing already written lost."""
import json
import subprocess
import sys

import pytest

from tamt_ds.search import main
from tests.conftest import ROOT

CPU_CONFIG = str(ROOT / "ds_configs" / "zero3_cpu.json")


def run_main(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def base(model, out):
    return ["--model_name_or_path", model, "--output_dir", str(out), "--deepspeed", CPU_CONFIG,
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_seq_length", "32",
            "--validation_blocks", "2"]


def test_exit_code_and_single_line_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "search.py"), "--sparsity", "1.5",
                           "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert lines == ["error: --sparsity must be in [0, 1), got 1.5: pass e.g. --sparsity 0.7"]


@pytest.mark.parametrize("extra, expect", [
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--objective", "mse"], "unknown --objective 'mse'"),
    (["--mask_patterns", "nothing_here$"], "pass --mask_patterns"),
    (["--deepspeed", "/nonexistent/ds.json"], "pass --deepspeed with one of"),
    (["--mask_init", "/nonexistent/mask.pt"], "mask file '/nonexistent/mask.pt' not found"),
])
def test_bad_arguments(extra, expect, tiny_bert, tmp_path, capsys):
    code, err = run_main(base(tiny_bert, tmp_path / "out") + extra, capsys)
    assert code == 2 and len([l for l in err if l.startswith("error:")]) == 1, err
    assert expect in err[-1], err


def test_fp16_config_follows_the_device(tiny_bert, tmp_path, capsys):
    """zero3_fp16.json: refused with one line where the device has no fp16 (most CPUs), run where it has
    (GPUs; CPUs whose DeepSpeed accelerator reports fp16, e.g. with AVX512-FP16 / AMX-FP16)."""
    from deepspeed.accelerator import get_accelerator

    out = tmp_path / "out"
    code, err = run_main(base(tiny_bert, out) + ["--deepspeed", str(ROOT / "ds_configs" / "zero3_fp16.json")], capsys)
    if get_accelerator().is_fp16_supported():
        assert code == 0, err
        assert json.loads((out / "run_config.json").read_text())["deepspeed"]["fp16"]["enabled"] is True
        assert (out / "mask.pt").is_file()
    else:
        assert code == 2 and len([l for l in err if l.startswith("error:")]) == 1, err
        assert "fp16, which this device does not support" in err[-1], err
        assert not out.exists()


def test_unknown_model(tmp_path, capsys):
    code, err = run_main(base(str(tmp_path / "no_such_model"), tmp_path / "out"), capsys)
    assert code == 2 and "pass --model_name_or_path" in err[-1], err


def test_invalid_deepspeed_json(tiny_bert, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    code, err = run_main(base(tiny_bert, tmp_path / "out") + ["--deepspeed", str(bad)], capsys)
    assert code == 2 and "is not valid JSON" in err[-1], err


def test_mask_file_from_another_model(tiny_bert, tiny_roberta_mlm, tmp_path, capsys):
    import torch

    torch.save({"encoder.layer.0.attention.self.query.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "m.pt")
    code, err = run_main(base(tiny_bert, tmp_path / "out") + ["--mask_init", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "made for another model" in err[-1], err


@pytest.mark.parametrize("content", ["", "short text only\n"])
def test_empty_or_too_short_corpus(content, tiny_bert, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(content)
    code, err = run_main(base(tiny_bert, tmp_path / "out") + ["--train_files", str(corpus)], capsys)
    assert code == 2 and err[-1].startswith("error:"), err


def test_output_dir_of_another_run_is_refused_and_kept(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"other": "run"}))
    (out / "mask.pt").write_bytes(b"precious")
    code, err = run_main(base(tiny_bert, out), capsys)
    assert code == 2 and "--overwrite_output_dir" in err[-1], err
    assert (out / "mask.pt").read_bytes() == b"precious"
    assert json.loads((out / "run_config.json").read_text()) == {"other": "run"}
