"""Nothing silently wrong: stale ref stores, changed settings on resume, a second
writer, bad starts, corrupt shards, full disks and read-only folders, dtype, file modes.

Tiny random model, the embedded `arith` rows (split / precompute-ref) and the toy `coin`
task (train), so each case takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dphrl.commands import eval_passk as passk
from dphrl.commands import precompute_ref as reference
from dphrl.commands import split
from dphrl.commands import train as trainer
from dphrl.data import write_json, write_jsonl
from dphrl.errors import ConfigError, DataError, DphrlError, FolderLocked, OutputError
from dphrl.lock import folder_lock
from dphrl.presample import refstore
from tests.conftest import compose_config
from tests.helpers import toytask

SAMPLING = [
    "engine=hf",
    "model.max_new_tokens=8",
    "split.k=2",
    "split.chunk_size=2",
    "ref.chunk_size=2",
    "ref.keep=all",
]


def _cfg(command: str, model: str, *extra: str):
    return compose_config([*SAMPLING, f"model.path={model}", *extra], command)


def _write_pef(folder: Path, ids: list[int]) -> Path:
    from dphrl.tasks.arith import generate

    rows = [{**row, "pass_rate": 1.0} for row in generate("train") if row["id"] in ids]
    write_jsonl(folder / "pef.jsonl", rows)
    return folder / "pef.jsonl"


def _sampled_chunks(monkeypatch) -> list[int]:
    """Record which chunks precompute-ref samples (the others were kept)."""
    seen: list[int] = []
    original = refstore._ShardSampler.sample
    monkeypatch.setattr(
        refstore._ShardSampler,
        "sample",
        lambda self, c: seen.append(c.index) or original(self, c),
    )
    return seen


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    """A ref store over D_pef = {0, 1, 2} in two shards, and the config that built it."""
    pef = _write_pef(tmp_path / "split", [0, 1, 2])
    cfg = _cfg(
        "precompute-ref", tiny_model_dir, f"split.out={pef.parent}", f"ref.out={tmp_path / 'ref'}"
    )
    reference.run(cfg, tmp_path)
    return cfg, tmp_path / "ref", pef


def _load(folder: Path, pef: Path, model: str, dtype: str = "float32") -> list[dict]:
    from dphrl.models import weights_hash

    return refstore.load_ref_store(folder, pef, weights_hash(model), dtype)


# 1. a stale ref store after the split changes -------------------------------------------------


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_a_ref_store_follows_the_split_and_train_refuses_a_stale_one(
    store, tiny_model_dir, tmp_path, monkeypatch
):
    cfg, folder, pef = store
    assert {r["id"] for r in _load(folder, pef, tiny_model_dir)} == {"0", "1", "2"}
    _write_pef(pef.parent, [2])  # the split was rerun with another threshold or task.limit
    with pytest.raises(DataError, match="built from another D_pef"):
        _load(folder, pef, tiny_model_dir)
    sampled = _sampled_chunks(monkeypatch)
    manifest = reference.run(cfg, tmp_path)
    assert sampled == [0]  # chunk 0 now holds prompt 2 alone; the old chunk 1 is gone
    assert manifest["split"]["pef_ids"] == [2] and manifest["counts"]["kept"] == 1
    assert {r["id"] for r in _load(folder, pef, tiny_model_dir)} == {"2"}
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.parquet"]


# 6. corrupt shards ------------------------------------------------------------------------------


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_a_corrupt_shard_is_named_and_only_it_is_rebuilt(
    store, tiny_model_dir, tmp_path, monkeypatch
):
    cfg, folder, pef = store
    before = _load(folder, pef, tiny_model_dir)
    shard = folder / "shard_00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)  # zeroed bytes in the middle
    shard.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"shard_00001.parquet does not match its checksum.*precompute-ref"
    ):
        _load(folder, pef, tiny_model_dir)
    shard.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(DataError, match=r"shard_00001.parquet has 100 bytes"):
        _load(folder, pef, tiny_model_dir)
    sampled = _sampled_chunks(monkeypatch)
    reference.run(cfg, tmp_path)
    assert sampled == [1]
    after = _load(folder, pef, tiny_model_dir)
    assert [(r["id"], r["response_ids"]) for r in after] == [
        (r["id"], r["response_ids"]) for r in before
    ]


# 9. dtype of the store vs training --------------------------------------------------------------


def _train_data(store, model: str, *extra: str):
    """What train reads through `pipeline.training_data` from the fixture's split and store."""
    from dphrl.presample.inputs import training_data

    cfg, folder, pef = store
    write_jsonl(pef.parent / "exp.jsonl", [{"id": 9, "prompt": "x", "reward_model": {}}])
    overrides = [f"split.out={pef.parent}", f"ref.out={folder}", "divergence=js", *extra]
    return training_data(_cfg("train", model, *overrides), True, model)


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_train_warns_about_a_store_in_another_dtype(store, tiny_model_dir, caplog, monkeypatch):
    _, folder, _ = store
    assert json.loads((folder / "manifest.json").read_text())["dtype"] == "float32"
    sampled = _sampled_chunks(monkeypatch)
    with caplog.at_level("WARNING"):
        _, rows = _train_data(store, tiny_model_dir, "model.dtype=bfloat16")
    assert sampled == [] and len(rows) == 3  # the store is used, not rebuilt
    assert "float32 log-probs but training runs in float32+autocast:bfloat16" in caplog.text


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_train_refuses_a_store_made_with_other_sampling_settings(store, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"temperature: folder has [0-9.]+, config has 0.5"):
        _train_data(store, tiny_model_dir, "ref.temperature=0.5")


