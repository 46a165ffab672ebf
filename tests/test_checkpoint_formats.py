"""Issue 8 item 9: the checkpoints people have. Each format builds exactly the index that a
`save_checkpoint` file of the same weights builds, and the service loads what the index directory holds;
anything unreadable is one line that lists the keys found and says how to re-save."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from indexer.checkpoints import CheckpointError, load_checkpoint, load_state_into, save_checkpoint
from indexer.config import ConfigError, parse_config
from indexer.build.pipeline import build_index
from indexer.store.directory import IndexDirectory
from indexer.task import ExampleSet, Task
from service.loading import ServiceStartupError, load_engine
from service.settings import Settings
from tests.service_support import REPO
from tests.tasks import MLPTask


class TokensExample(BaseModel):
    tokens: list[int]


class TiedModel(nn.Module):
    """A language-model-style head tied to the embedding (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.head = nn.Linear(5, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).mean(1)))


class TiedTask(Task):
    example_schema = TokensExample

    def build_model(self):
        torch.manual_seed(0)
        return TiedModel().double()

    def training_set(self):
        g = torch.Generator().manual_seed(1)
        return ExampleSet(torch.randint(0, 11, (24, 4), generator=g), torch.randint(0, 11, (24,), generator=g))

    def encode(self, examples):
        return torch.tensor([e.tokens for e in examples])


def _weights(task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _build(tmp: Path, name: str, ref: str, entries: list[dict], **top) -> IndexDirectory:
    data = {"task": ref, "checkpoints": entries, "projection": {"kind": "exact"}, "index": {"batch_size": 7}, **top}
    build_index(parse_config(data, tmp), tmp / name)
    return IndexDirectory.open(tmp / name)


@pytest.fixture(scope="module")
def mlp_reference(tmp_path_factory):
    """The index of two save_checkpoint files (lr 0.3 and 0.1) of MLPTask weights."""
    tmp = tmp_path_factory.mktemp("reference")
    task = MLPTask()
    paths = [save_checkpoint(tmp / f"ref-{i}.pt", _weights(task, i), lr=lr) for i, lr in enumerate((0.3, 0.1))]
    index = _build(tmp, "index", "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    return tmp, index


def _same_index(index: IndexDirectory, reference: IndexDirectory) -> None:
    for name in ("index.faiss", "self_influence.npy", "examples.jsonl"):
        assert (index.path / name).read_bytes() == (reference.path / name).read_bytes(), name
    assert [c["lr"] for c in index.manifest["checkpoints"]] == [c["lr"] for c in reference.manifest["checkpoints"]]
    engine = load_engine(Settings(index_dir=index.path, access_log=False))  # the service reads the copies
    assert engine.count == reference.count


def _optimizer(model, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    optimizer.step()  # a real optimizer state, with momentum buffers
    optimizer.zero_grad()
    return optimizer


def test_model_state_dict_with_optimizer_state(tmp_path, mlp_reference):
    """The PyTorch tutorial format: {"epoch", "model_state_dict", "optimizer_state_dict"}; lr from the
    optimizer state."""
    _, reference = mlp_reference
    task, entries = MLPTask(), []
    for i, lr in enumerate((0.3, 0.1)):
        model = _weights(task, i)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = _optimizer(_weights(task, i), lr)
        path = tmp_path / f"epoch-{i}.tar"
        torch.save({"epoch": i, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                    "loss": 0.5}, path)
        entries.append({"path": str(path)})
    _same_index(_build(tmp_path, "index", "tests.tasks:MLPTask", entries), reference)


def test_dataparallel_module_prefix_is_stripped(tmp_path, mlp_reference):
    _, reference = mlp_reference
    entries = []
    for i, lr in enumerate((0.3, 0.1)):
        wrapped = nn.DataParallel(_weights(MLPTask(), i))
        path = tmp_path / f"ddp-{i}.pt"
        torch.save(wrapped.state_dict(), path)  # every key starts with "module."
        assert all(k.startswith("module.") for k in torch.load(path, weights_only=True))
        entries.append({"path": str(path), "lr": lr})
    _same_index(_build(tmp_path, "index", "tests.tasks:MLPTask", entries), reference)


def _lightning_file(path: Path, model: nn.Module, lr: float) -> Path:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss_fn.weight"] = torch.ones(3)  # a module of the LightningModule that is not the model
    torch.save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "optimizer_states": [_optimizer(_weights(MLPTask(), 0), lr).state_dict()], "lr_schedulers": [],
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}}}, path)
    return path


