"""Single-process unit tests of the masking core on tiny random BERT / RoBERTa."""
import pytest
import torch

from tamt_ds.masking import INIT_SCORE, TAMT_PATTERNS, MaskError, attach_masks, masks_disabled
from tamt_ds.maskfile import masks_for_model, read_mask_file, save_mask_file
from tamt_ds.models import export_name, load_model
from tamt_ds.sharding import Shard
from tamt_ds.thresholds import Cut, bottom_k_cuts


@pytest.mark.parametrize("ties", [False, True])
def test_bottom_k_is_exact_and_tau_is_kthvalue(ties):
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        mats = [torch.randn(int(torch.randint(1, 400, (1,), generator=g)), generator=g) for _ in range(5)]
        if ties:
            mats = [(m * 2).round() for m in mats]
        ks = [int(m.numel() * 0.7) for m in mats]
        for m, k, cut in zip(mats, ks, bottom_k_cuts([Shard(m, 0, m.numel()) for m in mats], ks, reduce=False)):
            keep = cut.keep(m)
            assert int((~keep).sum()) == k
            if k:
                assert cut.tau == torch.kthvalue(m, k).values.item()
                # ties are pruned lowest flat index first
                tie_idx = (m == cut.tau).nonzero().view(-1)
                pruned_ties = (~keep)[tie_idx]
                assert torch.equal(pruned_ties, pruned_ties.sort(descending=True).values)


def test_global_scope_prunes_exactly_k_over_all_matrices():
    mats = [torch.tensor([0.0, 0, 1, 2]), torch.tensor([0.0, 3, 0, 0, 5])]
    cuts = bottom_k_cuts([Shard(m, 0, m.numel()) for m in mats], 4, reduce=False)
    keeps = [c.keep(m) for c, m in zip(cuts, mats)]
    assert sum(int((~k).sum()) for k in keeps) == 4
    # five zeros tie; the first four in (matrix, index) order are pruned
    assert keeps[0].tolist() == [False, False, True, True]
    assert keeps[1].tolist() == [False, True, False, True, True]


def test_cut_on_shards_equals_cut_on_whole():
    values = torch.tensor([1.0, 1, 1, 0, 1, 2, 1, 1])
    cut = Cut(1.0, 5)  # ties at flat index < 5 pruned
    whole = cut.keep(values)
    assert torch.equal(torch.cat([cut.keep(values[:3], 0), cut.keep(values[3:], 3)]), whole)
    assert whole.tolist() == [False, False, False, False, False, True, True, True]


def test_straight_through_gradients():
    lin = torch.nn.Linear(4, 3)
    w = lin.weight.detach().clone()
    masks = attach_masks(torch.nn.ModuleDict({"pooler": torch.nn.ModuleDict({"dense": lin})}), [r"pooler\.dense$"],
                         sparsity=0.5)
    masks.init_scores("magnitude")
    keep = masks.full_masks()["pooler.dense"]
    x = torch.randn(5, 4)
    lin.weight.requires_grad_(True)
    out = lin(x)
    assert torch.allclose(out, x @ (w * keep).T + lin.bias)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grad_eff = grad_out.T @ x  # dL/dW_eff
    assert torch.allclose(lin.mask_score.grad, grad_eff * w)  # identity STE: dL/dS = dL/dW_eff * W
    assert torch.allclose(lin.weight.grad, grad_eff * keep)  # pruned weights get exactly zero gradient
    assert (lin.weight.grad[~keep] == 0).all()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_tamt_matrix_set_and_init(kind, tiny_bert, tiny_roberta_mlm):
    path = tiny_bert if kind == "bert" else tiny_roberta_mlm
    model = load_model(path, with_mlm_head=kind == "roberta")
    masks = attach_masks(model, sparsity=0.7)
    names = [export_name(model, s.name) for s in masks]
    layers = model.config.num_hidden_layers
    expected = 6 * layers + 2  # + word embeddings + pooler (the MLM model carries the backbone's pooler)
    assert len(names) == expected, names
    assert "embeddings.word_embeddings.weight" in names
    assert all(n in model.base_model.state_dict() for n in names)
    masks.init_scores("magnitude")
    for site in masks:
        assert set(site.score.unique().tolist()) <= {0.0, torch.tensor(INIT_SCORE).item()}
        keep = site.module.mask_cut.keep(site.score)
        assert int((~keep).sum()) == int(site.score.numel() * 0.7)
    numels = [s.score.numel() for s in masks]
    assert masks.stats()["sparsity"] == sum(int(n * 0.7) for n in numels) / sum(numels)


