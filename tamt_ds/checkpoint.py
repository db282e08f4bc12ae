"""Checkpoints a search resumes from, on the same or on another number of ranks.

A checkpoint holds only what a search changes: the trainable parameters (the scores,
an MLM head) with their optimizer state, the schedule, the thresholds, the data
position and the RNG.  The frozen pre-trained weights are left out: a resume reloads
them from the model the search started from, and refuses another model (a sha256 of
its config and the weight files it loads from, `model_fingerprint`).

    <root>/step<N>/rank<r>.pt      rank r's slice of each trainable parameter and of its
                                   optimizer state (fp32), with the slice's flat offset;
                                   rank r's data position and RNG; the schedule
    <root>/step<N>/complete.json   written last, by rank 0: every file's size and sha256,
                                   the world size, the model fingerprint
    <root>/latest                  the newest complete checkpoint

ZeRO-3 gives rank r elements [r*P, (r+1)*P) of each flattened parameter.  Because
every slice is stored with its offset, a resume on any number of ranks reads, for its
own range, the overlapping pieces of every old rank's file (memory-mapped): the
checkpoint is world-size independent without a conversion step.  Resuming on the
same world size copies every value back bit for bit, so the run goes on exactly as
if it had never stopped.

A checkpoint is complete once complete.json exists; `latest` moves only after that,
and older checkpoints beyond `keep` are deleted only after that.  A resume takes the
newest checkpoint whose files all match complete.json, with a warning when that is
not the one `latest` names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass

import torch

from tamt_ds import sharding, zero
from tamt_ds.errors import InputError, disk_full

FORMAT_VERSION = 2  # 2: scores named <module>.mask.score (a module of their own), were <module>.mask_score
COMPLETE = "complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(InputError):
    pass


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------
# Which model a checkpoint belongs to.


def _model_dir(name_or_path: str) -> str | None:
    from tamt_ds.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        return path
    try:  # a hub name: its files are in the local cache once the model has loaded
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not on disk (e.g. built from a config): the name alone identifies it
        return None


def _loaded_files(folder: str) -> list[str]:
    """config.json and the weight files from_pretrained reads from a model folder, in
    transformers' own order of preference (modeling_utils: `transformers_weights` named in
    the config, model.safetensors, its sharded index, pytorch_model.bin, its index; an index
    with its shards).  Other weight files beside them (a pytorch_model.bin that
    evaluate_mask fetched into a hub snapshot holding model.safetensors) are not the model."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    config = os.path.join(folder, "config.json")
    explicit = None
    if os.path.isfile(config):
        with open(config) as f:
            explicit = json.load(f).get("transformers_weights")
    preference = [explicit] if explicit else [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    for name in preference:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        weights = [path]
        if name.endswith(".index.json"):
            with open(path) as f:
                weights += [os.path.join(folder, shard) for shard in set(json.load(f)["weight_map"].values())]
        return sorted([config, *weights] if os.path.isfile(config) else weights)
    return [config] if os.path.isfile(config) else []


def model_fingerprint(name_or_path: str) -> dict:
    """{"name", "sha256"}: sha256 over the model's config and the weight files it loads
    from, None where the model has no files on disk.  Computed on rank 0, the same answer
    on every rank."""
    digest = None
    if sharding.rank() == 0:
        folder = _model_dir(name_or_path)
        files = _loaded_files(folder) if folder else []
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(os.path.basename(f).encode() + b"\0" + _sha256(f).encode())
            digest = h.hexdigest()
    return {"name": name_or_path, "sha256": sharding.broadcast_object(digest)}


def _same_model(saved: dict, now: dict) -> bool:
    if saved.get("sha256") and now.get("sha256"):
        return saved["sha256"] == now["sha256"]
    return saved.get("name") == now.get("name")


# ---------------------------------------------------------------------------
# Finding the checkpoint to resume from.


@dataclass
class Found:
    tag: str
    folder: str
    meta: dict  # complete.json

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    def saved_state(self) -> dict:
        """The state the run saved with it (rank 0's copy, memory-mapped): to check settings before loading."""
        return torch.load(os.path.join(self.folder, "rank0.pt"), map_location="cpu", mmap=True,
                          weights_only=False)["state"]


def _step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def _tags(root: str) -> list[str]:
    """Checkpoint folders under root, newest first."""
    names = os.listdir(root) if os.path.isdir(root) else []
    tags = [n for n in names if _TAG.match(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(tags, key=_step_of, reverse=True)


def _problem(folder: str, check_hashes: bool = True) -> str | None:
    """Why a checkpoint folder cannot be resumed from; None if it is complete and intact."""
    try:
        with open(os.path.join(folder, COMPLETE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "incomplete (no complete.json)"
    except (OSError, json.JSONDecodeError) as e:
        return f"corrupt complete.json ({e})"
    if meta.get("version") != FORMAT_VERSION:
        return f"written in checkpoint format {meta.get('version')}, this code reads {FORMAT_VERSION}"
    for name, want in meta["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != want["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, {want['bytes']} were written"
        if check_hashes and _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return None


def _choose(root: str) -> tuple[str | None, list[str]]:
    """(the newest intact checkpoint or None, warnings)."""
    latest, warnings = _read_latest(root), []
    for tag in _tags(root):
        problem = _problem(os.path.join(root, tag))
        if problem is None:
            if latest is not None and latest != tag:
                older = _TAG.match(latest) and _step_of(latest) < _step_of(tag)  # a save ended before `latest` moved
                why = f"{tag} is newer and complete" if older else "which is not usable"
                warnings.append(f"{os.path.join(root, LATEST)} names {latest!r}, {why}: resuming from {tag}")
            return tag, warnings
        warnings.append(f"checkpoint {os.path.join(root, tag)} is {problem}: skipped")
    return None, warnings


def find(root: str, model: dict) -> Found | None:
    """The checkpoint to resume from (None if there is none), the same on every rank.

    Rank 0 checks the files against complete.json; a checkpoint that is incomplete or
    corrupt is skipped with a warning, in favour of the next older complete one.
    Refuses a checkpoint made from another model.
    """
    answer = None
    if sharding.rank() == 0:
        tag, warnings = _choose(root)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        if tag is None and warnings:
            answer = ("error", f"no usable checkpoint in {root} ({len(warnings)} incomplete or corrupt): pass "
                               f"--overwrite_output_dir instead of --resume to start the search over")
        elif tag is not None:
            with open(os.path.join(root, tag, COMPLETE)) as f:
                answer = ("found", tag, json.load(f))
    answer = sharding.broadcast_object(answer)
    if answer is None:
        return None
    if answer[0] == "error":
        raise CheckpointError(answer[1])
    found = Found(answer[1], os.path.join(root, answer[1]), answer[2])
    saved = found.meta["model"]
    if not _same_model(saved, model):
        raise CheckpointError(
            f"checkpoint {found.folder} was made from model {saved['name']!r} (sha256 {str(saved['sha256'])[:12]}), "
            f"not from {model['name']!r} (sha256 {str(model['sha256'])[:12]}): resume with --model_name_or_path "
            f"{saved['name']}, or start a new search with another --output_dir")
    return found


# ---------------------------------------------------------------------------
# What each rank saves: its slice of every trainable parameter and optimizer state.


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    out = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    for name, p in out:
        if not sharding.is_partitioned(p):
            raise CheckpointError(f"parameter {name} is not partitioned by ZeRO stage 3: search checkpoints need a "
                                  f"ZeRO-3 config, pass --deepspeed ds_configs/zero3_cpu.json or another zero3_*.json")
    return out


def _cpu(t: torch.Tensor, n: int) -> torch.Tensor:
    # Already fp32 on the host (CPU ranks, an offloaded optimizer): a view of ZeRO's flat partition,
    # which torch.save writes once for all the tensors that share it.  Copies of every entry at
    # once would add 12 B per trainable entry at each save (bert-large, 1 rank: 4 GB over the steps'
    # peak, at the end of the run).  On a GPU, a host copy.
    t = t.detach()[:n]
    return t if t.device.type == "cpu" and t.dtype == torch.float32 else t.to("cpu", torch.float32, copy=True)


def _engine_state(engine) -> dict:
    trainable = _trainable(engine)
    per_element, scalars = zero.optimizer_state_layout(engine)
    params = {}
    for name, p in trainable:
        shard = sharding.local_shard(p)
        n = shard.values.numel()
        entry = {"offset": shard.offset, "numel": shard.numel, "shape": tuple(sharding.full_shape(p)),
                 "fp32": _cpu(zero.local_fp32_master(p), n)}
        for key in per_element:
            entry[key] = _cpu(zero.local_optimizer_state(p, key), n)
        params[name] = entry
    return {
        "params": params,
        "optimizer": {"per_element": per_element, "scalars": scalars,
                      "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                       for g in zero.optimizer_param_groups(engine)]},
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": zero.loss_scaler_state(engine),
        "counters": zero.engine_counters(engine),
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class _NoSpace:
    """A checkpoint write the filesystem refused for want of space or quota."""

    rank: int
    host: str
    path: str
    newest: str | None = None  # the newest complete checkpoint, to resume from
    others: int = 0  # ranks refused besides `rank`

    def error(self, tag: str, keep: int) -> CheckpointError:
        also = f" (and on {self.others} other rank(s))" if self.others else ""
        limit = f"lower --save_total_limit (now {keep})" if keep else "pass --save_total_limit 1 (now 0: all kept)"
        return CheckpointError(
            f"checkpoint {tag} not saved: no space left on device on rank {self.rank} ({self.host}) writing "
            f"{self.path}{also}: free space there, {limit}, or pass another --output_dir; --resume continues from "
            f"{self.newest or 'step 0 (no complete checkpoint yet)'}")


def _no_space(e: BaseException, path: str) -> _NoSpace:
    if not disk_full(e):
        raise e
    return _NoSpace(sharding.rank(), socket.gethostname(), path)


def save(engine, root: str, step: int, state: dict, *, data: dict, model: dict, keep: int = 2) -> str:
    """Write checkpoint step<step> (every rank calls this): the engine's trainable state,
    `state` (the search's, the same on every rank), this rank's data position `data`.
    Then point `latest` at it and keep only the newest `keep` checkpoints (0: all).

    A write the filesystem refuses for want of space, on any rank, stops every rank with the
    same one line naming that rank and the path (not a traceback on one rank and lost contact
    on the others); the incomplete checkpoint is deleted, it only takes space."""
    from tamt_ds.maskfile import atomic_torch_save

    tag = f"step{step}"
    folder = os.path.join(root, tag)
    refused = None
    if sharding.rank() == 0:
        try:
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted earlier attempt at this step left
            os.makedirs(folder)
        except OSError as e:
            refused = _no_space(e, folder)
            refused.newest = _read_latest(root)
    refused = sharding.broadcast_object(refused)  # every rank waits for the folder
    if refused:
        raise refused.error(tag, keep)
    name = f"rank{sharding.rank()}.pt"
    path = os.path.join(folder, name)
    try:
        atomic_torch_save({"version": FORMAT_VERSION, "step": step, "rank": sharding.rank(), "state": state,
                           "data": data, "rng": _rng_state(), **_engine_state(engine)}, path)
        mine = (name, os.path.getsize(path), _sha256(path))
    except Exception as e:  # noqa: BLE001 - _no_space re-raises anything but a full disk
        mine = _no_space(e, path)
    written = sharding.gather_objects(mine)
    if sharding.rank() == 0:
        full = [w for w in written if isinstance(w, _NoSpace)]
        if full:
            refused = dataclasses.replace(full[0], others=len(full) - 1)
        else:
            meta = {"version": FORMAT_VERSION, "step": step, "world_size": sharding.world_size(), "model": model,
                    "files": {n: {"bytes": b, "sha256": h} for n, b, h in written}}
            for target, text in ((os.path.join(folder, COMPLETE), json.dumps(meta, indent=1)),
                                 (os.path.join(root, LATEST), tag)):
                try:
                    atomic_write_text(target, text)
                except OSError as e:
                    refused = _no_space(e, target)
                    break
        if refused is None:
            _prune(root, keep, newest=tag)
        elif os.path.isfile(os.path.join(folder, COMPLETE)):
            refused.newest = tag  # complete, `latest` not moved: a resume takes it all the same
        else:
            shutil.rmtree(folder, ignore_errors=True)
            refused.newest = _read_latest(root)
    refused = sharding.broadcast_object(refused)  # every rank waits for rank 0's files
    if refused:
        raise refused.error(tag, keep)
    return tag


def _prune(root: str, keep: int, newest: str) -> None:
    """Keep the newest `keep` complete checkpoints up to `newest`; delete the rest: older
    ones, leftovers of interrupted saves, and any later ones of a run this one resumed
    before (they belong to a history that did not happen)."""
    if keep <= 0:
        return
    last, kept = _step_of(newest), 0
    for tag in _tags(root):
        if _step_of(tag) <= last and kept < keep and os.path.isfile(os.path.join(root, tag, COMPLETE)):
            kept += 1
            continue
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


# ---------------------------------------------------------------------------
# Loading back, on any number of ranks.


@dataclass
class Restored:
    step: int
    state: dict  # the search's state, as saved
    data: list[dict]  # every saved rank's data position, in rank order
    world_size: int  # of the run that saved it


def _fill(out: torch.Tensor, lo: int, pieces: list[tuple[int, torch.Tensor]]) -> None:
    """Write into `out` (elements [lo, lo + len) of a flat tensor) the saved pieces that overlap it."""
    hi = lo + out.numel()
    for offset, piece in pieces:
        a, b = max(lo, offset), min(hi, offset + piece.numel())
        if a < b:
            out[a - lo:b - lo].copy_(piece[a - offset:b - offset])


def load(engine, found: Found) -> Restored:
    """Restore the engine (trainable parameters, optimizer, schedule) and the RNG from a
    checkpoint written on any number of ranks; return the rest for the caller."""
    world = found.world_size
    files = [torch.load(os.path.join(found.folder, f"rank{r}.pt"), map_location="cpu", mmap=True, weights_only=False)
             for r in range(world)]
    first = files[0]
    saved_opt = first["optimizer"]
    zero.create_optimizer_state(engine, saved_opt["per_element"], saved_opt["scalars"])
    groups = zero.optimizer_param_groups(engine)
    if len(saved_opt["param_groups"]) != len(groups):
        raise CheckpointError(f"checkpoint {found.folder} has {len(saved_opt['param_groups'])} optimizer parameter "
                              f"groups, this run {len(groups)}: resume with the same --objective")
    for group, saved in zip(groups, saved_opt["param_groups"]):
        group.update(saved)

    trainable = _trainable(engine)
    missing = sorted({n for n, _ in trainable} ^ set(first["params"]))
    if missing:
        raise CheckpointError(f"checkpoint {found.folder} and this run train different parameters ({missing[0]}, ...): "
                              f"resume with the same --objective and --mask_patterns")
    for name, p in trainable:
        shard = sharding.local_shard(p)
        device = sharding.local_partition(p).device
        for key in ("fp32", *saved_opt["per_element"]):
            value = torch.zeros(sharding.local_partition(p).numel(), dtype=torch.float32)  # ZeRO's padding stays 0
            _fill(value[:shard.values.numel()], shard.offset, [(f["params"][name]["offset"], f["params"][name][key])
                                                               for f in files])
            value = value.to(device)
            if key == "fp32":
                zero.set_local_fp32_master(p, value)
                sharding.local_partition(p).copy_(value)  # the training-dtype copy the forward uses
            else:
                zero.set_local_optimizer_state(p, value, key)

    zero.release_persistent_parameters(engine)  # the next forward gathers the slices just loaded

    if engine.lr_scheduler is not None and first["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(first["scheduler"])
    zero.set_loss_scaler_state(engine, first["loss_scaler"])
    zero.set_engine_counters(engine, first["counters"])
    # Every rank draws the same dropout stream (one seed for all), so on another world
    # size each rank continues it from a saved rank's state; on the same one, from its own.
    _set_rng_state(files[sharding.rank() % world]["rng"])
    return Restored(step=found.step, state=first["state"], data=[f["data"] for f in files], world_size=world)
