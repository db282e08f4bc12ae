"""Two modules wrap what the rest of the code must not touch directly.

tamt_ds/sharding.py runs every collective (it puts tensors on the communication device:
NCCL refuses CPU tensors) and knows how ZeRO-3 lays a parameter out (`ds_*`);
tamt_ds/zero.py reaches into DeepSpeed's ZeRO-3 optimizer and engine (fp32 masters,
optimizer state, loss scaler, persistent parameters, step counters).  Those internals can
move in any DeepSpeed release: kept in one place, a new release breaks one module, which
the tests named in the README ("Testing a newer DeepSpeed") exercise."""
import re

import pytest
import torch

from tests.conftest import ROOT

DIRECT = re.compile(r"torch\.distributed|from torch import distributed|\bdist\.(all_|broadcast|gather|barrier|reduce)")


def _attribute(*names: str) -> str:
    """`x.name`, or the name as a string in getattr / hasattr / setattr."""
    alternatives = "|".join(names)
    return rf"\.(?:{alternatives})\b|(?:get|has|set)attr\([^,]+,\s*[\"'](?:{alternatives})[\"']"


# ZeRO-3's per-parameter attributes and methods (deepspeed/runtime/zero/partition_parameters.py).
LAYOUT = re.compile(
    _attribute("ds_id", "ds_numel", "ds_shape", "ds_tensor", "ds_status", "ds_persist", "partition_numel",
               "padding_size", "convert_to_zero_parameters", "all_gather_coalesced")
    + r"|\bGatheredParameters\b|\bZeroParamStatus\b")
# The ZeRO-3 optimizer's and the engine's internals (deepspeed/runtime/zero/stage3.py, runtime/engine.py,
# utils/tensor_fragment.py), and DeepSpeed's accessors of them.
OPTIMIZER = re.compile(
    _attribute("_z3_optimizer", "_hp_mapping", "optimizer", "fp32_partitioned_groups_flat", "persistent_parameters",
               "loss_scaler", "cur_scale", "global_steps", "global_samples", "skipped_steps",
               "get_full_hp_param", "get_local_fp32_param", "set_local_hp_param")
    + r"|\bsafe_(?:get|set)_\w+|\bdeepspeed\.utils\b")

RULES = [  # (what, the one module allowed to, where else to go)
    (DIRECT, "tamt_ds/sharding.py", "call tamt_ds.sharding instead"),
    (LAYOUT, "tamt_ds/sharding.py", "ZeRO's parameter layout: call tamt_ds.sharding instead"),
    (OPTIMIZER, "tamt_ds/zero.py", "DeepSpeed's optimizer / engine internals: call tamt_ds.zero instead"),
]


def offending_lines(pattern: re.Pattern, text: str) -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if pattern.search(code):
            out.append((no, line.strip()))
    return out


@pytest.mark.parametrize("pattern, home, hint", RULES, ids=["torch.distributed", "zero-layout", "zero-optimizer"])
def test_only_one_module_touches_it(pattern, home, hint):
    offenders = []
    for folder in ("tamt_ds", "launchers", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / home:
                continue
            for no, line in offending_lines(pattern, path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {line}")
    assert not offenders, hint + ":\n" + "\n".join(offenders)


@pytest.mark.parametrize("line, pattern", [
    ("shape = p.ds_shape", LAYOUT),
    ("n = param.ds_tensor.ds_numel", LAYOUT),
    ("if hasattr(p, 'ds_id'):", LAYOUT),
    ("with deepspeed.zero.GatheredParameters(params):", LAYOUT),
    ("anchor.convert_to_zero_parameters(param_list=new)", LAYOUT),
    ("if hasattr(p, \"_z3_optimizer\"):", OPTIMIZER),
    ("flat = opt.fp32_partitioned_groups_flat[0]", OPTIMIZER),
    ("state = engine.optimizer.optimizer.state[flat]", OPTIMIZER),
    ("persistent = list(getattr(opt, \"persistent_parameters\", []))", OPTIMIZER),
    ("scale = opt.loss_scaler.cur_scale", OPTIMIZER),
    ("steps = engine.global_steps", OPTIMIZER),
    ("from deepspeed.utils import safe_get_full_fp32_param", OPTIMIZER),
    ("master = safe_get_local_fp32_param(p)", OPTIMIZER),
])
def test_the_scan_catches_each_internal_name(line, pattern):
    assert offending_lines(pattern, line) == [(1, line)]


@pytest.mark.parametrize("line", [
    "ds_config = load_ds_config(path)  # ds_shape in a comment",
    "kind, _, value = text.partition(':')",
    "state['loss_scaler'] = None",
    "engine.backward(loss); engine.step()",
    "shape = sharding.full_shape(p)",
])
def test_the_scan_lets_ordinary_code_through(line):
    assert offending_lines(LAYOUT, line) == [] and offending_lines(OPTIMIZER, line) == []


def test_collectives_without_a_process_group_return_the_input_on_its_device():
    from tamt_ds import sharding

    assert sharding.comm_device() == torch.device("cpu")
    t = torch.arange(4)
    assert sharding.all_reduce_(t, op="max") is t and t.tolist() == [0, 1, 2, 3]
    assert sharding.all_gather_counts(t).shape == (1, 4)
    assert sharding.gather_objects({"a": 1}) == [{"a": 1}]
