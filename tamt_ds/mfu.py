"""Model FLOPs utilisation (MFU) of the search: the matmul FLOPs one step needs per token,
times tokens/s, over the devices' peak.

FLOPs per token of a TAMT step, counted from the model (matmuls only: masks, softmax,
layer norms and optimizer are not model FLOPs), with N the weights of the Linear layers
every token passes (the pooler runs on one token per sequence, so it counts 1/s), L
layers of width d and s tokens per block:

    forward                 F = 2 N + 4 L s d             (x W^T; Q K^T and A V)
    student backward        B = 2 N' + 8 L s d + 2 N_t    (activation gradients through the N' weights
                                                           the loss depends on, attention's two matmuls
                                                           each, and dL/dW_eff = g^T x for the N_t weights
                                                           whose score or weight trains)
    search step             F (student) + B + F (teacher, KD objectives only)
                            + the encoder's forward again with gradient checkpointing

For KD with every encoder matrix masked (N = N' = N_t up to the pooler) that is
8 N + 16 L s d: a training step's 6 N plus the teacher's 2 N; frozen weights save no
FLOPs, since a score's gradient is a weight gradient times W.

Peak: a table of GPUs' dense tensor-core (bf16/fp16, tf32) and fp32 rates; on a CPU, the
best rate of a one-second matmul probe in the run's dtype, taken once per process.
"""
from __future__ import annotations

import functools
import re
import time

import torch
from torch import nn

from tamt_ds import sharding

# Dense peak TFLOP/s (NVIDIA datasheets, without structured sparsity), by device name;
# the first name contained in torch.cuda.get_device_name() counts.
# Matched case-insensitively, so the study's `gpu: {name: a100}` finds the same rows; a name
# contained in another (L4 in L40S, A10 in A100) comes after it.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}),
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    ("H100", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}),  # SXM
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    ("L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    ("L4", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    ("A10", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125, "fp32": 15.7}),  # no bf16
)
PROBE_SECONDS = 1.0
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ENCODER_LAYER = re.compile(r"layer\.\d+\.")


def search_flops_per_token(model: nn.Module, objective: str, *, seq_len: int,
                           gradient_checkpointing: bool = False) -> float:
    """Model FLOPs of one search step per token (see the module docstring).  Also IMP's and
    fine-tuning's (objective "imp" / "finetune": no teacher, every weight trains)."""
    per_token, on_path, trained, recomputed = _linear_counts(model, seq_len)
    forward = 2 * per_token + _attention(model.config, seq_len)
    student = forward + 2 * on_path + 2 * _attention(model.config, seq_len) + 2 * trained
    if gradient_checkpointing:
        student += 2 * recomputed + _attention(model.config, seq_len)
    teacher = forward if "kd" in objective else 0.0
    return student + teacher


