"""Fine-tuning pieces in one plain process (no DeepSpeed): the fixed mask under AdamW and
against the straight-through reference, exact file masks, parameter groups, argument parsing."""
import pytest
import torch

from tamt_ds.downstream.arguments import FinetuneArguments, FinetuneError, MaskSpec, data_dir_for, parse_mask, \
    parse_seeds, slug
from tamt_ds.downstream.finetune import param_groups, steps_for
from tamt_ds.downstream.fixed_mask import FixedMask, tamt_matrices
from tamt_ds.errors import InputError


def tiny_classifier(path, dtype=torch.float32):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_weights_stay_exactly_zero_under_adamw_with_weight_decay(tiny_bert, dtype):
    model = tiny_classifier(tiny_bert, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fixed = FixedMask.build(model, MaskSpec("omp", 0.5), None)
    assert not any("score" in n for n, _ in model.named_parameters())  # the plain model: nothing attached
    keep = {m.name: m.keep.view_as(m.weight) for m in fixed}
    assert len(keep) == 14
    for m in fixed:
        assert int((~keep[m.name]).sum()) == int(m.weight.numel() * 0.5)
        assert torch.equal(m.weight.detach() == 0, ~keep[m.name] | (before[m.name + ".weight"] == 0))
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(1000, 2000, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=torch.randint(0, 3, (4,), generator=g)).loss
        loss.backward()
        fixed.mask_gradients()
        for m in fixed:  # dL/dW = dL/dW_eff * m: pruned entries get exactly zero gradient
            assert (m.weight.grad[~keep[m.name]] == 0).all()
        opt.step()
        opt.zero_grad()
    for m in fixed:
        w = m.weight.detach()
        assert (w[~keep[m.name]] == 0).all(), m.name
        changed = (w != before[m.name + ".weight"]) & keep[m.name]
        # Kept weights train (in pure bf16 the embedding rows of unseen tokens only decay,
        # by less than bf16 resolves, so there only some change).
        share = 0.0 if dtype == torch.bfloat16 and "word_embeddings" in m.name else 0.9
        assert changed.sum() > share * keep[m.name].sum(), m.name
    for name, p in model.named_parameters():
        if name.endswith("bias") or "LayerNorm" in name or name.startswith("classifier"):
            assert not torch.equal(p.detach(), before[name]), name


class _TimesMask(torch.nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, w):
        return w * self.keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_mask_trains_exactly_like_the_straight_through_masked_forward(tiny_bert, dtype):
    """Dense forward + gradients masked once per step (after accumulating two micro-batches)
    gives, bit for bit, what W_eff = W * m in the forward gives (dL/dW = dL/dW_eff * m
    every micro-batch), with gradient clipping engaged and AdamW with weight decay."""
    from torch.nn.utils import parametrize

    runs = []
    for straight_through in (False, True):
        model = tiny_classifier(tiny_bert, dtype)
        fixed = FixedMask.build(model, MaskSpec("omp", 0.5), None)
        if straight_through:  # the reference: the mask inside the forward, autograd does the rest
            for m in fixed:
                module = model.get_submodule(m.name)
                parametrize.register_parametrization(module, "weight", _TimesMask(m.keep.view_as(m.weight)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(0)
        norms = []
        for _ in range(3):
            for _ in range(2):
                ids = torch.randint(1000, 2000, (4, 12), generator=g)
                (model(input_ids=ids, labels=torch.randint(0, 3, (4,), generator=g)).loss / 2).backward()
            if not straight_through:
                fixed.mask_gradients()
            norms.append(torch.nn.utils.clip_grad_norm_(params, 0.05))
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            weights = {n: (model.get_submodule(n).weight * 1).clone() for n in (m.name for m in fixed)}
        runs.append((torch.stack(norms), weights))
    (norms, weights), (ref_norms, ref_weights) = runs
    assert (norms > 0.05).all()  # clipping was engaged: its norm decides the step
    assert torch.equal(norms, ref_norms)
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name


def test_file_mask_with_any_per_matrix_counts_is_kept_exactly(tiny_bert):
    model = tiny_classifier(tiny_bert)
    g = torch.Generator().manual_seed(1)
    file_masks = {}
    for i, (name, module) in enumerate(tamt_matrices(model)):
        density = [0.0, 1.0, 0.123, 0.5, 0.77][i % 5]  # an all-pruned and an all-kept matrix too
        file_masks[name] = torch.rand(module.weight.shape, generator=g) < density
    from tamt_ds.models import export_name

    raw = {export_name(model, name): m for name, m in file_masks.items()}
    fixed = FixedMask.build(model, MaskSpec("file", path="mask.pt"), raw)
    assert [m.name for m in fixed] == list(file_masks)
    for m in fixed:
        assert torch.equal(m.keep.view_as(m.weight), file_masks[m.name]), m.name
        assert (m.weight.detach()[~file_masks[m.name]] == 0).all()


def test_a_mask_file_may_leave_matrices_dense_but_not_name_others(tiny_bert):
    from tamt_ds.downstream.fixed_mask import mask_for_task
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
    fixed = FixedMask.build(model, mask, encoder_only)
    assert len(fixed) == 12 and "bert.embeddings.word_embeddings" not in [m.name for m in fixed]
    for m in fixed:
        keep, w0 = encoder_only[m.name.removeprefix("bert.") + ".weight"], before[m.name + ".weight"]
        assert torch.equal(m.weight.detach(), torch.where(keep, w0, torch.zeros(())))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before["bert.embeddings.word_embeddings.weight"])
    for bad, why in (({**encoder_only, "encoder.layer.2.output.dense.weight": torch.ones(32, 64, dtype=torch.bool)},
                      "another model"),
                     ({"pooler.dense.weight": torch.ones(3, 3, dtype=torch.bool)}, "another model"),
                     ({**encoder_only, "embeddings.position_embeddings.weight": torch.ones(136, 32, dtype=torch.bool)},
                      "TAMT does not mask")):
        with pytest.raises(MaskError, match=why):
            mask_for_task(args, spec, MaskSpec("file", path="m.pt"), bad)


def test_param_groups_train_everything_and_exempt_biases_and_layernorms(tiny_bert):
    model = tiny_classifier(tiny_bert)
    FixedMask.build(model, MaskSpec("random", 0.3), None)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in decay["params"])
    grouped = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert grouped == set(names.values())


def test_argument_parsing(tmp_path):
    assert parse_mask(None) == parse_mask("none") == MaskSpec("dense", 0.0)
    assert parse_mask("omp:0.7") == MaskSpec("omp", 0.7)
    assert parse_mask("random:0.5") == MaskSpec("random", 0.5)
    (tmp_path / "m.pt").write_bytes(b"")
    assert parse_mask(str(tmp_path / "m.pt")) == MaskSpec("file", path=str(tmp_path / "m.pt"))
    for bad in ("omp:1", "omp:x", "random:-0.1", str(tmp_path / "absent.pt")):
        with pytest.raises(InputError):  # the project's one-line errors (a baseline's comes from masking)
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
