"""The ref store: D_pef responses of the initial policy with their reference log-probs.

For each D_pef prompt, `ref.samples_per_prompt` responses are sampled from the initial policy,
verified, and kept when correct (`ref.keep=correct`, the paper's choice) or always
(`ref.keep=all`). Their `ref_logprobs` are computed by the *training* forward pass
(`dphrl.rl.logprobs.batch_logprobs` over `dphrl.rl.batching.pack`, in the training dtype and
layout), not taken from the sampler, so log r = log pi_theta - log pi_ref is 0 before the first
update up to float rounding.

The store: `shard_00000.parquet`, ... (columns id, prompt_ids, response_ids, ref_logprobs
float32, reward, response_text), one per chunk of `ref.chunk_size` D_pef prompts, plus
`manifest.json`, which records what the store was built from and what it holds. With
`ref.topk` = k > 0 each response token also gets the initial policy's k most likely next tokens
(`ref_topk_ids`, int32) and their log-probs (`ref_topk_logprobs`, float32), lists of k per
token, from the same forward numerics (`dphrl.rl.logprobs.batch_topk_logprobs`), for
`divergence=forward_kl_topk`; that costs 8 k bytes a token before compression (BENCHMARKS.md
has the measured size). `ref.topk=0` writes the store exactly as before (same identity, same
bytes), so stores made before top-k existed stay current.

- the settings (`ref_state.json` too): model path and a hash of its weights, dtype, sampling;
- the split: a hash of `pef.jsonl` and the D_pef ids;
- per shard: the ids and a hash of the D_pef rows it was sampled from, its byte size and
  SHA-256.

Built through `dphrl.chunks`: a rerun keeps a shard only when it was sampled from the same
rows and its bytes check out, and rebuilds any other (a changed split, a corrupt file), so
the store always holds exactly the current D_pef. Every reader verifies the manifest
(`load_ref_store`): a stale, unfinished or corrupt store is refused with the shard named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from dphrl import dist, seeds
from dphrl.chunks import Chunk, Settings, run_chunks
from dphrl.config import EngineConfig, ModelConfig, RefConfig, TaskConfig
from dphrl.data import atomic_path, read_jsonl, rows_sha256, write_json
from dphrl.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SETTINGS = "ref_state.json"
REMEDY = "rerun `dphrl precompute-ref` (same ref.out): it rebuilds exactly the shards that differ"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(ref: RefConfig, task: TaskConfig, model: ModelConfig, weights: str, seed: int) -> dict:
    """What makes two precompute-ref runs the same store (the split is checked per shard);
    `topk` only when set, so that a store without top-k keeps the identity it always had."""
    return {
        "model": model.path,
        "weights_sha256": weights,
        "dtype": model.numerics,  # float32, or float32+autocast:<compute dtype>
        "task": task.name,
        "samples_per_prompt": ref.samples_per_prompt,
        "keep": ref.keep,
        "temperature": ref.temperature,
        "top_p": ref.top_p,
        "max_new_tokens": model.max_new_tokens,
        "max_prompt_len": model.max_prompt_len,
        "seed": seed,
        "chunk_size": ref.chunk_size,
    } | ({"topk": ref.topk} if ref.topk else {})


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256("\n".join(sorted(vocab)).encode()).hexdigest()
    return {"name": tokenizer.name_or_path, "vocab_size": len(vocab), "vocab_sha256": digest}


def split_record(pef_path: Path) -> dict:
    """What a store records of the split it was built from."""
    pef = read_jsonl(pef_path)
    return {
        "pef": str(pef_path.resolve()),
        "pef_sha256": rows_sha256(pef),
        "pef_ids": [r["id"] for r in pef],
    }


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def is_current(folder: str | os.PathLike, pef_path: Path, wanted: dict) -> bool:
    """Whether a finished store exists, built from this `pef.jsonl` with the `wanted` settings
    (`identity`). The dtype is left out: `load_ref_store` warns about a dtype mismatch."""
    manifest = read_manifest(folder)
    return bool(
        manifest
        and manifest.get("complete")
        and manifest.get("split", {}).get("pef_sha256") == split_record(pef_path)["pef_sha256"]
        and all(manifest.get(k) == v for k, v in wanted.items() if k != "dtype")
    )


def build_ref_store(
    ref: RefConfig,
    pef_path: Path,
    task_cfg: TaskConfig,
    model: ModelConfig,
    engine_cfg: EngineConfig,
    device: str,
    seed: int,
) -> dict:
    """Build (or finish, or bring up to date) the store in `ref.out` from `pef_path`; return
    its manifest. The caller holds the folder's lock (`dphrl.lock.ranks_lock`); under
    torchrun every rank calls this, samples its turns of the shards, and rank 0 writes."""
    from dphrl.embedded import resolve_model_path
    from dphrl.models import weights_hash

    if not pef_path.exists():
        raise DataError(f"{pef_path}: no D_pef file; run `dphrl split` first (same split.out)")
    pef = read_jsonl(pef_path)
    model_path = resolve_model_path(model.path, model.cache_dir)
    out = Path(ref.out)
    settings = Settings(
        out / SETTINGS,
        identity(ref, task_cfg, model, weights_hash(model_path), seed),
        "a ref store",
        "use another ref.out or delete this one (a differing seed: set ref.seed to the folder's)",
    )
    settings.check()
    if not pef:
        log.warning(
            "D_pef is empty: the initial policy fully solves no prompt; train will run without the divergence term"
        )
    old = read_manifest(out) or {}
    shards = {s["name"]: s for s in old.get("shard_records", [])}
    sampler = _ShardSampler(ref, task_cfg, model, engine_cfg, model_path, device, seed, pef)

    def done(c: Chunk) -> bool:
        entry = shards.get(_shard_name(c))
        return (
            bool(entry)
            and entry["rows_sha256"] == rows_sha256(pef[c.start : c.stop])
            and _verify(out, entry) is None
        )

    def write(c: Chunk, records: list[dict]) -> None:
        name = _shard_name(c)
        _write_shard(out / name, records)
        shards[name] = {
            "name": name,
            "ids": [str(r["id"]) for r in pef[c.start : c.stop]],
            "rows_sha256": rows_sha256(pef[c.start : c.stop]),
            "responses": len(records),
            "bytes": (out / name).stat().st_size,
            "sha256": file_sha256(out / name),
        }
        write_json(
            out / MANIFEST,
            {**settings.expected, "complete": False, "shard_records": list(shards.values())},
        )
        log.info("precompute-ref: shard %s: %d responses kept", name, len(records))

    try:
        run_chunks(
            len(pef), ref.chunk_size, settings, done, sampler.sample, write,
            "precompute-ref: D_pef", start=sampler.start,
        )  # fmt: skip
    finally:
        sampler.close()
    settings.record()
    manifest = None
    if dist.is_main():  # rank 0 writes; every rank returns the manifest
        manifest = _finish(out, settings.expected, shards, pef_path, len(pef), ref, model_path)
    return dist.broadcast_object(manifest)


def _finish(
    out: Path,
    expected: dict,
    shards: dict[str, dict],
    pef_path: Path,
    n_prompts: int,
    ref: RefConfig,
    model_path: str,
) -> dict:
    """Drop shards the split no longer has and write the finished manifest."""
    from dphrl.models import load_tokenizer

    n_chunks = math.ceil(n_prompts / ref.chunk_size)
    current = [shards[f"shard_{j:05d}.parquet"] for j in range(n_chunks)]
    for path in out.glob("shard_*.parquet"):  # shards of a longer, older D_pef
        if path.name not in {s["name"] for s in current}:
            path.unlink()
    manifest = {
        **expected,
        "complete": True,
        "model_path": model_path,
        "tokenizer": tokenizer_fingerprint(load_tokenizer(model_path)),
        "split": split_record(pef_path),
        "counts": {
            "prompts": n_prompts,
            "sampled": n_prompts * ref.samples_per_prompt,
            "kept": sum(s["responses"] for s in current),
        },
        "shards": [s["name"] for s in current],
        "shard_records": current,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _shard_name(c: Chunk) -> str:
    return f"shard_{c.index:05d}.parquet"


class _ShardSampler:
    """Samples one chunk of D_pef and scores its responses' ref log-probs; `start` loads."""

    def __init__(
        self,
        ref: RefConfig,
        task_cfg: TaskConfig,
        model: ModelConfig,
        engine_cfg: EngineConfig,
        model_path: str,
        device: str,
        seed: int,
        pef: list[dict],
    ) -> None:
        self.ref, self.task_cfg, self.model, self.engine_cfg = ref, task_cfg, model, engine_cfg
        self.model_path, self.device, self.seed, self.pef = model_path, device, seed, pef
        self.engine = self.policy = self.tokenizer = None

    def start(self) -> None:
        """The engine, the scoring policy and the tokenizer (every rank, before its chunks)."""
        from dphrl.engine import engine_from_config
        from dphrl.models import load_policy, load_tokenizer

        model = self.model
        self.engine = engine_from_config(
            self.engine_cfg, model, self.model_path, self.device, self.seed
        )
        # the trainer's numerics: float32 weights, the body in model.dtype (compute_dtype)
        self.policy = load_policy(self.model_path, "float32", self.device).eval()
        self.tokenizer = load_tokenizer(self.model_path)

    def sample(self, c: Chunk) -> list[dict]:
        from dphrl.engine import Sampling
        from dphrl.rollout import render_rows, sample_and_score
        from dphrl.tasks import get_task

        ref, model = self.ref, self.model
        ids, kept = render_rows(
            self.tokenizer, self.pef[c.start : c.stop], model.max_prompt_len, "precompute-ref"
        )
        base = Sampling(
            ref.temperature, ref.top_p, model.max_new_tokens, seeds.ref_store(self.seed)
        )
        sampling = base.shifted(c.start, ref.samples_per_prompt)
        task = get_task(self.task_cfg.name)
        scored = sample_and_score(
            self.engine, task, self.task_cfg, ids, kept, ref.samples_per_prompt, sampling
        )
        records = [
            {
                "id": str(row["id"]),
                "prompt_ids": prompt,
                "response_ids": s.completion.token_ids,
                "reward": float(s.verdict.reward),
                "response_text": s.completion.text,
            }
            for prompt, row, group in zip(ids, kept, scored)
            for s in group
            if ref.keep == "all" or s.verdict.reward >= 1.0
        ]
        _add_ref_logprobs(
            self.policy,
            records,
            self.tokenizer.pad_token_id,
            self.device,
            model.pack_tokens,
            model.compute_dtype,
            ref.topk,
        )
        return records

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _add_ref_logprobs(
    policy: Any,
    records: list[dict],
    pad_id: int,
    device: str,
    pack_tokens: int,
    autocast_dtype: str | None,
    topk: int = 0,
    batch: int = 8,
) -> None:
    """ref_logprobs by the training forward pass (float32 weights, the body under autocast in
    `autocast_dtype`, as the trainer's); every value must be finite. With `topk` > 0 also the
    top-k ids and log-probs per response token (a second, no-grad forward: the sampled token's
    log-prob stays the training forward's own)."""
    import torch

    from dphrl.rl.batching import pack, unpad
    from dphrl.rl.logprobs import autocast, batch_logprobs, batch_topk_logprobs

    for i in range(0, len(records), batch):
        part = records[i : i + batch]
        packed = pack(
            [r["prompt_ids"] for r in part], [r["response_ids"] for r in part], pad_id
        ).to(device)
        with torch.no_grad(), autocast(device, autocast_dtype):
            logp, _ = batch_logprobs(policy, packed, pack_tokens=pack_tokens)  # (N, T)
        for record, values in zip(part, unpad(logp.float().cpu(), packed.response_mask.cpu())):
            if not all(math.isfinite(v) for v in values):
                raise DataError(
                    f"ref log-probs of prompt {record['id']} are not finite; check model.dtype"
                )
            record["ref_logprobs"] = values
        if topk:
            with autocast(device, autocast_dtype):
                top_logp, top_ids = batch_topk_logprobs(
                    policy, packed, topk, pack_tokens=pack_tokens
                )  # (N, T, k)
            mask = packed.response_mask.cpu().bool()
            for record, lp, ids, m in zip(part, top_logp.cpu(), top_ids.cpu(), mask):
                record["ref_topk_logprobs"] = lp[m].tolist()  # (len, k)
                record["ref_topk_ids"] = ids[m].tolist()


