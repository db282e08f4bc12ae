"""launchers/evaluate_mask.py: a real 2-rank ZeRO-3 run against plain transformers in one process."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.tiny_bert_mlm import make_tiny_bert_mlm

LAUNCHER = ROOT / "launchers" / "evaluate_mask.py"
CPU_CONFIG = ROOT / "ds_configs" / "zero3_cpu.json"
BLOCKS, SEQ, BATCH, SEED = 5, 32, 2, 5  # 2 + 3 blocks: rank 0 runs a padding batch
MASKED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense", "pooler.dense", "word_embeddings")


def common(model, *extra):
    return ["--model_name_or_path", model, "--deepspeed", str(CPU_CONFIG), "--eval_blocks", str(BLOCKS),
            "--max_seq_length", str(SEQ), "--per_device_eval_batch_size", str(BATCH), "--seed", str(SEED), *extra]


def omp_mask(state: dict, sparsity: float) -> dict:
    """Plain one-shot magnitude pruning per matrix, ties in the project's tie-key order (the
    zero padding row of the word embeddings ties)."""
    from tamt_ds.thresholds import tie_keys

    out = {}
    for key, w in state.items():
        if key.endswith(".weight") and w.dim() == 2 and any(m + ".weight" in key for m in MASKED):
            by_key = torch.sort(tie_keys(torch.arange(w.numel()))).indices
            order = by_key[torch.sort(w.abs().flatten()[by_key], stable=True).indices]  # by |W|, ties by key
            keep = torch.ones(w.numel(), dtype=torch.bool)
            keep[order[: int(w.numel() * sparsity)]] = False
            out[key] = keep.view_as(w)
    return out


def reference(model_dir: str, mask: dict) -> dict:
    """KD / MLM of the masked model with plain transformers: kept weights only, the tied decoder
    left the dense embedding (torch.nn.utils.prune keeps it as weight_orig); the held-out blocks
    of both ranks, KD averaged over all their real tokens."""
    import torch.nn.functional as F
    import torch.nn.utils.prune as tprune
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from tamt_ds.data.corpus import CorpusArguments, build_validation_batches, default_validation_files

    tok = AutoTokenizer.from_pretrained(model_dir)
    files = default_validation_files()
    data = CorpusArguments(train_files=files, validation_files=files, validation_blocks=BLOCKS, max_seq_length=SEQ,
                           dataloader_num_workers=0)
    clean = [b for r in range(2) for b in build_validation_batches(data, tok, batch_size=BATCH, rank=r, world_size=2,
                                                                     seed=SEED, mlm=False)]
    corrupted = [b for r in range(2) for b in build_validation_batches(data, tok, batch_size=BATCH, rank=r,
                                                                         world_size=2, seed=SEED, mlm=True)]
    dense = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    masked = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    for name, module in masked.bert.named_modules():
        if name + ".weight" in mask:
            tprune.custom_from_mask(module, "weight", mask[name + ".weight"])
    kd = []  # per real token: mean over layers of 1 - cos
    with torch.no_grad():
        for b in clean:
            real = b["attention_mask"].bool()
            hs = masked.bert(**b, output_hidden_states=True).hidden_states[1:]
            ht = dense.bert(**b, output_hidden_states=True).hidden_states[1:]
            kd.append(torch.stack([1 - F.cosine_similarity(s[real], t[real], dim=-1) for s, t in zip(hs, ht)]).mean(0))
        loss, correct, n = 0.0, 0, 0
        for b in corrupted:
            logits = masked(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            picked = b["labels"] != -100
            loss += float(F.cross_entropy(logits[picked], b["labels"][picked], reduction="sum"))
            correct += int((logits[picked].argmax(-1) == b["labels"][picked]).sum())
            n += int(picked.sum())
    return {"kd_loss": float(torch.cat(kd).mean()), "mlm_loss": loss / n, "mlm_accuracy": correct / n}


@pytest.fixture(scope="module")
def tiny_bert_mlm(tmp_path_factory):
    return make_tiny_bert_mlm(str(tmp_path_factory.mktemp("tiny_bert_mlm_eval")))


def test_zero3_matches_plain_transformers(tiny_bert_mlm, tmp_path):
    from transformers import AutoModel

    state = AutoModel.from_pretrained(tiny_bert_mlm).state_dict()
    uneven = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(i)) > (0.2 + 0.05 * i)
              for i, (k, v) in enumerate(omp_mask(state, 0.0).items())}  # a different count in every matrix
    torch.save(uneven, tmp_path / "uneven.pt")
    outs = [tmp_path / f"{n}.json" for n in ("omp", "file", "none")]
    torchrun(LAUNCHER, *common(tiny_bert_mlm, "--mask", "omp:0.6", str(tmp_path / "uneven.pt"), "none",
                               "--output", *outs, "--save_mask", str(tmp_path / "omp_saved.pt"), "-", "-"))
    got = [json.loads(p.read_text()) for p in outs]
    assert all(g["mlm_head"] == "pre-trained" and g["world_size"] == 2 for g in got)
    saved = torch.load(tmp_path / "omp_saved.pt", weights_only=True)
    expected = omp_mask(state, 0.6)
    assert saved.keys() == expected.keys() and len(saved) == 14  # the same matrix set, pooler included
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    for result, mask in zip(got, (expected, uneven, {k: torch.ones_like(v) for k, v in expected.items()})):
        ref = reference(tiny_bert_mlm, mask)
        zeros = sum(int((~m).sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
        assert result["sparsity"] == pytest.approx(zeros, abs=1e-12), result["mask"]
        for key in ("kd_loss", "mlm_loss", "mlm_accuracy"):
            assert result[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (result["mask"], key)
    assert got[0]["kd_loss"] > 1e-3 and abs(got[2]["kd_loss"]) < 1e-6  # the dense model is its own teacher


def test_model_without_mlm_head_reports_kd_only(tiny_bert, tmp_path):
    """The packaged MiniLM's case: no pre-trained head, so no MLM numbers (a fresh head measures nothing)."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(LAUNCHER), *common(tiny_bert, "--mask", "random:0.5", "--output",
                                                                   str(out))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mlm_head"] is None and result["mlm_loss"] is None and result["kd_loss"] > 0
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--mask", "omp:1.5"], "sparsity must be a number in [0, 1)"),
    (["--mask", "nofile.pt"], "no such file"),
    (["--mask", "omp:0.5", "none", "--output", "x.json"], "give one per --mask"),
])
def test_bad_input_one_line(tiny_bert, tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(LAUNCHER), *common(tiny_bert, *extra)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_same_pattern_baselines_at_two_ranks(tiny_bert_mlm, tmp_path):
    """omp:2:4, random:structured:S and head_importance:S are built once (rank 0) as the mask files
    pattern_baselines writes, and evaluated like a mask file: against plain transformers."""
    from tamt_ds.pattern_baselines import baseline_masks
    from tests.test_head_importance import structures
    from tests.test_patterns import check_nm

    names = ["omp:2:4", "random:structured:0.5", "head_importance:0.5"]
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    saved = [tmp_path / f"{i}.pt" for i in range(3)]
    torchrun(LAUNCHER, *common(tiny_bert_mlm, "--mask", *names, "--output", *outs, "--save_mask", *saved,
                               "--mask_seed", "3"))
    got = [json.loads(p.read_text()) for p in outs]
    masks = [torch.load(p, weights_only=True) for p in saved]
    assert [g["sparsity_pattern"] for g in got] == ["2:4", "structured", "structured"]
    assert [g["mask_kind"] for g in got] == ["omp", "random", "head_importance"]
    for key, keep in masks[0].items():
        if "word_embeddings" not in key:
            check_nm(keep, 2, 4)
    for expected, mask in zip((baseline_masks(tiny_bert_mlm, "2:4", 0.5, "magnitude"),
                               baseline_masks(tiny_bert_mlm, "structured", 0.5, "random", seed=3)), masks):
        assert mask.keys() == expected.keys() and all(torch.equal(mask[k], expected[k]) for k in mask)
    for mask in masks[1:]:
        kept = structures(mask, 2, 2)
        assert sum(int(h.sum()) for h, _ in kept) == 2 and all(int(n.sum()) == 32 for _, n in kept)
    for result, mask in zip(got, masks):
        ref = reference(tiny_bert_mlm, mask)
        for key in ("kd_loss", "mlm_loss", "mlm_accuracy"):
            assert result[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (result["mask"], key)
