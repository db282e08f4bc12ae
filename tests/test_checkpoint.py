"""Choosing the checkpoint to resume from, bounded disk, the model check: real files, no engine
(the engine's save / load runs in tests/test_search_e2e.py)."""
import json
import os

import pytest

from tamt_ds import checkpoint
from tamt_ds.checkpoint import CheckpointError

MODEL = {"name": "m", "sha256": "abc"}


def fake_checkpoint(root, step: int, *, complete: bool = True, latest: bool = True, model=MODEL) -> str:
    """A checkpoint folder as `checkpoint.save` lays it out (rank files with random bytes)."""
    folder = root / f"step{step}"
    folder.mkdir(parents=True)
    files = {}
    for r in range(2):
        path = folder / f"rank{r}.pt"
        path.write_bytes(os.urandom(1000 + step))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": checkpoint._sha256(str(path))}
    if complete:
        meta = {"version": checkpoint.FORMAT_VERSION, "step": step, "world_size": 2, "model": model, "files": files}
        (folder / "complete.json").write_text(json.dumps(meta))
    if latest:
        (root / "latest").write_text(f"step{step}")
    return str(folder)


def test_newest_complete_checkpoint(tmp_path, capsys):
    for step in (10, 20):
        fake_checkpoint(tmp_path, step)
    found = checkpoint.find(str(tmp_path), MODEL)
    assert (found.tag, found.step, found.world_size) == ("step20", 20, 2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage, why", [
    (lambda f: os.remove(os.path.join(f, "complete.json")), "incomplete (no complete.json)"),
    (lambda f: os.truncate(os.path.join(f, "rank1.pt"), 10), "rank1.pt has 10 bytes"),
    (lambda f: open(os.path.join(f, "rank0.pt"), "r+b").write(b"\0" * 8), "rank0.pt does not match its sha256"),
    (lambda f: os.remove(os.path.join(f, "rank1.pt")), "rank1.pt is missing"),
])
def test_latest_incomplete_or_corrupt_falls_back_with_a_warning(tmp_path, capsys, damage, why):
    fake_checkpoint(tmp_path, 10)
    damage(fake_checkpoint(tmp_path, 20))
    found = checkpoint.find(str(tmp_path), MODEL)
    assert found.tag == "step10"
    err = capsys.readouterr().err
    assert why in err and "names 'step20', which is not usable: resuming from step10" in err


def test_a_complete_checkpoint_newer_than_latest_is_taken(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, latest=False)  # killed after complete.json, before `latest` moved
    assert checkpoint.find(str(tmp_path), MODEL).tag == "step20"
    assert "names 'step10', step20 is newer and complete: resuming from step20" in capsys.readouterr().err


def test_no_checkpoint_starts_fresh_but_only_broken_ones_is_an_error(tmp_path):
    assert checkpoint.find(str(tmp_path / "none"), MODEL) is None
    fake_checkpoint(tmp_path, 10, complete=False)
    with pytest.raises(CheckpointError, match="no usable checkpoint .*pass --overwrite_output_dir"):
        checkpoint.find(str(tmp_path), MODEL)


def test_another_model_is_refused_naming_the_fix(tmp_path):
    fake_checkpoint(tmp_path, 10)
    with pytest.raises(CheckpointError, match="resume with --model_name_or_path m,"):
        checkpoint.find(str(tmp_path), {"name": "m", "sha256": "def"})  # same name, other files
    assert checkpoint.find(str(tmp_path), {"name": "/copy/of/m", "sha256": "abc"}).tag == "step10"  # moved, same files


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 35, complete=False, latest=False)  # an interrupted save
    fake_checkpoint(tmp_path, 40)
    checkpoint._prune(str(tmp_path), keep=2, newest="step40")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step30", "step40"]
    # Resumed from step30 after a crash: checkpoints after the new one belong to the old history.
    fake_checkpoint(tmp_path, 35)
    checkpoint._prune(str(tmp_path), keep=2, newest="step35")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step30", "step35"]
    checkpoint._prune(str(tmp_path), keep=0, newest="step35")  # 0: keep all
    assert sorted(os.listdir(tmp_path)) == ["latest", "step30", "step35"]


def test_model_fingerprint_hashes_config_and_weights(tiny_bert, tmp_path):
    import shutil

    a = checkpoint.model_fingerprint(tiny_bert)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    assert checkpoint.model_fingerprint(str(copy))["sha256"] == a["sha256"] and a["sha256"]
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("0.0", "0.1"))
    assert checkpoint.model_fingerprint(str(copy))["sha256"] != a["sha256"]
    assert checkpoint.model_fingerprint("config-only-name") == {"name": "config-only-name", "sha256": None}


def test_fingerprint_covers_the_files_the_model_loads_from(tiny_bert, tmp_path):
    """A weight file transformers does not load (a pytorch_model.bin evaluate_mask fetched beside
    model.safetensors) leaves the fingerprint alone; a change to the loaded file changes it."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    assert (model / "model.safetensors").exists() and not (model / "pytorch_model.bin").exists()
    before = checkpoint.model_fingerprint(str(model))
    assert before["sha256"]
    state = load_file(str(model / "model.safetensors"))
    import torch

    torch.save({k: v + 1 for k, v in state.items()}, model / "pytorch_model.bin")
    assert checkpoint.model_fingerprint(str(model)) == before
    key = next(k for k in state if k.endswith("query.weight"))
    state[key][0, 0] += 1
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint.model_fingerprint(str(model))["sha256"] != before["sha256"]
    (model / "model.safetensors").unlink()  # now from_pretrained reads pytorch_model.bin
    only_bin = checkpoint.model_fingerprint(str(model))["sha256"]
    torch.save({k: v + 2 for k, v in state.items()}, model / "pytorch_model.bin")
    assert checkpoint.model_fingerprint(str(model))["sha256"] not in (only_bin, before["sha256"])
