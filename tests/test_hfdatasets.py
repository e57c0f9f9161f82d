"""Hugging Face datasets as task data: every task's loader sees the rows a file gives.

No hub access: the datasets are built here, saved with `save_to_disk`, read from a local data
folder by `load_dataset`, or placed in a datasets cache under a hub ID and read offline, as a
researcher's machine reads GSM8K after its first download.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from dphrl.config import TaskConfig
from dphrl.errors import ConfigError, DataError
from dphrl.hfdatasets import DatasetSpec, parse_spec
from dphrl.tasks import get_task
from tests.conftest import compose_config

datasets = pytest.importorskip("datasets")

GSM8K = [
    {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Bo reads 2 pages a day for 5 days. Pages?", "answer": "2 * 5 = 10\n#### 10"},
    {"question": "A pack holds 6 eggs. Eggs in 3 packs?", "answer": "6 * 3 = 18\n#### 18"},
]


def gsm8k_dict() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(GSM8K), "test": datasets.Dataset.from_list(GSM8K[:1])}
    )


def hub_cached(data: datasets.DatasetDict, repo: str, config: str, cache: Path) -> None:
    """Put `data` in the datasets cache `cache` as `load_dataset(repo, config)` leaves it after a
    download: built from parquet files, then filed under the hub ID's cache folder."""
    files = cache.parent / "hub_files" / config
    files.mkdir(parents=True)
    for split, part in data.items():
        part.to_parquet(str(files / f"{split}-00000-of-00001.parquet"))
    built = cache.parent / "built"
    datasets.load_dataset(str(files.parent), cache_dir=str(built))
    (found,) = (p.parent for p in built.rglob("dataset_info.json"))
    name = repo.split("/")[-1]
    target = cache / repo.replace("/", "___") / config / "0.0.0" / "cached"
    target.parent.mkdir(parents=True)
    shutil.copytree(found, target, ignore=shutil.ignore_patterns("*.lock"))
    for arrow in target.glob("*.arrow"):
        arrow.rename(target / arrow.name.replace(found.parts[-4], name, 1))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name)
    for split in info["splits"].values():
        split["dataset_name"] = name
    (target / "dataset_info.json").write_text(json.dumps(info))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache, offline (as `HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE=...` set
    before `datasets` is imported would make it)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_spec_parses_name_config_and_split_and_rejects_a_malformed_one():
    assert parse_spec("hf:openai/gsm8k:main@train") == DatasetSpec("openai/gsm8k", "main", "train")
    assert parse_spec("hf:HuggingFaceH4/MATH-500@test") == DatasetSpec(
        "HuggingFaceH4/MATH-500", None, "test"
    )
    assert parse_spec("hf:/data/gsm8k_saved") == DatasetSpec("/data/gsm8k_saved")
    assert str(parse_spec("hf:openai/gsm8k:main@train")) == "hf:openai/gsm8k:main@train"
    for bad in ("hf:", "hf:openai/gsm8k:@train", "hf:openai/gsm8k@", "hf:@train"):
        with pytest.raises(ConfigError, match=r"task\.path=.*hf:<name>\[:<config>\]\[@<split>\]"):
            parse_spec(bad)


def test_config_takes_the_readme_dataset_specs_without_looking_them_up():
    """The README's GSM8K-from-the-hub commands compose and validate (nothing is fetched)."""
    train = compose_config(
        ["task=gsm8k", "task.path=hf:openai/gsm8k:main@train"]
        + ["task.eval_path=hf:openai/gsm8k:main@test", "eval.every=10", "eval.limit=64"]
    )
    assert train.task.path == "hf:openai/gsm8k:main@train"
    evaluate = compose_config(
        ["task=gsm8k", "task.eval_path=hf:openai/gsm8k:main@test", "eval.models=[a,b]"]
        + ["eval.datasets=[gsm8k,'math=hf:HuggingFaceH4/MATH-500@test']"],
        "eval-passk",
    )
    assert evaluate.eval.datasets == ["gsm8k", "math=hf:HuggingFaceH4/MATH-500@test"]
    with pytest.raises(ConfigError, match="eval.datasets entry gsm8k"):
        compose_config(["task=gsm8k", "task.path=hf:a@b", "eval.datasets=['gsm8k=hf:a:@b']"])


