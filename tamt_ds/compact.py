"""compact_model/: a structured mask's subnetwork as a smaller dense model.

The pruned heads' query/key/value rows and attention-output columns, and the pruned FFN
neurons' intermediate rows (and biases) and output columns, are removed from the
original weights (not the engine's: bit-identical to the pre-trained ones).  Every
layer keeps the same number of neurons (config.intermediate_size) and its own number of
heads (config.tamt_heads_per_layer, read by compact_modeling.py, shipped alongside).
Its outputs are the masked model's up to float rounding: a removed head or neuron adds
exactly 0 there (its output-projection columns are 0).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from tamt_ds.errors import InputError
from tamt_ds.export import replace_dir
from tamt_ds.models import load_original_backbone

MODELING_FILE = "modeling_tamt_compact.py"
CLASSES = {"bert": "TamtCompactBertModel", "roberta": "TamtCompactRobertaModel"}


def kept_structures(masks_by_key: dict[str, torch.Tensor], num_layers: int, num_heads: int
                    ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """(kept head indices, kept neuron indices) per layer, from mask.pt's layout."""
    heads, neurons = [], []
    for i in range(num_layers):
        attn_out = masks_by_key[f"encoder.layer.{i}.attention.output.dense.weight"]
        heads.append([h for h in range(num_heads) if bool(attn_out.reshape(attn_out.shape[0], num_heads, -1)[0, h, 0])])
        neurons.append(masks_by_key[f"encoder.layer.{i}.output.dense.weight"][0].nonzero().view(-1))
    return heads, neurons


@torch.no_grad()
def compact_state(state: dict[str, torch.Tensor], heads: list[list[int]], neurons: list[torch.Tensor],
                  head_size: int) -> dict[str, torch.Tensor]:
    out = dict(state)
    for i, (kept_heads, kept_neurons) in enumerate(zip(heads, neurons)):
        p = f"encoder.layer.{i}."
        rows = torch.tensor([h * head_size + j for h in kept_heads for j in range(head_size)], dtype=torch.long)
        for name in ("query", "key", "value"):
            for suffix in ("weight", "bias"):
                key = f"{p}attention.self.{name}.{suffix}"
                out[key] = state[key].index_select(0, rows).contiguous()
        key = f"{p}attention.output.dense.weight"
        out[key] = state[key].index_select(1, rows).contiguous()
        for suffix in ("weight", "bias"):
            key = f"{p}intermediate.dense.{suffix}"
            out[key] = state[key].index_select(0, kept_neurons).contiguous()
        key = f"{p}output.dense.weight"
        out[key] = state[key].index_select(1, kept_neurons).contiguous()
    return out


def save_compact_model(masks_by_key: dict[str, torch.Tensor], source: str, tokenizer, out_dir: str) -> None:
    model = load_original_backbone(source)
    config = model.config
    if config.model_type not in CLASSES:
        raise InputError(f"compact_model/ is written for BERT and RoBERTa, not {config.model_type}")
    heads, neurons = kept_structures(masks_by_key, config.num_hidden_layers, config.num_attention_heads)
    if len({len(n) for n in neurons}) != 1:
        raise ValueError(f"a structured mask keeps the same number of neurons in every layer, got "
                         f"{[len(n) for n in neurons]}")
    state = compact_state(model.state_dict(), heads, neurons, config.hidden_size // config.num_attention_heads)
    config.intermediate_size = len(neurons[0])
    config.tamt_heads_per_layer = [len(h) for h in heads]
    config.tamt_kept_heads = heads  # which of the original heads, per layer
    config.auto_map = {"AutoModel": f"{MODELING_FILE[:-3]}.{CLASSES[config.model_type]}"}
    config.architectures = [CLASSES[config.model_type]]
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".tmp-compact-")
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "compact_modeling.py"), os.path.join(tmp, MODELING_FILE))
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_compact_model(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, trust_remote_code=True)
