"""launchers/study.py end to end on a tiny model and tiny local tasks: every stage as a real
subprocess, a hard kill and a resume that redoes nothing finished, study.json rows, the
correlations against the table, the figures; the search-budget and train-examples axes and the
MLM-loss panel (the tiny model has a pre-trained MLM head, made and saved here); the config's
one-line errors; and the rule that no dev or test input of the embedded study's tasks is in the
shipped upstream text."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

LAUNCHER = ROOT / "launchers" / "study.py"
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():  # CI lays shared/ beside the clone; sessions have /work/shared
    SHARED = Path("/work/shared/data")
SAMPLE = ROOT / "tamt_ds" / "data" / "sample"


def write_task(root: Path, name: str, pair: bool, n_train: int = 40, n_dev: int = 16) -> None:
    words = ["run", "walk", "think", "see", "move", "grow", "speak", "write", "hold", "turn"]
    root = root / name
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("validation", n_dev), ("test", n_dev)):
        with open(root / f"{split}.tsv", "w") as f:
            f.write("sentence1\tsentence2\tlabel\n" if pair else "sentence\tlabel\n")
            for i in range(n):
                a, b = words[i % 10], words[(i * 3 + len(split)) % 10]
                text = f"to {a} or {b} in the {split} {i}"
                f.write(f"{text}\t{b} {a} again\t{i % 2}\n" if pair else f"{text}\tverb.{'ab'[i % 2]}\n")


def tiny_config(tmp: Path, model: str) -> Path:
    data = tmp / "tasks"
    write_task(data, "single", pair=False)
    write_task(data, "pairs", pair=True)
    cfg = {
        "name": "tiny", "output_dir": str(tmp / "study"), "model_name_or_path": model,
        "deepspeed": "ds_configs/zero3_cpu.json", "parallel_jobs": 2,
        "methods": ["tamt-kd", "imp", "omp", "random"], "sparsities": [0.2, 0.4], "mask_seeds": [1],
        "search": {"max_steps": {0.2: 3, 0.4: 4}, "per_device_train_batch_size": 4, "max_seq_length": 32, "validation_blocks": 4,
                   "save_steps": 2, "eval_steps": 4, "logging_steps": 2, "threshold_reset_steps": 2,
                   "learning_rate": 5e-3},
        "imp": {"prune_interval": 2, "per_device_train_batch_size": 4, "max_seq_length": 32, "validation_blocks": 4,
                "learning_rate": 1e-3},
        "evaluate": {"eval_blocks": 8, "max_seq_length": 32, "per_device_eval_batch_size": 4},
        "finetune": {"tasks": ["single", "pairs"], "task_data_dir": str(data), "seeds": [1, 2],
                     "args": {"max_steps": 3, "max_seq_length": 32, "per_device_train_batch_size": 8,
                              "eval_steps": 0, "learning_rate": 1e-3},
                     "task_args": {"pairs": {"max_steps": 2, "per_device_train_batch_size": 4}}},
        # the two axes, one small point each: a snapshot at step 2 of the 4-step search, IMP every step
        # (main: every 2), TAMT and OMP masks fine-tuned on 8 of the 40 train examples
        "search_budget": {"snapshot_steps": [2], "imp_prune_intervals": [1], "sparsities": [0.4], "tasks": ["single"]},
        "train_examples": {"sizes": [8], "methods": ["tamt-kd", "omp"], "sparsities": [0.4],
                           "tasks": ["single"]},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_study(config: Path, *extra, timeout: int = 2400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), "--config", str(config), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study killed (SIGKILL) once its first fine-tuning result exists, then run again; its model
    is a tiny BERT with a pre-trained MLM head (as bert-base-uncased has), saved here."""
    from tests.tiny_bert_mlm import make_tiny_bert_mlm

    tmp = tmp_path_factory.mktemp("study")
    config = tiny_config(tmp, make_tiny_bert_mlm(str(tmp / "tiny_bert_mlm")))
    out = tmp / "study"
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 1500
    first = None
    while time.time() < deadline and proc.poll() is None:
        found = sorted((out / "finetune").glob("*/*/results.json")) if (out / "finetune").is_dir() else []
        done = [p for p in found if json.loads(p.read_text() or "{}").get("complete")]
        if done:
            first = done[0]
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and its running job, mid-study
            break
        time.sleep(0.2)
    killed_output = proc.communicate()[0]
    assert first is not None, f"no fine-tuning result appeared ({proc.returncode}):\n{killed_output[-4000:]}"
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("masks/**/mask.pt"), *out.glob("eval/*.json"), first]}
    resumed = run_study(config)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return {"out": out, "config": config, "stamps": stamps, "first": first, "killed": killed_output,
            "resumed": resumed.stdout}


