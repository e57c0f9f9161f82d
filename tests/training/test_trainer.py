"""`dphrl train` on a tiny random model and the toy `coin` task: every divergence and algo,
the ref batch at step 0, dynamic sampling, bad configs, exact resume and the final model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dphrl.commands import train as trainer
from dphrl.data import read_jsonl
from dphrl.errors import ConfigError
from dphrl.presample.inputs import training_data
from dphrl.training.trainer import Trainer
from tests.conftest import compose_config
from tests.helpers import toytask

# Whole train runs (split, ref store, steps): the slow tier. tests/training/test_smoke.py keeps one
# two-step run in the fast tier.
pytestmark = pytest.mark.slow

FAST = [
    "task=arith",  # replaced by coin below; arith composes the task group
    "engine=hf",
    "model.max_new_tokens=12",
    "algo.group_size=4",
    "algo.prompts_per_step=2",
    "split.k=2",
    "trainer.ref_batch_size=4",
    "trainer.lr=1e-2",
    "trainer.tensorboard=false",
    "task.limit=12",
]


@pytest.fixture(autouse=True)
def coin(monkeypatch):
    toytask.register(monkeypatch)


def _cfg(tmp: Path, model: str, *extra: str, data: Path | None = None):
    data = data or tmp
    return compose_config(
        [
            *FAST,
            "task.name=coin",
            f"model.path={model}",
            f"split.out={data}/split",
            f"ref.out={data}/ref",
            f"trainer.run_dir={tmp}/run",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Split and ref store for the tiny model, made once by the pipeline train runs itself."""
    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    toytask.register(mp)
    tmp = tmp_path_factory.mktemp("data")
    trainer.run(_cfg(tmp, tiny_model_dir, "trainer.max_steps=1", "ref.keep=all"), tmp)
    mp.undo()
    return tmp


