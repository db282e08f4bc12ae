"""The TAMT authors' structured baseline: attention heads and FFN neurons ranked by importance.

Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): put a gate xi_s = 1 on every
head and on every FFN neuron (the structures the structured pattern prunes); the importance of s is

    I_s = sum over batches of | dL / d xi_s |

for L the pre-training objective: MLM where the checkpoint has a pre-trained MLM head, else
the search's KD loss (the masked student, with dropout as in the search, against the dense
teacher).  At xi = 1 without dropout the KD loss is 0 and so is its gradient: the dropout
draws are what make that objective rank anything, as they make the search's first steps move.

The gates are the structured pattern's own (patterns.ColumnGatedLinear gates a head's or
neuron's input columns of the output projection, and its score's straight-through gradient
is exactly dL/d xi).  Heads are normalised per layer (I / ||I_layer||_2, Michel et al.'s
default), then cut with the structured pattern's rules: heads by one cut over all layers,
the same number of neurons in every layer (normalising neurons would not change a per-layer
cut).  One process, no ZeRO: a baseline mask is computed once, like OMP's.
"""
from __future__ import annotations

import torch
from torch import nn

from tamt_ds.objectives import compute_loss
from tamt_ds.patterns import StructuredMaskSet, attach_structured
from tamt_ds.thresholds import Cut


def measure(model: nn.Module, masks: StructuredMaskSet, batches: list[dict], objective: str,
            seed: int = 0) -> list[torch.Tensor]:
    """Per mask site (heads then neurons of each layer): sum over `batches` of |dL/d gate|, float64.
    The model's own weights are frozen; only the gates' gradients are computed."""
    for p in model.parameters():
        p.requires_grad_(False)
    for site in masks:
        site.score.data.fill_(1.0)
        site.score.requires_grad_(True)
        site.module.mask_cut = Cut(0.5)  # every structure kept: gates at 1
    totals = [torch.zeros(site.score.numel(), dtype=torch.float64) for site in masks]
    torch.manual_seed(seed)  # the dropout draws
    model.train()
    for batch in batches:
        loss = compute_loss(objective, model, masks, batch)["loss"]
        grads = torch.autograd.grad(loss, masks.scores)
        for total, g in zip(totals, grads):
            total += g.detach().double().abs()
    return totals


def normalise_heads_per_layer(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's head importances divided by their L2 norm (neuron sites, odd places, unchanged)."""
    return [v / v.norm().clamp_min(1e-20) if i % 2 == 0 else v for i, v in enumerate(values)]


def importance_masks(model: nn.Module, sparsity: float, batches: list[dict], objective: str, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """{module name: bool keep-mask} (every TAMT matrix, mask.pt's layout by module name) of the
    head-importance baseline at `sparsity` (the structured pattern's meaning)."""
    masks = attach_structured(model, sparsity)
    values = normalise_heads_per_layer(measure(model, masks, batches, objective, seed))
    masks.set_ranking([v.float() for v in values])
    return masks.full_masks()