def test_gsm8k_rows_are_the_same_from_a_file_the_hub_cache_and_a_saved_folder(
    tmp_path, offline_cache
):
    rows_file = tmp_path / "train.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    hub_cached(gsm8k_dict(), "testorg/gsm8k-mini", "main", offline_cache)
    gsm8k_dict().save_to_disk(str(tmp_path / "saved"))
    gsm8k_dict()["train"].save_to_disk(str(tmp_path / "saved_train"))

    task = get_task("gsm8k")
    from_file = task.load(TaskConfig(name="gsm8k", path=str(rows_file)))
    assert [r["reward_model"]["ground_truth"] for r in from_file] == ["7", "10", "18"]
    for source in (
        "hf:testorg/gsm8k-mini:main@train",  # a hub ID, offline, from the cache
        f"hf:{tmp_path / 'hub_files'}@train",  # a local folder load_dataset reads
        f"hf:{tmp_path / 'saved'}@train",  # DatasetDict.save_to_disk
        str(tmp_path / "saved_train"),  # Dataset.save_to_disk, as a plain path
    ):
        assert task.load(TaskConfig(name="gsm8k", path=source)) == from_file, source
    held_out = task.load(
        TaskConfig(name="gsm8k", eval_path="hf:testorg/gsm8k-mini:main@test"), "eval"
    )
    assert held_out == from_file[:1]


def test_verl_shaped_sql_rows_are_the_same_from_parquet_and_a_dataset(tmp_path):
    """A BIRD / Spider mirror in the verl row shape: nested prompt and ground-truth structs."""
    root = tmp_path / "dbs"
    (root / "zoo").mkdir(parents=True)
    with sqlite3.connect(root / "zoo" / "zoo.sqlite") as conn:
        conn.executescript("CREATE TABLE keeper (name TEXT); INSERT INTO keeper VALUES ('Mia');")
    truth = {"db_id": "zoo", "gold_sql": "SELECT name FROM keeper", "cmp_method": "bird"}
    rows = [
        {
            "data_source": "bird",
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"index": i},
        }
        for i in range(2)
    ]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))

    task = get_task("bird")
    cfg = TaskConfig(name="bird", path=str(tmp_path / "rows.parquet"), db_root=str(root))
    from_file = task.load(cfg)
    assert from_file[1]["reward_model"]["ground_truth"]["gold_sql"] == "SELECT name FROM keeper"
    cfg.path = f"hf:{tmp_path / 'saved'}"
    assert task.load(cfg) == from_file


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    datasets.Dataset.from_list([{"problem": "1+1?", "final": "2"}]).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(DataError, match=r"hf:.*/d:1: .*its columns: final, problem"):
        get_task("math").load(TaskConfig(name="math", path=f"hf:{tmp_path / 'd'}"))
    datasets.Dataset.from_list([{"question": "q", "db": "zoo"}]).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DataError, match="not a SQL row.*its columns: db, question"):
        get_task("bird").load(TaskConfig(name="bird", path=str(tmp_path / "s"), db_root="/"))


def test_offline_without_a_cached_copy_and_an_unnamed_split_say_what_to_do(tmp_path, offline_cache):
    with pytest.raises(DataError, match="not in the datasets cache.*HF_DATASETS_OFFLINE"):
        get_task("gsm8k").load(TaskConfig(name="gsm8k", path="hf:openai/gsm8k:main@train"))
    gsm8k_dict().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(
        DataError, match=r"holds the splits train, test; name one, e\.g\. hf:.*@train"
    ):
        get_task("gsm8k").load(TaskConfig(name="gsm8k", path=str(tmp_path / "saved")))
    with pytest.raises(DataError, match="no split 'dev'; its splits: train, test"):
        get_task("gsm8k").load(TaskConfig(name="gsm8k", path=f"hf:{tmp_path / 'saved'}@dev"))