def _write_shard(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [
        ("id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("ref_logprobs", pa.list_(pa.float32())),
        ("reward", pa.float32()),
        ("response_text", pa.string()),
    ]
    if records and "ref_topk_ids" in records[0]:  # ref.topk > 0: a list of k per token
        columns += [
            ("ref_topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("ref_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ]
    schema = pa.schema(columns)
    table = pa.Table.from_pylist(records, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _verify(folder: Path, entry: dict) -> str | None:
    """Why a shard does not match its manifest entry (missing, size, checksum), or None."""
    path = folder / entry["name"]
    if not path.exists():
        return "is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if file_sha256(path) != entry["sha256"]:
        return "does not match its checksum (the file was changed or damaged)"
    return None


def load_ref_store(
    folder: str | os.PathLike, pef_path: Path, weights_sha256: str, dtype: str
) -> list[dict]:
    """Read a finished store, verified: made from this model's weights and this `pef.jsonl`,
    every shard whole. A store made in other numerics than training's (`dtype`: `model.numerics`,
    float32 weights and the compute dtype) is used with a warning (its log-probs differ from the training
    forward's by the rounding of either)."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{manifest_path}: no ref store manifest; run `dphrl precompute-ref` first")
    if not manifest.get("complete"):
        raise DataError(f"{manifest_path}: the store is unfinished; {REMEDY}")
    if manifest.get("weights_sha256") != weights_sha256:
        raise ConfigError(
            f"{manifest_path} was made from model {manifest.get('model_path')!r} "
            f"(weights {str(manifest.get('weights_sha256'))[:12]}), but the configured model has "
            f"weights {weights_sha256[:12]}; rerun precompute-ref for this model (another ref.out)"
        )
    built_from = manifest.get("split", {})
    if built_from.get("pef_sha256") != split_record(pef_path)["pef_sha256"]:
        raise DataError(
            f"{manifest_path} was built from another D_pef ({built_from.get('pef')}, "
            f"{len(built_from.get('pef_ids', []))} prompts) than {pef_path} holds now "
            f"(the split was rerun or changed); {REMEDY}"
        )
    if manifest.get("dtype") != dtype:
        log.warning(
            "the ref store %s holds %s log-probs but training runs in %s: log r is not 0 at step 0 "
            "(rounding); rerun precompute-ref with the trainer's model.dtype (and model.autocast) "
            "for an exact rehearsal",
            folder,
            manifest.get("dtype"),
            dtype,
        )
    rows: list[dict] = []
    for entry in manifest["shard_records"]:
        problem = _verify(folder, entry)
        if problem:
            raise DataError(f"{folder / entry['name']} {problem}; {REMEDY}")
        rows.extend(pq.read_table(folder / entry["name"]).to_pylist())
    if len(rows) != manifest["counts"]["kept"]:
        raise DataError(
            f"{manifest_path} says {manifest['counts']['kept']} responses but the shards hold "
            f"{len(rows)}; {REMEDY}"
        )
    return rows
