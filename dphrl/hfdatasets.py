"""Hugging Face datasets as row sources: `task.path` (or an `eval.datasets` entry) names one.

The math and SQL sets researchers use are published as Hugging Face datasets (GSM8K, MATH-500,
BIRD / Spider mirrors in the verl row shape), so a task reads them where it reads a file:

    hf:<name>[:<config>][@<split>]      e.g. hf:openai/gsm8k:main@train, hf:HuggingFaceH4/MATH-500@test

This spelling needs no quotes in a Hydra override (`task.path=hf:openai/gsm8k:main@train`);
inside a list the `name=spec` entry is quoted as a file's is
(`"eval.datasets=['gsm8k=hf:openai/gsm8k:main@test']"`). `<name>` is a hub ID or a local
folder `datasets.load_dataset` reads; a folder written by `save_to_disk` is read with
`load_from_disk`, with or without the `hf:` prefix. The split may be left out when the dataset
has one. Loading goes through the `datasets` library, so `HF_DATASETS_OFFLINE=1` and the cache
(`HF_DATASETS_CACHE` / `HF_HOME`) behave as they do for any of its users: offline, a hub ID
loads from the cache or fails with a `DataError` saying so.

Rows come back as the plain dicts a parquet file gives (`dphrl.data.read_rows`), so every task's
row loader sees the same rows from a dataset as from the file it was saved from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dphrl.errors import ConfigError, DataError

PREFIX = "hf:"
# what `save_to_disk` writes: a DatasetDict's index, or one Dataset's state
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `hf:<name>[:<config>][@<split>]`."""

    name: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return (
            PREFIX
            + self.name
            + (f":{self.config}" if self.config else "")
            + (f"@{self.split}" if self.split else "")
        )


def is_dataset(source: str | os.PathLike) -> bool:
    """Whether `source` names a dataset (an `hf:` spec, or a `save_to_disk` folder), not a file."""
    text = str(source)
    return text.startswith(PREFIX) or is_saved_folder(text)


def is_saved_folder(path: str | os.PathLike) -> bool:
    """A folder `Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote."""
    folder = Path(path).expanduser()
    return folder.is_dir() and any((folder / marker).is_file() for marker in _SAVED_MARKERS)


def parse_spec(source: str, key: str = "task.path") -> DatasetSpec:
    """`hf:<name>[:<config>][@<split>]` (or a saved folder's path) -> its parts.

    A malformed spec is a `ConfigError` naming `key`, so `validate` can reject it before any
    work; nothing is downloaded here.
    """
    if not source.startswith(PREFIX):
        return DatasetSpec(name=source)
    body = source.removeprefix(PREFIX)
    rest, at, split = body.rpartition("@") if "@" in body else (body, "", "")
    name, colon, config = rest.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise ConfigError(
            f"{key}={source!r} is not a dataset spec; write hf:<name>[:<config>][@<split>], "
            "e.g. hf:openai/gsm8k:main@train"
        )
    return DatasetSpec(name=name, config=config or None, split=split or None)


def read_dataset_rows(source: str) -> list[dict]:
    """The rows of one split of the dataset `source` names, as plain dicts.

    Raises `DataError` naming the spec and what to do: `datasets` missing, offline without a
    cached copy, an unknown dataset, config or split (with the splits there are).
    """
    spec = parse_spec(source)
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{source}: reading a Hugging Face dataset needs the `datasets` package; pip install datasets"
        ) from err
    loaded = _load(datasets, spec, source)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _one_split(loaded, spec, source)
    return loaded.to_list()


def _load(datasets, spec: DatasetSpec, source: str):
    """A `Dataset` (a split was named or the folder holds one) or a `DatasetDict`."""
    if is_saved_folder(spec.name):
        try:
            return datasets.load_from_disk(str(Path(spec.name).expanduser()))
        except (OSError, ValueError) as err:
            raise DataError(f"{source}: not a readable saved dataset ({err})") from err
    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except ConnectionError as err:  # offline, or the hub unreachable, and nothing cached
        raise DataError(
            f"{source}: {err}; the dataset is not in the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}). Load it once online (unset "
            "HF_DATASETS_OFFLINE), or give the cache that holds it in HF_DATASETS_CACHE"
        ) from err
    except (FileNotFoundError, ValueError) as err:  # no such dataset, config or split
        raise DataError(
            f"{source}: {err}; check the name, the config after ':' and the split after '@'"
        ) from err


def _one_split(loaded, spec: DatasetSpec, source: str):
    """The split `spec` names of a DatasetDict, or its only one."""
    splits = list(loaded)
    if spec.split is not None:
        if spec.split not in loaded:
            raise DataError(f"{source}: no split {spec.split!r}; its splits: {', '.join(splits)}")
        return loaded[spec.split]
    if len(splits) == 1:
        return loaded[splits[0]]
    shown = source if source.startswith(PREFIX) else PREFIX + source
    raise DataError(
        f"{source}: holds the splits {', '.join(splits)}; name one, e.g. {shown}@{splits[0]}"
    )