def test_resume_redoes_nothing_finished(study):
    log = study["resumed"]
    assert "[1/" in study["killed"] and "finetune" in study["killed"]  # progress: which job, how many
    for path, stamp in study["stamps"].items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    jobs = [l for l in log.splitlines() if l.startswith("[")]  # "[i/n] stage: job (est. ...)"
    assert jobs and all(" finetune: " in l for l in jobs), jobs  # masks and evaluations were all done
    task_dir = study["first"].parent.name
    cell = study["first"].parent.parent.name
    assert not any(f"finetune {cell} on" in l and task_dir.removeprefix("local-") in l.split(" on ")[1]
                   for l in log.splitlines() if l.startswith("[")), "a finished fine-tuning task ran again"


def test_masks_levels_and_rows(study):
    import torch

    out = study["out"]
    for s in ("0.2", "0.4"):  # every method's mask at every sparsity, same matrix set, exact sparsity
        masks = [torch.load(p, weights_only=True) for p in
                 (out / f"masks/tamt-kd_s{s}_m1/mask.pt", out / f"masks/imp_m1/{s}/mask.pt",
                  out / f"masks/omp_s{s}/mask.pt", out / f"masks/random_s{s}_m1/mask.pt")]
        assert all(m.keys() == masks[0].keys() for m in masks) and len(masks[0]) == 14
        for m in masks:
            assert all(int((~v).sum()) == int(v.numel() * float(s)) for v in m.values())
    for s, steps in (("0.2", 3), ("0.4", 4)):  # a per-sparsity search argument reached its search
        run = json.loads((out / f"masks/tamt-kd_s{s}_m1/run_config.json").read_text())
        assert run["search"]["max_steps"] == steps
    for task, steps, batch in (("single", 3, 8), ("pairs", 2, 4)):  # each task's own protocol, every mask alike
        for results in out.glob(f"finetune/*/local-{task}/results.json"):
            run = json.loads(results.read_text())
            assert [s["steps"] for s in run["per_seed"]] == [steps, steps], results
            assert run["args"]["per_device_train_batch_size"] == batch, results
    all_rows = json.loads((out / "study.json").read_text())
    assert isinstance(all_rows, list)
    for r in all_rows:
        assert {"method", "sparsity", "task", "metric", "mean", "std", "kd_loss", "axis", "search_steps",
                "search_tokens", "train_examples"} <= r.keys()
    rows = [r for r in all_rows if r["axis"] == "main"]
    assert all(r["train_examples"] is None for r in rows)
    cells = {(r["method"], r["sparsity"], r["task"], r["split"]) for r in rows}
    for method in ("tamt-kd", "imp", "omp", "random"):
        for s in (0.2, 0.4):
            for task in ("single", "pairs", "average"):
                for split in ("dev", "test"):
                    assert (method, s, task, split) in cells
    assert ("dense", 0.0, "average", "test") in cells
    for r in rows:
        assert r["n"] == 2 and len(r["values"]) == 2  # 2 fine-tuning seeds x 1 mask seed
        assert r["kd_loss"] is not None and (r["kd_loss"] > 0 or r["method"] == "dense")
        # the row's numbers are the fine-tuning harness's own
        if r["task"] != "average":
            cell = "dense" if r["method"] == "dense" else \
                f"{r['method']}_s{r['sparsity']:g}" + ("" if r["method"] == "omp" else "_m1")
            res = json.loads((out / "finetune" / cell / f"local-{r['task']}" / "results.json").read_text())
            assert res["best"][r["metric"]]["values"] == r["values"]
            ev = json.loads((out / "eval" / f"{cell}.json").read_text())
            assert ev["kd_loss"] == r["kd_loss"]
    main_table = (out / "study.md").read_text().split("Spearman correlation")[0]  # the axes' tables follow it
    assert main_table.count("| tamt-kd |") == 2