# 5. a failed start leaves no settings behind --------------------------------------------------


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_a_failed_split_start_does_not_lock_the_folder_to_its_settings(tmp_path, tiny_model_dir):
    out = tmp_path / "split"
    missing = tmp_path / "no-such-model"
    with pytest.raises(DphrlError, match="no-such-model"):
        split.run(_cfg("split", str(missing), f"split.out={out}", "task.limit=2"), tmp_path)
    assert not (out / "split_state.json").exists()
    stats = split.run(_cfg("split", tiny_model_dir, f"split.out={out}", "task.limit=2"), tmp_path)
    assert stats["prompts"] == 2 and (out / "split_state.json").exists()


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_a_failed_eval_start_does_not_lock_the_folder_to_its_settings(tmp_path, tiny_model_dir):
    common = ["eval.n=2", "eval.k=[1,2]", "eval.limit=2", "eval.greedy=false"]
    bad = _cfg("eval-passk", str(tmp_path / "no-such-model"), *common)
    with pytest.raises(DphrlError, match="no-such-model"):
        passk.run(bad, tmp_path / "eval")
    assert not (tmp_path / "eval" / "passk_settings.json").exists()
    passk.run(_cfg("eval-passk", tiny_model_dir, *common), tmp_path / "eval")
    assert (tmp_path / "eval" / "passk.json").exists()


# 4. one writer per folder -----------------------------------------------------------------------

