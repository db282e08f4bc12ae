"""Scaling study: per-rank peak memory, step time and tokens/s of mask search across model
sizes, ranks and ZeRO-3 configs, beside the memory model's prediction (tamt_ds/plan.py).

    python benchmarks/scaling.py run                 # the grid, one cell at a time; cells done are skipped
    python benchmarks/scaling.py run --redo          # measure every cell again (e.g. after a code change)
    python benchmarks/scaling.py report              # docs/scaling.md table + PNG plots from the result files
    python benchmarks/scaling.py gpu_summary ...     # the figures of scripts/gpu_check.sh (on a GPU node)

Each grid cell (model x ranks x config) is its own multi-process run (`cell`, launched here
with torchrun), so memory is measured per process and freed between cells, and one result
file per cell is written (`--results_dir`).  A cell is measured twice: the masked search
step (TAMT-KD: frozen weights, trained scores) and a dense step of the same model (MLM,
every weight trained), as separate runs.  Before a run the memory model predicts its peak;
a run that would not fit this machine's available memory is skipped and said so in the
table, and a running cell is stopped if the machine runs low (other jobs share it).

Peak memory per rank: CUDA max allocated on GPUs; on CPU the resident set's high-water
mark (VmHWM), reset after the warm-up step (/proc/self/clear_refs), so that the steps'
peak is measured apart from the load (the whole-process peak is recorded too).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # grid name -> --model_name_or_path
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "bert-base": "config:bert-base-uncased",
    "bert-large": "config:bert-large-uncased",
    "roberta-large": "config:roberta-large",
}
CONFIGS = ("zero3_cpu", "zero3_offload")  # a "+gc" suffix (e.g. zero3_cpu+gc) adds --gradient_checkpointing
GB = 1e9


# ---- one cell: runs inside every rank ------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
            f.write("5")


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def build(model_name: str, cfg: dict, *, mode: str, objective: str, gradient_checkpointing: bool):
    """(engine, masks) for a masked search step, or (engine, None) for a dense MLM step."""
    from tamt_ds import engine as eng
    from tamt_ds.masking import attach_masks
    from tamt_ds.models import enable_gradient_checkpointing, load_model

    with_head = mode == "dense" or "mlm" in objective
    model = load_model(model_name, with_mlm_head=with_head, ds_config=cfg)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if mode == "dense":
        return eng.build_engine(model, cfg, params=model.parameters(), lr=1e-5, weight_decay=0.0,
                                total_steps=10**6)[0], None
    # as in search.py: the MLM head (not the backbone) trains with the scores when the objective has MLM
    head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")] if with_head else []
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_masks(model, sparsity=0.7)
    masks.init_scores("magnitude")
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    params = masks.scores + [p for p in head if id(p) not in tied]
    for p in params:
        p.requires_grad_(True)
    return eng.build_engine(model, cfg, params=params, lr=1e-5, weight_decay=0.0, total_steps=10**6)[0], masks


def run_cell(args) -> int:
    import torch

    from tamt_ds import engine as eng, sharding
    from tamt_ds.host_memory import release_freed_memory_for
    from tamt_ds.objectives import compute_loss

    release_freed_memory_for(args.model)  # as search.py does
    eng.init_distributed()
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=args.batch, grad_accum=1, grad_clip=1.0)
    t0 = time.perf_counter()
    engine, masks = build(args.model, cfg, mode=args.mode, objective=args.objective,
                          gradient_checkpointing=args.gradient_checkpointing)
    load_s = time.perf_counter() - t0
    after_load = peak_memory_bytes()
    device = engine.device
    g = torch.Generator().manual_seed(sharding.rank())
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)  # valid in every vocabulary here
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {k: v.to(device) for k, v in batch.items()}
    objective = "mlm" if args.mode == "dense" else args.objective

    def step():
        if masks is None:
            loss = engine(**batch).loss
        else:
            loss = compute_loss(objective, engine, masks, batch)["loss"]
        engine.backward(loss)
        engine.step()

    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            reset_peak_memory()
        sharding.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sharding.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    mine = {
        "rank": sharding.rank(),
        "peak_steps_bytes": peak_memory_bytes(),
        # whole process (load, warm-up, steps): the kernel's high-water mark on CPU, CUDA's on GPU
        "peak_process_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "after_load_bytes": after_load,
        "step_s": statistics.median(times),
        "steps_s": times,
        "load_s": load_s,
    }
    if not torch.cuda.is_available():
        mine["rss_anon_bytes"] = _status_kb("RssAnon") * 1024
    ranks = sharding.gather_objects(mine)
    if sharding.rank() == 0:
        world = sharding.world_size()
        step_s = max(r["step_s"] for r in ranks)
        out = {"mode": args.mode, "objective": objective, "model": args.model, "world_size": world,
               "deepspeed": args.deepspeed, "batch": args.batch, "seq": args.seq, "steps": args.steps,
               "gradient_checkpointing": args.gradient_checkpointing, "device": str(device),
               "precision": str(eng.precision(cfg)), "ranks": ranks, "step_s": step_s,
               "tokens_per_s": args.batch * args.seq * world / step_s,
               "peak_steps_gb": max(r["peak_steps_bytes"] for r in ranks) / GB,
               "peak_process_gb": max(r["peak_process_bytes"] for r in ranks) / GB}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v for k, v in out.items() if k != "ranks"}))
    eng.shutdown()  # a rank that exits with a live gloo group can abort at interpreter shutdown
    return 0


# ---- the grid: runs in one plain process ---------------------------------------------------
def cell_name(model: str, config: str, ranks: int) -> str:
    return f"{model}__{config}__r{ranks}"


def config_file(config: str) -> tuple[str, bool]:
    """(DeepSpeed JSON path, gradient checkpointing) of a grid config label like zero3_cpu+gc."""
    name, _, extra = config.partition("+")
    return str(ROOT / "ds_configs" / f"{name}.json"), extra == "gc"


def predict(args, model: str, config: str, ranks: int, mode: str):
    from tamt_ds import plan

    path, gc = config_file(config)
    return plan.estimate(plan.PlanInput(
        model=MODELS[model], world_size=ranks, deepspeed=path, per_device_train_batch_size=args.batch,
        max_seq_length=args.seq, objective=args.objective, trainable="scores" if mode == "masked" else "all",
        gradient_checkpointing=gc, device=_device_kind()))


def _device_kind() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _wait_for_memory(need: float, wait_s: float) -> int:
    """Available memory, once it covers `need` or after `wait_s` (a shared machine's other jobs come and go)."""
    deadline = time.time() + wait_s
    while (free := _available_bytes()) < need and time.time() < deadline:
        time.sleep(10)
    return free


def launch(args, model: str, config: str, ranks: int, mode: str, out: Path) -> dict:
    """One torchrun of `cell`, watched: stopped (with its ranks) if the machine runs low on memory."""
    import psutil

    from tamt_ds.engine import free_port

    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)), "TOKENIZERS_PARALLELISM": "false"}
    path, gc = config_file(config)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), "cell", "--model", MODELS[model],
           "--deepspeed", path, "--mode", mode, "--objective", args.objective,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", str(out)] + (["--gradient_checkpointing"] if gc else [])
    log = out.with_suffix(".log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        low = None
        while proc.poll() is None:
            if time.time() - t0 > args.cell_timeout:
                low = f"stopped after {args.cell_timeout} s"
            elif psutil.virtual_memory().available < args.min_free_gb * GB:
                low = f"stopped: the machine's available memory fell below {args.min_free_gb} GB"
            if low:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.5)
    if low or proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-1500:] if log.exists() else ""
        return {"status": "failed", "reason": low or f"exit code {proc.returncode}", "log_tail": tail}
    return {"status": "ok", **json.loads(out.read_text())}


