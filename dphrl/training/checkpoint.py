"""Checkpoints: atomic save, exact resume, and the final model as a plain HF folder.

A checkpoint is a folder `run_dir/checkpoints/step_000002/` holding

- `model.safetensors` (+ `model.json`: names of tied weights stored once),
- `optimizer.safetensors` + `optimizer.json` (tensors apart, param groups and counters as JSON),
- `scheduler.safetensors` + `scheduler.json`,
- `rng_rank00000.safetensors` + `.json`, one pair per rank (python, numpy, torch, CUDA),
- `trainer_state.json` (step, data positions, settings: the trainer's `state_dict()` but its
  live `HANDLES`, whose states are the files above),
- `checkpoint.json`, written last: the completion marker.

No pickle and no `torch.save` anywhere, so a checkpoint can be opened without trusting it.

`trainer_state.json` also records the settings that define the run (`run_settings`): a resume
with other values is refused, naming the keys (`check_resume`); only the keys of
`RESUMABLE_KEYS` (how long to run, how often to save, logging, evaluation, engine memory) may
change. A run folder that holds checkpoints is resumed or refused, never trained over.

It is written into a hidden sibling `.tmp_step_000002/` and renamed into place with
`os.replace` only once every file is on disk, so a kill mid-save leaves the previous checkpoint
as the latest; `latest_checkpoint` also ignores any folder without the marker.

The same code serves one process and FSDP2 under torch.distributed: full state dicts are gathered
with `torch.distributed.checkpoint.state_dict` (which also works on a plain model), only rank 0
writes them, and every rank writes its own RNG state. Resume expects the world size it was saved
with; with another, ranks past the saved ones take rank 0's RNG state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dphrl import dist
from dphrl.algo_config import RENAMED_KEYS
from dphrl.config import DphrlConfig
from dphrl.data import write_json
from dphrl.errors import ConfigError, DphrlError

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
_PREFIX = "step_"
_TMP = ".tmp_"
FORMAT = 1


# Keys whose value may differ between a checkpoint and its resume: they do not change what the
# run computes (a prefix ending in "." allows a whole section).
RESUMABLE_KEYS = (
    "trainer.max_steps",
    "trainer.epochs",  # a budget, as max_steps
    "trainer.save_every",
    "trainer.keep",
    "trainer.resume",
    "trainer.run_dir",
    "trainer.tensorboard",
    "trainer.wandb",
    "eval.",
    "engine.vllm.gpu_memory_utilization",
    "engine.vllm.enforce_eager",
    "engine.hf.batch_size",
    "engine.sleep_mode",
    "trainer.micro_batch_tokens",  # the memory plan's knobs: how much at once, not what
    "layout.gpu_memory_gib",
    "model.cache_dir",
    "dry_run",
)


def config_items(cfg: DphrlConfig) -> dict[str, Any]:
    """Every key of a config as flat `section.key` -> JSON value."""
    import dataclasses

    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                flat[f"{prefix}{f.name}"] = json.loads(
                    json.dumps(value, default=lambda o: getattr(o, "value", str(o)))
                )

    walk("", cfg)
    return flat


def is_resumable(key: str) -> bool:
    """Whether `key` may change between a checkpoint and its resume (`RESUMABLE_KEYS`)."""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_KEYS)


def run_settings(cfg: DphrlConfig) -> dict[str, Any]:
    """The run-defining settings of a train config: every key but the resumable ones."""
    return {k: v for k, v in config_items(cfg).items() if not is_resumable(k)}


def data_settings(prompts: list[dict], ref_rows: list[dict]) -> dict[str, str]:
    """What a run trains on, as hashes: a resume over changed prompts or a rebuilt ref store
    (same config, other data) is refused like a changed setting."""
    from dphrl.data import rows_sha256

    ref = [{"id": r["id"], "response_ids": r["response_ids"]} for r in ref_rows]
    return {"data.prompts_sha256": rows_sha256(prompts), "data.ref_rows_sha256": rows_sha256(ref)}


def check_resume(run_dir: str | os.PathLike, resume: bool, settings: dict[str, Any]) -> Path | None:
    """The checkpoint a train run continues from, or None for a fresh run; refuses to train over
    an earlier run's checkpoints without `trainer.resume=true`, and to resume with changed
    run-defining settings (naming each key that differs)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    if not resume:
        raise ConfigError(
            f"{run_dir} holds checkpoints of an earlier run (latest {found.name}); continue it with "
            "trainer.resume=true, or start a new run in another trainer.run_dir (or delete this one)"
        )
    saved = json.loads((found / "trainer_state.json").read_text()).get("settings")
    if saved is None:
        return found  # a checkpoint from before settings were recorded: nothing to compare
    # a checkpoint from before the algo groups: its flat keys are compared under their new names
    saved = {RENAMED_KEYS.get(k, k): v for k, v in saved.items()}
    diff = [  # keys one side lacks come from a schema change, not from the user
        f"{k}: checkpoint has {saved[k]!r}, config has {settings[k]!r}"
        for k in sorted(saved.keys() & settings.keys())
        if saved[k] != settings[k]
    ]
    if diff:
        raise ConfigError(
            f"{found} was saved with other settings ({'; '.join(diff)}); resume with the "
            "checkpoint's values or start a new trainer.run_dir (keys that may change on resume: "
            f"{', '.join(RESUMABLE_KEYS)})"
        )
    return found


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder a checkpoint of `step` lives in; zero-padded so names sort by step."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write a complete checkpoint of `step` atomically, then keep only the last `keep`.

    Collective under torch.distributed: every rank must call it (gathering the full state dicts
    needs all of them); rank 0 writes everything but each rank's RNG state. Returns the folder.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
    json.dumps(trainer_state)  # fail before writing anything if the loop's state is not JSON
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = (
        get_optimizer_state_dict(model, optimizer, options=options)
        if optimizer is not None
        else None
    )
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(_TMP + final.name)
    rank, world = dist.rank(), dist.world_size()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save of the same step
        tmp.mkdir(parents=True)
    dist.barrier()
    _write_tree(tmp, f"rng_rank{rank:05d}", rng_state())
    dist.barrier()
    if rank == 0:
        _write_model(tmp, model_sd)
        if optim_sd is not None:
            _write_tree(tmp, "optimizer", optim_sd)
        if scheduler is not None:
            _write_tree(tmp, "scheduler", scheduler.state_dict())
        write_json(tmp / "trainer_state.json", trainer_state)
        _fsync_files(tmp)
        write_json(tmp / MARKER, {"format": FORMAT, "step": step, "world_size": world})
        _fsync(tmp / MARKER)
        _replace_dir(tmp, final)
        prune_checkpoints(run_dir, keep)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; return trainer_state.

    Collective under torch.distributed: rank 0 reads the full state dicts and they are
    broadcast into each rank's shards, so no rank but 0 holds a full copy in memory.
    """
    path = Path(path)
    if not (path / MARKER).exists():
        raise DphrlError(
            f"{path}: not a complete checkpoint (no {MARKER}); resume from another one or delete it"
        )
    distributed = dist.world_size() > 1
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    reads = dist.rank() == 0 or not distributed
    set_model_state_dict(model, _read_model(path) if reads else {}, options=options)
    if optimizer is not None:
        optim_sd = _read_tree(path, "optimizer") if reads else {}
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    if scheduler is not None:
        scheduler.load_state_dict(_read_tree(path, "scheduler"))
    rng_name = f"rng_rank{dist.rank():05d}"
    if not (path / f"{rng_name}.json").exists():
        rng_name = "rng_rank00000"
    set_rng_state(_read_tree(path, rng_name))
    return json.loads((path / "trainer_state.json").read_text())


# The live objects of a trainer's `state_dict()` whose full states this module gathers and
# stores as tensors; every other key of it is the loop's JSON state (trainer_state.json).
HANDLES = ("model", "optimizer", "scheduler")


def save_state(run_dir: str | os.PathLike, state: dict, keep: int) -> Path:
    """`save_checkpoint` of a trainer's `state_dict()` at its `step`: the `HANDLES`' states
    as safetensors, the rest (step, data positions, settings, ...) as trainer_state.json."""
    loop = {key: value for key, value in state.items() if key not in HANDLES}
    handles = [state[key] for key in HANDLES]
    return save_checkpoint(run_dir, state["step"], *handles, loop, keep)


def load_state(path: str | os.PathLike, state: dict) -> dict:
    """Restore checkpoint `path` into a trainer's `state_dict()`: the `HANDLES` (and the RNG)
    in place; returns `state` with trainer_state.json's values over it, for the trainer's
    `load_state_dict` (a key an older checkpoint lacks keeps the trainer's current value)."""
    return {**state, **load_checkpoint(path, *(state[key] for key in HANDLES))}


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first; half-written folders are not listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        name = folder.name
        if (
            name.startswith(_PREFIX)
            and name[len(_PREFIX) :].isdigit()
            and (folder / MARKER).exists()
        ):
            found.append((int(name[len(_PREFIX) :]), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None: what `trainer.resume=true` continues."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of killed saves."""
    for folder in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder)
    for folder in (Path(run_dir) / CHECKPOINTS).glob(_TMP + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def save_hf_model(
    model: torch.nn.Module, tokenizer: Any | None, out_dir: str | os.PathLike
) -> Path:
    """Write the model (and tokenizer) as a plain HF folder that transformers and vLLM load.

    Collective under torch.distributed, like `save_checkpoint`. Tied weights (an output layer
    sharing the input embedding) are stored once, as `from_pretrained` expects; the folder
    appears atomically, so a reader never sees a half-written model.
    """
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    out = Path(out_dir)
    if dist.rank() == 0:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state = {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}
        tmp = out.with_name(_TMP + out.name)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_files(tmp)
        _replace_dir(tmp, out)
    dist.barrier()
    return out


def rng_state() -> dict:
    """Every random generator the loop draws from, so a resumed run draws the same numbers."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured; CUDA states only where the same devices exist."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# --- storage without pickle: tensors to safetensors, the rest to JSON -------------------------


def _write_model(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Save weights once each: safetensors refuses two names for one storage (tied weights)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().cpu().contiguous()
    save_file(unique, folder / "model.safetensors", metadata={"format": "pt"})
    write_json(folder / "model.json", {"aliases": aliases})


def _read_model(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(folder / "model.safetensors")
    for alias, source in json.loads((folder / "model.json").read_text())["aliases"].items():
        state[alias] = state[source]
    return state


def _write_tree(folder: Path, name: str, obj: Any) -> None:
    """Store a nested state (dicts, lists, tuples, tensors, arrays, numbers) as JSON + safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, tensors, name)
    save_file(tensors, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", encoded)


def _read_tree(folder: Path, name: str) -> Any:
    tensors = load_file(folder / f"{name}.safetensors")
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON for `obj`, with tensors moved into `tensors` and tuples/arrays tagged to come back exact."""
    if isinstance(obj, torch.Tensor):
        while key in tensors:
            key += "'"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        items = [
            [_encode(k, tensors, key), _encode(v, tensors, f"{key}/{k}")] for k, v in obj.items()
        ]
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise DphrlError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# --- file system and process group ----------------------------------------------------------


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; an existing one (a re-save) is moved aside first."""
    old = final.with_name(_TMP + "old." + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent)


def _fsync_files(folder: Path) -> None:
    """Flush every file to disk before the marker and the rename promise they are complete."""
    for file in folder.rglob("*"):
        if file.is_file():
            _fsync(file)


def _fsync(path: Path) -> None:
    # Some file systems refuse fsync on folders; durability there is best effort.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
