"""Every collective goes through tamt_ds/sharding.py, which puts tensors on the communication
device (NCCL refuses CPU tensors): no other module may talk to torch.distributed."""
import re

import torch

from tests.conftest import ROOT

DIRECT = re.compile(r"torch\.distributed|from torch import distributed|\bdist\.(all_|broadcast|gather|barrier|reduce)")


def test_no_module_but_sharding_uses_torch_distributed():
    offenders = []
    for folder in ("tamt_ds", "launchers", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "tamt_ds" / "sharding.py":
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if DIRECT.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "call tamt_ds.sharding instead:\n" + "\n".join(offenders)


def test_collectives_without_a_process_group_return_the_input_on_its_device():
    from tamt_ds import sharding

    assert sharding.comm_device() == torch.device("cpu")
    t = torch.arange(4)
    assert sharding.all_reduce_(t, op="max") is t and t.tolist() == [0, 1, 2, 3]
    assert sharding.all_gather_counts(t).shape == (1, 4)
    assert sharding.gather_objects({"a": 1}) == [{"a": 1}]
