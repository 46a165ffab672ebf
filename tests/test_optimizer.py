"""Optimizer-aware TracIn against the float64 brute force (tests/oracle.py).

Each checkpoint's gradients are weighted by the step its optimizer took: lr per parameter group (SGD), and
lr * Gamma with Gamma = 1 / (sqrt(v_hat) + eps) from the saved state (Adam/AdamW, RMSprop, Adagrad). The
oracle recomputes those weights element by element from the raw `optimizer.state_dict()`
(`step_weights_bruteforce`) and TracIn from one `torch.autograd.grad` per example
(`weighted_tracin_matrix`); the index (exact mode), self-influence and answers over HTTP must equal it to
1e-6 of the largest score. Formats: save_checkpoint, the PyTorch tutorial dict, a real Lightning
checkpoint, a real Hugging Face Trainer output_dir."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import httpx
import numpy as np
import pytest
import torch
from pydantic import BaseModel
from torch import nn

from indexer.build.pipeline import build_index
from indexer.checkpoints import save_checkpoint
from indexer.config import ConfigError, parse_config
from indexer.sketch.embedding import Checkpoint
from indexer.store.directory import IndexDirectory
from indexer.task import ExampleSet, Task
from tests.oracle import step_weights_bruteforce, weighted_tracin_matrix
from tests.service_support import REPO, start_server
from tests.tasks import MLPTask

TOL = 1e-6  # of the largest |score|


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _train(task: Task, optimizer: torch.optim.Optimizer, model: nn.Module, steps: int = 3) -> None:
    ts = task.training_set()
    for _ in range(steps):
        loss = task.loss(task.forward(model, ts.inputs), ts.labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _build(tmp: Path, task_ref: str, entries: list[dict], extra: dict | None = None, name: str = "index",
           kind: str = "exact") -> IndexDirectory:
    data = {"task": task_ref, "checkpoints": entries, "projection": {"kind": kind, "dim": 32},
            "index": {"batch_size": 7}, **(extra or {})}
    return IndexDirectory.open(build_index(parse_config(data, tmp), tmp / name, overwrite=True).path)


def _names_by_group(model: nn.Module, optimizer_state: dict, order: list[str] | None = None) -> list[list[str]]:
    """Parameter names of each saved group, numbering the model's parameters in `order` (default: model order)."""
    names = order or [n for n, _ in model.named_parameters()]
    return [[names[i] for i in g["params"]] for g in optimizer_state["param_groups"]]


def _shapes(model: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _check_index(index: IndexDirectory, task: Task, paths: list[Path], weights: list[dict]) -> np.ndarray:
    """The exact-mode index's inner products and self-influence equal the weighted oracle; returns it."""
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    oracle = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], weights, x, y, x, y).numpy()
    vectors = index.index.reconstruct_n(0, index.count).astype(np.float64)
    assert _rel(vectors @ vectors.T, oracle) < TOL
    assert _rel(index.self_influence, oracle.diagonal()) < TOL
    return oracle


def _plain(weights: list[dict], lrs: Sequence[float]) -> list[dict]:
    """The same parameters weighted by one lr per checkpoint (what the project did before)."""
    return [{n: float(lr) for n in w} for w, lr in zip(weights, lrs)]


# -- SGD parameter groups ------------------------------------------------------------------------

def _sgd_groups_run(tmp: Path) -> tuple[MLPTask, list[Path], list[dict]]:
    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.03},
                                 {"params": model[2].parameters(), "lr": 0.3}], momentum=0.5)
    paths, weights = [], []
    for c in range(3):
        _train(task, optimizer, model)
        paths.append(save_checkpoint(tmp / f"sgd-{c}.pt", model, optimizer))
        state = optimizer.state_dict()
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
    return task, paths, weights


def test_two_sgd_groups_equal_the_oracle_and_differ_from_one_lr(tmp_path):
    task, paths, weights = _sgd_groups_run(tmp_path)
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    oracle = _check_index(index, task, paths, weights)
    assert index.manifest["optimizer"]["formula"] == "sgd"
    assert [[g["lr"] for g in c["step"]["groups"]] for c in index.manifest["checkpoints"]] == [[0.03, 0.3]] * 3
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    one_lr = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], _plain(weights, [0.03] * 3),
                                    x, y, x, y).numpy()
    assert _rel(one_lr, oracle) > 0.1  # group 0's lr for every parameter is far off: the test can fail


