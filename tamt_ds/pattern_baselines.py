"""Same-pattern baseline masks as mask.pt files: one-shot magnitude (OMP) or random masks of a
sparsity pattern, built exactly as a search of that pattern starts (patterns.py), and for
structured masks the TAMT authors' head-importance ranking (head_importance.py), written in
mask.pt's layout so that evaluate_mask, fine-tuning and the study take them as mask files.

    python -m tamt_ds.pattern_baselines --sparsity_pattern 2:4 --method magnitude --output omp-2_4.pt
    python -m tamt_ds.pattern_baselines --sparsity_pattern structured --sparsity 0.5 --method random --seed 1 --output r.pt
    python -m tamt_ds.pattern_baselines --sparsity_pattern structured --sparsity 0.5 --method head_importance --output h.pt

evaluate_mask and the study name the same masks `omp:2:4`, `random:structured:0.5`,
`head_importance:0.5` (parse_pattern_baseline).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tamt_ds.cli import parse_arguments
from tamt_ds.data.corpus import CorpusArguments
from tamt_ds.maskfile import atomic_torch_save
from tamt_ds.masking import MaskError
from tamt_ds.models import DEFAULT_MODEL, export_name, load_original_backbone
from tamt_ds.patterns import parse_pattern, prepare_pattern_search

# the names evaluate_mask and the study use -> this module's --method
BASELINE_KINDS = {"omp": "magnitude", "random": "random", "head_importance": "head_importance"}


@dataclass
class BaselineArguments:
    output: str = field(metadata={"help": "mask file to write"})
    model_name_or_path: str = DEFAULT_MODEL
    sparsity_pattern: str = field(default="unstructured", metadata={"help": "unstructured, N:M or structured"})
    sparsity: float = field(default=0.5, metadata={"help": "unstructured / structured: fraction pruned"})
    method: str = field(default="magnitude", metadata={
        "help": "magnitude (OMP: |W|, a group's or structure's norm), random, or head_importance (structured only: "
                "|dL/d gate| of each head and FFN neuron summed over --importance_batches of the search's text; "
                "MLM with a pre-trained MLM head, else KD; docs/patterns.md)"})
    seed: int = field(default=0, metadata={"help": "random: the noise; head_importance: the text's order and dropout"})
    importance_batches: int = 32
    importance_batch_size: int = 64


@dataclass(frozen=True)
class ImportanceData:
    """What head_importance reads: the search's training text (never a held-out set)."""
    corpus: CorpusArguments | None = None  # None: the search's default text and block length
    batches: int = 32
    batch_size: int = 64


def importance_batches(model_name: str, data: ImportanceData, mlm: bool, seed: int) -> list[dict]:
    """The first `data.batches` batches a 1-rank search with this seed would train on."""
    from tamt_ds.data.corpus import build_block_loader, with_default_corpus
    from tamt_ds.models import load_tokenizer
    from tamt_ds.search import SEARCH_MAX_SEQ_LENGTH

    corpus = data.corpus or with_default_corpus(CorpusArguments(max_seq_length=SEARCH_MAX_SEQ_LENGTH))
    loader = build_block_loader(corpus, load_tokenizer(model_name), batch_size=data.batch_size, rank=0,
                                world_size=1, seed=seed, mlm=mlm)
    stream = iter(loader)
    return [next(stream) for _ in range(data.batches)]


def head_importance_masks(model_name: str, sparsity: float, seed: int = 0, data: ImportanceData = ImportanceData()
                          ) -> dict[str, torch.Tensor]:
    from tamt_ds.evaluate_mask import has_pretrained_mlm_head
    from tamt_ds.head_importance import importance_masks
    from tamt_ds.models import load_model

    mlm = has_pretrained_mlm_head(model_name)
    model = load_model(model_name, with_mlm_head=mlm).float()
    masks = importance_masks(model, sparsity, importance_batches(model_name, data, mlm, seed), "mlm" if mlm else "kd",
                             seed)
    return {export_name(model, name): keep for name, keep in masks.items()}


def baseline_masks(model_name: str, pattern: str, sparsity: float, method: str = "magnitude", seed: int = 0,
                   data: ImportanceData = ImportanceData()) -> dict[str, torch.Tensor]:
    """{state-dict key: bool keep-mask}, mask.pt's content, of a one-shot mask of the pattern."""
    if method not in BASELINE_KINDS.values():
        raise MaskError(f"--method {method!r}: use magnitude, random or head_importance")
    if method == "head_importance":
        if parse_pattern(pattern).kind != "structured":
            raise MaskError(f"--method head_importance ranks heads and FFN neurons: use it with --sparsity_pattern "
                            f"structured, not {pattern}")
        return head_importance_masks(model_name, sparsity, seed, data)
    model = load_original_backbone(model_name).float()
    masks, _ = prepare_pattern_search(model, pattern=parse_pattern(pattern), sparsity=sparsity, init=method, seed=seed)
    return {export_name(model, name): keep for name, keep in masks.full_masks().items()}


def parse_pattern_baseline(text: str) -> tuple[str, str, float] | None:
    """`omp:N:M`, `random:N:M`, `omp:structured:S`, `random:structured:S`, `head_importance:S` ->
    (--method, pattern, sparsity); None for anything else (`omp:S` / `random:S`, unstructured,
    are masking.parse_baseline's)."""
    kind, _, rest = text.partition(":")
    if kind not in BASELINE_KINDS or not rest:
        return None
    parts = rest.split(":")
    if kind == "head_importance" and len(parts) == 1:
        parts = ["structured", *parts]
    usage = (f"--mask {text}: use omp:N:M, random:N:M, omp:structured:S, random:structured:S or head_importance:S "
             f"(S in [0, 1))")
    if parts == ["structured"]:
        raise MaskError(usage)
    if len(parts) == 1:
        return None
    if len(parts) != 2:
        raise MaskError(usage)
    if parts[0] != "structured":
        pattern = parse_pattern(rest)  # N:M, or a one-line error
        if pattern.kind != "n:m" or kind == "head_importance":
            raise MaskError(usage)
        return BASELINE_KINDS[kind], str(pattern), 1.0 - pattern.n / pattern.m
    try:
        sparsity = float(parts[1])
    except ValueError:
        sparsity = -1.0
    if not 0.0 <= sparsity < 1.0:
        raise MaskError(usage)
    return BASELINE_KINDS[kind], "structured", sparsity


def write_baseline(args: BaselineArguments) -> None:
    data = ImportanceData(batches=args.importance_batches, batch_size=args.importance_batch_size)
    if min(data.batches, data.batch_size) < 1:
        raise MaskError("--importance_batches and --importance_batch_size must be at least 1")
    masks = baseline_masks(args.model_name_or_path, args.sparsity_pattern, args.sparsity, args.method, args.seed, data)
    atomic_torch_save(masks, args.output)


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    return run_cli(lambda: write_baseline(*parse_arguments((BaselineArguments,), argv)))


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
