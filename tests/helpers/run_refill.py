"""torchrun driver for the DAPO refill test: `Trainer.rollout` with dynamic sampling on 2 ranks
whose groups are informative at different rates, with a stub engine and verifier (the refill
decision is what is tested, not generation). Rank 0 writes every rank's outcome as JSON."""

import json
import sys
from types import SimpleNamespace

import torch.distributed as tdist

from dphrl import dist
from dphrl.algo_config import AlgoConfig
from dphrl.tasks import Verdict
from dphrl.training import trainer
from dphrl.training.sampler import EpochSampler
from dphrl.training.trainer import Trainer

# Rank 0: every group informative. Rank 1: only prompts whose id is a multiple of 3 are, so it
# stays short for several rounds while rank 0 is full after one.
RANK = None


class Engine:
    def generate(self, ids, n, sampling):
        return [[SimpleNamespace(text=str(p[0]), token_ids=[1], logprobs=[0.0])] * n for p in ids]


def render_rows(tokenizer, rows, max_prompt_len, what):
    return [[row["id"]] for row in rows], rows


def score_outputs(task, task_cfg, rows, outputs):
    groups = []
    for row, outs in zip(rows, outputs):
        informative = RANK == 0 or row["id"] % 3 == 0
        rewards = [float(j % 2) if informative else 0.5 for j in range(len(outs))]
        groups.append(
            [SimpleNamespace(completion=c, verdict=Verdict(r)) for c, r in zip(outs, rewards)]
        )
    return groups


def main(out: str) -> None:
    global RANK
    tdist.init_process_group("gloo")
    RANK = tdist.get_rank()
    trainer.render_rows, trainer.score_outputs = render_rows, score_outputs
    t = Trainer.__new__(Trainer)
    t.algo = AlgoConfig(
        name="dapo", group_size=2, prompts_per_step=4, dynamic_sampling=True, max_refill_rounds=3
    )
    t.layout = dist.Layout("cpu", "cpu", "gloo", False, RANK, tdist.get_world_size(), RANK)
    t.cfg = SimpleNamespace(
        seed=0, model=SimpleNamespace(max_prompt_len=64, max_new_tokens=4), task=None
    )
    t.prompts = [{"id": i} for i in range(40)]
    t.prompt_sampler = EpochSampler(len(t.prompts), 0)
    t.tokenizer, t.task, t.engine, t.step_num = None, None, Engine(), 0
    t.timer = trainer.Timer()
    outcome = []
    for _ in range(2):  # two steps: the second starts where the samplers left off
        r = t.rollout()
        outcome.append({"rollouts": len(r.scored), "sampler": t.prompt_sampler.state_dict()})
        t.step_num += 1
    every = [None] * tdist.get_world_size()
    tdist.all_gather_object(every, outcome)
    if RANK == 0:
        with open(out, "w") as f:
            json.dump(every, f)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