def test_lr_table_in_the_config_equals_the_groups(tmp_path):
    """Plain state_dict files (no optimizer) with a per-layer lr table in the config."""
    task, paths, weights = _sgd_groups_run(tmp_path)
    plain = []
    for i, p in enumerate(paths):
        plain.append(tmp_path / f"plain-{i}.pt")
        torch.save(torch.load(p, weights_only=True)["state_dict"], plain[-1])
    index = _build(tmp_path, "tests.tasks:MLPTask",
                   [{"path": str(p), "lr": {"0": 0.03, "2.*": 0.3}} for p in plain], name="table")
    _check_index(index, task, plain, weights)
    with pytest.raises(ConfigError, match=r"no entry for traced parameter '2.weight'"):
        _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(plain[0]), "lr": {"0": 0.03}}], name="bad")


# -- Adam / AdamW ----------------------------------------------------------------------------------

def test_adamw_tutorial_format_equals_the_oracle(tmp_path):
    """{"model_state_dict", "optimizer_state_dict", "epoch"} of one AdamW group, no lr in the config."""
    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    paths, weights, lrs = [], [], []
    for epoch in range(2):
        _train(task, optimizer, model, steps=4)
        state = copy.deepcopy(optimizer.state_dict())
        paths.append(tmp_path / f"epoch-{epoch}.tar")
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict(), "optimizer_state_dict": state}, paths[-1])
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
        lrs.append(0.01)
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    oracle = _check_index(index, task, paths, weights)
    assert index.manifest["optimizer"]["formula"] == "adam"
    assert all(c["step"]["file"].endswith(".step.safetensors") for c in index.manifest["checkpoints"])
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    sgd = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], _plain(weights, lrs), x, y, x, y).numpy()
    assert _rel(sgd, oracle) > 0.5  # the SGD formula is another score altogether

    forced = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths],
                    {"optimizer": {"formula": "sgd"}}, name="forced")
    assert forced.manifest["optimizer"]["formula"] == "sgd" and forced.manifest["optimizer"]["forced"] is True
    _check_index(forced, task, paths, _plain(weights, lrs))


class SameShapeMLP(MLPTask):
    """Two hidden layers of the same shape: a body and a head group whose shapes do not tell them apart."""

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_adam_two_groups_saved_with_names_or_mapped_by_shape(tmp_path):
    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.Adam([{"params": model[0].parameters(), "lr": 0.005},
                                  {"params": model[2].parameters(), "lr": 0.05}], amsgrad=True)
    paths, tutorial, weights = [], [], []
    for c in range(2):
        _train(task, optimizer, model)
        paths.append(save_checkpoint(tmp_path / f"adam-{c}.pt", model, optimizer))
        state = copy.deepcopy(optimizer.state_dict())
        tutorial.append(tmp_path / f"tutorial-{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": state}, tutorial[-1])
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    _check_index(index, task, paths, weights)
    assert "recorded" in index.manifest["checkpoints"][0]["step"]["mapping"]
    by_shape = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in tutorial], name="by-shape")
    _check_index(by_shape, task, tutorial, weights)  # every shape sits in one group: membership is known


def test_groups_that_shapes_cannot_tell_apart_are_refused_or_given_by_patterns(tmp_path):
    task = SameShapeMLP()
    model = task.build_model()
    optimizer = torch.optim.Adam([{"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.05},
                                  {"params": model[0].parameters(), "lr": 0.005}])  # head first, not model order
    _train(task, optimizer, model)
    state = copy.deepcopy(optimizer.state_dict())
    path = tmp_path / "tutorial.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": state}, path)
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, "tests.test_optimizer:SameShapeMLP", [{"path": str(path)}])
    line = str(err.value)
    assert "\n" not in line and "group 0: lr 0.05, 4 tensors; group 1: lr 0.005, 2 tensors" in line
    index = _build(tmp_path, "tests.test_optimizer:SameShapeMLP", [{"path": str(path)}],
                   {"optimizer": {"groups": [["2", "4"], ["0"]]}}, name="patterns")
    order = ["2.weight", "2.bias", "4.weight", "4.bias", "0.weight", "0.bias"]
    _check_index(index, task, [path], [step_weights_bruteforce(state, _names_by_group(model, state, order),
                                                               _shapes(model))])