def forward_flops_per_token(model: nn.Module, *, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token (evaluation)."""
    return 2 * _linear_counts(model, seq_len)[0] + _attention(model.config, seq_len)


def meta_model(config, job: str) -> nn.Module:
    """The model a job trains, built from its config on the meta device (shapes, no memory):
    for the FLOPs of jobs that are planned, not run (IMP's cost, the study's GPU-hours).  A
    search trains its masked matrices (TAMT_PATTERNS) and MLM head, IMP ("imp") and
    fine-tuning ("finetune") every weight; MLM jobs get the backbone's pooler as load_model
    gives them."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from tamt_ds.masking import TAMT_PATTERNS
    from tamt_ds.models import backbone_of

    with torch.device("meta"):
        if job in ("kd", "finetune"):
            model = AutoModel.from_config(config)
        else:
            model = AutoModelForMaskedLM.from_config(config)
            backbone_of(model)[0].pooler = AutoModel.from_config(config).pooler
    base = {id(p) for p in model.base_model.parameters()}
    for p in model.parameters():  # as prepare_search: the MLM head trains, its decoder is the frozen embedding
        p.requires_grad_(job in ("imp", "finetune") or id(p) not in base)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(re.search(p, name) for p in TAMT_PATTERNS):
            module.weight.requires_grad_(True)  # stands for its mask score
    return model


def _attention(config, seq_len: int) -> float:
    return 4 * config.num_hidden_layers * seq_len * config.hidden_size  # Q K^T and A V, forward, per token


def _linear_counts(model: nn.Module, seq_len: int) -> tuple[float, float, float, float]:
    """Weights of the Linear layers: every token passes (the pooler 1/s), on the loss's path,
    trained (weight or mask score), and recomputed by gradient checkpointing (the encoder's)."""
    per_token = on_path = trained = recomputed = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        numel = sharding.full_numel(module.weight)
        if name.endswith("pooler.dense"):
            per_token += numel / seq_len  # the first token of each block; no loss reads its output
            continue
        per_token += numel
        on_path += numel
        score = getattr(module, "mask_score", None)
        if module.weight.requires_grad or (score is not None and score.requires_grad):
            trained += numel
        if _ENCODER_LAYER.search(name):
            recomputed += numel
    return per_token, on_path, trained, recomputed


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """This device's peak FLOP/s in `dtype` (None for a GPU not in the table)."""
    if device.type == "cuda":
        key = _DTYPE_NAMES.get(dtype, "fp32")
        if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        return datasheet_peak(torch.cuda.get_device_name(device), key)
    if device.type == "cpu":
        return _cpu_probe(dtype, torch.get_num_threads())
    return None


def datasheet_peak(gpu_name: str, key: str) -> float | None:
    """Dense peak FLOP/s of the first table row whose name `gpu_name` contains, in `key`
    (bf16 / fp16 / tf32 / fp32); None for a GPU not in the table or a dtype it lacks."""
    for gpu, peaks in GPU_PEAK_TFLOPS:
        if gpu.lower() in gpu_name.lower():
            return peaks[key] * 1e12 if key in peaks else None
    return None


@functools.lru_cache(maxsize=None)
def _cpu_probe(dtype: torch.dtype, threads: int) -> float:
    """The best rate of a (2048 x 1024) @ (1024 x 1024) matmul over about PROBE_SECONDS:
    what this CPU's cores, as this process uses them, reach in `dtype`."""
    # its own generator: the global RNG's stream is the search's (dropout), restored exactly on resume
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 1024, generator=gen).to(dtype)
    b = torch.randn(1024, 1024, generator=gen).to(dtype)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    torch.mm(a, b)  # first call: kernel selection, allocation
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < PROBE_SECONDS:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, flops / (time.perf_counter() - t))
    return best


def describe_peak(device: torch.device, dtype: torch.dtype | None = None) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} datasheet peak (tamt_ds/mfu.py table)"
    probe = "" if dtype is None else f" {peak_flops(device, dtype) / 1e9:,.0f} GFLOP/s"
    return f"CPU matmul probe{probe} ({PROBE_SECONDS:g} s, {torch.get_num_threads()} threads)"


def percent(flops_per_s: float, peak: float | None) -> str:
    return "n/a" if not peak else f"{100 * flops_per_s / peak:.1f}%"


class SearchMFU:
    """MFU of a search: FLOPs per token from the model, the peak summed over ranks (each
    rank probes its own share of the machine at the same time)."""

    def __init__(self, model: nn.Module, objective: str, *, seq_len: int, dtype: torch.dtype,
                 device: torch.device, gradient_checkpointing: bool = False):
        self.flops_per_token = search_flops_per_token(model, objective, seq_len=seq_len,
                                                      gradient_checkpointing=gradient_checkpointing)
        peak = peak_flops(device, dtype)
        known = torch.tensor([peak or 0.0, float(peak is None)], dtype=torch.float64)
        sharding.all_reduce_(known)
        self.peak = None if known[1] > 0 else float(known[0])
        self.text = (f"model FLOPs {self.flops_per_token / 1e9:.4g} GFLOP/token; peak "
                     f"{'unknown' if self.peak is None else f'{self.peak / 1e12:.4g} TFLOP/s'} over "
                     f"{sharding.world_size()} rank(s): {describe_peak(device)}, {_DTYPE_NAMES.get(dtype, dtype)}")

    def of(self, tokens_per_s: float) -> float:
        """MFU as a fraction (nan where the peak is unknown)."""
        return float("nan") if self.peak is None else tokens_per_s * self.flops_per_token / self.peak
