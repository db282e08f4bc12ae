"""config:NAME models: published shapes with random weights, built once per cache, no hub."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tamt_ds import models
from tests.conftest import ROOT

TINY = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "vocab_size": 30522, "pad_token_id": 0}


def test_shipped_names_and_a_one_line_error_for_others():
    assert models.random_config_names() == ["config:bert-base-uncased", "config:bert-large-uncased",
                                            "config:roberta-base", "config:roberta-large"]
    with pytest.raises(models.ModelError) as e:
        models.resolve_model_path("config:gpt2")
    assert "\n" not in str(e.value) and "config:bert-large-uncased" in str(e.value)


def _ask(cache, config):
    """A separate process asks for the model, as a rank does."""
    code = (f"from tamt_ds.models import random_model_dir; "
            f"print(random_model_dir('config:tiny', config_path={str(config)!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TAMT_DS_CACHE": str(cache)})


def test_many_processes_at_once_one_build_and_the_same_weights_everywhere(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    with ThreadPoolExecutor(3) as pool:
        procs = list(pool.map(lambda _: _ask(tmp_path / "cache", config), range(3)))
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    dirs = {p.stdout.strip() for p in procs}
    assert len(dirs) == 1
    assert sum(p.stderr.count("building config:tiny") for p in procs) == 1  # one builder, the others waited
    root = tmp_path / "cache" / "random_models"
    assert [d.name for d in root.iterdir() if not d.name.endswith(".lock")] == [os.path.basename(dirs.pop())]

    # another machine (another cache) builds bit-identical weights
    other = _ask(tmp_path / "cache2", config)
    assert other.returncode == 0, other.stderr[-2000:]
    first = next(d for d in root.iterdir() if not d.name.endswith(".lock"))
    second = next(d for d in (tmp_path / "cache2" / "random_models").iterdir() if not d.name.endswith(".lock"))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()

    # every model class the project loads finds all its backbone weights in the file
    from transformers import AutoModel, AutoModelForMaskedLM

    for cls in (AutoModel, AutoModelForMaskedLM):
        _, info = cls.from_pretrained(first, output_loading_info=True)
        assert not info["missing_keys"], (cls.__name__, info["missing_keys"])
    note = models.random_weights_note(str(first))
    assert note["source"] == "config:tiny" and note["seed"] == 0 and "random" in note["note"]


def test_random_roberta_search_end_to_end(tmp_path):
    """config:roberta-base (BERT word pieces in a RoBERTa vocabulary, one token type) through the
    real search launcher: it runs, and the log, run_config.json and the exported model say the
    weights are random."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "search.py"), "--model_name_or_path", "config:roberta-base",
         "--output_dir", str(out), "--deepspeed", str(ROOT / "ds_configs" / "zero3_cpu.json"), "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--max_seq_length", "16", "--validation_blocks", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TAMT_DS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "config:roberta-base: RANDOM weights" in proc.stdout + proc.stderr
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["random_weights"]["source"] == "config:roberta-base"
    pruned = json.loads((out / "pruned_model" / "config.json").read_text())
    assert pruned["tamt_random_weights"]["source"] == "config:roberta-base"
    assert pruned["hidden_size"] == 768 and pruned["vocab_size"] == 50265  # the published shapes
    assert "RANDOM WEIGHTS" in (out / "pruned_model" / "README.md").read_text()
    tok = json.loads((out / "pruned_model" / "tokenizer_config.json").read_text())
    assert tok["model_input_names"] == ["input_ids", "attention_mask"]  # RoBERTa has one token type