def run_grid(args) -> int:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for ranks in args.ranks:
            for config in args.configs:
                path = results / f"{cell_name(model, config, ranks)}.json"
                done = json.loads(path.read_text()) if path.exists() else {}
                for mode in args.modes:
                    if done.get(mode, {}).get("status") == "ok" and not args.redo:
                        continue
                    plan = predict(args, model, config, ranks, mode)
                    need = ranks * plan.per_rank_gb * GB * args.safety + 0.5 * GB
                    free = _wait_for_memory(need, args.wait_for_memory_s)
                    if need > free:
                        done[mode] = {"status": "skipped", "reason": f"needs ~{need / GB:.1f} GB (predicted "
                                      f"{plan.per_rank_gb:.1f} GB x {ranks} ranks), {free / GB:.1f} GB available"}
                    else:
                        print(f"{cell_name(model, config, ranks)} {mode}: predicted {plan.per_rank_gb:.2f} GB per rank, "
                              f"{free / GB:.1f} GB available", flush=True)
                        runs = Path(args.runs_dir)
                        runs.mkdir(parents=True, exist_ok=True)
                        done[mode] = launch(args, model, config, ranks, mode, runs / f"{path.stem}.{mode}.json")
                    done[mode]["predicted"] = plan.as_dict()
                    done[mode]["date"] = datetime.date.today().isoformat()
                    done[mode]["machine"] = machine()
                    print(f"  -> {done[mode]['status']}: {_summary(done[mode])}", flush=True)
                    path.write_text(json.dumps(done, indent=1))
    return 0


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return r.get("reason", "")
    return (f"peak/rank {r['peak_steps_gb']:.2f} GB (predicted {r['predicted']['per_rank_gb']:.2f}), "
            f"step {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tokens/s")