def _metrics(tmp: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl, one per logged step."""
    return read_jsonl(tmp / "run" / "metrics.jsonl")


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize(
    "overrides",
    [
        ["divergence=forward_kl"],
        ["divergence=js"],
        ["divergence=js_full"],
        ["divergence=alpha"],
        ["divergence=reverse_kl"],
        ["divergence=none"],
        # every tiny-model response hits max_new_tokens, so overlong filtering would mask them all
        ["divergence=js", "algo=dapo_ds", "algo.overlong.filter=false"],
        # several PPO passes: old log-probs come from their own forward before the first update
        ["divergence=js", "algo.ppo_epochs=2", "algo.minibatch_size=4"],
    ],
    ids=lambda o: "+".join(o),
)
def test_one_step_runs_and_moves_the_weights(overrides, data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(
        tmp_path, tiny_model_dir, "trainer.max_steps=1", "ref.keep=all", *overrides, data=data_dir
    )
    out = trainer.run(cfg, tmp_path)
    before, after = _weights(Path(tiny_model_dir)), _weights(out)
    moved = sum(float((before[k] - after[k]).abs().max()) for k in before)
    assert moved > 0
    metrics = _metrics(tmp_path)
    assert len(metrics) == 1 and metrics[0]["grad_norm"] > 0
    single_pass = "algo.ppo_epochs=2" not in overrides  # later passes see an updated policy
    if single_pass and overrides[0] in (
        "divergence=forward_kl",
        "divergence=js",
        "divergence=alpha",
        "divergence=js_full",
    ):
        assert metrics[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # log r = 0 at step 0
        assert metrics[0]["div_loss"] == pytest.approx(0.0, abs=1e-6)


def test_the_ref_batch_has_log_r_zero_at_step_0(data_dir, tiny_model_dir, tmp_path):
    from dphrl import dist

    cfg = _cfg(tmp_path, tiny_model_dir, "ref.keep=all", data=data_dir)
    prompts, ref_rows = training_data(cfg, True, tiny_model_dir)
    t = Trainer(
        cfg, tmp_path / "run", dist.resolve_layout(cfg.layout), prompts, ref_rows, tiny_model_dir
    )
    batch, ref_logp = t.ref_batch()
    logp = t.logprobs(t.policy, batch, 1.0)
    assert float((logp - ref_logp).abs().max()) < 1e-5


def test_autocast_runs_the_body_in_bfloat16_over_float32_weights(
    data_dir, tiny_model_dir, tmp_path
):
    """model.autocast=bfloat16: log-probs come back float32, near float32's but not equal (the
    body's rounding is there); a run whose ref store precompute-ref made under the same
    autocast gives log r = 0 at step 0 again; the step updates and saves float32 weights."""
    import torch

    from dphrl import dist

    overrides = ("ref.keep=all", "divergence=js", "model.autocast=bfloat16")
    cfg = _cfg(tmp_path, tiny_model_dir, *overrides, data=data_dir)
    layout = dist.resolve_layout(cfg.layout)
    prompts, ref_rows = training_data(cfg, layout.is_main, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "run", layout, prompts, ref_rows, tiny_model_dir)
    batch, ref_logp = t.ref_batch()  # data_dir's store: float32 log-probs
    logp = t.logprobs(t.policy, batch, 1.0)
    assert logp.dtype == torch.float32
    gap = float((logp - ref_logp).abs().max())
    assert 0 < gap < 0.1
    own = tmp_path / "own"
    own_cfg = _cfg(own, tiny_model_dir, "trainer.max_steps=1", *overrides)
    out = trainer.run(own_cfg, own)  # makes its split and store, then steps
    _, own_rows = training_data(own_cfg, layout.is_main, tiny_model_dir)
    fresh = Trainer(own_cfg, own / "fresh", layout, prompts, own_rows, tiny_model_dir)
    batch, ref_logp = fresh.ref_batch()
    assert float((fresh.logprobs(fresh.policy, batch, 1.0) - ref_logp).abs().max()) < gap / 100
    before, after = _weights(Path(tiny_model_dir)), _weights(out)
    assert all(w.dtype == torch.float32 for w in after.values())
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0


def test_dynamic_sampling_keeps_only_informative_groups_and_refills(
    data_dir, tiny_model_dir, tmp_path
):
    from dphrl import dist

    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "algo=dapo_ds",
        "algo.prompts_per_step=4",
        "ref.keep=all",
        data=data_dir,
    )
    layout = dist.resolve_layout(cfg.layout)
    prompts, ref_rows = training_data(cfg, layout.is_main, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "run", layout, prompts, ref_rows, tiny_model_dir)
    r = t.rollout()
    groups = r.rewards.view(-1, 4)
    assert len(groups) > 0
    assert bool((groups.amax(-1) > groups.amin(-1)).all())
    drawn = t.prompt_sampler.state_dict()
    assert drawn["epoch"] * len(prompts) + drawn["offset"] >= 4  # at least one draw of 4 prompts


def test_empty_ref_store_with_a_divergence_that_needs_it_fails_before_rollout(
    data_dir, tiny_model_dir, tmp_path, monkeypatch
):
    import shutil

    from dphrl.presample import refstore

    shutil.copytree(data_dir / "split", tmp_path / "split")
    (tmp_path / "split" / "pef.jsonl").write_text(
        '{"id": 0, "prompt": [], "reward_model": {"ground_truth": "even"}}\n'
    )
    # D_pef has a prompt, but none of its responses is kept (ref.keep=correct, all wrong).
    monkeypatch.setattr(refstore._ShardSampler, "sample", lambda self, chunk: [])
    cfg = _cfg(tmp_path, tiny_model_dir, "divergence=js")
    with pytest.raises(ConfigError, match="needs ref-store responses"):
        trainer.run(cfg, tmp_path)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_pef_trains_with_the_divergence_off(data_dir, tiny_model_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(data_dir / "split", tmp_path / "split")
    (tmp_path / "split" / "pef.jsonl").write_text("")
    with caplog.at_level("INFO", logger="dphrl"):
        trainer.run(
            _cfg(tmp_path, tiny_model_dir, "divergence=js", "trainer.max_steps=1"), tmp_path
        )
    assert "D_pef is empty" in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["div_loss"] == 0.0


def test_killed_run_resumes_exactly(data_dir, tiny_model_dir, tmp_path):
    steps = ["trainer.max_steps=4", "trainer.save_every=1", "ref.keep=all", "divergence=js"]
    whole = trainer.run(_cfg(tmp_path / "a", tiny_model_dir, *steps, data=data_dir), tmp_path)
    trainer.run(
        _cfg(tmp_path / "b", tiny_model_dir, *steps, data=data_dir),
        tmp_path,
        stop_after_step=2,
    )
    resumed = trainer.run(
        _cfg(tmp_path / "b", tiny_model_dir, *steps, "trainer.resume=true", data=data_dir), tmp_path
    )

    def metrics(run):
        lines = (run.parent / "metrics.jsonl").read_text().splitlines()
        return [
            {
                k: v
                for k, v in json.loads(line).items()
                if not k.startswith(("time_", "tokens_per_s"))
            }
            for line in lines
        ]

    a, b = metrics(whole), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-7)
    wa, wb = _weights(whole), _weights(resumed)
    assert all(float((wa[k] - wb[k]).abs().max()) < 1e-6 for k in wa)


def test_eval_every_reports_pass_at_k_during_training(data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "trainer.max_steps=2",
        "eval.every=2",
        "eval.n=4",
        "eval.k=[1,4]",
        "eval.limit=3",
        "ref.keep=all",
        data=data_dir,
    )
    trainer.run(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert "eval_pass@1" not in rows[0]
    assert 0.0 <= rows[1]["eval_pass@1"] <= rows[1]["eval_pass@4"] <= 1.0
    assert rows[1]["eval_greedy"] in {0.0, 1 / 3, 2 / 3, 1.0}  # eval.greedy: one answer a prompt


def test_eval_pef_limit_also_evaluates_the_splits_d_pef_prompts(data_dir, tiny_model_dir, tmp_path):
    """eval.pef_limit: eval.every also samples the split's first D_pef prompts, logged as
    eval_pef_* beside the held-out eval_*, with the same k values."""
    pef = read_jsonl(data_dir / "split" / "pef.jsonl")
    if not pef:
        pytest.skip("the tiny model solved no prompt in every sample")
    limit = min(2, len(pef))
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "trainer.max_steps=1",
        "eval.every=1",
        "eval.n=2",
        "eval.k=[1,2]",
        "eval.limit=2",
        f"eval.pef_limit={limit}",
        "ref.keep=all",
        data=data_dir,
    )
    trainer.run(cfg, tmp_path)
    (row,) = _metrics(tmp_path)
    assert {"eval_pass@1", "eval_pass@2", "eval_greedy"} <= set(row)
    assert 0.0 <= row["eval_pef_pass@1"] <= row["eval_pef_pass@2"] <= 1.0
    assert row["eval_pef_greedy"] in {i / limit for i in range(limit + 1)}


def test_eval_pef_limit_without_a_split_names_the_file(tmp_path):
    from dphrl.training.heldout import pef_rows

    with pytest.raises(ConfigError, match=r"eval.pef_limit=4 .*split/pef.jsonl does not exist"):
        pef_rows(str(tmp_path / "split"), 4)


def test_eval_at_end_false_skips_only_the_last_steps_eval(data_dir, tiny_model_dir, tmp_path):
    """eval.at_end=false (the reproduction evaluates the final model with eval-passk): the
    middle step is evaluated, the last is not."""
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "trainer.max_steps=2",
        "eval.every=1",
        "eval.at_end=false",
        "eval.n=2",
        "eval.k=[1]",
        "eval.limit=2",
        "ref.keep=all",
        data=data_dir,
    )
    trainer.run(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert [("eval_pass@1" in r) for r in rows] == [True, False]


def test_beta_below_zero_is_refused():
    with pytest.raises(ConfigError, match="divergence.beta"):
        compose_config(["divergence.beta=-0.1"])


def test_zero_advantage_rows_skip_the_forward_and_the_update_is_unchanged(
    data_dir, tiny_model_dir, tmp_path
):
    """Groups whose rewards are all equal add nothing to PPO-clip: skipping their forward
    leaves the loss, statistics and AdamW update as a full forward gives them (also over two
    PPO passes of two minibatches), and a step with no informative group still steps AdamW."""
    import dataclasses

    import torch

    from dphrl import dist

    cfg = _cfg(
        tmp_path, tiny_model_dir, "divergence=none", "algo.ppo_epochs=2",
        "algo.minibatch_size=4", "algo.prompts_per_step=3", data=data_dir,
    )  # fmt: skip
    layout = dist.resolve_layout(cfg.layout)
    prompts, _ = training_data(cfg, layout.is_main, tiny_model_dir)
    skip, full = (Trainer(cfg, tmp_path / k, layout, prompts, [], tiny_model_dir) for k in "ab")
    full._policy_logprobs = lambda mb: full.logprobs(
        full.policy, mb.rollouts, full.algo.temperature, grad=True
    )
    rows = []
    forward = skip.logprobs
    skip.logprobs = lambda model, batch, *a, **k: (
        rows.append(len(batch)) or forward(model, batch, *a, **k)
    )
    r = skip.rollout()

    def with_rewards(rewards):
        scored = [
            dataclasses.replace(s, verdict=dataclasses.replace(s.verdict, reward=float(x)))
            for s, x in zip(r.scored, rewards)
        ]
        return dataclasses.replace(r, scored=scored)

    # group 1 informative, groups 0 and 2 all equal: rows 4-7 alone carry a gradient
    for rewards in ([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], [0] * 12):
        rows.clear()
        before = [p.detach().clone() for p in skip.policy.parameters()]
        r2 = with_rewards(rewards)
        stats = [t.update(t.batch(r2, t.advantages(r2))) for t in (skip, full)]
        for key in ("pg_loss", "clip_frac", "grad_norm"):
            assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5, abs=1e-7), key
        a, b = dict(skip.policy.named_parameters()), dict(full.policy.named_parameters())
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
        grad_rows = rows[1:]  # rows[0]: batch's old-log-prob forward over all 12
        assert rows[0] == 12 and grad_rows == ([4] * 2 if any(rewards) else [])
        moved = max(float((p.detach() - q).abs().max()) for p, q in zip(a.values(), before))
        assert moved > 1e-4  # AdamW's momentum moves the weights on a zero gradient too
    assert stats[0]["grad_norm"] == 0.0


def test_the_first_minibatch_takes_its_old_log_probs_from_its_own_forward(
    data_dir, tiny_model_dir, tmp_path
):
    """One epoch of three minibatches: the old-log-prob forward before the updates covers the
    last two minibatches' rows only (the first one's loss forward comes before any update, so
    its detached log-probs are the old ones), and the step's statistics and AdamW update are
    those of a separate forward of every row first, as before."""
    import dataclasses

    import torch

    from dphrl import dist

    cfg = _cfg(
        tmp_path, tiny_model_dir, "divergence=none", "algo.minibatch_size=4",
        "algo.prompts_per_step=3", data=data_dir,
    )  # fmt: skip
    layout = dist.resolve_layout(cfg.layout)
    prompts, _ = training_data(cfg, layout.is_main, tiny_model_dir)
    new, full = (Trainer(cfg, tmp_path / k, layout, prompts, [], tiny_model_dir) for k in "ab")
    T = new.algo.temperature
    forwarded, olds = [], []
    in_parts = new.logprobs_in_parts
    new.logprobs_in_parts = lambda model, batch, t: (
        forwarded.append(len(batch)) or in_parts(model, batch, t)
    )
    backward = new.backward
    new.backward = lambda mb: olds.append(mb.old_logp) or backward(mb)
    made = []  # what old_logprobs returned
    old_logprobs = new.old_logprobs
    new.old_logprobs = lambda *args: made.append(old_logprobs(*args)) or made[-1]
    # the reference: every row's old log-probs from a forward before the first update
    full.old_logprobs = lambda b, *_: full.logprobs_in_parts(full.policy, b.rollouts, T)
    full_backward = full.backward
    first_old = []

    def backward_with_old(mb):
        if mb.old_logp is None:  # minibatch 0, before any update: forward its rows apart
            first_old.append(full.logprobs_in_parts(full.policy, mb.rollouts, T))
            mb = dataclasses.replace(mb, old_logp=first_old[-1])
        return full_backward(mb)

    full.backward = backward_with_old
    r = new.rollout()
    scored = [
        dataclasses.replace(s, verdict=dataclasses.replace(s.verdict, reward=float(i % 2)))
        for i, s in enumerate(r.scored)
    ]  # every group informative: each minibatch carries a gradient
    r = dataclasses.replace(r, scored=scored)
    batch = new.batch(r, new.advantages(r))
    assert forwarded == [] and batch.old_logp is None  # pi_old comes in update
    reference = full.logprobs_in_parts(full.policy, batch.rollouts, T)  # before any update
    stats = [new.update(batch), full.update(full.batch(r, full.advantages(r)))]
    assert forwarded == [8]  # groups 1 and 2 (minibatches 1 and 2), not group 0
    (old,) = made
    assert float(old[:4].abs().max()) == 0.0  # never read
    torch.testing.assert_close(old[4:], reference[4:], atol=1e-6, rtol=1e-5)
    assert olds[0] is None and all(o is not None for o in olds[1:]) and len(olds) == 3
    assert len(first_old) == 1
    for key in ("pg_loss", "clip_frac", "grad_norm"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5, abs=1e-7), key
    a, b = dict(new.policy.named_parameters()), dict(full.policy.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert stats[0]["adam_updates"] == 3


@pytest.mark.parametrize(
    "overrides",
    [
        ["divergence=forward_kl", "algo.loss=dppo_tv"],
        ["divergence=alpha", "algo.loss=dppo_kl", "algo.advantage=maxrl"],
        ["divergence=js", "algo.loss=cispo", "algo.entropy.target=100", "trainer.max_steps=2"],
    ],
    ids=lambda o: "+".join(o),
)
def test_the_2026_objectives_train_with_a_divergence(overrides, data_dir, tiny_model_dir, tmp_path):
    """Each new loss / advantage composes with a ref-store divergence and moves the weights;
    every step logs the rehearsal's forgetting (0 at step 0: log r = 0). The entropy target far
    above the tiny model's entropy makes the coefficient climb one step a step from 0."""
    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.max_steps=1", "ref.keep=all", *overrides,
               data=data_dir)  # fmt: skip
    out = trainer.run(cfg, tmp_path)
    before, after = _weights(Path(tiny_model_dir)), _weights(out)
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0
    metrics = _metrics(tmp_path)
    first = metrics[0]
    assert first["ref_logratio_token"] == pytest.approx(0.0, abs=1e-5)
    assert first["ref_logratio_seq"] == pytest.approx(0.0, abs=1e-4)
    assert first["ref_forgot_frac"] == 0.0
    if "algo.entropy.target=100" in overrides:
        assert [m["entropy_coef"] for m in metrics] == pytest.approx([0.0, 0.005])
        assert first["policy_entropy"] > 0


def test_forward_kl_topk_trains_on_a_store_with_top_k(data_dir, tiny_model_dir, tmp_path):
    """divergence=forward_kl_topk (ref.topk=8 from its config file) builds its own store with
    the top-k columns next to the split, and trains on it: 0 at step 0, weights moved."""
    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.max_steps=1", "ref.keep=all",
               "divergence=forward_kl_topk", data=data_dir)  # fmt: skip
    cfg.ref.out = str(tmp_path / "ref_top8")
    out = trainer.run(cfg, tmp_path)
    manifest = json.loads((tmp_path / "ref_top8" / "manifest.json").read_text())
    assert manifest["topk"] == 8
    before, after = _weights(Path(tiny_model_dir)), _weights(out)
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0
    (m,) = _metrics(tmp_path)
    assert m["div_loss"] == pytest.approx(0.0, abs=1e-5)  # the stored top-k is the policy's own
    assert m["kl_ref"] == pytest.approx(0.0, abs=1e-6)
