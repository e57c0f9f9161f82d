"""The ref store's top-k columns (`ref.topk`): what a store without them keeps, and what
precompute-ref writes with them. Fast: a tiny random model, no engine."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_llama_config


def test_ref_topk_zero_keeps_the_store_identity_and_columns(tmp_path):
    """ref.topk=0 (the default) makes the identity and the shard bytes of stores made before
    top-k existed, so they stay current; ref.topk=k adds the key and two list columns."""
    import pyarrow.parquet as pq

    from dphrl.config import ModelConfig, RefConfig, TaskConfig
    from dphrl.presample.refstore import _write_shard, identity

    before = identity(RefConfig(), TaskConfig(), ModelConfig(), "w", 0)
    assert "topk" not in before
    assert identity(RefConfig(topk=8), TaskConfig(), ModelConfig(), "w", 0) == {**before, "topk": 8}
    row = {"id": "0", "prompt_ids": [1, 2], "response_ids": [3, 4], "ref_logprobs": [-0.5, -1.0]}
    row |= {"reward": 1.0, "response_text": "x"}
    _write_shard(tmp_path / "plain.parquet", [row])
    assert pq.read_schema(tmp_path / "plain.parquet").names == [
        "id", "prompt_ids", "response_ids", "ref_logprobs", "reward", "response_text",
    ]  # fmt: skip
    top = row | {
        "ref_topk_ids": [[3, 9], [4, 1]],
        "ref_topk_logprobs": [[-0.5, -2.0], [-1.0, -1.5]],
    }
    _write_shard(tmp_path / "top.parquet", [top])
    back = pq.read_table(tmp_path / "top.parquet").to_pylist()[0]
    assert back["ref_topk_ids"] == [[3, 9], [4, 1]]
    assert back["ref_topk_logprobs"] == [[-0.5, -2.0], [-1.0, -1.5]]


def test_precompute_writes_the_top_k_of_the_training_forward():
    """`_add_ref_logprobs` with topk=3: per response token 3 ids and log-probs, the top of the
    full log-softmax at the position predicting it, descending; ref_logprobs as without."""
    from dphrl.presample.refstore import _add_ref_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).float().eval()
    records = [
        {"id": "a", "prompt_ids": [5, 6, 7], "response_ids": [11, 12, 13]},
        {"id": "b", "prompt_ids": [5, 6, 7], "response_ids": [14]},
    ]
    plain = [dict(r) for r in records]
    _add_ref_logprobs(model, plain, 0, "cpu", 4096, None)
    _add_ref_logprobs(model, records, 0, "cpu", 4096, None, topk=3)
    for r, p in zip(records, plain):
        assert r["ref_logprobs"] == p["ref_logprobs"]
        assert len(r["ref_topk_ids"]) == len(r["response_ids"])
        assert all(len(ids) == 3 for ids in r["ref_topk_ids"])
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 11, 12, 13]])
        logp = model(input_ids=ids).logits[0, 2:5].log_softmax(-1)  # predicts 11, 12, 13
    top = logp.topk(3, dim=-1)
    assert records[0]["ref_topk_ids"] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(records[0]["ref_topk_logprobs"]), top.values)
    got = torch.tensor(records[0]["ref_logprobs"])
    torch.testing.assert_close(got, logp.gather(-1, torch.tensor([[11], [12], [13]]))[:, 0])