def test_lightning_checkpoint_with_a_prefix_option(tmp_path, mlp_reference):
    _, reference = mlp_reference
    paths = [_lightning_file(tmp_path / f"lightning-{i}.ckpt", _weights(MLPTask(), i), lr)
             for i, lr in enumerate((0.3, 0.1))]
    # without the prefix: one line that says which option to set
    with pytest.raises(ConfigError, match=r"under the prefix 'model\.': set checkpoint_prefix = \"model\.\""):
        _build(tmp_path, "refused", "tests.tasks:MLPTask", [{"path": str(p)} for p in paths])
    index = _build(tmp_path, "index", "tests.tasks:MLPTask", [{"path": str(p)} for p in paths],
                   checkpoint_prefix="model.")
    _same_index(index, reference)
    assert [c["file"] for c in index.manifest["checkpoints"]] == ["checkpoints/00-lightning-0.pt",
                                                                 "checkpoints/01-lightning-1.pt"]
    assert all("source_sha256" in c for c in index.manifest["checkpoints"])  # normalised copies
    # the per-checkpoint option overrides the top-level one
    per_file = _build(tmp_path, "per-file", "tests.tasks:MLPTask",
                      [{"path": str(paths[0]), "prefix": "model."}, {"path": str(paths[1]), "prefix": "model."}])
    _same_index(per_file, reference)


def test_a_file_recording_learning_rate(tmp_path, mlp_reference):
    _, reference = mlp_reference
    entries = []
    for i, lr in enumerate((0.3, 0.1)):
        path = tmp_path / f"lr-{i}.pt"
        torch.save({"state_dict": _weights(MLPTask(), i).state_dict(), "learning_rate": lr}, path)
        assert load_checkpoint(path)[1]["lr"] == lr
        entries.append({"path": str(path)})
    _same_index(_build(tmp_path, "index", "tests.tasks:MLPTask", entries), reference)


def test_safetensors_file_with_lr_metadata(tmp_path, mlp_reference):
    from safetensors.torch import save_file

    _, reference = mlp_reference
    entries = []
    for i, lr in enumerate((0.3, 0.1)):
        path = tmp_path / f"w-{i}.safetensors"
        save_file(_weights(MLPTask(), i).state_dict(), str(path), metadata={"learning_rate": str(lr)})
        entries.append({"path": str(path)})
    _same_index(_build(tmp_path, "index", "tests.tasks:MLPTask", entries), reference)


def test_legacy_torch_save_format(tmp_path, mlp_reference):
    _, reference = mlp_reference
    entries = []
    for i, lr in enumerate((0.3, 0.1)):
        path = tmp_path / f"legacy-{i}.pt"
        torch.save({"state_dict": _weights(MLPTask(), i).state_dict(), "lr": lr}, path,
                   _use_new_zipfile_serialization=False)
        entries.append({"path": str(path)})
    _same_index(_build(tmp_path, "index", "tests.tasks:MLPTask", entries), reference)


