"""DeepSpeed set-up shared by search and fine-tuning: config, process group, engine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tamt_ds.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class EngineError(InputError):
    pass


def default_config() -> tuple[str, str]:
    """The config for the machine at hand, and why: bf16 wherever the device computes it
    natively (it halves the bytes moved and, on such CPUs, multiplies matmul throughput), fp16
    on GPUs without native bf16, fp32 on CPUs without bf16 instructions (emulated bf16 is
    slower than fp32 there).  Every launcher's default goes through here (load_ds_config)."""
    if torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        native = bf16_support(gpu)
        if native:
            return str(CONFIG_DIR / "zero3_bf16.json"), f"native: {native}"
        major, minor = torch.cuda.get_device_capability(gpu)
        return str(CONFIG_DIR / "zero3_fp16.json"), f"no native bf16 below compute capability 8.0 (this GPU: {major}.{minor})"
    native = bf16_support(torch.device("cpu"))
    if native:
        return str(CONFIG_DIR / "zero3_cpu_bf16.json"), f"native: {native}"
    return str(CONFIG_DIR / "zero3_cpu.json"), "no native bf16 on this CPU (no AVX512-BF16 / AMX-BF16 / Arm BF16 for oneDNN)"


def default_config_path() -> str:
    """A config that works on the machine at hand."""
    return default_config()[0]


# CPU instructions that compute in bf16 (torch.cpu.get_capabilities() names, from cpuinfo):
# x86 AVX512-BF16 (Cooper Lake, Zen 4 on) and AMX-BF16 (Sapphire Rapids on), Arm BF16 / SVE-BF16.
_CPU_BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def bf16_support(device: torch.device | str) -> str | None:
    """Why `device` computes in bf16 in hardware, not by emulation (emulated bf16 is slower than
    fp32), e.g. "CPU avx512_bf16 via oneDNN"; None where it does not.

    CUDA: compute capability 8.0 or above (Ampere on); torch.cuda.is_bf16_supported() also
    counts emulation, which V100 and T4 offer.  CPU: oneDNN runs bf16 kernels, and the CPU has
    bf16 instructions (oneDNN's own check, torch.ops.mkldnn._is_mkldnn_bf16_supported, also
    accepts plain AVX512 cores, which emulate it)."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return f"CUDA compute capability {capability[0]}.{capability[1]}" if capability >= (8, 0) else None
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        capabilities = torch.cpu.get_capabilities()
        found = [name for name in _CPU_BF16_INSTRUCTIONS if capabilities.get(name, False)]
        return f"CPU {' + '.join(found)} via oneDNN" if found else None
    return None


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes in bf16 in hardware (bf16_support says why)."""
    return bf16_support(device) is not None


def load_ds_config(path: str | None, *, micro_batch: int, grad_accum: int, grad_clip: float,
                   check_this_device: bool = True) -> dict:
    """Read a DeepSpeed JSON config and fill its "auto" values from the arguments.
    `check_this_device=False`: the config is for other machines (a plan or pre-flight of a GPU
    job made on a login node), so this machine's fp16 support does not count."""
    why = None
    if not path:
        path, why = default_config()
    if not os.path.isfile(path):
        raise EngineError(f"DeepSpeed config {path!r} not found: pass --deepspeed with one of "
                          f"{sorted(p.name for p in CONFIG_DIR.glob('*.json'))} in {CONFIG_DIR}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise EngineError(f"DeepSpeed config {path!r} is not valid JSON ({e.msg} at line {e.lineno}): fix the file "
                          f"or pass another --deepspeed config") from e
    if not isinstance(cfg, dict):
        raise EngineError(f"DeepSpeed config {path!r} must be a JSON object: pass a config like ds_configs/zero3_cpu.json")
    fill = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip}
    for key, value in fill.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    if check_this_device and cfg.get("fp16", {}).get("enabled") and not _fp16_supported():
        raise EngineError(f"{path} asks for fp16, which this device does not support: pass --deepspeed "
                          f"{CONFIG_DIR / 'zero3_bf16.json'} (bf16) or {CONFIG_DIR / 'zero3_cpu.json'} (fp32)")
    cfg["_source"] = os.path.abspath(path)
    cfg["_precision"] = {"dtype": str(precision(cfg)).removeprefix("torch."),
                         "why": f"{why}; the default here" if why else f"--deepspeed {path}"}
    return cfg


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def precision(cfg: dict) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def precision_line(cfg: dict) -> str:
    """Which precision a run trains in and why, for its start-up line (run_config.json keeps
    the same as cfg["_precision"]), e.g. "precision bfloat16 (native: CPU avx512_bf16 via oneDNN; the default here)"."""
    return f"precision {cfg['_precision']['dtype']} ({cfg['_precision']['why']})"