def test_correlations_match_the_table(study):
    from scipy.stats import spearmanr

    out = study["out"]
    rows = [r for r in json.loads((out / "study.json").read_text()) if r["axis"] == "main"]
    corr = json.loads((out / "correlations.json").read_text())
    for s in (0.2, 0.4):
        pts = [(r["kd_loss"], r["mean"]) for r in rows
               if r["task"] == "average" and r["split"] == "test" and r["sparsity"] == s and r["method"] != "dense"]
        c = next(c for c in corr if c["loss"] == "kd_loss" and c["sparsity"] == s)
        assert c["n"] == len(pts) == 4
        rho = spearmanr(*zip(*pts)).statistic
        assert (c["rho"] is None and rho != rho) or c["rho"] == pytest.approx(rho)
        if c["low"] is not None:
            assert -1 <= c["low"] <= c["high"] <= 1
    # the model has a pre-trained MLM head: MLM loss measured for every mask and correlated like KD
    for s in (0.2, 0.4, "all"):
        c = next(c for c in corr if c["loss"] == "mlm_loss" and c["sparsity"] == s)
        assert c["n"] == (8 if s == "all" else 4)
    for r in rows:
        cell = "dense" if r["method"] == "dense" else \
            f"{r['method']}_s{r['sparsity']:g}" + ("" if r["method"] == "omp" else "_m1")
        ev = json.loads((out / "eval" / f"{cell}.json").read_text())
        assert ev["mlm_head"] == "pre-trained" and r["mlm_loss"] == ev["mlm_loss"] > 0
        assert r["mlm_accuracy"] == ev["mlm_accuracy"]
    assert "| MLM loss |" in (out / "study.md").read_text()


def drawn_pixels(path: Path):
    """The figure's RGB pixels, after checking it shows more than axes on a blank canvas."""
    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(path)[..., :3]
    assert rgb.shape[0] > 200 and rgb.shape[1] > 300, path
    background = rgb[0, 0]
    inked = np.abs(rgb - background).max(axis=-1) > 0.1
    coloured = rgb.max(axis=-1) - rgb.min(axis=-1) > 0.15  # data (markers, lines, cells); axes and text are grey
    assert inked.mean() > 0.01, (path, inked.mean())
    assert coloured.mean() > 0.0005, (path, coloured.mean())  # a tiny study: few points (0.0015 seen)
    assert rgb.std() > 0.02, path
    return rgb


