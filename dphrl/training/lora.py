"""LoRA adapters through peft: add them, push merged weights, save, and load a saved adapter.

The policy stays the plain transformers model (peft injects its LoRA layers in place), so every
forward in dphrl (log-probs, packing) runs unchanged; `PeftModel` is kept beside it for what
only peft knows: `disable_adapter()` (the online reference is the policy without adapters)
and `save_pretrained` (the adapter folder). The rollout engine never sees LoRA: it gets
W + (alpha / r) B A under the base weight names at each push.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dphrl.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "dphrl_base.json"  # the model.path the adapter was trained on (a resolvable spec)


def add_adapters(model: torch.nn.Module, lora: LoraConfig) -> Any:
    """Inject LoRA layers into `model` (in place; base weights frozen); return the PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(peft_model: Any, tokenizer: Any, out: str | os.PathLike, base: str) -> Path:
    """Write the adapter folder (peft's files and the tokenizer), naming `base` (model.path)."""
    out = Path(out)
    peft_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / BASE_FILE).write_text(json.dumps({"model_path": base}) + "\n")
    return out


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merged_model_dir(adapter: str | os.PathLike, base_path: str, out: str | os.PathLike) -> Path:
    """An HF folder of `base_path` with the adapter merged in, made once under `out` (named by
    the adapter's content hash) and reused: what an engine can load."""
    from peft import PeftModel

    from dphrl.models import load_policy, load_tokenizer

    adapter = Path(adapter)
    digest = hashlib.sha256()
    for f in sorted(adapter.iterdir()):
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    target = Path(out) / f"{adapter.name}-{digest.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    merged = PeftModel.from_pretrained(load_policy(base_path), adapter).merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    merged.save_pretrained(tmp)
    has_tokenizer = (adapter / "tokenizer_config.json").exists()
    load_tokenizer(str(adapter) if has_tokenizer else base_path).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def base_of(adapter: str | os.PathLike) -> str:
    """The model the adapter was trained on: dphrl's record of model.path, else peft's."""
    ours = Path(adapter) / BASE_FILE
    if ours.is_file():
        return json.loads(ours.read_text())["model_path"]
    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