def test_rmsprop_and_adagrad_equal_the_oracle(tmp_path):
    task = MLPTask()
    for name, make in (("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.3)),
                       ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05))):
        model = task.build_model()
        optimizer = make(model.parameters())
        paths, weights = [], []
        for c in range(2):
            _train(task, optimizer, model)
            paths.append(save_checkpoint(tmp_path / f"{name}-{c}.pt", model, optimizer))
            state = copy.deepcopy(optimizer.state_dict())
            weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
        index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths], name=name)
        assert index.manifest["optimizer"]["formula"] == name
        _check_index(index, task, paths, weights)


def test_adam_without_state_is_built_with_a_warning(tmp_path, capsys):
    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(task, optimizer, model)
    path = save_checkpoint(tmp_path / "nostate.pt", model, optimizer, optimizer_state=False)
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(path)}])
    err = capsys.readouterr().err
    assert "carries no optimizer state" in err and "heuristic" in err
    assert len([line for line in err.splitlines() if "no optimizer state" in line]) == 1
    assert index.manifest["optimizer"]["formula"] == "sgd" and "heuristic" in index.manifest["optimizer"]["why"]


def test_refusals_name_the_optimizer_or_parameter(tmp_path):
    task = MLPTask()

    def saved(make, name, **save):
        model = task.build_model()
        optimizer = make(model)
        _train(task, optimizer, model)
        path = tmp_path / f"{name}.pt"
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
        return path

    cases = [
        (saved(lambda m: torch.optim.NAdam(m.parameters(), lr=0.01), "nadam"), {}, "nadam"),
        (saved(lambda m: torch.optim.Adam(m.parameters(), lr=0.01, maximize=True), "maximize"), {}, "maximize"),
        (saved(lambda m: torch.optim.Adam(m[2].parameters(), lr=0.01), "head-only"), {},
         "in none of the optimizer's groups|cannot tell which"),
        (saved(lambda m: torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.1},
                                          {"params": m[2].parameters(), "lr": 0.2}]), "no-state"), {},
         "does not say which parameters each holds|fit more than one assignment"),
        (saved(lambda m: torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.1},
                                          {"params": m[2].parameters(), "lr": 0.2}], momentum=0.9), "one-lr"),
         {"lr": 0.1}, "config gives one lr"),
    ]
    for path, extra, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(path), **extra}], name=path.stem)
        assert "\n" not in str(err.value)
        assert not (tmp_path / path.stem).exists()
    head_only = tmp_path / "head-only.pt"  # tracing only what the optimizer trains is fine
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(head_only)}], {"layers": ["2"]}, name="head")
    assert index.manifest["optimizer"]["formula"] == "adam"


# -- the preconditioner's bound ------------------------------------------------------------------

class DeadPixelMLP(MLPTask):
    """MLPTask whose first input feature is always 0 in training: Adam's second moment of fc1's first column
    stays exactly 0, and Gamma = 1 / eps there; a query with that feature non-zero must stay bounded."""

    def training_set(self) -> ExampleSet:
        base = super().training_set()
        x = base.inputs.clone()
        x[:, 0] = 0.0
        return ExampleSet(x, base.labels, ids=base.ids, examples=lambda i: {"x": x[i].tolist()})