HOLDER = """
import sys, time
from dphrl.lock import folder_lock
with folder_lock(sys.argv[1], "dphrl split"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_stops_naming_the_holder_and_a_dead_holder_is_stale(tmp_path, caplog):
    out = tmp_path / "split"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = compose_config([*SAMPLING, f"split.out={out}"], "split")
        with pytest.raises(FolderLocked, match=rf"dphrl split, pid {holder.pid} on host"):
            split.run(cfg, tmp_path)
        assert not (out / "samples.jsonl").exists()
    finally:
        holder.kill()  # as kill -9: the lock file stays, naming a dead process
        holder.wait()
    assert str(holder.pid) in (out / ".dphrl.lock").read_text()
    with caplog.at_level("WARNING"), folder_lock(out, "test"):
        pass
    assert (
        f"pid {holder.pid} on host" in caplog.text and "ended without releasing it" in caplog.text
    )


def test_two_locks_in_one_process_conflict(tmp_path):
    with folder_lock(tmp_path, "first"), pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
        with folder_lock(tmp_path, "second"):
            pass


# 7. full disk and read-only folders ------------------------------------------------------------


def _raise(code: int, text: str):
    def fail(*args, **kwargs):
        raise OSError(code, text)

    return fail


def test_a_full_disk_is_a_named_error_and_nothing_is_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _raise(errno.ENOSPC, "No space left on device"))
    with pytest.raises(
        OutputError, match=r"cannot write .*a\.json: No space left on device; free space"
    ):
        write_json(tmp_path / "a.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_a_named_error(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: simulate what a read-only folder raises.
    monkeypatch.setattr(tempfile, "mkstemp", _raise(errno.EROFS, "Read-only file system"))
    with pytest.raises(OutputError, match="Read-only file system; the folder is not writable"):
        write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    monkeypatch.setattr(os, "open", _raise(errno.EACCES, "Permission denied"))
    cfg = compose_config([*SAMPLING, f"split.out={tmp_path / 'split'}"], "split")
    with pytest.raises(OutputError, match=r"\.dphrl\.lock: Permission denied"):
        split.run(cfg, tmp_path)


def test_the_command_edge_turns_a_full_disk_into_exit_2(
    tmp_path, monkeypatch, capsys, tiny_model_dir
):
    from dphrl.cli import run_command

    monkeypatch.setattr(os, "fsync", _raise(errno.ENOSPC, "No space left on device"))
    monkeypatch.setenv("COLUMNS", "500")  # rich wraps the one-line error at the terminal width
    out = tmp_path / "split"
    args = [*SAMPLING, f"model.path={tiny_model_dir}", "task.limit=2", f"split.out={out}"]
    with pytest.raises(SystemExit) as exit_:
        run_command("split", [*args, f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "samples.jsonl" in err and "Traceback" not in err


# 10. file modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "atomic.json", {})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~mask


# 2, 3. train: resume or refuse, never overwrite -------------------------------------------------

TRAIN = [
    "task=arith",
    "task.name=coin",
    "task.limit=4",
    "engine=hf",
    "model.max_new_tokens=8",
    "algo.group_size=2",
    "algo.prompts_per_step=2",
    "divergence=none",
    "trainer.tensorboard=false",
    "trainer.max_steps=1",
]


def _train(tmp: Path, model: str, *extra: str) -> Path:
    cfg = compose_config([*TRAIN, f"model.path={model}", f"trainer.run_dir={tmp}/run", *extra])
    return trainer.run(cfg, tmp)


def _steps(tmp: Path) -> list[int]:
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_a_rerun_over_checkpoints_is_refused_not_overwritten(tmp_path, tiny_model_dir, monkeypatch):
    toytask.register(monkeypatch)
    _train(tmp_path, tiny_model_dir, "trainer.max_steps=2", "trainer.save_every=1")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(
        ConfigError, match="holds checkpoints of an earlier run.*trainer.resume=true"
    ):
        _train(tmp_path, tiny_model_dir, "trainer.max_steps=3")
    assert _steps(tmp_path) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == saved


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_resume_with_changed_settings_is_refused_naming_the_keys(
    tmp_path, tiny_model_dir, monkeypatch
):
    toytask.register(monkeypatch)
    _train(tmp_path, tiny_model_dir)
    changed = ["trainer.max_steps=2", "algo.group_size=4", "trainer.lr=1e-3", "divergence.beta=0.5"]
    with pytest.raises(ConfigError) as refused:
        _train(tmp_path, tiny_model_dir, "trainer.resume=true", *changed)
    message = str(refused.value)
    for key in ("algo.group_size: checkpoint has 2, config has 4", "trainer.lr", "divergence.beta"):
        assert key in message
    assert "trainer.max_steps:" not in message  # may change on resume
    assert _steps(tmp_path) == [1]
    _train(
        tmp_path,
        tiny_model_dir,
        "trainer.resume=true",
        "trainer.max_steps=2",
        "trainer.save_every=1",
    )
    assert _steps(tmp_path) == [1, 2]


@pytest.mark.slow  # runs the pipeline on the tiny model
def test_resume_over_changed_training_data_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    toytask.register(monkeypatch)
    _train(tmp_path, tiny_model_dir)
    monkeypatch.setattr(toytask, "PROMPTS", [p.upper() for p in toytask.PROMPTS])  # same count
    with pytest.raises(ConfigError, match="data.prompts_sha256: checkpoint has"):
        _train(tmp_path, tiny_model_dir, "trainer.resume=true", "trainer.max_steps=2")
    assert _steps(tmp_path) == [1]


def test_every_key_allowed_to_change_on_resume_exists():
    from dphrl.training.checkpoint import RESUMABLE_KEYS, config_items

    keys = config_items(compose_config([]))
    for allowed in RESUMABLE_KEYS:
        assert any(k == allowed or k.startswith(allowed) for k in keys), allowed