DEFAULT_DIST_TIMEOUT_S = 600  # torch's NCCL default; longer than any rank-0-only stretch (export, checkpoint)
# A collective's own timeout comes this much after the heartbeat's deadline, so that a dead
# or frozen peer is always reported by the heartbeat's one line (under NCCL the collective's
# timeout is a watchdog abort); it remains the bound for a peer alive but stuck.
COLLECTIVE_GRACE_S = 60


def init_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> None:
    """One process group for every launcher: deepspeed, torchrun (env vars) or mpirun (MPI discovery).

    A peer dead or frozen (its heartbeat silent) for `timeout_s` seconds ends every other
    rank with one line, on any backend (guards.Heartbeat).  A peer alive but stuck is
    bounded by the collectives' own timeout, `timeout_s` + COLLECTIVE_GRACE_S: gloo
    raises; NCCL's watchdog, which async error handling turns into an abort."""
    import datetime

    import deepspeed

    from tamt_ds import sharding

    if sharding.initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        # Plain `python launchers/x.py`: a one-process group, no MPI needed.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL collective ends the process
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(local_rank())  # before the group forms, so NCCL binds this rank's GPU
    build_comm_op()
    # Under mpirun DeepSpeed derives RANK / LOCAL_RANK / MASTER_ADDR from MPI and takes the
    # port from this argument (not from MASTER_PORT): honour a MASTER_PORT the user set.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s + COLLECTIVE_GRACE_S),
                               distributed_port=port)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # mpirun: LOCAL_RANK is known only now
    from tamt_ds.guards import Heartbeat

    Heartbeat.start(deadline_s=timeout_s)


def shutdown() -> None:
    """After a clean run, on every rank: wait for every rank (still beating, so that a rank
    done early is not taken for dead by one still exporting), stop the heartbeat, then end
    the process group together."""
    from tamt_ds import sharding
    from tamt_ds.guards import Heartbeat

    sharding.barrier()
    Heartbeat.stop()
    sharding.shutdown()


def build_comm_op() -> str | None:
    """Compile DeepSpeed's shared-memory comm op if this machine lacks it; its file (None: no such op here).

    DeepSpeed's CPU accelerator JIT-builds it when the process group forms (~80 s once per
    machine, then cached under TORCH_EXTENSIONS_DIR), on every rank of a node at once:
    torch lets one rank build while the others poll its lock file, and a build killed
    half-way leaves that file behind, so every later run would wait on it forever.  Here
    ranks take turns under an flock (the kernel drops it when its holder dies), and a lock
    file found while holding it was left by a dead build.  `make` builds it at set-up."""
    import fcntl

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None  # e.g. CUDA: nothing to build
    build_dir = _get_build_directory(builder.NAME, verbose=False)
    with open(os.path.join(build_dir, "tamt-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(build_dir, "lock")):
            os.remove(os.path.join(build_dir, "lock"))
        return builder.load(verbose=False).__file__


def local_rank() -> int:
    """This process's index among the ranks of its node: picks the GPU, never names files or logs."""
    return int(os.environ.get("LOCAL_RANK", 0))


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that nobody fixed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def linear_decay(optimizer, total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel: one pass over each tensor, no temporaries.  ZeRO-3
    hands it one flat fp32 partition of all trainable parameters; on a CPU the default
    (single-tensor) path made five full-size temporaries of it per step, 1.4 s against the fused
    kernel's 0.12 s for MiniLM's 22.5M scores (docs/benchmarks.md).  Its rounding differs from
    the default path in the last bit, so single-process references use this function too."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def build_engine(model, cfg: dict, *, params, lr: float, weight_decay: float, total_steps: int, warmup_steps: int = 0):
    """deepspeed.initialize with AdamW over `params` (torch's: it compiles nothing, and
    only the local ZeRO share of the trainable parameters ever reaches it) and a
    linear-decay schedule, unless the config names its own optimizer/scheduler.
    `params` may also be torch param groups (dicts), e.g. to exempt biases from weight decay."""
    import deepspeed

    ds_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    from tamt_ds import sharding, zero

    zero_config = ds_cfg.get("zero_optimization", {})
    if sharding.world_size() == 1 and zero_config.get("stage") == 3:
        ds_cfg["zero_optimization"] = zero.one_rank_settings(zero_config)  # the same bits, less work
    groups = list(params)
    groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    optimizer = scheduler = None
    if "optimizer" not in ds_cfg:
        optimizer = adamw(groups, lr=lr, weight_decay=weight_decay)
        if "scheduler" not in ds_cfg:
            scheduler = linear_decay(optimizer, total_steps, warmup_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups if optimizer is None else None,
                                                   optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    zero.streamline_step(engine)  # its optimizer step without two full-size copies of the gradients
    zero.skip_coordinator(engine)  # one rank: no fetch or release around each module
    zero.no_backward_hooks_without_grad(engine)  # the teacher and evaluation passes
    return engine, scheduler