def machine() -> str:
    import psutil
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU")


# ---- report: table into docs/scaling.md, plots, targets -------------------------------------
BEGIN, END = "<!-- scaling:begin (written by benchmarks/scaling.py report) -->", "<!-- scaling:end -->"


def load_cells(results_dir: str) -> list[dict]:
    cells = []
    for path in sorted(Path(results_dir).glob("[!.]*__*__r*.json")):
        model, config, ranks = path.stem.split("__")
        cells.append({"model": model, "config": config, "ranks": int(ranks[1:]), **json.loads(path.read_text())})
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(cells, key=lambda c: (order.get(c["model"], 99), c["config"], c["ranks"]))


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def peak_gb(r: dict | None) -> float | None:
    """The whole process's peak per rank (load, warm-up and steps): what the OOM killer sees."""
    return r["peak_process_gb"] if _ok(r) else None


def model_error(r: dict | None) -> float | None:
    """Memory model against measurement: predicted / measured - 1."""
    return r["predicted"]["per_rank_gb"] / peak_gb(r) - 1 if _ok(r) else None


def _fmt(x, spec: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{unit}"


def table(cells: list[dict]) -> str:
    rows = ["| model | params | ranks | config | masked: peak/rank (steps only) | predicted | error | step | "
            "tokens/s | dense: peak/rank | predicted | error | step | masked/dense step |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        m, d = c.get("masked"), c.get("dense")
        params = (m or d)["predicted"]["params"]["backbone_and_head"] / 1e6

        def cols(r):
            if not r:
                return ["not run"] + ["—"] * 3
            if not _ok(r):
                return [f"{r['status']}: {r.get('reason', '')}", _fmt(r["predicted"]["per_rank_gb"], ".2f", " GB"),
                        "—", "—"]
            return [f"{peak_gb(r):.2f} GB ({r['peak_steps_gb']:.2f})", f"{r['predicted']['per_rank_gb']:.2f} GB",
                    f"{model_error(r):+.0%}", f"{r['step_s']:.2f} s"]

        mc, dc = cols(m), cols(d)
        ratio = m["step_s"] / d["step_s"] if _ok(m) and _ok(d) else None
        tokens = m["tokens_per_s"] if _ok(m) else None
        rows.append(f"| {c['model']} | {params:.0f}M | {c['ranks']} | {c['config']} | {' | '.join(mc)} | "
                    f"{_fmt(tokens, '.0f')} | {' | '.join(dc[:3])} | {dc[3]} | {_fmt(ratio, '.2f')} |")
    return "\n".join(rows)


def targets(cells: list[dict]) -> list[str]:
    """The issue's targets, each PASS / FAIL / NOT MEASURED, with the figures."""
    by = {(c["model"], c["config"], c["ranks"]): c for c in cells}
    out = []
    for config in sorted({c["config"] for c in cells if c["config"].startswith("zero3_cpu")}):
        one = peak_gb(by.get(("bert-large", config, 1), {}).get("masked"))
        two = peak_gb(by.get(("bert-large", config, 2), {}).get("masked"))
        out.append(f"bert-large search, 1 rank ({config}, 4 x 128): peak <= 11 GB: " +
                   ("NOT MEASURED" if one is None else f"{'PASS' if one <= 11 else 'FAIL'} ({one:.2f} GB)"))
        out.append(f"bert-large search, 2 ranks ({config}): per-rank peak <= 0.65 x the 1-rank peak: " +
                   ("NOT MEASURED" if one is None or two is None else
                    f"{'PASS' if two <= 0.65 * one else 'FAIL'} ({two:.2f} / {one:.2f} = {two / one:.2f})"))
    errors = [(c, mode, model_error(c.get(mode))) for c in cells for mode in ("masked", "dense")
              if model_error(c.get(mode)) is not None]
    worst = max(errors, key=lambda e: abs(e[2]), default=None)
    out.append("memory model within 20% of the measured peak on every measured cell: " +
               ("NOT MEASURED" if worst is None else
                f"{'PASS' if abs(worst[2]) <= 0.2 else 'FAIL'} ({len(errors)} runs; worst {worst[2]:+.0%}: "
                f"{worst[0]['model']} {worst[0]['config']} {worst[0]['ranks']} rank(s) {worst[1]})"))
    return out


def plots(cells: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    series = sorted({(c["config"], c["ranks"]) for c in cells})
    files = []
    for what, ylabel, fname in (("memory", "peak memory per rank (GB)", "memory_per_rank.png"),
                                ("step", "step time (s)", "step_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for config, ranks in series:
            pts = [(c["masked"]["predicted"]["params"]["backbone_and_head"] / 1e6, c) for c in cells
                   if c["config"] == config and c["ranks"] == ranks and "masked" in c]
            pts.sort(key=lambda p: p[0])
            label = f"{config}, {ranks} rank{'s' if ranks > 1 else ''}"
            if what == "memory":
                meas = [(x, peak_gb(c["masked"])) for x, c in pts if _ok(c["masked"])]
                pred = [(x, c["masked"]["predicted"]["per_rank_gb"]) for x, c in pts]
                line, = ax.plot(*zip(*meas), "o-", label=f"{label} measured") if meas else (None,)
                ax.plot(*zip(*pred), "x--", color=line.get_color() if line else None, alpha=0.6,
                        label=f"{label} predicted")
            else:
                masked = [(x, c["masked"]["step_s"]) for x, c in pts if _ok(c["masked"])]
                dense = [(x, c["dense"]["step_s"]) for x, c in pts if _ok(c.get("dense"))]
                line, = ax.plot(*zip(*masked), "o-", label=f"{label} masked search") if masked else (None,)
                if dense:
                    ax.plot(*zip(*dense), "s:", color=line.get_color() if line else None, label=f"{label} dense")
        ax.set_xlabel("model parameters (M)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"TAMT search, {cells[0]['masked']['batch']} x {cells[0]['masked']['seq']} tokens per rank"
                     if cells and "masked" in cells[0] else "TAMT search")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        files.append(out_dir / fname)
    return files


def report(args) -> int:
    cells = load_cells(args.results_dir)
    if not cells:
        print(f"no result files in {args.results_dir}: run `python benchmarks/scaling.py run` first", file=sys.stderr)
        return 2
    for c in cells:  # the memory model as it is now (a cell keeps the prediction made when it ran, too)
        for mode in ("masked", "dense"):
            if mode in c:
                c[mode]["predicted_at_run"] = c[mode]["predicted"]
                c[mode]["predicted"] = predict(args, c["model"], c["config"], c["ranks"], mode).as_dict()
    doc = Path(args.doc)
    pngs = plots(cells, doc.parent / "scaling")
    runs = [r for c in cells for r in (c.get("masked"), c.get("dense")) if r]
    dates = sorted({r["date"] for r in runs})
    machines = sorted({r["machine"] for r in runs})
    lines = [BEGIN, "",
             f"Measured {', '.join(dates)} on {'; '.join(machines)}, with "
             f"`python benchmarks/scaling.py run` (then `report`): TAMT-KD search step (sparsity 0.7) and a dense MLM "
             f"step, {args.batch} x {args.seq} tokens per rank, {args.warmup} warm-up + {args.steps} measured steps, "
             f"fp32 on `zero3_cpu`, bf16 on `zero3_offload`. Peak = the rank's resident-set high-water mark over the "
             f"whole process (load, warm-up, steps; in brackets: over the measured steps only), worst rank; predicted "
             f"= `tamt_ds/plan.py`; error = predicted / measured - 1. Step time: median over the measured steps, "
             f"slowest rank; tokens/s over all ranks.", "", table(cells), "", "Targets:", ""]
    lines += [f"- {t}" for t in targets(cells)]
    lines += ["", " ".join(f"![{p.stem}](scaling/{p.name})" for p in pngs), "", END]
    block = "\n".join(lines)
    text = doc.read_text() if doc.exists() else f"# Scaling\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + block + rest.split(END, 1)[1])
    print(table(cells))
    print("\n".join(targets(cells)))
    print(f"wrote {doc} and {', '.join(map(str, pngs))}")
    return 0


# ---- GPU check summary (scripts/gpu_check.sh) -----------------------------------------------
def peak_tflops(name: str) -> float | None:
    """The GPU's dense bf16 peak: PEAK_TFLOPS where its name is not in tamt_ds.mfu's table."""
    from tamt_ds import mfu

    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    peak = mfu.datasheet_peak(name, "bf16")
    return None if peak is None else peak / 1e12


def check_search_outputs(run: Path) -> list[str]:
    """The search's output contract (as tests/test_search_e2e.py checks it); returns the problems."""
    import torch
    from transformers import AutoModel

    from tamt_ds.models import resolve_model_path

    problems = [f"missing {n}" for n in ("mask.pt", "pruned_model", "metrics.jsonl", "run_config.json",
                                         "tensorboard", "checkpoints") if not (run / n).exists()]
    if problems:
        return problems
    cfg = json.loads((run / "run_config.json").read_text())
    mask = torch.load(run / "mask.pt", weights_only=True)
    pruned = AutoModel.from_pretrained(run / "pruned_model").state_dict()
    original, info = AutoModel.from_pretrained(resolve_model_path(cfg["search"]["model_name_or_path"]),
                                               output_loading_info=True)
    original = original.state_dict()
    sparsity = cfg["search"]["sparsity"]
    for key, keep in mask.items():
        if key in info["missing_keys"]:  # not in the checkpoint (a fresh pooler): nothing to compare with
            continue
        if int((~keep).sum()) != int(keep.numel() * sparsity):
            problems.append(f"{key}: {int((~keep).sum())} pruned, expected {int(keep.numel() * sparsity)}")
        if not (pruned[key][~keep] == 0).all() or not torch.equal(pruned[key][keep], original[key][keep]):
            problems.append(f"{key}: pruned model is not the original weights with exact zeros where pruned")
    if cfg.get("random_weights") and "tamt_random_weights" not in json.loads((run / "pruned_model" / "config.json").read_text()):
        problems.append("pruned_model/config.json does not say its weights are random")
    return problems


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def check_imp_outputs(level: Path, sparsity: float) -> list[str]:
    """An IMP level's mask: written, exactly int(numel * level) pruned per matrix."""
    import torch

    if not (level / "mask.pt").exists():
        return [f"{level}/mask.pt missing"]
    return [f"{key}: {int((~keep).sum())} pruned, expected {int(keep.numel() * sparsity)}"
            for key, keep in torch.load(level / "mask.pt", weights_only=True).items()
            if int((~keep).sum()) != int(keep.numel() * sparsity)]


def gpu_summary(args) -> int:
    import torch

    from tamt_ds import gpu_check, mfu, plan
    from tamt_ds.models import model_config

    out = Path(args.out)
    search_run, ft_run = out / "search", out / "finetune"
    problems = [f"search: {p}" for p in check_search_outputs(search_run)]
    if not (ft_run / "results.json").exists():
        problems.append("finetune: results.json missing")
    problems += [f"kill + --resume (bf16): {p}" for p in gpu_check.resume_problems(
        _read(out / "resume.log"), out / "resume", max_steps=30)]
    problems += [f"IMP round (zero3_offload): {p}" for p in check_imp_outputs(out / "imp" / "0.1", 0.1)]
    problems += [f"evaluate_mask: {p}" for p in gpu_check.evaluate_mask_problems(
        {"search mask": out / "eval_search.json", "IMP mask": out / "eval_imp.json", "none": out / "eval_none.json"})]
    fp16_checked = (out / "fp16").exists()
    if fp16_checked:
        problems += [f"fp16 kill + --resume: {p}" for p in gpu_check.resume_problems(
            _read(out / "fp16_resume.log"), out / "fp16_resume", max_steps=20)]
        problems += [f"fp16: {p}" for p in gpu_check.loss_scaler_problems(out / "fp16" / "checkpoints" / "step20",
                                                                         out / "fp16_resume" / "checkpoints" / "step20")]
    rows = [json.loads(l) for l in (search_run / "metrics.jsonl").read_text().splitlines() if "perf/tokens_per_s" in l]
    timed = max(rows, key=lambda r: r["step"])  # steps 21-30: warmed up, no threshold reset, eval or save inside
    tokens_per_s = timed["perf/tokens_per_s"]
    rank0_alloc = gpu_check.mib_to_gb(max(r.get("perf/gpu_max_allocated_mb", 0) for r in rows))
    flops = mfu.search_flops_per_token(mfu.meta_model(model_config(args.model), "kd"), "kd", seq_len=args.seq)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    peak = peak_tflops(name)
    utilisation = tokens_per_s * flops / (args.world_size * peak * 1e12) if peak else None
    per_gpu, unreadable = {}, 0
    for phase in ("search", "finetune"):
        peaks, bad = gpu_check.memory_peaks_gb(_read(out / f"nvidia_smi_{phase}.csv"), args.gpus.split(","))
        unreadable += bad
        if peaks:
            per_gpu[phase] = peaks
    predicted = plan.estimate(plan.PlanInput(model=args.model, world_size=args.world_size, deepspeed=args.deepspeed,
                                             per_device_train_batch_size=args.batch, max_seq_length=args.seq,
                                             device="gpu", gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 1e9
                                             if torch.cuda.is_available() else None))
    summary = {"date": datetime.date.today().isoformat(), "device": f"{args.world_size} x {name}",
               "search_tokens_per_s": tokens_per_s, "model_flops_per_token": flops, "peak_tflops_bf16": peak,
               "mfu": utilisation, "rank0_max_allocated_gb": rank0_alloc, "per_gpu_peak_used_gb": per_gpu,
               "predicted_per_rank_gb": predicted.per_rank_gb, "predicted_parts_gb": predicted.as_dict()["parts"],
               "prediction_error": predicted.per_rank_gb / rank0_alloc - 1 if rank0_alloc else None,
               "verdict": predicted.verdict, "nvidia_smi_unreadable_samples": unreadable,
               "fp16_checked": fp16_checked, "problems": problems}
    (out / "gpu_summary.json").write_text(json.dumps(summary, indent=1))
    md = [f"GPU check {summary['date']}, {summary['device']}: `scripts/gpu_check.sh` (bf16, {args.model}, "
          f"{args.batch} x {args.seq} tokens per GPU, 30 search steps + 30 masked fine-tuning steps)", "",
          "| figure | value |", "| --- | --- |",
          f"| search tokens/s (all GPUs, steps 21-30) | {tokens_per_s:.0f} |",
          f"| model FLOPs per token (teacher fwd + student fwd + bwd) | {flops / 1e9:.2f} GFLOP |",
          f"| MFU (vs {peak} TFLOPS bf16 per GPU) | {_fmt(utilisation, '.1%')} |",
          f"| rank 0 CUDA max allocated (search) | {rank0_alloc:.2f} GB |",
          f"| memory model's prediction (per rank) | {predicted.per_rank_gb:.2f} GB ({_fmt(summary['prediction_error'], '+.0%')}) |"]
    for phase, gpus in per_gpu.items():
        md.append(f"| nvidia-smi peak used per GPU, {phase} | "
                  f"{', '.join(f'GPU{i} {v:.1f} GB' for i, v in sorted(gpus.items()))} |")
    md.append(f"| output contract, kill + --resume, IMP (offload), evaluate_mask"
              f"{', fp16 loss scaler' if fp16_checked else ' (no fp16 on this GPU)'} | "
              f"{'OK' if not problems else '; '.join(problems)} |")
    (out / "gpu_summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(plan.render(predicted))
    return 1 if problems else 0


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch", type=int, default=4, help="per-rank batch (blocks)")
    common.add_argument("--seq", type=int, default=128, help="tokens per block")
    common.add_argument("--objective", default="kd", choices=["mlm", "kd", "mlm_kd"])
    common.add_argument("--steps", type=int, default=3, help="measured steps (after the warm-up)")
    common.add_argument("--warmup", type=int, default=1)
    common.add_argument("--results_dir", default=str(ROOT / "docs" / "scaling" / "cells"))

    grid = sub.add_parser("run", parents=[common], help="run the grid")
    grid.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    grid.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    grid.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS))
    grid.add_argument("--modes", type=lambda s: s.split(","), default=["masked", "dense"],
                      help="masked (the search step) and/or dense (MLM, every weight trained)")
    grid.add_argument("--redo", action="store_true", help="measure cells already done again")
    grid.add_argument("--runs_dir", default=str(ROOT / "outputs" / "scaling_runs"),
                      help="each run's raw output and log")
    grid.add_argument("--safety", type=float, default=1.25, help="skip a run unless predicted x this fits")
    grid.add_argument("--min_free_gb", type=float, default=1.0, help="stop a running cell below this")
    grid.add_argument("--wait_for_memory_s", type=float, default=900,
                      help="wait this long for enough available memory before skipping a run")
    grid.add_argument("--cell_timeout", type=int, default=3600)

    cell = sub.add_parser("cell", parents=[common], help="one measurement (launched by `run`, in every rank)")
    cell.add_argument("--model", required=True)
    cell.add_argument("--deepspeed", required=True)
    cell.add_argument("--mode", choices=["masked", "dense"], default="masked")
    cell.add_argument("--gradient_checkpointing", action="store_true")
    cell.add_argument("--out", required=True)
    cell.add_argument("--local_rank", type=int, default=-1)

    rep = sub.add_parser("report", parents=[common], help="table into docs/scaling.md, PNG plots")
    rep.add_argument("--doc", default=str(ROOT / "docs" / "scaling.md"))

    gpu = sub.add_parser("gpu_summary", parents=[common], help="figures of scripts/gpu_check.sh")
    gpu.add_argument("--out", required=True, help="the check's output directory (search/, finetune/, nvidia_smi_*.csv)")
    gpu.add_argument("--model", required=True)
    gpu.add_argument("--deepspeed", required=True)
    gpu.add_argument("--world_size", type=int, required=True)
    gpu.add_argument("--gpus", required=True, help="nvidia-smi indices of the GPUs used, e.g. 0,1 (python -m tamt_ds.gpu_check visible)")

    args = ap.parse_args(argv)
    if args.command == "gpu_summary":
        return gpu_summary(args)
    if args.command == "cell":
        return run_cell(args)
    if args.command == "run":
        unknown = set(args.models) - set(MODELS)
        if unknown:
            ap.error(f"unknown model(s) {sorted(unknown)}: use {', '.join(MODELS)}")
        return run_grid(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
