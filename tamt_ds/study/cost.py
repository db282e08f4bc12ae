"""Expected GPU-hours of a study's jobs, from FLOPs and an assumed GPU throughput.

    job FLOPs = tokens x FLOPs per token (closed form from the model's config.json, as tamt_ds.plan counts
                parameters) x passes, where a pass is one forward (backward = 2 forwards):
        TAMT-KD search   4   teacher forward + student forward + backward (scores get dL/dW_eff * W,
                             a weight-gradient matmul, so backward costs what a training backward costs)
        TAMT-MLM search  3   + the MLM decoder (2 h V per token) in each pass; MLM+KD 4 + decoder
        IMP              3   MLM training of every weight, + decoder
        fine-tuning      3   examples x max_seq_length tokens (padded length: an upper bound), epochs,
                             + one forward over the dev set per evaluation
        evaluation       1   (KD: + the dense forward once) over the held-out blocks
    GPU-hours = FLOPs / (GPUs x peak x MFU) / 3600, the peak and MFU from the config's `gpu` section.

The MFU defaults are assumptions, not measurements: 0.35 of the dense bf16 peak for a
ZeRO-3 search on 8 GPUs at 512 tokens (gathers overlap with compute) and 0.25 for
one-GPU fine-tuning at 128-384 tokens (small matmuls, evaluation, data loading).  Nothing here
reads a dataset: the GLUE / SQuAD sizes are the published train / dev sizes below.
"""
from __future__ import annotations

from dataclasses import dataclass

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts)
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "v100": 125.0, "l40s": 362.0}

# train / dev examples (GLUE: nyu-mll/glue; MNLI dev = matched + mismatched; SQuAD v1.1: rajpurkar/squad,
# questions -- a 384-token window with stride 128 gives ~1% more features, not counted)
TASK_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
              "qqp": (363846, 40430), "mnli": (392702, 19647), "qnli": (104743, 5463), "rte": (2490, 277),
              "wnli": (635, 71), "squad": (87599, 10570), "squad_v2": (130319, 11873)}


@dataclass
class GpuAssumptions:
    """A study's `gpu` section: the GPU and the fractions of its peak the jobs are assumed to reach."""
    name: str = "a100"  # a key of GPU_PEAK_TFLOPS
    search_mfu: float = 0.35
    finetune_mfu: float = 0.25

    @property
    def peak_flops(self) -> float:
        return GPU_PEAK_TFLOPS[self.name] * 1e12


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token of a BERT/RoBERTa backbone: 2 x every matmul weight + attention."""
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model: str) -> "ModelFlops":
        from tamt_ds.models import RANDOM_PREFIX, SHIPPED_CONFIGS, model_config

        shipped = SHIPPED_CONFIGS / f"{model.rstrip('/').split('/')[-1]}.json"
        config = model_config(RANDOM_PREFIX + shipped.stem if shipped.is_file() else model)  # no hub for known ones
        return cls(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size)

    def forward(self, seq_len: int) -> float:
        h, i = self.hidden, self.intermediate
        per_layer = 2 * (4 * h * h + 2 * h * i) + 4 * seq_len * h  # the 6 matrices; QK^T and AV
        return self.layers * per_layer

    def decoder(self) -> float:
        return 2 * self.hidden * (self.hidden + self.vocab)  # MLM head transform + tied decoder


PASSES = {"kd": 4, "mlm": 3, "mlm_kd": 4, "imp": 3}


def search_flops(m: ModelFlops, objective: str, steps: int, batch: int, seq_len: int) -> float:
    """A TAMT search (objective kd / mlm / mlm_kd) or IMP ("imp"), `batch` sequences a step (global)."""
    per_token = PASSES[objective] * m.forward(seq_len)
    if objective != "kd":
        per_token += 3 * m.decoder()
    return steps * batch * seq_len * per_token


def finetune_flops(m: ModelFlops, task: str, *, examples: int, seq_len: int, evaluations: int) -> float:
    """One seed: `examples` trained on (steps x global batch), `evaluations` forwards over the dev set."""
    dev = TASK_SIZES.get(task, (0, 1_000))[1]
    return (3 * examples + evaluations * dev) * seq_len * m.forward(seq_len)


def gpu_hours(flops: float, mfu: float, gpu: GpuAssumptions) -> float:
    """GPU-hours of a job of `flops` at `mfu` of each GPU's peak, on any number of GPUs (its wall
    hours are GPU-hours / GPUs)."""
    return flops / (gpu.peak_flops * mfu) / 3600


def describe(gpu: GpuAssumptions) -> str:
    return (f"assumed: {gpu.name.upper()} at {GPU_PEAK_TFLOPS[gpu.name]:g} TFLOP/s dense bf16 peak; searches and "
            f"IMP at {gpu.search_mfu:.0%} of it, fine-tuning and evaluation at {gpu.finetune_mfu:.0%}; FLOPs = "
            f"passes x (2 x matmul weights + attention) per token (tamt_ds/study/cost.py), fine-tuning at the "
            f"padded length; GLUE / SQuAD sizes as published")


class StudyGpuHours:
    """Expected GPU-hours of each kind of job (None without the config's gpu section)."""

    def __init__(self, cfg):  # a StudyConfig
        self.cfg, self.gpu = cfg, cfg.gpu
        self.model = ModelFlops.of(cfg.model_name_or_path) if cfg.gpu else None

    def _hours(self, flops: float, mfu: float) -> float | None:
        return gpu_hours(flops, mfu, self.gpu) if self.gpu else None

    def search(self, objective: str, args: dict, steps: int) -> float | None:
        if not self.gpu:
            return None
        from tamt_ds.search import SEARCH_MAX_SEQ_LENGTH

        batch = int(args.get("per_device_train_batch_size", 64 if objective != "imp" else 32)) * self.cfg.nproc
        batch *= int(args.get("gradient_accumulation_steps", 1))
        seq = int(args.get("max_seq_length", SEARCH_MAX_SEQ_LENGTH))
        return self._hours(search_flops(self.model, objective, steps, batch, seq), self.gpu.search_mfu)

    def evaluate(self, masks: int) -> float | None:
        if not self.gpu:
            return None
        e = self.cfg.evaluate
        seq = int(e.get("max_seq_length", 128))
        tokens = int(e.get("eval_blocks", 64)) * seq
        return self._hours((masks + 1) * tokens * self.model.forward(seq), self.gpu.finetune_mfu)

    def finetune(self, task: str, args: dict) -> float | None:
        if not self.gpu:
            return None
        from tamt_ds.study.runner import _finetune_steps, finetune_nproc  # the plan's own step count

        batch = int(args.get("per_device_train_batch_size", 32)) * finetune_nproc(self.cfg)
        batch *= int(args.get("gradient_accumulation_steps", 1))
        steps = _finetune_steps(args, task, finetune_nproc(self.cfg))
        evaluations = 1 + (steps // int(args["eval_steps"]) if args.get("eval_steps") else 0)
        flops = finetune_flops(self.model, task, examples=steps * batch, evaluations=evaluations,
                               seq_len=int(args.get("max_seq_length", 128)))
        return self._hours(len(self.cfg.finetune.seeds) * flops, self.gpu.finetune_mfu)
