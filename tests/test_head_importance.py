"""The head-importance baseline (Michel et al. 2019, the TAMT authors' structured baseline):
its gate gradients against a single-process reference made with forward hooks on a plain
transformers model, its ranking against the structured pattern's rules applied by hand, and
the CLI's mask file checked as whole heads / neurons with the pattern's counts."""
import pytest
import torch

from tamt_ds.errors import InputError
from tamt_ds.objectives import kd_loss


def structures(mask: dict[str, torch.Tensor], layers: int, heads: int, prefix: str = "") -> list[tuple]:
    """(kept heads, kept neurons) of each layer, after checking that every matrix of a structure
    agrees (q/k/v rows and output columns of a head; intermediate row and output column of a neuron)."""
    out = []
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}."
        attn_out, ffn_out = mask[p + "attention.output.dense.weight"], mask[p + "output.dense.weight"]
        head = attn_out[0].reshape(heads, -1)[:, 0]
        neuron = ffn_out[0]
        cols = head.repeat_interleave(attn_out.shape[1] // heads)
        assert torch.equal(attn_out, cols[None, :].expand_as(attn_out))
        for name in ("query", "key", "value"):
            rows = mask[p + f"attention.self.{name}.weight"]
            assert torch.equal(rows, cols[:, None].expand_as(rows)), name
        assert torch.equal(ffn_out, neuron[None, :].expand_as(ffn_out))
        inter = mask[p + "intermediate.dense.weight"]
        assert torch.equal(inter, neuron[:, None].expand_as(inter))
        out.append((head, neuron))
    return out


def reference_importance(model, batches, objective: str, seed: int) -> tuple[list, list]:
    """|dL/d gate| summed over batches, gates applied by forward pre-hooks on a plain model."""
    cfg = model.config
    layers = model.base_model.encoder.layer
    head_gates = [torch.ones(cfg.num_attention_heads, requires_grad=True) for _ in layers]
    neuron_gates = [torch.ones(cfg.intermediate_size, requires_grad=True) for _ in layers]
    on = [True]

    def gate(g):
        return lambda module, args: (args[0] * g.repeat_interleave(args[0].shape[-1] // g.numel()),) if on[0] else None

    for layer, hg, ng in zip(layers, head_gates, neuron_gates):
        layer.attention.output.dense.register_forward_pre_hook(gate(hg))
        layer.output.dense.register_forward_pre_hook(gate(ng))
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [torch.zeros(cfg.num_attention_heads, dtype=torch.float64) for _ in layers]
    neurons = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in layers]
    torch.manual_seed(seed)
    for batch in batches:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if objective == "kd":
            model.eval()
            on[0] = False
            with torch.no_grad():
                teacher = model(**inputs, output_hidden_states=True).hidden_states
            on[0] = True
            model.train()
            loss = kd_loss(model(**inputs, output_hidden_states=True).hidden_states, teacher, batch["attention_mask"])
        else:
            model.train()
            loss = model(**inputs, labels=batch["labels"]).loss
        grads = torch.autograd.grad(loss, head_gates + neuron_gates)
        for total, g in zip(heads + neurons, grads):
            total += g.double().abs()
    return heads, neurons


def batches_for(vocab: int, mlm: bool, n: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(5, min(vocab, 1000), (4, 16), generator=gen)
        attention = torch.ones_like(ids)
        attention[0, 12:] = 0  # a padded row
        batch = {"input_ids": ids, "attention_mask": attention}
        if mlm:
            batch["labels"] = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
        out.append(batch)
    return out


@pytest.mark.parametrize("fixture, objective", [("tiny_bert_dropout", "kd"), ("tiny_roberta_mlm", "mlm")])
def test_importance_is_the_gate_gradient_and_the_mask_keeps_the_most_important(request, fixture, objective):
    from transformers import AutoModel, AutoModelForMaskedLM

    from tamt_ds.head_importance import importance_masks, measure
    from tamt_ds.patterns import attach_structured

    path = request.getfixturevalue(fixture)
    cls = AutoModelForMaskedLM if objective == "mlm" else AutoModel
    reference = cls.from_pretrained(path).float()
    batches = batches_for(reference.config.vocab_size, objective == "mlm")
    ref_heads, ref_neurons = reference_importance(reference, batches, objective, seed=3)

    model = cls.from_pretrained(path).float()
    masks = attach_structured(model, 0.5)
    measured = measure(model, masks, batches, objective, seed=3)
    for got, want in zip(measured, [v for pair in zip(ref_heads, ref_neurons) for v in pair]):
        assert want.abs().sum() > 0  # the objective ranks something (KD: through dropout)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)

    keep = importance_masks(cls.from_pretrained(path).float(), 0.5, batches, objective, seed=3)
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    kept = structures({k + ".weight": v for k, v in keep.items()}, 2, 2, prefix)
    # heads: normalised per layer, then the 2 (of 4) most important over both layers kept
    normalised = torch.cat([h / h.norm() for h in ref_heads])
    head_keep = torch.cat([h for h, _ in kept])
    assert int(head_keep.sum()) == 2
    assert normalised[head_keep].min() > normalised[~head_keep].max()
    for (_, neuron_keep), importance in zip(kept, ref_neurons):  # 32 of 64 neurons in every layer
        assert int(neuron_keep.sum()) == 32
        assert importance[neuron_keep].min() > importance[~neuron_keep].max()


def test_cli_writes_a_structured_mask_from_the_search_text(tiny_bert_dropout, tmp_path):
    from tamt_ds.pattern_baselines import main

    out = tmp_path / "h.pt"
    assert main(["--model_name_or_path", tiny_bert_dropout, "--sparsity_pattern", "structured", "--sparsity", "0.5",
                 "--method", "head_importance", "--importance_batches", "2", "--importance_batch_size", "4",
                 "--output", str(out)]) == 0
    mask = torch.load(out, weights_only=True)
    kept = structures(mask, 2, 2)
    assert sum(int(h.sum()) for h, _ in kept) == 2 and all(int(n.sum()) == 32 for _, n in kept)
    assert mask["embeddings.word_embeddings.weight"].all() and mask["pooler.dense.weight"].all()


@pytest.mark.parametrize("text, expect", [
    ("omp:2:4", ("magnitude", "2:4", 0.5)), ("random:1:4", ("random", "1:4", 0.75)),
    ("omp:structured:0.3", ("magnitude", "structured", 0.3)), ("head_importance:0.5", ("head_importance", "structured", 0.5)),
    ("head_importance:structured:0.5", ("head_importance", "structured", 0.5)), ("omp:0.5", None), ("x.pt", None)])
def test_pattern_baseline_names(text, expect):
    from tamt_ds.pattern_baselines import parse_pattern_baseline

    assert parse_pattern_baseline(text) == expect


@pytest.mark.parametrize("text", ["head_importance:2:4", "omp:structured:1.5", "omp:structured", "omp:5:4",
                                  "random:structured:0.5:1"])
def test_bad_pattern_baseline_names_are_input_errors(text):
    from tamt_ds.pattern_baselines import parse_pattern_baseline

    with pytest.raises(InputError, match="--"):
        parse_pattern_baseline(text)


def test_head_importance_of_another_pattern_is_refused(tiny_bert):
    from tamt_ds.pattern_baselines import baseline_masks

    with pytest.raises(InputError, match="use it with --sparsity_pattern structured"):
        baseline_masks(tiny_bert, "2:4", 0.5, "head_importance")
