"""--sparsity_pattern N:M and structured: the masks' patterns checked by independent rules,
the same masks at 1, 2 and 3 ZeRO-3 ranks, real 2-rank searches and their exports
(compact_model/ loaded with plain transformers against the masked model)."""
import pytest
import torch
import torch.nn.functional as F

from tamt_ds.errors import InputError
from tamt_ds.masking import attach_score
from tamt_ds.patterns import ColumnGatedLinear, nm_keep, parse_pattern
from tamt_ds.thresholds import Cut
from tests.cluster import search_args
from tests.conftest import ROOT, torchrun

SEARCH = ROOT / "launchers" / "search.py"
WORKER = ROOT / "tests" / "workers" / "pattern_worker.py"


def nm_reference(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m along a row, one at a time: the n largest, ties to the lower index."""
    keep = torch.zeros(values.shape, dtype=torch.bool)
    for r in range(values.shape[0]):
        for start in range(0, values.shape[1], m):
            group = values[r, start:start + m].tolist()
            for j in sorted(range(m), key=lambda j: (-group[j], j))[:n]:
                keep[r, start + j] = True
    return keep


def check_nm(keep: torch.Tensor, n: int, m: int) -> None:
    """Every group of m consecutive weights along the input dimension keeps exactly n."""
    rows, cols = keep.shape
    assert cols % m == 0
    for r in range(rows):
        for start in range(0, cols, m):
            assert int(keep[r, start:start + m].sum()) == n, (r, start)


def test_nm_keep_is_top_n_per_group_with_ties_to_the_lower_index():
    values = torch.randint(0, 3, (6, 16), generator=torch.Generator().manual_seed(0)).float()  # many ties
    for n, m in ((2, 4), (1, 4), (3, 8), (4, 4)):
        assert torch.equal(nm_keep(values, n, m), nm_reference(values, n, m)), (n, m)
    assert torch.equal(nm_keep(values.bfloat16(), 2, 4), nm_reference(values, 2, 4))


@pytest.mark.parametrize("text", ["2:0", "5:4", "0:4", "2-4", "blocks"])
def test_bad_pattern_is_an_input_error(text):
    with pytest.raises(InputError, match="--sparsity_pattern"):
        parse_pattern(text)


def test_column_gated_linear_is_the_masked_linear_with_straight_through_scores():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    attach_score(layer, ColumnGatedLinear, torch.nn.Parameter(torch.tensor([0.02, 0.0, 0.03, 0.01])))
    layer.mask_cut = Cut(0.015)  # keeps structures 0 and 2, of 2 columns each
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0]).requires_grad_(True)  # the reference: W * g, g differentiable
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, layer.weight * gate.repeat_interleave(2)[None, :], layer.bias)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(layer.mask_score.grad, gate.grad, atol=1e-5)  # dL/dS = dL/dg
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_compact_model_equals_the_masked_model_also_with_a_layer_without_heads(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from tamt_ds.compact import load_compact_model, save_compact_model

    original = AutoModel.from_pretrained(tiny_bert)
    head = original.config.hidden_size // original.config.num_attention_heads
    kept_heads, kept_neurons = [[1], []], torch.randperm(64, generator=torch.Generator().manual_seed(0))[:40]
    masks, masked_state = {}, original.state_dict()
    for i, heads in enumerate(kept_heads):
        cols = torch.zeros(32, dtype=torch.bool)
        for h in heads:
            cols[h * head:(h + 1) * head] = True
        neurons = torch.zeros(64, dtype=torch.bool)
        neurons[kept_neurons] = True
        p = f"encoder.layer.{i}."
        layout = {p + "attention.output.dense.weight": cols[None, :].expand(32, 32),
                  p + "output.dense.weight": neurons[None, :].expand(32, 64),
                  p + "intermediate.dense.weight": neurons[:, None].expand(64, 32),
                  **{p + f"attention.self.{n}.weight": cols[:, None].expand(32, 32) for n in ("query", "key", "value")}}
        masks.update(layout)
        for key, keep in layout.items():
            masked_state[key] = masked_state[key] * keep
    masked = AutoModel.from_pretrained(tiny_bert)
    masked.load_state_dict(masked_state)
    save_compact_model(masks, tiny_bert, AutoTokenizer.from_pretrained(tiny_bert), str(tmp_path / "compact"))
    compact = load_compact_model(str(tmp_path / "compact"))
    assert compact.config.tamt_heads_per_layer == [1, 0] and compact.config.intermediate_size == 40
    ids = torch.randint(5, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, 15:] = 0
    with torch.no_grad():
        a = compact(input_ids=ids, attention_mask=attention)
        b = masked(input_ids=ids, attention_mask=attention)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-4
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-4
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in original.parameters())


# ---- the same masks at 1, 2 and 3 ZeRO-3 ranks -------------------------------------------------
@pytest.fixture(scope="module")
def by_world(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("patterns")
    out = {}
    for world in (1, 2, 3):
        torchrun(WORKER, tiny_bert, tmp / f"{world}.pt", "2:4", "structured", nproc=world)
        out[world] = torch.load(tmp / f"{world}.pt", weights_only=False)
    return out


@pytest.mark.parametrize("pattern", ["2:4", "structured"])
def test_same_masks_at_1_2_and_3_ranks(by_world, pattern):
    one = by_world[1][pattern]
    for world in (2, 3):
        other = by_world[world][pattern]
        assert other["world"] == world
        for which in ("initial", "masks"):
            assert one[which].keys() == other[which].keys()
            for key in one[which]:
                assert torch.equal(one[which][key], other[which][key]), (world, which, key)


def test_nm_masks_follow_the_rule_on_the_scores_and_on_magnitudes(by_world, tiny_bert):
    from transformers import AutoModel

    result = by_world[2]["2:4"]
    modules = dict(AutoModel.from_pretrained(tiny_bert).named_modules())
    for name, keep in result["masks"].items():
        if name.endswith("word_embeddings"):
            assert keep.all()  # the embeddings stay dense
            continue
        check_nm(keep, 2, 4)
        assert torch.equal(keep, nm_reference(result["scores"][name], 2, 4)), name
        assert torch.equal(result["initial"][name], nm_reference(modules[name].weight.abs(), 2, 4)), name  # OMP
    assert result["stats"]["sparsity"] == 0.5


def test_structured_cut_is_global_over_heads_and_per_layer_over_neurons(by_world):
    result = by_world[3]["structured"]
    scores, masks = result["scores"], result["masks"]
    heads = {n: s for n, s in scores.items() if n.endswith("attention.output.dense")}
    neurons = {n: s for n, s in scores.items() if n.endswith(".output.dense") and n not in heads}
    kept = {n: masks[n][0].reshape(len(s), -1)[:, 0] for n, s in {**heads, **neurons}.items()}
    assert sum(int((~kept[n]).sum()) for n in heads) == 2  # 50% of 2 layers x 2 heads, over all layers
    head_kept = torch.cat([scores[n][kept[n]] for n in heads])
    head_pruned = torch.cat([scores[n][~kept[n]] for n in heads])
    assert head_kept.min() >= head_pruned.max()
    for n in neurons:  # the same number in every layer, the highest scores
        assert int(kept[n].sum()) == 32
        assert scores[n][kept[n]].min() >= scores[n][~kept[n]].max()
    assert abs(result["stats"]["sparsity"] - 0.5) < 1e-9
    initial = result["initial"]  # OMP by structure norm: the same counts
    assert sum(int((~initial[n][0].reshape(2, -1)[:, 0]).sum()) for n in heads) == 2
    assert all(int(initial[n][0].sum()) == 32 for n in neurons)


# ---- real 2-rank searches and what they export -----------------------------------------------
@pytest.fixture(scope="module")
def searches(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pattern_searches")
    for pattern in ("2:4", "structured"):
        out = tmp / pattern.replace(":", "_")
        torchrun(SEARCH, *search_args(tiny_bert, out, "--max_steps", "3", "--save_steps", "3", "--sparsity", "0.5",
                                      "--sparsity_pattern", pattern))
    return tmp


def test_nm_search_exports_an_nm_mask_and_its_pruned_model(searches, tiny_bert):
    from transformers import AutoModel

    mask = torch.load(searches / "2_4" / "mask.pt", weights_only=True)
    original = AutoModel.from_pretrained(tiny_bert).state_dict()
    pruned = AutoModel.from_pretrained(searches / "2_4" / "pruned_model").state_dict()
    assert len(mask) == 6 * 2 + 2  # mask.pt's layout: every TAMT matrix
    for key, keep in mask.items():
        assert keep.dtype == torch.bool and keep.shape == original[key].shape
        if key == "embeddings.word_embeddings.weight":
            assert keep.all()
        else:
            check_nm(keep, 2, 4)
        assert torch.equal(pruned[key], original[key] * keep)


def test_structured_search_exports_a_compact_model_equal_to_the_masked_one(searches, tiny_bert):
    from transformers import AutoModel

    mask = torch.load(searches / "structured" / "mask.pt", weights_only=True)
    original = AutoModel.from_pretrained(tiny_bert)
    masked_state = {k: v * mask[k] if k in mask else v for k, v in original.state_dict().items()}
    original.load_state_dict(masked_state)
    compact = AutoModel.from_pretrained(searches / "structured" / "compact_model", trust_remote_code=True)
    heads = [int(mask[f"encoder.layer.{i}.attention.output.dense.weight"][0].sum()) // 16 for i in range(2)]
    neurons = [int(mask[f"encoder.layer.{i}.output.dense.weight"][0].sum()) for i in range(2)]
    assert compact.config.tamt_heads_per_layer == heads and sum(heads) == 2
    assert neurons == [32, 32] and compact.config.intermediate_size == 32
    ids = torch.randint(5, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = compact(input_ids=ids).last_hidden_state
        b = original(input_ids=ids).last_hidden_state
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("pattern", ["2:4", "structured"])
def test_fine_tuning_keeps_the_pattern(tiny_bert, pattern):
    """FixedMask (the fine-tuning mask) from a pattern's mask file: after AdamW steps with weight
    decay, every pruned weight is still 0, so the pattern holds on the trained weights."""
    from transformers import AutoModel

    from tamt_ds.downstream.arguments import MaskSpec
    from tamt_ds.downstream.fixed_mask import FixedMask
    from tamt_ds.pattern_baselines import baseline_masks

    mask_file = baseline_masks(tiny_bert, pattern, 0.5)
    model = AutoModel.from_pretrained(tiny_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = FixedMask.build(model, MaskSpec("file", path="mask.pt"), mask_file)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=ids)
        (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
        fixed.mask_gradients()
        opt.step()
    state = model.state_dict()
    for key, keep in mask_file.items():
        assert (state[key][~keep] == 0).all(), key  # pruned stay 0
        assert not torch.equal(state[key][keep], before[key][keep]), key  # kept ones trained
        if pattern == "2:4" and "word_embeddings" not in key:
            check_nm(keep, 2, 4)
    layer = state["encoder.layer.0.attention.output.dense.weight"] != 0
    assert layer.any(0).sum() == mask_file["encoder.layer.0.attention.output.dense.weight"].any(0).sum()


@pytest.mark.parametrize("extra, expect", [
    (["--sparsity_pattern", "2-4"], "--sparsity_pattern '2-4': use unstructured, structured or N:M"),
    (["--sparsity_pattern", "2:4", "--threshold_scope", "global"], "--threshold_scope global is for unstructured"),
    (["--sparsity_pattern", "3:5"], "not a multiple of 5"),
])
def test_bad_pattern_settings_are_one_line_errors_writing_nothing(tiny_bert, tmp_path, capsys, extra, expect):
    from tamt_ds.search import main

    out = tmp_path / "run"
    code = main(["--model_name_or_path", tiny_bert, "--output_dir", str(out), "--deepspeed",
                 str(ROOT / "ds_configs" / "zero3_cpu.json"), "--max_steps", "1", *extra])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not out.exists() or not any(out.iterdir())


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("searched, asked", [("structured", "2:4"), ("2_4", "1:4"), ("2_4", None)])
def test_resuming_with_another_pattern_is_a_one_line_error_losing_nothing(searches, tiny_bert, tmp_path, capsys,
                                                                          searched, asked):
    import shutil

    from tamt_ds.search import main

    out = tmp_path / searched
    shutil.copytree(searches / searched, out)
    before = _files(out)
    code = main(["--model_name_or_path", tiny_bert, "--output_dir", str(out), "--deepspeed",
                 str(ROOT / "ds_configs" / "zero3_cpu.json"), "--max_steps", "6", "--resume", "True",
                 *(["--sparsity_pattern", asked] if asked else [])])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    saved = searched.replace("_", ":")
    assert code == 2 and len(err) == 1, err
    assert f"was searched with --sparsity_pattern {saved}, this run asks for {asked or 'unstructured'}" in err[0]
    assert f"resume with --sparsity_pattern {saved}" in err[0]
    assert _files(out) == before  # nothing written, nothing lost


def test_imp_refuses_a_pattern_in_one_line(tmp_path, capsys):
    from tamt_ds.imp import main

    code = main(["--sparsity_pattern", "2:4", "--output_dir", str(tmp_path / "imp")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1 and "IMP has no --sparsity_pattern" in err[0], err
    assert not (tmp_path / "imp").exists()
