"""Single-process unit tests of the masking core on tiny random BERT / RoBERTa."""
import pytest
import torch

from tamt_ds.masking import INIT_SCORE, MaskError, attach_masks, masks_disabled, prepare_search
from tamt_ds.maskfile import masks_for_model, read_mask_file, save_mask_file
from tamt_ds.models import export_name, load_model
from tamt_ds.sharding import Shard
from tamt_ds.thresholds import ALL_TIES, TIE_SEED, bottom_k_cuts, tie_keys


def test_tie_keys_are_a_seeded_bijection_without_overflow():
    def reference(i):  # the same hash in Python integers
        m = (1 << 31) - 1
        h = (i + TIE_SEED) & m
        h ^= h >> 16
        h = (h * 0x7FEB352D) & m
        h ^= h >> 15
        h = (h * 0x846CA68B) & m
        return h ^ (h >> 16)

    first = tie_keys(torch.arange(1 << 22))
    assert first.unique().numel() == 1 << 22  # distinct keys
    assert 0 <= int(first.min()) and int(first.max()) < 1 << 31
    high = torch.tensor([0, 1, 12345, (1 << 31) - 2, (1 << 31) - 1, 1_999_999_999])
    assert tie_keys(high).tolist() == [reference(int(i)) for i in high]
    # not the index order: the first pruned ties are spread over the matrix
    assert torch.argsort(first[:4096])[:64].float().mean() > 1000


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
                # the pruned ties are those with the smallest tie keys
                tie_idx = (m == cut.tau).nonzero().view(-1)
                keys, pruned = tie_keys(tie_idx), ~keep[tie_idx]
                if pruned.any() and (~pruned).any():
                    assert keys[pruned].max() < keys[~pruned].min()


def test_global_scope_prunes_exactly_k_over_all_matrices():
    mats = [torch.tensor([0.0, 0, 1, 2]), torch.tensor([0.0, 3, 0, 0, 5])]
    cuts = bottom_k_cuts([Shard(m, 0, m.numel()) for m in mats], 4, reduce=False)
    keeps = [c.keep(m) for c, m in zip(cuts, mats)]
    assert sum(int((~k).sum()) for k in keeps) == 4
    # five zeros tie: the four with the smallest (tie key, matrix) are pruned
    zeros = sorted((int(tie_keys(torch.tensor(i))), m, i) for m, x in enumerate(mats) for i in range(len(x)) if x[i] == 0)
    pruned = {(m, i) for _, m, i in zeros[:4]}
    for m, keep in enumerate(keeps):
        assert keep.tolist() == [(m, i) not in pruned and mats[m][i] >= 0 for i in range(len(mats[m]))]
    # equal tie keys in two matrices are taken in matrix order: exactly k all the same
    same = [torch.zeros(6), torch.zeros(6)]
    for k in range(13):
        cuts = bottom_k_cuts([Shard(m, 0, 6) for m in same], k, reduce=False)
        assert sum(int((~c.keep(m)).sum()) for c, m in zip(cuts, same)) == k


