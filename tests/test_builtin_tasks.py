"""Built-in tasks end to end (indexer/tasks): a model trained a few steps and saved the way its stack saves it, indexed
from a config with no Python of the user's, served by a real `tracin serve`, queried over HTTP, and in exact mode
equal to the float64 oracle (one torch.autograd.grad per example, tests/oracle.py).

torchvision's tests are in tests/test_builtin_vision.py: they run in this venv when torchvision imports here, else
in `.venv-vision` (`make vision-venv`) through `test_vision_tasks_in_their_own_venv` below.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from indexer.cli import main as tracin
from indexer.config import ConfigError, load_config
from indexer.store.directory import IndexDirectory
from tests import builtin_support as bs
from tests.oracle import tracin_matrix
from tests.service_support import checkpoints_of, start_server

REPO = Path(__file__).resolve().parents[1]


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[huggingface,data]')")


def _traced(task, layers) -> set[str] | None:
    if not layers:
        return None
    return {n for n, p in task.build_model().named_parameters()
            if p.requires_grad and any(fnmatch.fnmatch(n.rsplit(".", 1)[0], pattern) for pattern in layers)}


def assert_oracle(config_path: Path, index_path: Path, query: dict | None = None, label=None,
                  server_url: str | None = None) -> dict | None:
    """Self-influence of every training row equals the float64 oracle (relative 1e-6 of the largest); with a
    `query` (a JSON example) and a served index, the HTTP answer's scores equal the oracle's for those rows."""
    config = load_config(config_path)
    task = config.task.build()
    train = task.training_set()
    names = _traced(task, config.layers)
    ckpts = checkpoints_of(index_path)
    matrix = tracin_matrix(task, ckpts, train.inputs, train.labels, train.inputs, train.labels, names)
    index = IndexDirectory.open(index_path)
    self_influence = np.asarray(index.self_influence, dtype=np.float64)
    diag = matrix.diagonal().numpy()
    scale = np.abs(diag).max()
    assert scale > 0
    np.testing.assert_allclose(self_influence, diag, rtol=0, atol=1e-6 * scale)
    if query is None:
        return None
    body = {"example": query, "k": 5, **({"label": label} if label is not None else {})}
    answer = httpx.post(server_url + "/influence", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    inputs = task.encode([task.example_schema.model_validate(query)])
    used = task.labels_tensor([answer["label_used"]])
    scores = tracin_matrix(task, ckpts, inputs, used, train.inputs, train.labels, names)[0].numpy()
    ids = [index.examples[r]["id"] for r in range(index.count)]
    hits = answer["proponents"] + answer["opponents"]
    assert hits and answer["exact"] is True
    for hit in hits:
        assert abs(hit["score"] - scores[ids.index(hit["id"])]) <= 1e-6 * np.abs(scores).max(), hit
    best = int(np.argmax(scores))
    assert answer["proponents"][0]["id"] == ids[best]  # the top proponent is the oracle's
    return answer


# -- tabular.mlp -------------------------------------------------------------------------------------

def test_tabular_mlp_from_a_csv_and_state_dicts(tmp_path):
    csv_path, features, names = bs.wine_table(tmp_path / "wine.csv")
    paths = bs.train_tabular(csv_path, features, names, tmp_path / "ckpt")
    config = bs.toml_config(tmp_path / "wine.toml", "tabular.mlp",
                            {"data": "wine.csv", "feature_columns": features, "label_column": "cultivar",
                             "hidden": [8], "classes": names},
                            [(p.relative_to(tmp_path), 0.1) for p in paths])
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    index = IndexDirectory.open(tmp_path / "index")
    assert index.manifest["task"]["ref"] == "tabular.mlp"
    assert index.manifest["task"]["args"]["data"] == str(csv_path.resolve())  # absolute: served from anywhere
    assert index.examples[0]["display"] == {c: pytest.approx(float(v)) for c, v in
                                             zip(features, _csv_row(csv_path, 0, features))}
    server = start_server(tmp_path / "index")
    try:
        query = {c: float(v) for c, v in zip(features, _csv_row(csv_path, 3, features))}
        answer = assert_oracle(config, tmp_path / "index", query, label="class_1", server_url=server.base_url)
        assert answer["label_used"] == 1 and answer["label_used_name"] == "class_1"
        bad = httpx.post(server.base_url + "/influence", json={"example": {"alcohol": 1.0}, "k": 3}, timeout=30)
        assert bad.status_code == 422 and "malic_acid" in bad.text  # the schema names the missing column
    finally:
        server.stop()


def _csv_row(path: Path, row: int, columns: list[str]) -> list[float]:
    import csv

    with open(path) as handle:
        record = list(csv.DictReader(handle))[row]
    return [float(record[c]) for c in columns]


def test_tabular_standardisation_is_the_training_rows_like_standard_scaler(tmp_path):
    from sklearn.preprocessing import StandardScaler

    from indexer.tasks.tabular import TabularMLPTask

    csv_path, features, names = bs.wine_table(tmp_path / "wine.csv", rows=30)
    task = TabularMLPTask(str(csv_path), [4], features, "cultivar", classes=names)
    import pandas as pd

    expected = StandardScaler().fit_transform(pd.read_csv(csv_path)[features].values)
    np.testing.assert_allclose(task.training_set().inputs.numpy(), expected, rtol=1e-6, atol=1e-6)
    example = task.example_schema.model_validate(dict(zip(features, _csv_row(csv_path, 2, features))))
    np.testing.assert_allclose(task.encode([example]).numpy()[0], expected[2], rtol=1e-6, atol=1e-6)


# -- huggingface.sequence_classification ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_dir(tmp_path_factory):
    _needs("transformers", "accelerate")
    work = tmp_path_factory.mktemp("trainer")
    rows = bs.news_rows()
    bs.write_csv(work / "news.csv", rows)
    bs.trainer_run(work / "out", rows)
    return work


def test_sequence_classification_from_a_trainer_output_dir_equals_the_oracle(trainer_dir, tmp_path):
    out = trainer_dir / "out"
    folders = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in folders] == ["checkpoint-3", "checkpoint-6"]
    # no lr in the config: each checkpoint-N/ folder records it (the lead's Trainer reading, issue 18)
    config = bs.toml_config(tmp_path / "news.toml", "huggingface.sequence_classification",
                            {"model": str(folders[-1]), "data": str(trainer_dir / "news.csv")}, folders)
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    index = IndexDirectory.open(tmp_path / "index")
    logged = bs.trainer_lrs(out)
    assert [c["lr"] for c in index.manifest["checkpoints"]] == pytest.approx([logged[3], logged[6]])
    assert index.examples[0]["label"] == 0 and index.examples[0]["display"]["text"] == bs.news_rows()[0]["text"]
    server = start_server(tmp_path / "index")
    try:
        text = bs.news_rows()[4]["text"]
        answer = assert_oracle(config, tmp_path / "index", {"text": text}, label="business", server_url=server.base_url)
        assert answer["label_used_name"] == "business"
        info = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
        assert "TextExample" in json.dumps(info)
    finally:
        server.stop()


def test_trainer_dir_writes_the_config_it_used_and_serves_text(trainer_dir, tmp_path, capsys):
    out = tmp_path / "index"
    args = ["index", "--trainer-dir", str(trainer_dir / "out"), "--data", str(trainer_dir / "news.csv"),
            "--text-column", "text", "--label-column", "label", "--out", str(out), "--quiet"]
    assert tracin(args + ["--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "index.toml").exists()
    assert tracin(args) == 0
    written = (tmp_path / "index.toml").read_text()
    assert written == printed
    config = tomllib.loads(written)
    assert config["task"] == "huggingface.sequence_classification"
    assert [Path(c["path"]).name for c in config["checkpoints"]] == ["checkpoint-3", "checkpoint-6"]
    assert config["task_args"]["model"].endswith("checkpoint-6") and "tokenizer" not in config["task_args"]
    # the written config repeats the build: the same vectors
    assert tracin(["index", str(tmp_path / "index.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = IndexDirectory.open(out), IndexDirectory.open(tmp_path / "again")
    np.testing.assert_array_equal(np.asarray(first.self_influence), np.asarray(again.self_influence))
    server = start_server(out)
    try:
        answer = httpx.post(server.base_url + "/influence", json={"example": {"text": "bank profit share"}, "k": 3},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["prediction"]["label_name"] in bs.TOPICS and len(body["proponents"]) == 3
        assert all("text" in hit["display"] for hit in body["proponents"])
        missing = httpx.post(server.base_url + "/influence", json={"example": {"txt": "bank"}, "k": 3}, timeout=30)
        assert missing.status_code == 422 and "text" in missing.text
    finally:
        server.stop()


def test_text_pairs_from_a_datasets_folder_parquet_and_jsonl(trainer_dir, tmp_path):
    _needs("datasets", "pyarrow")
    import datasets

    rows = bs.news_rows()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "news_ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "news_dd"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "news.parquet"))
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from indexer.tasks.data import read_table

    tables = [read_table(trainer_dir / "news.csv"), read_table(tmp_path / "news_ds"), read_table(tmp_path / "news_dd"),
              read_table(tmp_path / "news.parquet"), read_table(tmp_path / "news.jsonl")]
    assert all(t.rows == tables[0].rows and t.columns == tables[0].columns for t in tables)
    folders = sorted((trainer_dir / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    config = bs.toml_config(tmp_path / "pairs.toml", "huggingface.sequence_classification",
                            {"model": str(folders[-1]), "data": "news_dd", "text_pair_column": "text_b",
                             "held_out": "news.jsonl"}, folders, layers=["bert.encoder.*", "classifier"])
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    index = IndexDirectory.open(tmp_path / "index")
    assert index.examples[1]["display"] == {"text": rows[1]["text"], "text_pair": rows[1]["text_b"]}
    assert index.queries[0]["example"] == {"text": rows[0]["text"], "text_pair": rows[0]["text_b"]}
    server = start_server(tmp_path / "index")
    try:
        assert_oracle(config, tmp_path / "index", {"text": rows[2]["text"], "text_pair": rows[2]["text_b"]},
                      label="culture", server_url=server.base_url)
    finally:
        server.stop()


# -- huggingface.causal_lm ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_summed_token_loss_equals_the_oracle(tmp_path, kind):
    _needs("transformers")
    rows = bs.news_rows(n=10)
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    paths = bs.lm_run(tmp_path, rows, kind)
    config = bs.toml_config(tmp_path / "lm.toml", "huggingface.causal_lm",
                            {"model": "model", "data": "texts.jsonl"}, [p.name for p in paths])
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    task = load_config(config).task.build()
    train = task.training_set()
    # the loss is the summed next-token cross-entropy over the text's tokens, padding excluded
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    with torch.no_grad():
        ours = task.loss(task.forward(model, train.inputs), train.labels)
        for i in range(len(rows)):
            alone = task.tokenize([rows[i]["text"]])
            mean = model(**alone, labels=alone["input_ids"]).loss  # HF: the mean over the text's predicted tokens
            assert float(ours[i]) == pytest.approx(float(mean) * (alone["input_ids"].shape[1] - 1), rel=1e-5)
    server = start_server(tmp_path / "index")
    try:
        text = rows[3]["text"]
        own = task.labels_of(task.tokenize([text]))[0].tolist()  # the text's own tokens as the query's label
        answer = assert_oracle(config, tmp_path / "index", {"text": text}, label=own, server_url=server.base_url)
        assert answer["label_used"] == own
        greedy = httpx.post(server.base_url + "/influence", json={"example": {"text": text}, "k": 2}, timeout=60)
        assert greedy.status_code == 200 and greedy.json()["label_used"][0] == -100
    finally:
        server.stop()


# -- errors in one line ----------------------------------------------------------------------------

def _refused(capsys, args: list[str]) -> str:
    assert tracin(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_missing_column_is_refused_naming_the_columns(tmp_path, capsys):
    csv_path, features, names = bs.wine_table(tmp_path / "wine.csv", rows=12)
    paths = bs.train_tabular(csv_path, features, names, tmp_path / "ckpt", epochs=1)
    config = bs.toml_config(tmp_path / "c.toml", "tabular.mlp",
                            {"data": "wine.csv", "feature_columns": ["alcohol", "acidity"], "label_column": "cultivar",
                             "hidden": [8], "classes": names}, [(paths[0], 0.1)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "task_args.feature_columns" in err and "no column 'acidity'" in err
    assert "['alcohol', 'malic_acid', 'ash', 'color_intensity', 'cultivar']" in err
    # an unknown class name, and a model whose sizes do not fit the checkpoint
    config = bs.toml_config(tmp_path / "c.toml", "tabular.mlp",
                            {"data": "wine.csv", "feature_columns": features, "label_column": "cultivar",
                             "hidden": [8], "classes": ["class_0", "class_1", "klass_2"]}, [(paths[0], 0.1)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "unknown label 'class_2'" in err and "klass_2" in err
    config = bs.toml_config(tmp_path / "c.toml", "tabular.mlp",
                            {"data": "wine.csv", "feature_columns": features, "label_column": "cultivar",
                             "hidden": [16], "classes": names}, [(paths[0], 0.1)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "for tabular.mlp 4 -> 16 -> 3" in err and "shape mismatch" in err and "0.weight" in err
    assert not (tmp_path / "index").exists()


def test_a_tokenizer_missing_from_the_model_folder_is_refused(trainer_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "checkpoint-6"
    shutil.copytree(trainer_dir / "out" / "checkpoint-6", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    config = bs.toml_config(tmp_path / "c.toml", "huggingface.sequence_classification",
                            {"model": str(folder), "data": str(trainer_dir / "news.csv")}, [folder])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "task_args.model: the tokenizer is missing from" in err and str(folder) in err
    assert "processing_class=tokenizer" in err
    err = _refused(capsys, ["index", "--trainer-dir", str(trainer_dir / "out"), "--data",
                            str(trainer_dir / "news.csv"), "--text-column", "body", "--out", str(tmp_path / "i2"), "--quiet"])
    assert "no column 'body'" in err and "['text', 'text_b', 'label']" in err
    rows = bs.news_rows()
    rows[5]["label"] = "weather"
    bs.write_csv(tmp_path / "bad.csv", rows)
    err = _refused(capsys, ["index", "--trainer-dir", str(trainer_dir / "out"), "--data", str(tmp_path / "bad.csv"),
                            "--out", str(tmp_path / "i3"), "--quiet"])
    assert "row 5: unknown label 'weather'" in err and "['sport', 'business', 'culture']" in err
    err = _refused(capsys, ["index", "--trainer-dir", str(tmp_path), "--data", str(tmp_path / "bad.csv"),
                            "--out", str(tmp_path / "i4"), "--quiet"])  # tmp_path/checkpoint-6 lacks its tokenizer
    assert "the tokenizer is missing from" in err
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, ["index", "--trainer-dir", str(tmp_path / "empty"), "--data", str(tmp_path / "bad.csv"),
                            "--out", str(tmp_path / "i5")])
    assert "no checkpoint-N/ folders" in err


# -- config: tracin init, built-in names, the trust model ----------------------------------------------

def test_init_prints_a_config_per_builtin_task_that_indexes_once_its_paths_are_edited(tmp_path, capsys):
    from indexer.tasks import BUILTIN_TASKS

    for name in BUILTIN_TASKS:
        assert tracin(["init", name]) == 0
        config = tomllib.loads(capsys.readouterr().out)
        assert config["task"] == name and config["checkpoints"]
    assert "built-in tasks: huggingface.sequence_classification" in _refused(capsys, ["init", "tabular.lstm"])
    assert tracin(["init", "tabular.mlp", "--out", str(tmp_path / "config.toml")]) == 0
    csv_path, features, names = bs.wine_table(tmp_path / "train.csv")
    paths = bs.train_tabular(csv_path, features, names, tmp_path / "checkpoints", epochs=10, hidden=64)
    text = (tmp_path / "config.toml").read_text()
    for old, new in (('["x1", "x2"]', json.dumps(features)), ('"label"', '"cultivar"'), ("num_classes = 2", f"classes = {json.dumps(names)}")):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "config.toml").write_text(text.replace("epoch-05", "epoch-5"))
    assert paths[4].name == "epoch-5.pt"
    assert tracin(["index", str(tmp_path / "config.toml"), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    assert IndexDirectory.open(tmp_path / "index").count == 40


def test_builtin_names_resolve_to_indexer_tasks_only():
    from indexer.config import TaskRef
    from indexer.store.manifest import ManifestError, parse_manifest
    from indexer.tasks import BUILTIN_TASKS
    from indexer.tasks.tabular import TabularMLPTask

    assert TaskRef("tabular.mlp").check() is TabularMLPTask
    assert all(target.startswith("indexer.tasks.") for target in BUILTIN_TASKS.values())
    with pytest.raises(ConfigError, match="must look like 'package.module:ClassName' or be a built-in task"):
        TaskRef("os.system").check()
    with pytest.raises(ConfigError, match="not an indexer.Task subclass"):
        TaskRef("os:system").check()
    manifest = json.loads((_any_index_manifest()).read_text())
    for ref, ok in (("tabular.mlp", True), ("indexer.tasks.tabular:TabularMLPTask", True), ("tabular.mlp2", False),
                    ("os.system", False)):
        manifest["task"]["ref"] = ref
        if ok:
            parse_manifest(manifest)
        else:
            with pytest.raises(ManifestError, match="built-in task"):
                parse_manifest(manifest)


def _any_index_manifest() -> Path:
    from tests.service_support import mlp_index

    return mlp_index() / "manifest.json"


# -- torchvision in its own venv -------------------------------------------------------------------

VISION_VENV = REPO / ".venv-vision"


def test_vision_tasks_in_their_own_venv():
    """tests/test_builtin_vision.py, in `.venv-vision` when torchvision cannot be imported here (this project's
    CPU torch has no matching torchvision on PyPI; `make vision-venv` builds that venv from local wheels)."""
    if importlib.util.find_spec("torchvision") is not None:
        probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("torchvision imports in this venv: tests/test_builtin_vision.py runs here directly")
    python = VISION_VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{VISION_VENV} does not exist (`make vision-venv` creates it where torch 2.14.1 + torchvision "
                    "0.29.1 wheels are on local disk): the torchvision tests were not run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_builtin_vision.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    assert "passed" in last and "skipped" not in last and "failed" not in last, tail


def test_the_vision_task_without_a_usable_torchvision_names_the_extra(tmp_path, capsys):
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("torchvision imports in this venv")
    (tmp_path / "images" / "cat").mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, tmp_path / "epoch-1.pt")
    config = bs.toml_config(tmp_path / "c.toml", "torchvision.image_classification",
                            {"arch": "resnet18", "num_classes": 2, "data": "images"}, [(tmp_path / "epoch-1.pt", 0.1)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "torchvision" in err and "pip install 'tracin-service[vision]'" in err
