"""Bad input: one line naming the fix, non-zero exit, nothing already written lost."""
import json
import re
import subprocess
import sys

import pytest
import torch

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
@pytest.mark.parametrize("validation", ["carved", "own file"])
def test_empty_or_too_short_corpus(content, validation, tiny_bert, tmp_path, capsys):
    """Without --validation_files the held-out blocks are carved from the corpus first, and
    that is what a tiny corpus fails; with them, the training stream's own check."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(content)
    extra = ["--train_files", str(corpus)]
    if validation == "own file":
        extra += ["--validation_files", str(ROOT / "tamt_ds" / "data" / "sample" / "validation.txt")]
    code, err = run_main(base(tiny_bert, tmp_path / "out") + extra, capsys)
    errors = [l for l in err if l.startswith("error:")]
    assert code == 2 and errors == [err[-1]], err  # one line, the last one, no traceback
    if validation == "carved":
        expect = (rf"error: cannot carve 2 validation blocks from '{re.escape(str(corpus))}': it holds only 0 blocks "
                  r"of 32 tokens; pass --validation_files, or a smaller --validation_blocks")
    else:
        expect = (r"error: corpus too short: it holds \d+ text tokens \(after any carved validation set\), fewer than "
                  r"one block of \d+ for each of the 1 readers \(world_size=1 x 1 workers\); use more data, a smaller "
                  r"--max_seq_length or fewer ranks / workers")
    assert re.fullmatch(expect, err[-1]), err
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_output_dir_of_another_run_is_refused_and_kept(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"other": "run"}))
    (out / "mask.pt").write_bytes(b"precious")
    code, err = run_main(base(tiny_bert, out), capsys)
    assert code == 2 and "--overwrite_output_dir" in err[-1], err
    assert (out / "mask.pt").read_bytes() == b"precious"
    assert json.loads((out / "run_config.json").read_text()) == {"other": "run"}


def _random_mask_file(model_dir, path, sparsity: float) -> dict:
    from tamt_ds.maskfile import save_mask_file
    from tamt_ds.masking import attach_masks
    from tamt_ds.models import load_model

    model = load_model(model_dir, with_mlm_head=False)
    masks = attach_masks(model, sparsity=sparsity)
    masks.init_scores("random", seed=7)
    save_mask_file(masks.full_masks(), model, str(path))
    return torch.load(path, weights_only=True)


def test_mask_init_file_of_another_sparsity_is_refused(tiny_bert, tmp_path, capsys):
    """A file pruning 50% given to a 70% search: refused, not silently re-cut to 70%."""
    _random_mask_file(tiny_bert, tmp_path / "m50.pt", 0.5)
    code, err = run_main(base(tiny_bert, tmp_path / "out") + ["--mask_init", str(tmp_path / "m50.pt"),
                                                              "--sparsity", "0.7"], capsys)
    assert code == 2 and len([l for l in err if l.startswith("error:")]) == 1, err
    assert "sparsity 0.5000" in err[-1] and "--sparsity 0.7 prunes" in err[-1] and "pass the file's" in err[-1], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_mask_init_file_is_the_starting_mask(tiny_bert, tmp_path):
    """2 ranks, ZeRO-3: a random 70% mask file given to a 70% search with learning rate 0 comes
    out exactly as given (the initial mask is the file's, sharded, and nothing re-cut it)."""
    from tests.conftest import torchrun

    given = _random_mask_file(tiny_bert, tmp_path / "m70.pt", 0.7)
    out = tmp_path / "out"
    torchrun(ROOT / "launchers" / "search.py", *base(tiny_bert, out), "--mask_init", str(tmp_path / "m70.pt"),
             "--sparsity", "0.7", "--learning_rate", "0", "--logging_steps", "1")
    got = torch.load(out / "mask.pt", weights_only=True)
    assert got.keys() == given.keys()
    for key in given:
        assert torch.equal(got[key], given[key]), key
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["mask/distance_to_init"] for r in rows if "mask/distance_to_init" in r] == [0.0]