def test_tied_mlm_decoder_uses_unmasked_embedding(tiny_roberta_mlm):
    model = load_model(tiny_roberta_mlm, with_mlm_head=True)
    masks = attach_masks(model, sparsity=0.9)
    masks.init_scores("magnitude")
    emb = model.get_input_embeddings()
    decoder = model.get_output_embeddings()
    assert decoder.weight is emb.weight and not hasattr(decoder, "mask_score")
    ids = torch.tensor([[0, 10, 20, 2]])
    h = model.roberta(ids).last_hidden_state
    logits = model(ids).logits
    # The head's decoder multiplies by the full (unmasked) embedding matrix.
    head_in = model.lm_head.layer_norm(torch.nn.functional.gelu(model.lm_head.dense(h)))
    assert torch.allclose(logits, head_in @ emb.weight.T + model.lm_head.bias, atol=1e-5)


def test_masks_disabled_gives_the_dense_model(tiny_bert):
    model = load_model(tiny_bert, with_mlm_head=False).eval()
    ids = torch.tensor([[101, 2000, 3000, 102]])
    dense = model(ids).last_hidden_state
    masks = attach_masks(model, sparsity=0.5)
    masks.init_scores("random", seed=3)
    assert not torch.allclose(model(ids).last_hidden_state, dense)
    with masks_disabled(masks):
        assert torch.equal(model(ids).last_hidden_state, dense)


def test_random_init_is_seeded_and_exact(tiny_bert):
    a = attach_masks(load_model(tiny_bert, with_mlm_head=False), sparsity=0.6)
    b = attach_masks(load_model(tiny_bert, with_mlm_head=False), sparsity=0.6)
    a.init_scores("random", seed=1)
    b.init_scores("random", seed=1)
    ma, mb = a.full_masks(), b.full_masks()
    for name in ma:
        assert torch.equal(ma[name], mb[name])
        assert int((~ma[name]).sum()) == int(ma[name].numel() * 0.6)


def test_mask_file_round_trip_and_authors_layout(tiny_bert, tmp_path):
    model = load_model(tiny_bert, with_mlm_head=False)
    masks = attach_masks(model, sparsity=0.5)
    masks.init_scores("random", seed=7)
    full = masks.full_masks()
    save_mask_file(full, model, str(tmp_path / "mask.pt"))
    # The authors' layout: bert.-prefixed keys ending in weight_mask, float values.
    authors = {"bert." + k + "_mask": v.float() for k, v in torch.load(tmp_path / "mask.pt").items()}
    torch.save(authors, tmp_path / "authors.pt")
    for path in (tmp_path / "mask.pt", tmp_path / "authors.pt"):
        other = attach_masks(load_model(tiny_bert, with_mlm_head=False), sparsity=0.5)
        raw = read_mask_file(str(path))
        other.init_scores("file", mask_file=masks_for_model(raw, model, other, str(path)))
        for name, keep in other.full_masks().items():
            assert torch.equal(keep, full[name]), name


def test_bad_inputs_name_the_fix(tiny_bert, tiny_roberta_mlm, tmp_path):
    model = load_model(tiny_bert, with_mlm_head=False)
    with pytest.raises(MaskError, match="--sparsity"):
        attach_masks(model, sparsity=1.0)
    with pytest.raises(MaskError, match="--mask_patterns"):
        attach_masks(load_model(tiny_bert, with_mlm_head=False), [r"nothing_like_this$"], sparsity=0.5)
    masks = attach_masks(model, sparsity=0.5)
    masks.init_scores("magnitude")
    save_mask_file(masks.full_masks(), model, str(tmp_path / "bert_mask.pt"))
    roberta = load_model(tiny_roberta_mlm, with_mlm_head=True)
    rmasks = attach_masks(roberta, sparsity=0.5)
    with pytest.raises(MaskError, match="another model"):
        masks_for_model(read_mask_file(str(tmp_path / "bert_mask.pt")), roberta, rmasks, "bert_mask.pt")
    with pytest.raises(MaskError, match="not found"):
        read_mask_file(str(tmp_path / "missing.pt"))
