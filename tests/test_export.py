"""pruned_model/: streamed tensor by tensor, the same files as save_pretrained of the whole pruned
backbone, and an export whose memory is bounded by the largest tensor, not the model."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tamt_ds import export, models
from tests.conftest import ROOT

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "type_vocab_size": 2, "vocab_size": 30522, "pad_token_id": 0}


def _random_model(tmp_path, kind: str) -> str:
    """A checkpoint as config: names build it: an MLM model + pooler, keys under `bert.` / `roberta.`."""
    config = tmp_path / f"{kind}.json"
    extra = {"type_vocab_size": 1, "pad_token_id": 1} if kind == "roberta" else {}
    config.write_text(json.dumps({**TINY, **extra, "model_type": kind,
                                  "architectures": [f"{kind.capitalize()}ForMaskedLM"]}))
    out = tmp_path / f"{kind}-model"
    models.build_random_model(f"config:{kind}", str(config), str(out))
    return str(out)


def _bin_model(tmp_path, source: str) -> str:
    """The same weights as a pytorch_model.bin checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "bin-model"
    out.mkdir()
    shutil.copy(os.path.join(source, "config.json"), out)
    torch.save(load_file(os.path.join(source, "model.safetensors")), out / "pytorch_model.bin")
    return str(out)


def _masks(source: str) -> dict:
    from tamt_ds.masking import TAMT_PATTERNS
    import re

    state = models.load_original_backbone(source).state_dict()
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(v.shape, generator=g) < 0.3 for k, v in state.items()
            if k.endswith(".weight") and any(re.search(p, k[: -len(".weight")]) for p in TAMT_PATTERNS)}


def _whole_model_export(masks, source, out):
    """The export as it was: the backbone loaded whole, pruned in place, save_pretrained."""
    model = models.load_original_backbone(source)
    state = model.state_dict()
    for key, keep in masks.items():
        state[key].copy_(torch.where(keep, state[key], torch.zeros((), dtype=state[key].dtype)))
    model.save_pretrained(out)


@pytest.mark.parametrize("kind", ["bert", "roberta", "bert-bin", "tiny_bert", "minilm"])
def test_streamed_export_writes_the_same_files(kind, tmp_path, tiny_bert):
    """MLM checkpoints (prefixed keys), a backbone checkpoint, a .bin one, the packaged default model."""
    source = {"bert": lambda: _random_model(tmp_path, "bert"), "roberta": lambda: _random_model(tmp_path, "roberta"),
              "bert-bin": lambda: _bin_model(tmp_path, _random_model(tmp_path, "bert")),
              "tiny_bert": lambda: tiny_bert, "minilm": lambda: models.DEFAULT_MODEL}[kind]()
    assert models.original_backbone_layout(source) is not None  # the streamed path, not the fallback
    masks = _masks(source)
    (tmp_path / "new").mkdir()
    export.save_pruned_weights(masks, source, str(tmp_path / "new"))
    _whole_model_export(masks, source, tmp_path / "old")
    assert sorted(os.listdir(tmp_path / "new")) == sorted(os.listdir(tmp_path / "old")) == ["config.json",
                                                                                         "model.safetensors"]
    assert (tmp_path / "new" / "model.safetensors").read_bytes() == (tmp_path / "old" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads(
        (tmp_path / "old" / "config.json").read_text())
    from transformers import AutoModel

    pruned = AutoModel.from_pretrained(tmp_path / "new").state_dict()
    original = models.load_original_backbone(source).state_dict()
    for key, keep in masks.items():
        assert (pruned[key][~keep] == 0).all() and torch.equal(pruned[key][keep], original[key][keep]), key


def test_a_checkpoint_without_every_backbone_tensor_is_loaded_whole(tmp_path, tiny_roberta_mlm):
    """RobertaForMaskedLM has no pooler: AutoModel initialises one, so the export falls back to the whole model."""
    assert models.original_backbone_layout(tiny_roberta_mlm) is None
    masks = _masks(tiny_roberta_mlm)
    (tmp_path / "new").mkdir()
    config = export.save_pruned_weights(masks, tiny_roberta_mlm, str(tmp_path / "new"))
    assert config["architectures"] == ["RobertaModel"]
    from safetensors.torch import load_file

    pruned = load_file(tmp_path / "new" / "model.safetensors")
    for key, keep in masks.items():
        assert (pruned[key][~keep] == 0).all(), key


BOUNDED = """
import json, os, sys, torch
from tamt_ds import export, models
from tamt_ds.host_memory import return_freed_memory_to_os
from tests.test_export import _masks

source, out = sys.argv[1], sys.argv[2]
return_freed_memory_to_os()  # freed tensors leave the resident set, as in a large-model search
masks = _masks(source)
os.mkdir(out + "/warm")
export.save_pruned_weights(masks, source, out + "/warm")  # imports and caches, once

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
os.mkdir(out + "/measured")
export.save_pruned_weights(masks, source, out + "/measured")
print(json.dumps({"extra": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's resident-set high-water mark")
def test_export_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """24 layers of 256 x 1024: the model is 76 MB, its largest tensor 1 MB.  Loading the
    backbone whole (the export before) raised the resident set by more than the model."""
    config = tmp_path / "deep.json"
    config.write_text(json.dumps({**TINY, "hidden_size": 256, "num_hidden_layers": 24, "num_attention_heads": 4,
                                  "intermediate_size": 1024, "vocab_size": 1000, "model_type": "bert",
                                  "architectures": ["BertForMaskedLM"]}))
    source = tmp_path / "deep-model"
    models.build_random_model("config:deep", str(config), str(source))
    from safetensors import safe_open

    with safe_open(source / "model.safetensors", "pt") as f:
        sizes = [f.get_slice(k).get_shape() for k in f.keys()]
    numels = [torch.Size(s).numel() * 4 for s in sizes]
    largest, model_bytes = max(numels), sum(numels)
    assert model_bytes > 60 * largest
    proc = subprocess.run([sys.executable, "-c", BOUNDED, str(source), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    # the tensor read, the mask's complement, the writer's view; a few MB of Python besides
    assert extra <= 4 * largest + 8e6, (extra, largest, model_bytes)