def test_gamma_is_bounded_where_the_second_moment_is_zero(tmp_path):
    task = DeadPixelMLP()
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    paths, weights = [], []
    for c in range(2):
        _train(task, optimizer, model)
        paths.append(save_checkpoint(tmp_path / f"dead-{c}.pt", model, optimizer))
        state = copy.deepcopy(optimizer.state_dict())
        assert int((state["state"][0]["exp_avg_sq"][:, 0] == 0).sum()) == 8
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
    index = _build(tmp_path, "tests.test_optimizer:DeadPixelMLP", [{"path": str(p)} for p in paths])
    oracle = _check_index(index, task, paths, weights)
    assert index.manifest["optimizer"]["bounded"] == 2 * 8
    query = torch.zeros(1, 6, dtype=torch.float64)
    query[0, 0] = 3.0
    server = start_server(index.path)
    try:
        answer = httpx.post(f"{server.base_url}/influence", json={"example": {"x": query[0].tolist()}, "label": 1,
                                                                  "k": 5}, timeout=60).json()
    finally:
        server.stop()
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    expected = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], weights, query,
                                      torch.tensor([1]), x, y).numpy()[0]
    got = {h["id"]: h["score"] for h in answer["proponents"] + answer["opponents"]}
    for hit_id, score in got.items():
        assert abs(score - expected[int(hit_id[2:])]) <= TOL * np.abs(expected).max()
    q_self = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], weights, query, torch.tensor([1]),
                                    query, torch.tensor([1])).item()
    assert answer["query"]["self_influence"] == pytest.approx(q_self, rel=1e-9)
    assert q_self < 100 * float(np.median(oracle.diagonal()))  # 1/eps would make it ~1e8 times larger


# -- served answers ----------------------------------------------------------------------------------

def test_served_answers_equal_the_oracle_in_sketch_mode_with_reranking(tmp_path):
    """Default projection (sketch) + exact re-ranking of every row: the served scores are the weighted
    oracle's, for AdamW checkpoints with two groups."""
    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.004},
                                   {"params": model[2].parameters(), "lr": 0.02}])
    paths, weights = [], []
    for c in range(2):
        _train(task, optimizer, model)
        paths.append(save_checkpoint(tmp_path / f"aw-{c}.pt", model, optimizer))
        state = copy.deepcopy(optimizer.state_dict())
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths], kind="sketch")
    held = task.held_out_set()
    ts = task.training_set()
    x, y = ts.batch(0, len(ts))
    server = start_server(index.path)
    try:
        info = httpx.get(f"{server.base_url}/index", timeout=30).json()
        assert info["optimizer"]["formula"] == "adam" and info["checkpoints"][0]["formula"] == "adam"
        assert [g["lr"] for g in info["checkpoints"][0]["groups"]] == [0.004, 0.02]
        for q in range(3):
            answer = httpx.post(f"{server.base_url}/influence",
                                json={"example": held.example_of(q), "label": 0, "k": 5, "rerank": len(ts)},
                                timeout=60).json()
            qx, _ = held.batch(q, q + 1)
            expected = weighted_tracin_matrix(task, [Checkpoint(p, 1.0) for p in paths], weights, qx,
                                              torch.tensor([0]), x, y).numpy()[0]
            assert answer["exact"] is True
            assert [h["id"] for h in answer["proponents"]] == [f"ex{i}" for i in np.argsort(-expected)[:5]]
            for hit in answer["proponents"]:
                assert abs(hit["score"] - expected[int(hit["id"][2:])]) <= TOL * np.abs(expected).max()
    finally:
        server.stop()


def test_inspect_says_which_formula(tmp_path):
    task, paths, _ = _sgd_groups_run(tmp_path)
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    out = subprocess.run([sys.executable, "-m", "indexer.cli", "inspect", str(index.path)], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert "formula    sgd" in out and "groups 0.03 (2 tensors), 0.3 (2 tensors)" in out


def test_tampered_step_weights_are_refused(tmp_path):
    from indexer.store.manifest import read_manifest, write_manifest

    task = MLPTask()
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(task, optimizer, model)
    path = save_checkpoint(tmp_path / "a.pt", model, optimizer)
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(path)}])
    _, manifest = read_manifest(index.path)
    manifest["checkpoints"][0]["step"]["groups"][0]["params"].pop()  # a parameter without a weight
    write_manifest(index.path, manifest)
    from indexer.store.directory import IndexDirectoryError
    from indexer.sketch.embedding import load_embedder

    with pytest.raises(IndexDirectoryError, match="differently from the traced parameters"):
        load_embedder(IndexDirectory.open(index.path))