def _save_pretrained(folder: Path, model: nn.Module, shards: int = 1) -> Path:
    """What transformers' save_pretrained writes: config.json and safetensors with a tied tensor once."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tied-test", "tie_word_embeddings": True}))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}  # tied: written once
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = {k: state[k] for k in names[s::shards]}
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 2])
def test_hugging_face_folder_with_a_tied_tensor_written_once(tmp_path, shards):
    task = TiedTask()
    models = [_weights(task, i) for i in range(2)]
    refs = [save_checkpoint(tmp_path / f"tied-{i}.pt", m, lr=lr) for i, (m, lr) in enumerate(zip(models, (0.3, 0.1)))]
    reference = _build(tmp_path, "reference", "tests.test_checkpoint_formats:TiedTask", [{"path": str(p)} for p in refs])
    folders = [_save_pretrained(tmp_path / f"hf-{i}", m, shards) for i, m in enumerate(models)]
    index = _build(tmp_path, "index", "tests.test_checkpoint_formats:TiedTask",
                   [{"path": str(f), "lr": lr} for f, lr in zip(folders, (0.3, 0.1))])
    _same_index(index, reference)
    assert [c["file"] for c in index.manifest["checkpoints"]] == ["checkpoints/00-hf-0.pt", "checkpoints/01-hf-1.pt"]


def test_tied_names_with_different_values_are_refused():
    model = TiedTask().build_model()
    state = dict(model.state_dict())
    state["head.weight"] = state["emb.weight"] + 1
    with pytest.raises(CheckpointError, match="ties 'emb.weight' and 'head.weight'"):
        load_state_into(model, state, "checkpoint x")


UNREADABLE = [
    ("pickled object", lambda p: torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": argparse.Namespace(a=1)},
                                            p), "holds a pickled argparse.Namespace object"),
    ("no state_dict", lambda p: torch.save({"weights": [1.0, 2.0], "step": 3}, p),
     "holds no state_dict (keys found: ['weights', 'step'])"),
    ("another model", lambda p: torch.save({"enc.weight": torch.ones(2, 2), "enc.bias": torch.ones(2)}, p),
     "keys found: ['enc.bias', 'enc.weight']"),
    ("not a checkpoint", lambda p: p.write_bytes(b"garbage, not a torch file"), "cannot read checkpoint"),
]


@pytest.mark.parametrize("name,write,message", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_checkpoints_are_one_line_with_how_to_resave(tmp_path, name, write, message):
    path = tmp_path / "bad.pt"
    write(path)
    config = tmp_path / "config.toml"
    config.write_text(f'task = "tests.tasks:MLPTask"\n[[checkpoints]]\npath = "{path}"\nlr = 0.1\n')
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(tmp_path / "index")],
                          capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "save_checkpoint" in proc.stderr or "torch.save(model.state_dict(), path)" in proc.stderr
    assert not (tmp_path / "index").exists()


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has none of .*model.safetensors.*found \['config.json'\]"):
        load_checkpoint(tmp_path / "hf")


# -- issue 22: adapter-only checkpoints load over the factory's frozen base ----------------------------------

class _FrozenBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 5).requires_grad_(False)  # the frozen base, from the model factory
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def test_a_checkpoint_without_the_frozen_base_loads_over_it_and_says_so():
    torch.manual_seed(0)
    trained = _FrozenBase()
    state = {k: v + 1 for k, v in trained.state_dict().items() if k.startswith("head.")}
    model = _FrozenBase()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_state_into(model, state, "checkpoint x")
    assert report.partial and report.from_factory == ("encoder.bias", "encoder.weight") and report.adapter is None
    assert torch.equal(model.head.weight, state["head.weight"]) and torch.equal(model.encoder.weight,
                                                                                base["encoder.weight"])
    again = load_state_into(_FrozenBase(), state, "checkpoint x")  # the factory is seeded: the same base
    other = _FrozenBase()
    with torch.no_grad():
        other.encoder.weight.add_(1e-3)
    changed = load_state_into(other, state, "checkpoint x")
    assert again.factory_sha256 != changed.factory_sha256  # (unseeded factories differ, and the digest says so)
    full = load_state_into(_FrozenBase(), trained.state_dict(), "checkpoint x")
    assert not full.partial and full.factory_sha256 is None


def test_a_checkpoint_missing_a_trainable_parameter_is_refused_naming_it():
    state = {k: v for k, v in _FrozenBase().state_dict().items() if k != "head.weight"}
    with pytest.raises(CheckpointError, match=r"checkpoint x lacks the trainable parameter \['head.weight'\]"):
        load_state_into(_FrozenBase(), state, "checkpoint x")


def _lora_checkpoints(tmp_path, count=2):
    from tests import zoo

    return zoo.make_zoo_checkpoints(zoo.LoRAAdapter(), tmp_path, count=count)


def test_peft_adapter_checkpoints_load_through_peft_naming(tmp_path):
    """save_pretrained writes `...lora_A.weight`; the model holds `...lora_A.default.weight`."""
    from safetensors.torch import load_file

    from tests import zoo

    ckpt = _lora_checkpoints(tmp_path, count=1)[0]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in ckpt.path.iterdir()}
    saved = load_file(str(ckpt.path / "adapter_model.safetensors"))
    state, _ = load_checkpoint(ckpt.path)  # the folder: its adapter weights
    assert set(state) == set(saved) and all(".default." not in k for k in state)
    model = zoo.LoRAAdapter().build_model()
    report = load_state_into(model, state, "checkpoint x")
    assert report.adapter == "default" and report.partial
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(saved) and all(torch.equal(lora[k.replace(".weight", ".default.weight")], v)
                                           for k, v in saved.items())
    assert not any("lora_" in k for k in report.from_factory)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & set(report.from_factory)


def test_an_adapter_checkpoint_missing_a_lora_weight_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _lora_checkpoints(tmp_path, count=1)[0]
    state = load_file(str(ckpt.path / "adapter_model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(ckpt.path / "adapter_model.safetensors"))
    config = tmp_path / "config.toml"
    config.write_text(f'task = "tests.zoo:LoRAAdapter"\n[[checkpoints]]\npath = "{ckpt.path}"\nlr = 0.1\n'
                      '[projection]\nkind = "exact"\n')
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(config), "--out", str(tmp_path / "index")],
                          capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "not a checkpoint of the PEFT adapter the task builds" in proc.stderr and dropped in proc.stderr


def test_the_service_refuses_a_factory_that_builds_another_base(tmp_path, monkeypatch):
    from tests import zoo

    ckpts = _lora_checkpoints(tmp_path)
    data = {"task": "tests.zoo:LoRAAdapter", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
            "projection": {"kind": "exact"}, "index": {"batch_size": 4}}
    index = build_index(parse_config(data, tmp_path), tmp_path / "index").path
    entries = json.loads((index / "manifest.json").read_text())["base_weights"]
    assert [e["checkpoint"] for e in entries] == [0, 1] and all(e["adapter"] == "default" for e in entries)
    load_engine(Settings(index_dir=index, warmup=False))
    original = zoo.LoRAAdapter.make_model

    def another_base(self):
        model = original(self)
        with torch.no_grad():
            model.base_model.model.classifier.weight.add_(0.01)  # frozen, not in the adapter checkpoints
        return model

    monkeypatch.setattr(zoo.LoRAAdapter, "make_model", another_base)
    with pytest.raises(ServiceStartupError, match=r"checkpoints\[0\] holds only part of the model .* other values"):
        load_engine(Settings(index_dir=index, warmup=False))
