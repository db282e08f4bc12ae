"""Memory model: per-rank peak memory of a TAMT search (or a dense step) under ZeRO-3, by part.

    python -m tamt_ds.plan --model config:bert-large-uncased --world_size 64 \\
        --deepspeed ds_configs/zero3_bf16.json --per_device_train_batch_size 16 --max_seq_length 512 \\
        [--gpu_memory_gb 40] [--gradient_checkpointing] [--json]

Every term is a count times bytes, in the spirit of nanoGPT's transformer_sizing notebook:
parameter counts in closed form from the model's config.json (tested equal to the real
models), bytes from the DeepSpeed config (dtype, buckets, offload).  N = ranks, b = bytes
of the training dtype, P_w = backbone weights, P_s = masked entries (one score each),
P_t = trainable (scores + MLM head; every weight for a dense step), T = tokens per rank.

  frozen weights   P_w * b / N              ZeRO-3 partition (+ small persistent params, whole)
  scores           P_s * b / N              partitioned like the weights
  gradients        P_t * b / N              DeepSpeed's flat gradient partition (+ fp32 copy, offload)
  optimizer states P_t * (4 + 8) / N        fp32 master copy (kept even in fp32) + Adam m, v
  reduce bucket    min(bucket, P_t) * b     full-size gradients waiting for the reduce-scatter
  activations      T * (L (10h + 2i + 3aS*) + 3h) * b + KD/MLM terms   (*: attention matrices;
                   on CPU, where PyTorch's SDPA falls back to the math path with dropout)
  masked weights   what the straight-through layer keeps for backward, per masked entry:
                   measured on a 16x16 MaskedLinear / MaskedEmbedding (tamt_ds.masking) here
  mask statistics  what the MaskSet keeps per masked entry between steps (measured the same way)
  gather buffers   full weights + scores gathered at once (N > 1): the current module, the
                   prefetch bucket and what DeepSpeed keeps for reuse (max_reuse_distance)
  step temporaries ~3 * (sub-group of P_t / N) * 4: Adam's and the norm's temporaries
  runtime          CPU only: Python, torch, transformers, DeepSpeed (measured, ~0.7 GB)

The phases around the steps, each the persistent parts (those alive then) + its own:
  checkpoint read  P_w * stored bytes           load: rank 0 reads the whole checkpoint file
  checkpoint copies P_t * (4 + 8) / N           a save from a GPU: fp32 master + Adam m, v, host copies
  full masks       P_s * 1                      export, rank 0: every bool mask (mask.pt)
  export buffers   largest tensor * (stored + 1) export: pruned_model/ streamed one tensor at a time

Peak (per_rank_gb) = the persistent parts + max(forward/backward transients, optimizer-step
transients); the whole process (process_per_rank_gb) = the largest of load, steps, checkpoint
and export (`phases`).
On a GPU the figure is CUDA max allocated; the verdict adds the CUDA context and allocator
slack.  Offloaded parts (zero3_offload.json) move to host memory.  Measured against the
grid in docs/scaling.md (benchmarks/scaling.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field

GB = 1e9
CPU_RUNTIME_GB = 0.7        # RSS of a rank after imports and engine set-up, model states excluded (measured here)
CUDA_CONTEXT_GB = 0.8       # CUDA context + NCCL buffers outside max_allocated (typical; not measured here)
ALLOCATOR_SLACK = 1.10      # caching-allocator fragmentation on top of max_allocated
STEP_TEMPORARIES = 3        # fp32 copies of a sub-group alive during DeepSpeed's step (measured on CPU, torch AdamW)


# ---- parameter counts -----------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    positions: int
    token_types: int
    stored_bytes: int = 4  # of the checkpoint's weights: config.json's dtype (fp32 where it names none)

    @classmethod
    def from_config(cls, config) -> "Shape":
        stored = 2 if str(getattr(config, "dtype", None) or "float32").endswith(("float16", "bfloat16")) else 4
        return cls(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
                   config.vocab_size, config.max_position_embeddings, config.type_vocab_size, stored)


def parameter_tensors(s: Shape, *, pooler: bool = True, mlm_head: bool = False) -> dict[str, int]:
    """Every parameter tensor of a BERT/RoBERTa backbone (transformers' names, no prefix) and,
    with `mlm_head`, of its MLM head ('head.' names; the decoder is tied to the embeddings)."""
    h, i = s.hidden, s.intermediate
    t = {"embeddings.word_embeddings.weight": s.vocab * h, "embeddings.position_embeddings.weight": s.positions * h,
         "embeddings.token_type_embeddings.weight": s.token_types * h,
         "embeddings.LayerNorm.weight": h, "embeddings.LayerNorm.bias": h}
    for n in range(s.layers):
        p = f"encoder.layer.{n}."
        for lin, (fan_in, fan_out) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                                       "attention.self.value": (h, h), "attention.output.dense": (h, h),
                                       "intermediate.dense": (h, i), "output.dense": (i, h)}.items():
            t[p + lin + ".weight"], t[p + lin + ".bias"] = fan_in * fan_out, fan_out
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = h, h
    if pooler:
        t["pooler.dense.weight"], t["pooler.dense.bias"] = h * h, h
    if mlm_head:
        t.update({"head.dense.weight": h * h, "head.dense.bias": h, "head.layer_norm.weight": h,
                  "head.layer_norm.bias": h, "head.bias": s.vocab})
    return t


def masked_tensors(tensors: dict[str, int], patterns=None) -> dict[str, int]:
    """The weights that get a score: modules matching the TAMT patterns (as attach_masks does)."""
    from tamt_ds.masking import TAMT_PATTERNS

    regexes = [re.compile(p) for p in (patterns or TAMT_PATTERNS)]
    return {n: k for n, k in tensors.items()
            if n.endswith(".weight") and any(r.search(n[: -len(".weight")]) for r in regexes)}


# ---- inputs ---------------------------------------------------------------------------
@dataclass
class PlanInput:
    model: str
    world_size: int = 1
    deepspeed: str | None = None
    per_device_train_batch_size: int = 32
    max_seq_length: int = 128
    objective: str = "kd"                 # kd, mlm or mlm_kd
    trainable: str = "scores"             # scores (the search) or all (a dense step, for comparison)
    gradient_checkpointing: bool = False
    device: str = "gpu"                   # where the ranks compute: gpu or cpu
    gpu_memory_gb: float | None = None


@dataclass
class ZeroSettings:
    """The ZeRO-3 values that size memory, with DeepSpeed's own defaults (its config parser)."""
    dtype_bytes: int
    reduce_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    max_reuse_distance: int
    param_persistence_threshold: int
    sub_group_size: int
    offload_param: bool
    offload_optimizer: bool

    @classmethod
    def from_ds_config(cls, cfg: dict) -> "ZeroSettings":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero = DeepSpeedZeroConfig(**cfg.get("zero_optimization", {}))
        half = cfg.get("bf16", {}).get("enabled") or cfg.get("fp16", {}).get("enabled")
        off_p, off_o = zero.offload_param, zero.offload_optimizer
        return cls(2 if half else 4, int(zero.reduce_bucket_size), int(zero.prefetch_bucket_size),
                   int(zero.max_live_parameters), int(zero.max_reuse_distance), int(zero.param_persistence_threshold),
                   int(zero.sub_group_size), bool(off_p and str(off_p.device).endswith("cpu")),
                   bool(off_o and str(off_o.device).endswith("cpu")))


# ---- the masked layer's saved tensors, measured -------------------------------------------
def masked_weight_saved_bytes(dtype_bytes: int) -> tuple[float, float, float]:
    """Bytes per masked entry, measured on 16x16 layers, following whatever tamt_ds.masking does:
    what a MaskedLinear / MaskedEmbedding keeps from its forward until backward (beyond its
    parameters and inputs; autograd's saved-tensor hooks), and what the MaskSet keeps per entry
    between steps (its tensors besides the parameters, e.g. masks for the statistics):
    (linear, embedding, mask set)."""
    import torch
    from torch import nn

    from tamt_ds.masking import attach_masks

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    net = nn.ModuleDict({"lin": nn.Linear(16, 16), "emb": nn.Embedding(16, 16)}).to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    masks = attach_masks(net, [r"^lin$", r"^emb$"], sparsity=0.5)
    masks.init_scores("magnitude")
    for s in masks.scores:
        s.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    held = sum(t.untyped_storage().nbytes() for site in masks for t in vars(site).values()
               if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in params)
    out = []
    # the linear's input requires grad, as every activation after a masked embedding does
    for name, x in (("lin", torch.randn(2, 16, dtype=dtype, requires_grad=True)), ("emb", torch.arange(16))):
        saved = {}

        def pack(t, inputs=x.untyped_storage().data_ptr()):
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() != inputs:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net[name](x)
        # what scales with the matrix (not with the 2-token input): the weight-sized tensors
        out.append(sum(v for v in saved.values() if v >= 16 * 16) / (16 * 16))
    return out[0], out[1], held / (2 * 16 * 16)


# ---- the estimate ----------------------------------------------------------------------
@dataclass
class Part:
    name: str
    gb: float
    kind: str          # persistent | forward (transient in forward/backward) | step (transient in the step)
                       # | load (the model load, before scores and optimizer exist) | checkpoint (a save)
                       # | export (after the last step)
    where: str         # device | host
    formula: str


@dataclass
class Plan:
    inputs: PlanInput
    parts: list[Part]
    per_rank_gb: float                   # predicted peak of the steps on the device (RSS on CPU, max allocated on GPU)
    host_per_rank_gb: float              # offloaded parts, in host memory, per rank
    params: dict[str, int]
    phases: dict[str, float] = field(default_factory=dict)  # device peak of each phase: load, steps, checkpoint, export
    process_per_rank_gb: float = 0.0     # the whole process's device peak: the largest phase
    deepspeed_estimate_gb: float | None = None
    verdict: str = ""
    fits: bool | None = None
    alternatives: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["parts"] = {p.name: round(p.gb, 4) for p in self.parts}
        return d


def _model_shape(model: str) -> Shape:
    from tamt_ds.models import model_config

    return Shape.from_config(model_config(model))


def estimate(inp: PlanInput, *, shape: Shape | None = None, zero: ZeroSettings | None = None,
             masked_bytes: tuple[float, float, float] | None = None) -> Plan:
    from tamt_ds.engine import load_ds_config

    shape = shape or _model_shape(inp.model)
    if zero is None:
        cfg = load_ds_config(inp.deepspeed or _default_config(inp.device), micro_batch=inp.per_device_train_batch_size,
                             grad_accum=1, grad_clip=1.0, check_this_device=inp.device == "cpu")
        zero = ZeroSettings.from_ds_config(cfg)
    b, n = zero.dtype_bytes, inp.world_size
    search = inp.trainable == "scores"
    with_head = inp.trainable == "all" or "mlm" in inp.objective
    # as models.load_model builds: an MLM model carries the backbone's pooler too (attach_backbone_pooler)
    tensors = parameter_tensors(shape, pooler=True, mlm_head=with_head)
    masked = masked_tensors(tensors) if search else {}
    p_all = sum(tensors.values())
    p_scores = sum(masked.values())
    head = sum(v for k, v in tensors.items() if k.startswith("head."))
    p_train = p_scores + head if search else p_all
    small = sum(v for v in tensors.values() if v <= zero.param_persistence_threshold)
    small += sum(v for v in masked.values() if v <= zero.param_persistence_threshold)
    L = shape.layers
    on_cpu = inp.device == "cpu"
    param_where = "host" if zero.offload_param and not on_cpu else "device"
    optim_where = "host" if zero.offload_optimizer and not on_cpu else "device"
    parts: list[Part] = []

    def add(name, nbytes, kind, where, formula):
        parts.append(Part(name, nbytes / GB, kind, where, formula))

    add("frozen weights" if search else "weights", (p_all - small) * b / n + small * b, "persistent", param_where,
        "P_w * b / N")
    if search:
        add("scores", p_scores * b / n, "persistent", param_where, "P_s * b / N")
    if zero.offload_optimizer:  # the CPU optimizer steps on its own fp32 copy of the gradient partition
        add("gradients", p_train * (b + 4) / n, "persistent", optim_where, "P_t * (b + 4 fp32 copy) / N")
    else:
        add("gradients", p_train * b / n, "persistent", optim_where, "P_t * b / N")
    add("optimizer states", p_train * 12 / n, "persistent", optim_where, "P_t * (4 master + 8 Adam) / N")
    add("reduce bucket", min(zero.reduce_bucket_size, p_train) * b, "persistent", "device",
        "min(reduce_bucket_size, P_t) * b")
    add("activations", _activation_bytes(shape, inp, b, on_cpu), "forward", "device",
        "T (L (10h + 2i + 3aS) + 3h) b + KD / MLM terms" if on_cpu else "T (L (10h + 2i) + 3h) b + KD / MLM terms")
    if search:
        per_lin, per_emb, per_set = masked_bytes or masked_weight_saved_bytes(b)
        add("mask statistics", p_scores * per_set / n, "persistent", "device",
            f"{per_set:g} B per masked entry / N (measured: the MaskSet's local masks)")
        emb = sum(v for k, v in masked.items() if "embeddings" in k)
        lin = p_scores - emb
        # the forward's peak is at its end, when the layers' transients are live (the embedding's
        # larger ones come and go at its start, with no activations held yet)
        largest = max(v for k, v in masked.items() if k.startswith("encoder.layer."))
        if inp.gradient_checkpointing:  # inside checkpointed layers only the recomputed layer keeps them
            layer = sum(v for k, v in masked.items() if k.startswith("encoder.layer.0."))
            lin = lin - L * layer + layer
        add("masked weights", lin * per_lin + emb * per_emb + largest * b, "forward", "device",
            f"{per_lin:g} B per masked linear entry, {per_emb:g} per embedding entry (measured) + one layer's W*m")
        if n == 1 and not zero.offload_param:  # every weight persistent: the forward keeps W*m (masking.py)
            add("kept W*m (one rank)", lin * b, "forward", "device", "P_lin * b (the masked linears' W*m)")
    if n > 1:  # one rank: DeepSpeed's "gathered" parameter is its own partition, no copy
        # KD too: teacher, student and backward are one ZeRO-3 step (zero.same_step), whose trace
        # DeepSpeed replays with prefetch and reuse (docs/benchmarks.md, gathered bytes per KD step)
        largest_module = max(tensors.values()) * (2 if search else 1)  # weight (+ its score)
        gathered = min(p_all + p_scores, zero.max_reuse_distance + zero.prefetch_bucket_size + largest_module)
        formula = "min(P_w + P_s, max_reuse_distance + prefetch_bucket_size + largest module) * b"
        add("gather buffers", gathered * b, "forward", "device", formula)
    sub_group = min(zero.sub_group_size, p_train) / n
    add("step temporaries", STEP_TEMPORARIES * sub_group * 4, "step", optim_where,
        f"{STEP_TEMPORARIES} * min(sub_group_size, P_t) / N * 4")
    if on_cpu:
        add("runtime", CPU_RUNTIME_GB * GB, "persistent", "device", "measured constant (CPU)")
    # The load: rank 0 reads the whole checkpoint into the partitioned model (its pages stay resident
    # while mapped), before any score, gradient or optimizer state exists.
    add("checkpoint read", p_all * shape.stored_bytes, "load", "device" if on_cpu else "host",
        "P_w * stored bytes (rank 0 reads the whole file)")
    # The export (tamt_ds/export.py) on rank 0, the engine still alive: every bool mask assembled
    # (mask.pt), then pruned_model/ one tensor at a time: the largest tensor read, its mask's
    # complement, and on N > 1 the gathered score of the matrix being assembled.
    # A checkpoint (every --save_steps and after the last step, tamt_ds/checkpoint.py) writes the
    # fp32 master and Adam moments where they already are on the host (CPU ranks, offloaded
    # optimizer); from a GPU it copies them all to the host at once first.
    if not on_cpu and not zero.offload_optimizer:
        add("checkpoint copies", p_train * 12 / n, "checkpoint", "host",
            "P_t * (4 master + 8 Adam) / N (fp32 host copies, all at once)")
    if search:
        export_where, largest_tensor = "device" if on_cpu else "host", max(tensors.values())
        add("full masks", p_scores * 1, "export", export_where, "P_s * 1 B (bool, every matrix, on rank 0)")
        add("export buffers", largest_tensor * (shape.stored_bytes + 1) + (largest_tensor * b if n > 1 else 0),
            "export", export_where, "largest tensor * (stored bytes + 1)" + (" + its gathered score * b" if n > 1 else ""))

    def phase_peaks(where):
        persistent = sum(p.gb for p in parts if p.kind == "persistent" and p.where == where)
        of = lambda kind: sum(p.gb for p in parts if p.kind == kind and p.where == where)  # noqa: E731
        at_load = sum(p.gb for p in parts if p.kind == "persistent" and p.where == where
                      and p.name in ("frozen weights", "weights", "runtime"))
        return {"load": at_load + of("load"), "steps": persistent + max(of("forward"), of("step")),
                "checkpoint": persistent + of("checkpoint"), "export": persistent + of("export")}

    device_phases = phase_peaks("device")
    plan = Plan(inp, parts, device_phases["steps"], phase_peaks("host")["steps"] if not on_cpu else 0.0,
                {"backbone_and_head": p_all, "masked": p_scores, "trainable": p_train}, phases=device_phases,
                process_per_rank_gb=max(device_phases.values()))
    plan.deepspeed_estimate_gb = _deepspeed_estimate(p_all + p_scores, max(tensors.values()), n)
    judge(plan, zero)
    return plan


def _activation_bytes(s: Shape, inp: PlanInput, b: int, on_cpu: bool) -> float:
    h, L, i, a, S, V = s.hidden, s.layers, s.intermediate, s.heads, inp.max_seq_length, s.vocab
    T = inp.per_device_train_batch_size * S
    attention = 3 * a * S if on_cpu else 0  # CPU: SDPA's math path keeps probabilities, dropout mask, dropped
    layer = (10 * h + 2 * i + attention) * b
    if inp.gradient_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        total = T * (L * h * b + layer + 3 * h * b)
    else:
        total = T * (L * layer + 3 * h * b)
    if "kd" in inp.objective and inp.trainable == "scores":
        total += T * (L + 1) * h * b      # the teacher's hidden states
        total += T * L * 2 * h * 4        # the KD loss's fp32 copies of real tokens (student and teacher)
    if "mlm" in inp.objective or inp.trainable == "all":
        total += T * (3 * h * b + 2 * V * b)  # head transform; the saved log-softmax and its gradient
    return total


def _deepspeed_estimate(total_params: int, largest: int, n: int) -> float | None:
    """DeepSpeed's own ZeRO-3 model-state estimate (no offload) for the same parameter count:
    it assumes every parameter trains (18 bytes each: 16-bit weight and gradient, fp32 master
    and Adam), so it charges gradients and optimizer state to the frozen weights."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest, num_gpus_per_node=n, num_nodes=1,
                                                      cpu_offload=False, cpu_offload_params=False)
    return gpu / GB


# ---- verdict ---------------------------------------------------------------------------
def _usable_gb(plan: Plan) -> float | None:
    if plan.inputs.gpu_memory_gb is None:
        return None
    return (plan.inputs.gpu_memory_gb - CUDA_CONTEXT_GB) / ALLOCATOR_SLACK


def judge(plan: Plan, zero: ZeroSettings) -> None:
    """Fits or not on --gpu_memory_gb; if not, which of the shipped remedies would make it fit."""
    usable = _usable_gb(plan)
    if usable is None:
        plan.verdict = "no --gpu_memory_gb given: no verdict"
        return
    plan.fits = plan.per_rank_gb <= usable
    if plan.fits:
        plan.verdict = (f"fits: {plan.per_rank_gb:.1f} GB predicted per rank of {usable:.1f} GB usable "
                        f"({plan.inputs.gpu_memory_gb:g} GB GPU)")
        return
    plan.verdict = (f"does NOT fit: {plan.per_rank_gb:.1f} GB predicted per rank, {usable:.1f} GB usable "
                    f"({plan.inputs.gpu_memory_gb:g} GB GPU)")
    inp = plan.inputs
    tries = [("--gradient_checkpointing", dict(gradient_checkpointing=True), None)]
    offload = str(_config_dir() / "zero3_offload.json")
    tries.append((f"--deepspeed {offload}", {}, offload))
    tries.append((f"--deepspeed {offload} --gradient_checkpointing", dict(gradient_checkpointing=True), offload))
    for label, change, config in tries:
        other = estimate(dataclasses.replace(inp, deepspeed=config or inp.deepspeed, gpu_memory_gb=None, **change),
                         shape=None if config else _shape_of(plan), zero=None if config else zero)
        if other.per_rank_gb <= usable:
            host = f", {other.host_per_rank_gb:.1f} GB host memory per rank" if other.host_per_rank_gb else ""
            plan.alternatives.append(f"{label}: {other.per_rank_gb:.1f} GB per rank{host}")
    if plan.alternatives:
        plan.verdict += "; fits with " + plan.alternatives[0]
    else:
        plan.verdict += "; no shipped config fits: use more ranks or a smaller --per_device_train_batch_size"


def _shape_of(plan: Plan) -> Shape:
    return _model_shape(plan.inputs.model)


def _config_dir():
    from tamt_ds.engine import CONFIG_DIR

    return CONFIG_DIR


def _default_config(device: str) -> str:
    return str(_config_dir() / ("zero3_cpu.json" if device == "cpu" else "zero3_bf16.json"))


# ---- command line ----------------------------------------------------------------------
def render(plan: Plan) -> str:
    inp = plan.inputs
    lines = [f"{inp.model}: {plan.params['backbone_and_head'] / 1e6:.1f}M parameters, "
             f"{plan.params['masked'] / 1e6:.1f}M masked, {plan.params['trainable'] / 1e6:.1f}M trainable | "
             f"{inp.world_size} ranks | {inp.per_device_train_batch_size} x {inp.max_seq_length} tokens per rank | "
             f"{inp.deepspeed or _default_config(inp.device)} | {inp.device}"
             + (" | gradient checkpointing" if inp.gradient_checkpointing else ""),
             f"{'part':<18} {'GB/rank':>8}  {'when':<10} {'where':<6} formula"]
    for p in plan.parts:
        lines.append(f"{p.name:<18} {p.gb:>8.3f}  {p.kind:<10} {p.where:<6} {p.formula}")
    lines.append(f"{'peak per rank':<18} {plan.per_rank_gb:>8.3f}  (steps: persistent + max(forward, step) transients)")
    ph = plan.phases
    lines.append(f"{'load':<18} {ph['load']:>8.3f}  (weights + runtime + load)")
    lines.append(f"{'checkpoint':<18} {ph['checkpoint']:>8.3f}  (persistent + checkpoint)")
    lines.append(f"{'export':<18} {ph['export']:>8.3f}  (persistent + export)")
    lines.append(f"{'whole process':<18} {plan.process_per_rank_gb:>8.3f}  (the largest of steps, load, checkpoint, export)")
    if plan.host_per_rank_gb:
        lines.append(f"{'host per rank':<18} {plan.host_per_rank_gb:>8.3f}  (offloaded)")
    if plan.deepspeed_estimate_gb is not None:
        lines.append(f"DeepSpeed's estimate_zero3_model_states_mem_needs (no offload, every parameter trained): "
                     f"{plan.deepspeed_estimate_gb:.2f} GB per rank for model states")
    lines.append(plan.verdict)
    return "\n".join(lines)


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    ap = argparse.ArgumentParser(description="Predict per-rank memory of a TAMT search under ZeRO-3.")
    ap.add_argument("--model", "--model_name_or_path", dest="model", required=True)
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (default: zero3_bf16 on GPU)")
    ap.add_argument("--per_device_train_batch_size", type=int, default=32)
    ap.add_argument("--max_seq_length", type=int, default=128)
    ap.add_argument("--objective", default="kd", choices=["kd", "mlm", "mlm_kd"])
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--gpu_memory_gb", type=float, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.world_size < 1 or args.per_device_train_batch_size < 1 or args.max_seq_length < 1:
        ap.error("--world_size, --per_device_train_batch_size and --max_seq_length must be at least 1")

    def run():
        with _stdout_to_stderr():  # DeepSpeed logs to stdout; --json promises one JSON object there
            plan = estimate(PlanInput(model=args.model, world_size=args.world_size, deepspeed=args.deepspeed,
                                      per_device_train_batch_size=args.per_device_train_batch_size,
                                      max_seq_length=args.max_seq_length, objective=args.objective,
                                      gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                                      gpu_memory_gb=args.gpu_memory_gb))
        print(json.dumps(plan.as_dict()) if args.json else render(plan))

    return run_cli(run)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
