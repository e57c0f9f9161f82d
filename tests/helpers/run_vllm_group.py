"""Driver for the torchrun test of the vLLM engine under a process group dphrl made: each rank
starts its own engine (vLLM's external_launcher), samples, closes it, starts a second one
the same way, and the default group still all-reduces. Writes `<folder>/rank<r>.json`."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from dphrl import dist
from dphrl.config import LayoutConfig
from dphrl.engine import Sampling
from dphrl.engine.vllm import VLLMEngine

layout = dist.resolve_layout(LayoutConfig(name="cpu", device="cpu", backend="gloo"))
dist.init(layout)
prompt = [[1, 2, 3, 4, 5 + layout.rank]]
samples = []
for _ in range(2):  # a second engine after the first's close: eval-passk's next model
    engine = VLLMEngine(sys.argv[1], seed=0, max_model_len=256)
    out = engine.generate(prompt, 2, Sampling(temperature=1.0, max_new_tokens=6, seed=layout.rank))
    samples.append([c.token_ids for c in out[0]])
    engine.close()
total = torch.tensor([float(layout.rank + 1)])
tdist.all_reduce(total)  # the trainer's group survived the engine's close
result = {"rank": layout.rank, "samples": samples, "sum": total.item()}
(Path(sys.argv[2]) / f"rank{layout.rank}.json").write_text(json.dumps(result))
dist.shutdown()
