"""Same-pattern baseline masks as mask.pt files: one-shot magnitude (OMP) or random masks of a
sparsity pattern, built exactly as a search of that pattern starts (patterns.py), written in
mask.pt's layout so that evaluate_mask, fine-tuning and the study take them as mask files.

    python -m tamt_ds.pattern_baselines --sparsity_pattern 2:4 --method magnitude --output omp-2_4.pt
    python -m tamt_ds.pattern_baselines --sparsity_pattern structured --sparsity 0.5 --method random --seed 1 --output r.pt
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tamt_ds.cli import parse_arguments
from tamt_ds.maskfile import atomic_torch_save
from tamt_ds.masking import MaskError
from tamt_ds.models import DEFAULT_MODEL, export_name, load_original_backbone
from tamt_ds.patterns import parse_pattern, prepare_pattern_search


@dataclass
class BaselineArguments:
    output: str = field(metadata={"help": "mask file to write"})
    model_name_or_path: str = DEFAULT_MODEL
    sparsity_pattern: str = field(default="unstructured", metadata={"help": "unstructured, N:M or structured"})
    sparsity: float = field(default=0.5, metadata={"help": "unstructured / structured: fraction pruned"})
    method: str = field(default="magnitude", metadata={"help": "magnitude (OMP: |W|, a group's or structure's norm) "
                                                               "or random"})
    seed: int = 0


def baseline_masks(model_name: str, pattern: str, sparsity: float, method: str = "magnitude", seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """{state-dict key: bool keep-mask}, mask.pt's content, of a one-shot mask of the pattern."""
    if method not in ("magnitude", "random"):
        raise MaskError(f"--method {method!r}: use magnitude or random")
    model = load_original_backbone(model_name).float()
    masks, _ = prepare_pattern_search(model, pattern=parse_pattern(pattern), sparsity=sparsity, init=method, seed=seed)
    return {export_name(model, name): keep for name, keep in masks.full_masks().items()}


def write_baseline(args: BaselineArguments) -> None:
    masks = baseline_masks(args.model_name_or_path, args.sparsity_pattern, args.sparsity, args.method, args.seed)
    atomic_torch_save(masks, args.output)


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    return run_cli(lambda: write_baseline(*parse_arguments((BaselineArguments,), argv)))


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
