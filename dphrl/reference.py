"""`dphrl precompute-ref`: the ref store of D_pef responses, and reading it back in `train`.

For each D_pef prompt, `ref.samples_per_prompt` responses are sampled from the initial policy,
verified, and kept when correct (`ref.keep=correct`, the paper's choice) or always
(`ref.keep=all`). Their `ref_logprobs` are computed by the *training* forward pass
(`dphrl.logprobs.batch_logprobs` over `dphrl.batching.pack`, in the training dtype and
layout), not taken from the sampler, so log r = log pi_theta - log pi_ref is 0 before the first
update up to float rounding (batches are composed differently here and in training).

The store: `shard_00000.parquet`, ... (columns id, prompt_ids, response_ids, ref_logprobs
float32, reward, response_text) plus `manifest.json` (model path and a hash of its weights,
tokenizer, sampling settings, counts). Resumable: each chunk of prompts becomes one shard,
written atomically; a rerun skips the shards that exist.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from dphrl.data import atomic_path, check_settings, read_jsonl, write_json
from dphrl.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def identity(cfg: Any) -> dict:
    """What makes two precompute-ref runs the same store."""
    return {
        "model": cfg.model.path,
        "dtype": cfg.model.dtype,
        "split": str(Path(cfg.split.out).resolve()),
        "samples_per_prompt": cfg.ref.samples_per_prompt,
        "keep": cfg.ref.keep,
        "temperature": cfg.ref.temperature,
        "top_p": cfg.ref.top_p,
        "max_new_tokens": cfg.model.max_new_tokens,
        "seed": cfg.seed,
        "chunk_size": cfg.ref.chunk_size,
    }


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256("\n".join(sorted(vocab)).encode()).hexdigest()
    return {"name": tokenizer.name_or_path, "vocab_size": len(vocab), "vocab_sha256": digest}


def run(cfg: Any, run_dir: Path) -> dict:
    """Build (or finish) the ref store in `ref.out`; return its manifest."""
    import torch

    from dphrl.engine import Sampling, engine_from_config
    from dphrl.models import load_policy, load_tokenizer, resolve_model_path, weights_hash
    from dphrl.rollout import render_rows, sample_and_score
    from dphrl.tasks import get_task

    pef_path = Path(cfg.split.out) / "pef.jsonl"
    if not pef_path.exists():
        raise DataError(f"{pef_path}: no D_pef file; run `dphrl split` first (same split.out)")
    pef = read_jsonl(pef_path)
    out = Path(cfg.ref.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(
        out / "ref_state.json",
        identity(cfg),
        "a ref store",
        "use another ref.out or delete this one",
    )
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    if not pef:
        log.warning(
            "D_pef is empty: the initial policy fully solves no prompt; train will run without the divergence term"
        )

    task = get_task(cfg.task.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = engine = None
    size = cfg.ref.chunk_size
    counts = {"prompts": len(pef), "sampled": 0, "kept": 0}
    for j in range(0, len(pef), size):
        shard = out / f"shard_{j // size:05d}.parquet"
        if shard.exists():
            continue
        engine = engine or engine_from_config(
            cfg.engine, cfg.model, model_path, device=device, seed=cfg.seed
        )
        policy = policy or load_policy(model_path, cfg.model.dtype, device).eval()
        ids, kept = render_rows(
            tokenizer, pef[j : j + size], cfg.model.max_prompt_len, "precompute-ref"
        )
        base = Sampling(
            cfg.ref.temperature, cfg.ref.top_p, cfg.model.max_new_tokens, cfg.seed + 1_000_003
        )
        sampling = base.shifted(j, cfg.ref.samples_per_prompt)
        scored = sample_and_score(
            engine, task, cfg.task, ids, kept, cfg.ref.samples_per_prompt, sampling
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
            if cfg.ref.keep == "all" or s.verdict.reward >= 1.0
        ]
        _add_ref_logprobs(policy, records, tokenizer.pad_token_id, device, cfg.model.pack_tokens)
        _write_shard(shard, records)
        log.info("precompute-ref: shard %s: %d responses kept", shard.name, len(records))
    for shard in sorted(out.glob("shard_*.parquet")):
        counts["kept"] += _num_rows(shard)
    counts["sampled"] = len(pef) * cfg.ref.samples_per_prompt
    manifest = {
        **identity(cfg),
        "model_path": model_path,
        "weights_sha256": weights_hash(model_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "counts": counts,
        "shards": sorted(p.name for p in out.glob("shard_*.parquet")),
    }
    write_json(out / MANIFEST, manifest)
    print(
        f"precompute-ref: {counts['kept']} responses from {counts['prompts']} D_pef prompts -> {out}"
    )
    return manifest


def _add_ref_logprobs(
    policy: Any, records: list[dict], pad_id: int, device: str, pack_tokens: int, batch: int = 8
) -> None:
    """ref_logprobs by the training forward pass; every value must be finite."""
    import torch

    from dphrl.batching import pack, unpad
    from dphrl.logprobs import batch_logprobs

    for i in range(0, len(records), batch):
        part = records[i : i + batch]
        packed = pack(
            [r["prompt_ids"] for r in part], [r["response_ids"] for r in part], pad_id
        ).to(device)
        with torch.no_grad():
            logp, _ = batch_logprobs(policy, packed, pack_tokens=pack_tokens)  # (N, T)
        for record, values in zip(part, unpad(logp.float().cpu(), packed.response_mask.cpu())):
            if not all(math.isfinite(v) for v in values):
                raise DataError(
                    f"ref log-probs of prompt {record['id']} are not finite; check model.dtype"
                )
            record["ref_logprobs"] = values


def _write_shard(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.int32())),
            ("ref_logprobs", pa.list_(pa.float32())),
            ("reward", pa.float32()),
            ("response_text", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(records, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def load_ref_store(path: str | Path, model_path: str, weights_sha256: str) -> list[dict]:
    """Read a finished ref store, refusing one made from another model than the configured one."""
    import json

    import pyarrow.parquet as pq

    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: no ref store manifest; run `dphrl precompute-ref` first")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("weights_sha256") != weights_sha256:
        raise ConfigError(
            f"{manifest_path} was made from model {manifest.get('model_path')!r} "
            f"(weights {str(manifest.get('weights_sha256'))[:12]}), but the configured model is "
            f"{model_path!r} (weights {weights_sha256[:12]}); rerun precompute-ref for this model"
        )
    rows: list[dict] = []
    for name in manifest["shards"]:
        if not (folder / name).exists():
            raise DataError(f"{manifest_path} lists {name}, which is missing; rerun precompute-ref")
        rows.extend(pq.read_table(folder / name).to_pylist())
    if len(rows) != manifest["counts"]["kept"]:
        raise DataError(
            f"{manifest_path} says {manifest['counts']['kept']} responses but the shards hold {len(rows)}; "
            "the store was changed after it was written: rerun precompute-ref"
        )
    return rows
