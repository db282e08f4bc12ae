"""Fine-tuning pieces in one plain process (no DeepSpeed): the fixed mask under AdamW,
exact file masks, parameter groups, argument parsing."""
import pytest
import torch

from tamt_ds.downstream.finetune import (FinetuneArguments, FinetuneError, MaskSpec, data_dir_for, fix_mask,
                                         param_groups, parse_mask, parse_seeds, slug, steps_for)
from tamt_ds.masking import TAMT_PATTERNS, attach_masks


def tiny_classifier(path, dtype=torch.float32):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_weights_stay_exactly_zero_under_adamw_with_weight_decay(tiny_bert, dtype):
    model = tiny_classifier(tiny_bert, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = fix_mask(model, MaskSpec("omp", 0.5), None)
    keep = {s.name: s.module.mask_cut.keep(s.score.detach()) for s in masks}
    for s in masks:
        assert int((~keep[s.name]).sum()) == int(s.weight.numel() * 0.5)
        assert torch.equal(s.weight.detach() == 0, ~keep[s.name] | (before[s.name + ".weight"] == 0))
        assert not s.score.requires_grad
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(1000, 2000, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=torch.randint(0, 3, (4,), generator=g)).loss
        loss.backward()
        for s in masks:  # dL/dW = dL/dW_eff * m: pruned entries get exactly zero gradient
            assert (s.weight.grad[~keep[s.name]] == 0).all()
        opt.step()
        opt.zero_grad()
    for s in masks:
        w = s.weight.detach()
        assert (w[~keep[s.name]] == 0).all(), s.name
        assert torch.equal(s.module.mask_cut.keep(s.score.detach()), keep[s.name])  # the mask did not move
        changed = (w != before[s.name + ".weight"]) & keep[s.name]
        # Kept weights train (in pure bf16 the embedding rows of unseen tokens only decay,
        # by less than bf16 resolves, so there only some change).
        share = 0.0 if dtype == torch.bfloat16 and "word_embeddings" in s.name else 0.9
        assert changed.sum() > share * keep[s.name].sum(), s.name
    for name, p in model.named_parameters():
        if name.endswith("bias") or "LayerNorm" in name or name.startswith("classifier"):
            assert not torch.equal(p.detach(), before[name]), name


def test_file_mask_with_any_per_matrix_counts_is_kept_exactly(tiny_bert):
    model = tiny_classifier(tiny_bert)
    probe = attach_masks(tiny_classifier(tiny_bert), TAMT_PATTERNS, sparsity=0.0)
    g = torch.Generator().manual_seed(1)
    file_masks = {}
    for i, s in enumerate(probe):
        density = [0.0, 1.0, 0.123, 0.5, 0.77][i % 5]  # an all-pruned and an all-kept matrix too
        file_masks[s.name] = torch.rand(s.weight.shape, generator=g) < density
    from tamt_ds.models import export_name

    raw = {export_name(model, name): m for name, m in file_masks.items()}
    masks = fix_mask(model, MaskSpec("file", path="mask.pt"), raw)
    zeros = sum(int((~m).sum()) for m in file_masks.values())
    assert masks.sparsity == zeros / sum(m.numel() for m in file_masks.values())
    for _ in range(2):  # and a later threshold reset keeps it
        for name, keep in masks.full_masks().items():
            assert torch.equal(keep, file_masks[name]), name
        masks.reset_thresholds()
    for s in masks:
        assert (s.weight.detach()[~file_masks[s.name]] == 0).all()


def test_a_mask_file_may_leave_matrices_dense_but_not_name_others(tiny_bert):
    from tamt_ds.downstream.finetune import mask_for_task
    from tamt_ds.downstream.tasks import TaskSpec
    from tamt_ds.masking import MaskError

    spec = TaskSpec("local:x", "classification", 3, ("a", "b", "c"), ("sentence",), "accuracy", ("validation",))
    args = FinetuneArguments(model_name_or_path=tiny_bert)
    g = torch.Generator().manual_seed(0)
    encoder_only = {f"encoder.layer.{i}.{m}.weight": torch.rand(shape, generator=g) > 0.7
                    for i in range(2) for m, shape in (("attention.self.query", (32, 32)), ("attention.self.key", (32, 32)),
                                                       ("attention.self.value", (32, 32)),
                                                       ("attention.output.dense", (32, 32)),
                                                       ("intermediate.dense", (64, 32)), ("output.dense", (32, 64)))}
    mask = mask_for_task(args, spec, MaskSpec("file", path="m.pt"), encoder_only)
    assert mask.unmasked == ("embeddings.word_embeddings.weight", "pooler.dense.weight")
    zeros = sum(int((~m).sum()) for m in encoder_only.values())
    assert mask.sparsity == zeros / sum(m.numel() for m in encoder_only.values())
    model = tiny_classifier(tiny_bert)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = fix_mask(model, mask, encoder_only)
    assert len(masks) == 12 and not hasattr(model.bert.embeddings.word_embeddings, "mask_score")
    for s in masks:
        keep, w0 = encoder_only[s.name.removeprefix("bert.") + ".weight"], before[s.name + ".weight"]
        assert torch.equal(s.weight.detach(), torch.where(keep, w0, torch.zeros(())))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before["bert.embeddings.word_embeddings.weight"])
    for bad, why in (({**encoder_only, "encoder.layer.2.output.dense.weight": torch.ones(32, 64, dtype=torch.bool)},
                      "another model"),
                     ({"pooler.dense.weight": torch.ones(3, 3, dtype=torch.bool)}, "another model"),
                     ({**encoder_only, "embeddings.position_embeddings.weight": torch.ones(136, 32, dtype=torch.bool)},
                      "TAMT does not mask")):
        with pytest.raises(MaskError, match=why):
            mask_for_task(args, spec, MaskSpec("file", path="m.pt"), bad)


