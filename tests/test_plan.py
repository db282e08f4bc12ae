"""The memory model's arithmetic, its counts against the real models, its verdict and its CLI."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tamt_ds import plan
from tamt_ds.masking import TAMT_PATTERNS
from tests.conftest import ROOT

# Published parameter counts of the backbones (AutoModel, with pooler)
PUBLISHED = {"bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888,
             "roberta-base": 124_645_632, "roberta-large": 355_359_744}


def _real(config, mlm: bool):
    """The real transformers model on the meta device (shapes only, no memory)."""
    from transformers import AutoModel, AutoModelForMaskedLM

    with torch.device("meta"):
        return (AutoModelForMaskedLM if mlm else AutoModel).from_config(config)


def _real_masked(model) -> int:
    import re

    regexes = [re.compile(p) for p in TAMT_PATTERNS]
    return sum(m.weight.numel() for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Embedding) and any(r.search(n) for r in regexes))


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["all-MiniLM-L6-v2"])
def test_parameter_counts_equal_the_real_models(name):
    from tamt_ds.models import model_config

    config = model_config(name if name == "all-MiniLM-L6-v2" else f"config:{name}")
    shape = plan.Shape.from_config(config)
    backbone = plan.parameter_tensors(shape)
    real = _real(config, mlm=False)
    assert backbone == {n: p.numel() for n, p in real.named_parameters()}  # every tensor, by name
    if name in PUBLISHED:
        assert sum(backbone.values()) == PUBLISHED[name]
    assert sum(plan.masked_tensors(backbone).values()) == _real_masked(real)
    # with an MLM head: no pooler, the head's own tensors (decoder tied to the word embeddings)
    with_head = plan.parameter_tensors(shape, pooler=False, mlm_head=True)
    real_mlm = _real(config, mlm=True)
    assert sum(with_head.values()) == sum(p.numel() for p in real_mlm.parameters())
    assert sum(plan.masked_tensors(with_head).values()) == _real_masked(real_mlm)


@pytest.mark.parametrize("mlm", [False, True])
def test_counts_follow_what_the_search_loads(tiny_bert, mlm):
    """The counts the planner assumes are the ones load_model + attach_masks really produce."""
    from tamt_ds.masking import attach_masks
    from tamt_ds.models import load_model, model_config

    model = load_model(tiny_bert, with_mlm_head=mlm)
    total = sum(p.numel() for p in model.parameters())
    masks = attach_masks(model, sparsity=0.5)
    tensors = plan.parameter_tensors(plan.Shape.from_config(model_config(tiny_bert)), pooler=True, mlm_head=mlm)
    assert sum(tensors.values()) == total
    assert sum(plan.masked_tensors(tensors).values()) == sum(s.numel() for s in masks.scores)


SHAPE = plan.Shape(hidden=64, layers=2, intermediate=256, heads=4, vocab=1000, positions=128, token_types=2)


def _zero(**kw):
    base = dict(dtype_bytes=2, reduce_bucket_size=10_000, prefetch_bucket_size=5_000, max_live_parameters=10**9,
                max_reuse_distance=0, param_persistence_threshold=0, sub_group_size=10**9, offload_param=False,
                offload_optimizer=False)
    return plan.ZeroSettings(**{**base, **kw})


def test_model_state_terms_equal_a_measured_two_rank_step(tiny_bert, tmp_path):
    """The partitioned terms against what a real 2-rank ZeRO-3 search step holds on each rank
    (persistence threshold 0: every tensor partitioned; partitions are padded to a multiple
    of the world size, hence the small tolerance)."""
    from tests.conftest import torchrun

    config = str(ROOT / "ds_configs" / "zero3_cpu.json")
    torchrun(ROOT / "tests" / "workers" / "plan_worker.py", tiny_bert, config, tmp_path)
    p = plan.estimate(plan.PlanInput(model=tiny_bert, world_size=2, deepspeed=config, per_device_train_batch_size=4,
                                     max_seq_length=16, device="cpu"))
    parts = {x.name: x.gb * plan.GB for x in p.parts}
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["partitioned"] and measured["adam moments"] == 2
        for name in ("frozen weights", "scores", "gradients", "optimizer states"):
            assert measured[name] == pytest.approx(parts[name], rel=0.01), (rank, name, measured[name], parts[name])


def test_terms_are_the_documented_formulas():
    inp = plan.PlanInput(model="x", world_size=4, per_device_train_batch_size=2, max_seq_length=16, device="gpu")
    p = plan.estimate(inp, shape=SHAPE, zero=_zero(), masked_bytes=(3.0, 1.0, 2.0))
    parts = {x.name: x.gb * plan.GB for x in p.parts}
    layer_max = max(v for k, v in plan.masked_tensors(plan.parameter_tensors(SHAPE)).items()
                    if k.startswith("encoder.layer."))
    p_s = p.params["masked"]
    emb = plan.masked_tensors(plan.parameter_tensors(SHAPE))["embeddings.word_embeddings.weight"]
    # the terms no measured step pins down here (transients; the measured per-entry bytes given)
    assert parts["reduce bucket"] == pytest.approx(10_000 * 2)
    assert parts["masked weights"] == pytest.approx((p_s - emb) * 3 + emb * 1 + layer_max * 2)
    assert parts["mask statistics"] == pytest.approx(p_s * 2.0 / 4)
    tensors = plan.parameter_tensors(SHAPE, pooler=True)  # KD too replays its trace: prefetch bucket + a module
    assert parts["gather buffers"] == pytest.approx(min(sum(tensors.values()) + p_s,
                                                        5_000 + 2 * max(tensors.values())) * 2)
    assert parts["step temporaries"] == pytest.approx(3 * p_s / 4 * 4)
    # the phases after the steps and before them (tamt_ds/export.py; the load) live in host memory
    where = {x.name: x.where for x in p.parts}
    assert {where[k] for k in ("full masks", "export buffers", "checkpoint read", "checkpoint copies")} == {"host"}
    persistent = sum(x.gb for x in p.parts if x.kind == "persistent")
    transients = max(sum(x.gb for x in p.parts if x.kind == k) for k in ("forward", "step"))
    assert p.per_rank_gb == p.phases["steps"] == pytest.approx(persistent + transients)
    assert p.phases["load"] == pytest.approx(parts["frozen weights"] / plan.GB)
    # a GPU run's checkpoint copies and export buffers are in host memory
    assert p.phases["checkpoint"] == p.phases["export"] == pytest.approx(persistent)
    assert p.process_per_rank_gb == max(p.phases.values())
    # on CPU every phase is in the rank's resident set
    cpu = plan.estimate(plan.PlanInput(**{**inp.__dict__, "device": "cpu"}), shape=SHAPE, zero=_zero(),
                        masked_bytes=(3.0, 1.0, 2.0))
    cparts = {x.name: x.gb for x in cpu.parts}
    cpersistent = sum(x.gb for x in cpu.parts if x.kind == "persistent")
    assert cpu.phases["load"] == pytest.approx(cparts["frozen weights"] + cparts["runtime"] + cparts["checkpoint read"])
    assert "checkpoint copies" not in cparts  # written from where they are
    assert cpu.phases["checkpoint"] == pytest.approx(cpersistent)
    assert cpu.phases["export"] == pytest.approx(cpersistent + cparts["full masks"] + cparts["export buffers"])
    assert cpu.process_per_rank_gb == max(cpu.phases.values())
    # more ranks: the partitioned parts shrink, the per-rank batch's parts do not
    p8 = plan.estimate(plan.PlanInput(**{**inp.__dict__, "world_size": 8}), shape=SHAPE, zero=_zero(),
                       masked_bytes=(3.0, 1.0, 2.0))
    parts8 = {x.name: x.gb * plan.GB for x in p8.parts}
    assert parts8["optimizer states"] == pytest.approx(parts["optimizer states"] / 2)
    assert parts8["activations"] == parts["activations"]
    # one rank: every weight persistent, so the masked linears keep W*m for backward (masking.py)
    p1 = plan.estimate(plan.PlanInput(**{**inp.__dict__, "world_size": 1}), shape=SHAPE, zero=_zero(),
                       masked_bytes=(3.0, 1.0, 2.0))
    assert {x.name: x.gb * plan.GB for x in p1.parts}["kept W*m (one rank)"] == pytest.approx((p_s - emb) * 2)
    assert "kept W*m (one rank)" not in parts


def test_offload_moves_model_states_to_the_host():
    inp = plan.PlanInput(model="x", world_size=2, per_device_train_batch_size=2, max_seq_length=16, device="gpu")
    on = plan.estimate(inp, shape=SHAPE, zero=_zero(offload_param=True, offload_optimizer=True), masked_bytes=(3, 1, 2))
    off = plan.estimate(inp, shape=SHAPE, zero=_zero(), masked_bytes=(3, 1, 2))
    where = {x.name: x.where for x in on.parts}
    assert where["frozen weights"] == where["optimizer states"] == "host" and where["activations"] == "device"
    assert on.per_rank_gb < off.per_rank_gb and on.host_per_rank_gb > 0


def test_verdict_fits_or_names_a_config_that_fits():
    big = plan.PlanInput(model="config:bert-large-uncased", world_size=1,
                         deepspeed=str(ROOT / "ds_configs" / "zero3_bf16.json"), per_device_train_batch_size=16,
                         max_seq_length=512)
    tight = plan.estimate(plan.PlanInput(**{**big.__dict__, "gpu_memory_gb": 16}))
    assert tight.fits is False and "does NOT fit" in tight.verdict
    assert tight.alternatives and "fits with" in tight.verdict  # checkpointing and/or offload rescue it
    roomy = plan.estimate(plan.PlanInput(**{**big.__dict__, "gpu_memory_gb": 80}))
    assert roomy.fits is True and roomy.verdict.startswith("fits")
    hopeless = plan.estimate(plan.PlanInput(**{**big.__dict__, "gpu_memory_gb": 2}))
    assert hopeless.fits is False and not hopeless.alternatives and "no shipped config fits" in hopeless.verdict


def test_json_output_parses_and_errors_are_one_line():
    cmd = [sys.executable, "-m", "tamt_ds.plan", "--model", "config:bert-large-uncased", "--world_size", "64",
           "--deepspeed", str(ROOT / "ds_configs" / "zero3_bf16.json"), "--per_device_train_batch_size", "16",
           "--max_seq_length", "512", "--gpu_memory_gb", "40", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["per_rank_gb"] > 0 and out["fits"] is True
    assert set(out["parts"]) >= {"frozen weights", "scores", "gradients", "optimizer states", "activations",
                                 "gather buffers"}
    assert out["params"]["backbone_and_head"] == PUBLISHED["bert-large-uncased"]
    assert set(out["phases"]) == {"load", "steps", "checkpoint", "export"} and out["per_rank_gb"] == out["phases"]["steps"]
    assert out["process_per_rank_gb"] == max(out["phases"].values())
    assert {"checkpoint read", "checkpoint copies", "full masks", "export buffers"} <= set(out["parts"])  # a GPU plan
    bad = subprocess.run(cmd[:4] + ["config:nope"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "config:bert-large-uncased" in errors[0]