def test_cut_is_the_same_on_a_whole_matrix_its_shards_and_gathered_rows():
    g = torch.Generator().manual_seed(0)
    for rows, cols in ((7, 5), (64, 48)):
        values = (torch.rand(rows, cols, generator=g) * 3).floor().to(torch.bfloat16)  # 3 values: massive ties
        k = int(values.numel() * 0.5)
        (cut,) = bottom_k_cuts([Shard(values.view(-1), 0, values.numel())], [k], reduce=False)
        assert 0 <= cut.tie_key < ALL_TIES  # some ties pruned, some kept
        whole = cut.keep(values)
        assert int((~whole).sum()) == k
        cuts_at = [0, 3, 17, values.numel() // 2, values.numel()]
        flat = values.view(-1)
        shards = [cut.keep(flat[a:b], a) for a, b in zip(cuts_at, cuts_at[1:])]
        assert torch.equal(torch.cat(shards), whole.view(-1))
        ids = torch.randint(0, rows, (3, 9), generator=g)
        assert torch.equal(cut.keep(values[ids], rows=ids), whole[ids])


def test_bf16_ties_are_pruned_evenly_over_rows_and_columns():
    """Every score ties (as bf16 scores near 0.02 do by the thousand): a quarter of the
    rows (and of the columns) gets a quarter of the pruned entries, not all of them."""
    scores = torch.full((512, 384), 0.02, dtype=torch.bfloat16)
    k = int(scores.numel() * 0.3)
    (cut,) = bottom_k_cuts([Shard(scores.view(-1), 0, scores.numel())], [k], reduce=False)
    pruned = ~cut.keep(scores)
    assert int(pruned.sum()) == k
    for dim in (1, 0):
        per_quarter = pruned.sum(dim).view(4, -1).sum(1).double()
        assert ((per_quarter - k / 4).abs() < 0.01 * k / 4).all(), per_quarter.tolist()


def test_straight_through_gradients():
    lin = torch.nn.Linear(4, 3)
    w = lin.weight.detach().clone()
    masks = attach_masks(torch.nn.ModuleDict({"pooler": torch.nn.ModuleDict({"dense": lin})}), [r"pooler\.dense$"],
                         sparsity=0.5)
    masks.init_scores("magnitude")
    keep = masks.full_masks()["pooler.dense"]
    x = torch.randn(2, 5, 4)
    lin.weight.requires_grad_(True)
    out = lin(x)
    assert torch.allclose(out, x @ (w * keep).T + lin.bias)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grad_eff = grad_out.reshape(-1, 3).T @ x.reshape(-1, 4)  # dL/dW_eff
    assert torch.allclose(lin.mask_score.grad, grad_eff * w)  # identity STE: dL/dS = dL/dW_eff * W
    assert torch.allclose(lin.weight.grad, grad_eff * keep)  # pruned weights get exactly zero gradient
    assert (lin.weight.grad[~keep] == 0).all()
    assert torch.allclose(lin.bias.grad, grad_out.sum((0, 1)))


def test_straight_through_gradients_of_an_embedding_on_looked_up_rows():
    emb = torch.nn.Embedding(11, 6, padding_idx=0)
    masks = attach_masks(torch.nn.ModuleDict({"embeddings": torch.nn.ModuleDict({"word_embeddings": emb})}),
                         sparsity=0.6)
    masks.init_scores("random", seed=2)
    w, keep = emb.weight.detach().clone(), masks.full_masks()["embeddings.word_embeddings"]
    ids = torch.tensor([[0, 3, 3, 7], [10, 1, 0, 3]])
    emb.weight.requires_grad_(True)
    out = emb(ids)
    # reference: plain autograd through F.embedding(ids, W * m) with m's gradient passed to S
    w_ref, s_ref = w.clone().requires_grad_(True), torch.zeros_like(w, requires_grad=True)
    ref = torch.nn.functional.embedding(ids, w_ref * (keep + s_ref - s_ref.detach()), padding_idx=0)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert torch.allclose(emb.weight.grad, w_ref.grad) and torch.allclose(emb.mask_score.grad, s_ref.grad)
    assert (emb.weight.grad[~keep] == 0).all() and (emb.mask_score.grad[0] == 0).all()  # padding row: no gradient


def test_masked_forward_saves_nothing_weight_sized_for_backward(tiny_roberta_mlm):
    """What autograd keeps from a masked forward (besides the parameters themselves, which
    ZeRO-3 re-gathers for backward) is no more than what the dense forward that trains
    the same matrices keeps, and holds no copy of any masked matrix (W * m or m)."""
    model = load_model(tiny_roberta_mlm, with_mlm_head=True)
    masks, _ = prepare_search(model, sparsity=0.7)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(s.score.shape) for s in masks}
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def saved(forward) -> tuple[int, list]:
        nbytes, sized = 0, []

        def pack(t):
            nonlocal nbytes
            if t.untyped_storage().data_ptr() not in params:
                nbytes += t.untyped_storage().nbytes()
                if tuple(t.shape) in shapes:
                    sized.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward().logits.float().sum().backward()
        return nbytes, sized

    masked_bytes, masked_sized = saved(lambda: model(ids))
    for s in masks:
        s.score.requires_grad_(False)
        s.weight.requires_grad_(True)
    with masks_disabled(masks):
        dense_bytes, _ = saved(lambda: model(ids))
    assert masked_sized == [] and masked_bytes <= dense_bytes, (masked_sized, masked_bytes, dense_bytes)


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
