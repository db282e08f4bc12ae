"""The 1-rank search step's short cuts (engine.build_engine, zero.one_rank_settings): ZeRO-3's
gradient all-reduce path instead of its reduce-scatter path, which copies every gradient to
scatter it to itself; and every parameter kept gathered, with the module hooks no longer
calling ZeRO-3's parameter coordinator (zero.skip_coordinator).  They must not change a bit of
the search."""
import pytest
import torch

from tamt_ds import engine as eng, sharding
from tamt_ds.masking import INIT_SCORE, prepare_search
from tamt_ds.models import load_model
from tamt_ds.objectives import compute_loss


def search_steps(model_dir, config: str, monkeypatch, *, build_as_world: int = 1, steps: int = 3):
    """Scores after `steps` KD steps (a threshold reset among them) at 1 rank, the engine built
    as for `build_as_world` ranks; whether that engine took the reduce-scatter path; and how
    many modules ZeRO-3's parameter coordinator fetched parameters for during the steps."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fetches = []
    real_fetch = PartitionedParameterCoordinator.fetch_sub_module
    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module",
                        lambda self, module, forward: fetches.append(module) or real_fetch(self, module, forward))
    cfg = eng.load_ds_config(str(eng.CONFIG_DIR / config), micro_batch=4, grad_accum=1, grad_clip=1.0)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    torch.manual_seed(0)
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, params = prepare_search(model, sparsity=0.7)
    with monkeypatch.context() as m:
        m.setattr(sharding, "world_size", lambda: build_as_world)  # what build_engine sees
        engine, _ = eng.build_engine(model, cfg, params=params, lr=5e-3, weight_decay=0.0, total_steps=10)
    engine.train()
    fetches.clear()  # from here on: the steps
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(5, model.config.vocab_size, (4, 16), generator=gen)
        loss = compute_loss("kd", engine, masks, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})["loss"]
        engine.backward(loss)
        engine.step()
        if step == 1:
            masks.reset_thresholds()
    return [sharding.local_shard(s).values.clone() for s in masks.scores], engine.optimizer.reduce_scatter, len(fetches)


@pytest.mark.parametrize("config", ["zero3_cpu.json", "zero3_bf16.json"])
def test_one_rank_all_reduce_path_equals_the_reduce_scatter_path(tiny_bert_dropout, config, monkeypatch):
    eng.init_distributed()
    assert sharding.world_size() == 1
    short_cut, scattered, fetched = search_steps(tiny_bert_dropout, config, monkeypatch)
    reference, reference_scattered, reference_fetched = search_steps(tiny_bert_dropout, config, monkeypatch,
                                                                     build_as_world=2)
    assert not scattered and reference_scattered  # the two paths really ran
    assert fetched == 0 and reference_fetched > 0
    assert any(((s != 0) & (s != INIT_SCORE)).any() for s in short_cut)  # the scores trained
    assert len(short_cut) == len(reference)
    for a, b in zip(short_cut, reference):
        assert torch.equal(a, b)