# -- Lightning and the Hugging Face Trainer ---------------------------------------------------------

def test_lightning_checkpoint_with_adam_state(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    task = MLPTask()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = task.build_model()

        def training_step(self, batch, _):
            x, y = batch
            return task.loss(self.model(x), y).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=0.02)

    ts = task.training_set()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ts.inputs, ts.labels), batch_size=40)
    checkpoints = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=4, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(paths) == 2
    model = task.build_model()
    weights = []
    for p in paths:
        state = torch.load(p, weights_only=True)["optimizer_states"][0]
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state), _shapes(model)))
    index = _build(tmp_path, "tests.tasks:MLPTask", [{"path": str(p)} for p in paths],
                   {"checkpoint_prefix": "model."})
    assert index.manifest["optimizer"]["formula"] == "adam"
    _check_index(index, task, paths_for_oracle(paths, tmp_path), weights)


def paths_for_oracle(paths: list[Path], tmp: Path) -> list[Path]:
    """Lightning's checkpoints as plain state dicts (the oracle loads `state_dict` keys of the model)."""
    out = []
    for i, p in enumerate(paths):
        state = torch.load(p, weights_only=True)["state_dict"]
        out.append(tmp / f"oracle-{i}.pt")
        torch.save({k[len("model."):]: v for k, v in state.items()}, out[-1])
    return out


class BertExample(BaseModel):
    tokens: list[int]


class TinyBertTask(Task):
    """A 1-layer BERT sequence classifier built from a config (random weights, no download) on token ids."""

    example_schema = BertExample
    n = 16

    def build_model(self) -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=16, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config).eval()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(3)
        x = torch.randint(1, 40, (self.n, 6), generator=g)
        y = torch.randint(0, 2, (self.n,), generator=g)
        return ExampleSet(x, y, examples=lambda i: {"tokens": x[i].tolist()})

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits

    def encode(self, examples):
        return torch.tensor([e.tokens for e in examples])


def test_trainer_output_dir_with_adamw_equals_the_oracle(tmp_path):
    """A real Hugging Face Trainer run (AdamW, linear schedule, two weight-decay groups); the config lists its
    checkpoint-N folders with no lr: lr from trainer_state.json, Gamma from optimizer.pt."""
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    task = TinyBertTask()
    ts = task.training_set()

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return task.n

        def __getitem__(self, i):
            return {"input_ids": ts.inputs[i], "labels": ts.labels[i]}

    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2, save_steps=2,
                             logging_steps=1, learning_rate=5e-3, weight_decay=0.01, lr_scheduler_type="linear",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=task.build_model().train(), args=args, train_dataset=Data()).train()
    folders = sorted((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [f.name for f in folders] == ["checkpoint-2", "checkpoint-4"]
    import json

    from transformers.trainer_pt_utils import get_parameter_names

    model = task.build_model()
    decay = set(get_parameter_names(model, [nn.LayerNorm], ["bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                            r"_norm(?:$|\.)"]))
    names = [n for n, _ in model.named_parameters()]
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    weights, plain_paths = [], []
    for folder in folders:
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        log = json.loads((folder / "trainer_state.json").read_text())
        step = log["global_step"]
        lr = next(e["learning_rate"] for e in log["log_history"] if e.get("step") == step and "learning_rate" in e)
        weights.append(step_weights_bruteforce(state, _names_by_group(model, state, order), _shapes(model),
                                               lr_in_force=lr))
        from safetensors.torch import load_file

        plain_paths.append(tmp_path / f"{folder.name}.pt")
        torch.save(load_file(str(folder / "model.safetensors")), plain_paths[-1])
    index = _build(tmp_path, "tests.test_optimizer:TinyBertTask", [{"path": str(f)} for f in folders],
                   {"index": {"batch_size": 7, "compute_dtype": "float64"}})
    assert index.manifest["optimizer"]["formula"] == "adam"
    assert index.manifest["checkpoints"][0]["step"]["mapping"].startswith("Trainer weight-decay groups")
    _check_index(index, task, plain_paths, weights)