def test_param_groups_train_everything_but_the_mask_and_exempt_biases_and_layernorms(tiny_bert):
    model = tiny_classifier(tiny_bert)
    fix_mask(model, MaskSpec("random", 0.3), None)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in decay["params"])
    grouped = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert grouped == {n for n in names.values() if not n.endswith("mask_score")}


def test_argument_parsing(tmp_path):
    assert parse_mask(None) == parse_mask("none") == MaskSpec("dense", 0.0)
    assert parse_mask("omp:0.7") == MaskSpec("omp", 0.7)
    assert parse_mask("random:0.5") == MaskSpec("random", 0.5)
    (tmp_path / "m.pt").write_bytes(b"")
    assert parse_mask(str(tmp_path / "m.pt")) == MaskSpec("file", path=str(tmp_path / "m.pt"))
    for bad in ("omp:1", "omp:x", "random:-0.1", str(tmp_path / "absent.pt")):
        with pytest.raises(FinetuneError):
            parse_mask(bad)
    assert parse_seeds("1,2,3") == [1, 2, 3]
    for bad in ("", "1,1", "a"):
        with pytest.raises(FinetuneError):
            parse_seeds(bad)
    args = FinetuneArguments(data_dir="mnli=/glue,squad=/squad")
    assert data_dir_for(args, "mnli") == "/glue" and data_dir_for(args, "squad") == "/squad"
    assert data_dir_for(args, "cola") is None and data_dir_for(args, "local:/x") is None
    assert data_dir_for(FinetuneArguments(data_dir="/glue"), "cola") == "/glue"
    assert slug("local:/data/supersense_verb/") == "local-supersense_verb" and slug("mnli") == "mnli"
    # steps: epochs of this rank's share (last batch partial), capped by --max_steps
    args = FinetuneArguments(per_device_train_batch_size=8, num_train_epochs=2.5)
    assert steps_for(args, 65) == (23, 9)
    args.max_steps = 5
    assert steps_for(args, 65) == (5, 9)