def test_figures_written_and_plot_only(study):
    import numpy as np

    out = study["out"]
    names = ["fig_downstream_vs_sparsity.png", "fig_downstream_vs_kd_loss.png", "fig_downstream_vs_mlm_loss.png",
             "fig_mask_overlap_s0.2.png", "fig_mask_overlap_s0.4.png", "fig_sparsity_profile.png",
             "fig_search_efficiency.png", "fig_data_scarcity.png"]
    drawn = {name: drawn_pixels(out / name) for name in names}
    rows = (out / "study.json").read_text()
    for name in names:
        (out / name).unlink()
    proc = run_study(study["config"], "--plot-only", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job(s) to run" not in proc.stdout
    for name in names:  # the same pictures, drawn again from the recorded results alone
        assert np.array_equal(drawn_pixels(out / name), drawn[name]), name
    assert (out / "study.json").read_text() == rows

    # --plot-only reads the results as they are now: a changed evaluation moves its point
    ev_path = out / "eval" / "tamt-kd_s0.2_m1.json"
    original = ev_path.read_text()
    ev = json.loads(original)
    ev["kd_loss"] *= 3
    ev_path.write_text(json.dumps(ev))
    try:
        proc = run_study(study["config"], "--plot-only", timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not np.array_equal(drawn_pixels(out / "fig_downstream_vs_kd_loss.png"),
                                  drawn["fig_downstream_vs_kd_loss.png"])
        assert np.array_equal(drawn_pixels(out / "fig_sparsity_profile.png"), drawn["fig_sparsity_profile.png"])
        assert {r["kd_loss"] for r in json.loads((out / "study.json").read_text())
                if r["method"] == "tamt-kd" and r["sparsity"] == 0.2} == {ev["kd_loss"]}
    finally:
        ev_path.write_text(original)
        assert run_study(study["config"], "--plot-only", timeout=600).returncode == 0  # as the other tests expect
    assert (out / "study.json").read_text() == rows


def test_search_budget_axis(study):
    """A snapshot of the 4-step search at step 2 and IMP every step are points of the axis, each with
    what it cost; the main cells carry their own cost (OMP and random: none)."""
    import torch

    out = study["out"]
    snap = torch.load(out / "masks/tamt-kd_s0.4_m1/snapshots/2/mask.pt", weights_only=True)
    assert all(int((~v).sum()) == int(v.numel() * 0.4) for v in snap.values()) and len(snap) == 14
    final = torch.load(out / "masks/tamt-kd_s0.4_m1/mask.pt", weights_only=True)
    assert snap.keys() == final.keys()
    rows = [r for r in json.loads((out / "study.json").read_text()) if r["split"] == "test"]

    def row(axis, method, steps, task="single"):
        found = [r for r in rows if (r["axis"], r["method"], r["sparsity"], r["task"], r["search_steps"])
                 == (axis, method, 0.4, task, steps)]
        assert len(found) == 1, (axis, method, steps, found)
        return found[0]

    for axis, method, steps, folder, cell in (
            ("search_budget", "tamt-kd", 2, "masks/tamt-kd_s0.4_m1/snapshots/2", "tamt-kd_s0.4_m1_step2"),
            ("main", "tamt-kd", 4, "masks/tamt-kd_s0.4_m1", "tamt-kd_s0.4_m1"),
            ("search_budget", "imp", 4 * 1, "masks/imp_m1_every1/0.4", "imp_s0.4_m1_every1"),  # 4 rounds x 1 step
            ("main", "imp", 4 * 2, "masks/imp_m1/0.4", "imp_s0.4_m1")):
        r, cost = row(axis, method, steps), json.loads((out / folder / "cost.json").read_text())
        assert r["search_tokens"] == cost["search_tokens"] > 0 and r["search_flops"] == cost["search_flops"] > 0
        assert r["search_device_seconds"] == cost["search_device_seconds"] > 0
        assert r["train_examples"] is None and r["kd_loss"] > 0
        res = json.loads((out / "finetune" / cell / "local-single" / "results.json").read_text())
        assert res["best"][r["metric"]]["values"] == r["values"] and res["mask"].endswith("mask.pt")
    # a snapshot's cost is that of its steps: tokens grow with the search (4 blocks of <= 32 tokens a step)
    assert row("search_budget", "tamt-kd", 2)["search_tokens"] < row("main", "tamt-kd", 4)["search_tokens"] <= 4 * 4 * 32
    assert not any(r["axis"] == "search_budget" and r["task"] == "pairs" for r in rows)  # the axis's tasks only
    omp = row("main", "omp", 0)
    assert omp["search_tokens"] == 0 and omp["search_flops"] == 0
    assert all(r["search_steps"] is None for r in rows if r["method"] == "dense")
    md = (out / "study.md").read_text()
    assert "Search budget" in md and "| tamt-kd | 0.4 | single | 2 |" in md


def test_train_examples_axis(study):
    """TAMT's and OMP's masks fine-tuned on the same 8 examples for a seed (another 8 for the other
    seed), recorded per seed; the rows carry N and the figure's differences are paired by seed."""
    out = study["out"]
    runs = {m: json.loads((out / "finetune" / cell / "n8" / "local-single" / "results.json").read_text())
            for m, cell in (("tamt-kd", "tamt-kd_s0.4_m1"), ("omp", "omp_s0.4"))}
    seen = {m: [(s["seed"], s["train_examples"], s["train_sha256"]) for s in r["per_seed"]] for m, r in runs.items()}
    assert seen["tamt-kd"] == seen["omp"]
    (_, n1, sha1), (_, n2, sha2) = seen["omp"]
    assert n1 == n2 == 8 and sha1 != sha2  # the subset is drawn from the fine-tuning seed
    full = json.loads((out / "finetune/omp_s0.4/local-single/results.json").read_text())
    assert [s["train_examples"] for s in full["per_seed"]] == [40, 40]
    assert all(r["args"]["train_subset"] == 8 for r in runs.values()) and full["args"]["train_subset"] is None
    rows = [r for r in json.loads((out / "study.json").read_text()) if r["axis"] == "train_examples"]
    assert {(r["method"], r["sparsity"], r["task"], r["train_examples"]) for r in rows if r["split"] == "test"} \
        == {(m, 0.4, t, 8) for m in ("tamt-kd", "omp") for t in ("single", "average")}
    for r in rows:
        if r["task"] == "single":
            assert r["values"] == runs[r["method"]]["best"][r["metric"]]["values"]
    assert "| omp | 0.4 | single | 8 |" in (out / "study.md").read_text()


@pytest.mark.parametrize("section, key, value, refused", [
    ("finetune", "learning_rate", 2e-3, "local-single was run with learning_rate 0.001, the config says 0.002"),
    ("search", "learning_rate", 1e-2, "tamt-kd_s0.2_m1 was run with learning_rate 0.005, the config says 0.01"),
    ("imp", "prune_interval", 3, "imp_m1 was run with prune_interval 2, the config says 3"),
    ("search", "logging_steps", 1, None),  # how often a search logs: its mask is the same
])
def test_edited_protocol_refused_not_mixed(study, tmp_path, section, key, value, refused):
    """Finished cells of an edited config are not taken as the new protocol's results."""
    cfg = yaml.safe_load(study["config"].read_text())
    (cfg["finetune"]["args"] if section == "finetune" else cfg[section])[key] = value
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    proc = run_study(edited, "--dry-run", timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    if refused is None:
        assert proc.returncode == 0 and "0 job(s) to run" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode == 2 and len(errors) == 1 and refused in errors[0], proc.stderr[-2000:]
        assert "delete it to redo it" in errors[0]


@pytest.mark.parametrize("change, message", [
    ({"methods": ["tamt-kd", "magic"]}, "unknown method(s) ['magic']"),
    ({"sparsities": [0.25]}, "multiples of prune_fraction"),
    ({"search": {"sparsity": 0.3}}, "set by the study"),
    ({"search": {"max_steps": {0.7: 20}}}, "max_steps is a per-sparsity mapping without a value for [0.5]"),
    ({"finetune": {"tasks": ["nosuchtask"], "task_data_dir": "/nonexistent"}}, "not found"),
    ({"launcher": "slurm"}, "launcher must be"),
    ({"finetune": {"task_args": {"wic": {"max_steps": 5}}}}, "finetune.task_args must map tasks of finetune.tasks"),
    ({"search": {"max_steps": 20}, "search_budget": {"snapshot_steps": [10, 20]}},
     "search_budget.snapshot_steps [20] are not before the search's end at sparsity 0.5"),
    ({"search_budget": {"imp_prune_intervals": [20]}}, "repeats imp.prune_interval (20)"),
    ({"train_examples": {"sizes": [0, 100]}}, "train_examples.sizes must be a list of distinct whole numbers >= 1"),
    ({"train_examples": {"sizes": [100], "methods": ["omp"]}}, "train_examples.methods must be a list of the study's"),
    ({"search_budget": {"snapshot_stepz": [10]}}, "search_budget: unknown key(s) ['snapshot_stepz']"),
])
def test_bad_config_one_line(tmp_path, change, message):
    cfg = {"methods": ["tamt-kd", "imp"], "sparsities": [0.5], "output_dir": str(tmp_path / "o"), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_study(path, "--dry-run", timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_no_dev_or_test_input_of_the_tasks_in_the_upstream_sample():
    """The embedded study's upstream text (the shipped sample) holds train inputs of supersense_verb
    and wic_wn (without labels), and none of their dev or test inputs, nor any of supersense_noun's
    (built by the project; its glosses are not in the sample at all); every task of the embedded
    study is checked."""
    sample = set()
    for f in SAMPLE.glob("*.txt"):
        sample |= {line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    built = ROOT / "tamt_ds" / "data" / "tasks"
    columns = {"supersense_verb": (SHARED, ["sentence"], True), "wic_wn": (SHARED, ["sentence1", "sentence2"], True),
               "supersense_noun": (built, ["sentence"], False)}
    assert set(yaml.safe_load((ROOT / "studies" / "embedded.yaml").read_text())["finetune"]["tasks"]) <= set(columns)
    for task, (root, cols, train_in_sample) in columns.items():
        for split in ("validation", "test"):
            with open(root / task / f"{split}.tsv", encoding="utf-8") as f:
                inputs = {row[c].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                          for c in cols}
            leaked = inputs & sample
            assert not leaked, f"{task}/{split}: {len(leaked)} inputs in the sample, e.g. {sorted(leaked)[:3]}"
        with open(root / task / "train.tsv", encoding="utf-8") as f:
            train = {row[c].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) for c in cols}
        if train_in_sample:
            assert len(train & sample) > 0.5 * len(train)  # the check can fail: train inputs are there



def test_embedded_study_plan_fits_its_hour(tmp_path):
    """`make study`'s printed plan (the budget section's per-unit CPU costs, measured on this
    machine kind) stays within the config's 60 minutes: a longer protocol or a bigger grid must
    be paid for elsewhere."""
    cfg = yaml.safe_load((ROOT / "studies" / "embedded.yaml").read_text())
    cfg["finetune"]["task_data_dir"] = str(SHARED)  # ../shared/data, or the sessions' /work/shared
    config = tmp_path / "embedded.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--config", str(config), "--dry-run",
                           "--output_dir", str(tmp_path / "never_written")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = next(l.split() for l in proc.stdout.splitlines() if l.strip().startswith("total"))
    assert total[1] != "0.0" and float(total[1]) <= float(total[3]) == 60, proc.stdout
    assert not (tmp_path / "never_written").exists()

def test_search_without_max_steps_is_budgeted_at_the_search_default(tmp_path):
    """A study that leaves search.max_steps out runs the search's own default: its budget must count
    those steps, not a copy of the default that went stale (it counted 120 while the search ran 270)."""
    from tamt_ds.search import SearchArguments
    from tamt_ds.study.config import load_config
    from tamt_ds.study.runner import plan

    path = tiny_config(tmp_path, "some/model")
    raw = yaml.safe_load(path.read_text())
    del raw["search"]["max_steps"], raw["search_budget"]  # (the axis' snapshot must fall before the end)
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path))
    searches = [j for j in plan(cfg)[0] if j.script == "launchers/search.py"]
    b = cfg.budget
    assert searches and all(j.cpu_s == pytest.approx(b.process_start_cpu_s + SearchArguments.max_steps * b.search_step_cpu_s)
                            for j in searches)


def test_plan_counts_the_fine_tuning_steps_the_harness_runs(tmp_path):
    """A fine-tune's steps in the plan are the harness's: epochs over its (subset of the) train set, capped
    by max_steps, on each rank's share -- a 250-example subset at max_steps 160 runs 24 steps of 32, not
    160 (the 2026-12-05 run: 37 CPU-s used, 240 planned)."""
    from tamt_ds.study.runner import _finetune_steps

    write_task(tmp_path, "t", pair=False, n_train=300)
    task, args = f"local:{tmp_path / 't'}", {"max_steps": 160, "per_device_train_batch_size": 32}
    assert _finetune_steps({**args, "train_subset": 250}, task, 1) == 24  # 3 epochs of 8 batches
    assert _finetune_steps({**args, "train_subset": 1000}, task, 1) == 96
    assert _finetune_steps({**args, "train_subset": 250}, task, 2) == 12  # 125 examples a rank
    assert _finetune_steps(args, task, 1) == 30  # all 300: 10 batches
    assert _finetune_steps({**args, "num_train_epochs": 20}, task, 1) == 160
    assert _finetune_steps({"gradient_accumulation_steps": 2, "per_device_train_batch_size": 16}, task, 1) == 30
    assert _finetune_steps(args, "sst2", 1) == 160 and _finetune_steps({"max_steps": 7}, "some/hub_task", 1) == 7


def test_spearman_interval():
    import numpy as np
    from scipy.stats import rankdata, spearmanr

    from tamt_ds.study.report import spearman_with_interval

    up = spearman_with_interval([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert up["rho"] == pytest.approx(1.0) and up["low"] == pytest.approx(1.0) and up["n"] == 5
    x = [0.31, 0.12, 0.55, 0.47, 0.12, 0.90, 0.66, 0.25, 0.71, 0.05, 0.38, 0.83]  # ties in x and in y
    y = [71.0, 80.5, 64.2, 66.0, 79.1, 60.3, 66.0, 74.9, 58.2, 77.7, 70.1, 69.0]
    got = spearman_with_interval(x, y, resamples=500, seed=3)
    assert got["rho"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    rx, ry = rankdata(x), rankdata(y)  # Spearman = Pearson of the (average) ranks
    assert got["rho"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    # the interval: the same percentile bootstrap, computed here without scipy's spearmanr
    rng = np.random.default_rng(3)
    xs, ys, rhos = np.asarray(x), np.asarray(y), []
    for _ in range(500):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(xs[idx]) == 0 or np.ptp(ys[idx]) == 0:
            continue
        rhos.append(np.corrcoef(rankdata(xs[idx]), rankdata(ys[idx]))[0, 1])
    assert got["resamples_used"] == len(rhos)
    assert got["low"] == pytest.approx(np.percentile(rhos, 2.5), abs=1e-9)
    assert got["high"] == pytest.approx(np.percentile(rhos, 97.5), abs=1e-9)
    assert got["low"] < got["rho"] < got["high"]
    assert spearman_with_interval([1, 2], [2, 1])["rho"] is None  # too few points
    assert spearman_with_interval([1, 2, 3], [5, 5, 5])["rho"] is None  # a constant variable
