"""Expected GPU-hours of a study's jobs, from FLOPs and an assumed GPU throughput.

    job FLOPs = tokens x FLOPs per token, counted by tamt_ds.mfu (the count the searches' MFU
                and cost.json use) on the job's model built from its config on the meta device:
        TAMT search      teacher forward (KD) + student forward + backward through the masked layers
        IMP              MLM training of every weight, the MLM head included
        fine-tuning      training of every weight over examples x max_seq_length tokens (padded
                         length: an upper bound), + one forward over the dev set per evaluation
        evaluation       one forward (KD: + the dense forward once) over the held-out blocks
    GPU-hours = FLOPs / (GPUs x peak x MFU) / 3600, the peak from mfu's datasheet table (bf16,
    fp16 where a GPU has no bf16) and the MFU from the config's `gpu` section.

The MFU defaults are assumptions, not measurements: 0.35 of the dense bf16 peak for a
ZeRO-3 search on 8 GPUs at 512 tokens (gathers overlap with compute) and 0.25 for
one-GPU fine-tuning at 128-384 tokens (small matmuls, evaluation, data loading).  Nothing here
reads a dataset: the GLUE / SQuAD sizes are the published train / dev sizes below.
"""
from __future__ import annotations

from dataclasses import dataclass

from tamt_ds import mfu

# train / dev examples (GLUE: nyu-mll/glue; MNLI dev = matched + mismatched; SQuAD v1.1: rajpurkar/squad,
# questions -- a 384-token window with stride 128 gives ~1% more features, not counted)
TASK_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
              "qqp": (363846, 40430), "mnli": (392702, 19647), "qnli": (104743, 5463), "rte": (2490, 277),
              "wnli": (635, 71), "squad": (87599, 10570), "squad_v2": (130319, 11873)}


@dataclass
class GpuAssumptions:
    """A study's `gpu` section: the GPU and the fractions of its peak the jobs are assumed to reach."""
    name: str = "a100"  # a row of tamt_ds.mfu.GPU_PEAK_TFLOPS, any case
    search_mfu: float = 0.35
    finetune_mfu: float = 0.25

    @property
    def peak_flops(self) -> float | None:
        return mfu.datasheet_peak(self.name, "bf16") or mfu.datasheet_peak(self.name, "fp16")


class JobFlops:
    """FLOPs per token of each kind of job on one model, from its config (no hub for the
    configs the project ships)."""

    def __init__(self, model: str):
        from tamt_ds.models import RANDOM_PREFIX, SHIPPED_CONFIGS, model_config

        shipped = SHIPPED_CONFIGS / f"{model.rstrip('/').split('/')[-1]}.json"
        self.config = model_config(RANDOM_PREFIX + shipped.stem if shipped.is_file() else model)
        self._models = {}

    def _model(self, job: str):
        if job not in self._models:
            self._models[job] = mfu.meta_model(self.config, job)
        return self._models[job]

    def training(self, job: str, seq_len: int) -> float:
        """Per token of a search (kd / mlm / mlm_kd), IMP ("imp") or fine-tuning ("finetune")."""
        return mfu.search_flops_per_token(self._model(job), job, seq_len=seq_len)

    def forward(self, seq_len: int) -> float:
        return mfu.forward_flops_per_token(self._model("kd"), seq_len=seq_len)


def search_flops(m: JobFlops, objective: str, steps: int, batch: int, seq_len: int) -> float:
    """A TAMT search (objective kd / mlm / mlm_kd) or IMP ("imp"), `batch` sequences a step (global)."""
    return steps * batch * seq_len * m.training(objective, seq_len)


def finetune_flops(m: JobFlops, task: str, *, examples: int, seq_len: int, evaluations: int) -> float:
    """One seed: `examples` trained on (steps x global batch), `evaluations` forwards over the dev set."""
    dev = TASK_SIZES.get(task, (0, 1_000))[1]
    return (examples * m.training("finetune", seq_len) + evaluations * dev * m.forward(seq_len)) * seq_len


def gpu_hours(flops: float, utilisation: float, gpu: GpuAssumptions) -> float:
    """GPU-hours of a job of `flops` at `mfu` of each GPU's peak, on any number of GPUs (its wall
    hours are GPU-hours / GPUs)."""
    return flops / (gpu.peak_flops * utilisation) / 3600


def describe(gpu: GpuAssumptions) -> str:
    return (f"assumed: {gpu.name.upper()} at {gpu.peak_flops / 1e12:g} TFLOP/s dense bf16 peak; searches and "
            f"IMP at {gpu.search_mfu:.0%} of it, fine-tuning and evaluation at {gpu.finetune_mfu:.0%}; FLOPs = "
            f"the model's matmuls per token (tamt_ds/mfu.py), fine-tuning at the "
            f"padded length; GLUE / SQuAD sizes as published")


class StudyGpuHours:
    """Expected GPU-hours of each kind of job (None without the config's gpu section)."""

    def __init__(self, cfg):  # a StudyConfig
        self.cfg, self.gpu = cfg, cfg.gpu
        self.model = JobFlops(cfg.model_name_or_path) if cfg.gpu else None

    def _hours(self, flops: float, utilisation: float) -> float | None:
        return gpu_hours(flops, utilisation, self.gpu) if self.gpu else None

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
