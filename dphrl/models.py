"""Loading a resolved model folder: its tokenizer, its policy in a dtype on a device, the hash
of its weights, and the cache folder every built artifact lives under.

`model.path` is resolved to such a folder first (`dphrl.embedded.resolve_model_path`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """`model.cache_dir`, else `$DPHRL_CACHE`, else `<user cache dir>/dphrl`."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("DPHRL_CACHE"):
        return Path(os.environ["DPHRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dphrl"


def load_tokenizer(model_path: str):
    """The tokenizer of a resolved model folder, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_path: str, dtype: str = "float32", device: str = "cpu"):
    """The trainable causal LM, in the training dtype, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    return model.to(device)


def weights_hash(model_path: str) -> str:
    """SHA-256 over a model folder's weight files, so a ref store can name the model it came from."""
    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return f"unhashed:{model_path}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
