"""The benchmarks' own arithmetic, on hand-built inputs (the benchmarks themselves run by
`python benchmarks/run.py`, not here)."""

from __future__ import annotations

from benchmarks.cost_curves import points
from benchmarks.mfu import layout_counts, model_flops
from benchmarks.pipeline import push_share
from dphrl.rl.batching import pack, share_prefixes


def test_layout_counts_the_shared_prefix_rows_by_hand():
    # One prompt of 3 tokens, responses of 2 and 1 tokens, packed into one row [p p p a a b].
    sp = share_prefixes(pack([[1, 2, 3], [1, 2, 3]], [[4, 5], [6]], pad_id=0), max_tokens=64)
    # Keys per query: prompt 1 + 2 + 3; a: 4, 5 (prompt + own); b: 4 (prompt + itself).
    assert layout_counts(sp) == {"tokens": 6, "scored": 3, "pairs": 6 + 9 + 4}


def test_model_flops_by_term():
    flops = model_flops(10, 4, layers=2, attn_dim=3, tokens=6, scored=3, pairs=19)
    assert flops == {
        "body": 6 * 10 * 6,
        "head": 6 * 4 * 3,
        "attention": 12 * 2 * 3 * 19,
        "total": 360 + 72 + 1368,
    }


def test_cost_curve_points_share_the_crossing_point_once():
    grid = {"groups": (4, 8), "fixed_len": 32, "lengths": (32, 128), "fixed_group": 4}
    assert points(grid) == [(4, 32), (8, 32), (4, 128)]


def test_push_share_leaves_out_the_first_step():
    first = {"step": 1, "time_rollout": 9.0, "time_train": 9.0, "time_weight_sync": 2.0}
    later = {"step": 2, "time_rollout": 5.0, "time_verify": 1.0, "time_train": 3.5}
    later["time_weight_sync"] = 0.5
    assert push_share([first, later, later]) == {
        "steps": 2,
        "step_s": 10.0,
        "push_s": 0.5,
        "share": 0.05,
    }


def test_roofline_bound_by_hand():
    from benchmarks.roofline import bound_seconds

    shape = {"matmul_params": 100, "layers": 1, "heads": 1, "kv_heads": 1, "head_dim": 2}
    # prefill: 2 x 100 x 3 FLOPs at 100 FLOP/s = 6 s (the weights' 400 bytes take 0.4 s);
    # step 1 at context 4: 2 x 100 + 4 x 1 x 1 x 2 x 4 = 232 FLOPs = 2.32 s (464 bytes: 0.464 s)
    got = bound_seconds(shape, [3], [[2]], peak=100.0, bandwidth=1000.0, width=4)
    assert abs(got - 8.32) < 1e-9
    # memory-bound: a slow bandwidth makes each pass its bytes' time instead
    got = bound_seconds(shape, [3], [[2]], peak=1e9, bandwidth=100.0, width=4)
    assert abs(got - (400 / 100 + 464 / 100)) < 1e-9


def test_roofline_variants_are_registered_engines_with_their_options():
    import importlib
    import inspect

    from benchmarks.roofline import VARIANTS
    from dphrl.engine import ENGINES

    for name, (engine, options) in VARIANTS.items():
        module, cls = ENGINES[engine].split(":")  # the engine modules import vLLM lazily
        accepts = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        assert set(options) <= set(accepts), (name, options)
