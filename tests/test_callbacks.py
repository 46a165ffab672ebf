"""Training-loop callbacks (indexer/callbacks.py): a tiny Hugging Face `Trainer` run and a tiny Lightning run
save checkpoints with the learning rate of their last optimizer step, and `tracin index` builds on them.

Needs the extras `huggingface` (transformers, accelerate) and `lightning`; each part skips, saying why,
when its library is missing. Nothing is downloaded (HF_HUB_OFFLINE=1; models are built from a config).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from pydantic import BaseModel, Field
from torch import nn

from indexer.checkpoints import load_checkpoint
from indexer.cli import main as tracin
from indexer.store.directory import IndexDirectory
from indexer.task import ExampleSet, Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB, SEQ, CLASSES, N = 40, 8, 3, 48


def _tokens(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose class is the most frequent of three token bands: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    band = VOCAB // CLASSES
    ids[:, : SEQ // 2] = labels[:, None] * band + torch.randint(1, band, (n, SEQ // 2), generator=g)
    return ids, labels


class TokenExample(BaseModel):
    input_ids: list[int] = Field(min_length=SEQ, max_length=SEQ)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class TinyBertTask(Task):
    """The task `tracin index` uses for the Trainer's checkpoints: the same model class and config."""

    example_schema = TokenExample

    def build_model(self) -> nn.Module:
        return tiny_bert()

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits

    def encode(self, examples: Sequence[TokenExample]) -> torch.Tensor:
        return torch.tensor([e.input_ids for e in examples])

    def training_set(self) -> ExampleSet:
        ids, labels = _tokens()
        return ExampleSet(ids, labels, examples=lambda i: {"input_ids": ids[i].tolist()})


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def _table(n: int = N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


class TinyMLPTask(Task):
    """The task for the Lightning run: `build_model()` is the LightningModule's inner `net`."""

    example_schema = TokenExample  # not served here

    def build_model(self) -> nn.Module:
        return _mlp()

    def encode(self, examples):  # pragma: no cover - not served
        raise NotImplementedError

    def training_set(self) -> ExampleSet:
        x, y = _table()
        return ExampleSet(x, y)


def _index(tmp_path: Path, task_ref: str, checkpoints: list[Path], layers: list[str]) -> IndexDirectory:
    lines = [f'task = "{task_ref}"', "layers = [" + ", ".join(f'"{x}"' for x in layers) + "]"]
    for path in checkpoints:  # no lr here: `tracin index` reads it from the files
        lines += ["[[checkpoints]]", f'path = "{path}"']
    lines += ["[projection]", 'kind = "exact"', "[index]", 'factory = "Flat"', "batch_size = 16"]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    return IndexDirectory.open(tmp_path / "index")


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[huggingface,lightning]')")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.ids, self.labels = _tokens()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _lrs(paths: list[Path]) -> list[float]:
    return [load_checkpoint(p)[1]["lr"] for p in paths]


# -- Hugging Face Trainer -------------------------------------------------------------------------

def test_trainer_callback_saves_the_lr_of_the_last_step_and_tracin_indexes_it(tmp_path):
    _needs("transformers", "accelerate")
    from transformers import Trainer, TrainingArguments

    from indexer.callbacks import TracInTrainerCallback

    per_epoch = TracInTrainerCallback(tmp_path / "epochs")  # default: every epoch
    per_steps = TracInTrainerCallback(tmp_path / "steps", every_n_epochs=None, every_n_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=8,
                             learning_rate=0.1, lr_scheduler_type="linear", optim="sgd", weight_decay=0.0,
                             logging_strategy="steps", logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset(), callbacks=[per_epoch, per_steps])
    trainer.train()
    # The Trainer's own log: the lr each optimizer step used (6 steps per epoch, linear decay to 0).
    used = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert len(used) == 12 and used[6] != used[7]
    assert [p.name for p in per_epoch.saved] == ["epoch-001.pt", "epoch-002.pt"]
    assert _lrs(per_epoch.saved) == pytest.approx([used[6], used[12]], rel=1e-12)  # not the next step's lr
    assert [p.name for p in per_steps.saved] == ["step-000004.pt", "step-000008.pt", "step-000012.pt"]
    assert _lrs(per_steps.saved) == pytest.approx([used[4], used[8], used[12]], rel=1e-12)
    state, meta = load_checkpoint(per_epoch.saved[-1])
    assert meta["format"] == "tracin-checkpoint/1" and meta["epoch"] == 2 and meta["step"] == 12
    final = trainer.model.state_dict()
    assert set(state) == set(final) and all(torch.equal(state[k], final[k].cpu()) for k in final)

    index = _index(tmp_path, "tests.test_callbacks:TinyBertTask", per_epoch.saved, ["classifier"])
    assert index.count == N and [c["lr"] for c in index.manifest["checkpoints"]] == _lrs(per_epoch.saved)
    assert (index.self_influence > 0).all()


# -- Lightning ------------------------------------------------------------------------------------

def test_lightning_callback_saves_the_lr_of_the_last_step_and_tracin_indexes_it(tmp_path):
    _needs("lightning")
    import lightning as L
    import torch.nn.functional as F

    from indexer.callbacks import TracInLightningCallback

    class LitMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.2)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # halved after each epoch
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    x, y = _table()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 3 steps per epoch
    per_epoch = TracInLightningCallback(tmp_path / "epochs", module="net")
    per_steps = TracInLightningCallback(tmp_path / "steps", every_n_epochs=None, every_n_train_steps=2, module="net")
    module = LitMLP()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[per_epoch, per_steps])
    trainer.fit(module, loader)
    assert [p.name for p in per_epoch.saved] == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]
    # Lightning steps an epoch scheduler before on_train_epoch_end: the lr recorded is still the one used.
    assert _lrs(per_epoch.saved) == pytest.approx([0.2, 0.1, 0.05], rel=1e-12)
    assert [p.name for p in per_steps.saved] == ["step-000002.pt", "step-000004.pt", "step-000006.pt",
                                                 "step-000008.pt"]
    assert _lrs(per_steps.saved) == pytest.approx([0.2, 0.1, 0.1, 0.05], rel=1e-12)
    state, _ = load_checkpoint(per_epoch.saved[-1])
    final = module.net.state_dict()
    assert set(state) == set(final) and all(torch.equal(state[k], final[k]) for k in final)

    index = _index(tmp_path, "tests.test_callbacks:TinyMLPTask", per_epoch.saved, ["0", "2"])
    assert index.count == N and [c["lr"] for c in index.manifest["checkpoints"]] == pytest.approx([0.2, 0.1, 0.05])


# -- without the libraries ------------------------------------------------------------------------

def test_missing_library_raises_an_import_error_naming_the_extra(monkeypatch):
    import indexer.callbacks as callbacks

    monkeypatch.setattr(callbacks, "_CLASSES", {})
    for name in ("transformers", "lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'tracin-service\[huggingface\]'"):
        from indexer.callbacks import TracInTrainerCallback  # noqa: F401
    with pytest.raises(ImportError, match=r"pip install 'tracin-service\[lightning\]'"):
        callbacks.TracInLightningCallback  # noqa: B018


def test_schedule_arguments_are_checked():
    from indexer.callbacks import _Saver

    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        _Saver("x", None, 0, "TracInTrainerCallback")
    with pytest.raises(ValueError, match="give every_n_epochs or every_n_steps"):
        _Saver("x", None, None, "TracInLightningCallback")


def test_callbacks_record_the_optimizer_state_so_adamw_runs_are_scored_with_adam(tmp_path):
    """The Trainer's default optimizer (AdamW) through TracInTrainerCallback: each file records the optimizer's
    class, its state and every group's parameter names, and the index uses the Adam formula."""
    _needs("transformers", "accelerate")
    from transformers import Trainer, TrainingArguments

    from indexer.callbacks import TracInTrainerCallback

    saver = TracInTrainerCallback(tmp_path / "epochs")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=8,
                             learning_rate=0.01, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    Trainer(model=tiny_bert(), args=args, train_dataset=TokenDataset(), callbacks=[saver]).train()
    payload = torch.load(saver.saved[-1], weights_only=True)
    assert payload["optimizer_class"].endswith("AdamW")
    names = payload["optimizer_param_names"]
    assert len(names) == 2 and {n for g in names for n in g} == {n for n, _ in tiny_bert().named_parameters()}
    assert all("exp_avg_sq" in s for s in payload["optimizer_state_dict"]["state"].values())
    index = _index(tmp_path, "tests.test_callbacks:TinyBertTask", saver.saved, ["classifier"])
    assert index.manifest["optimizer"]["formula"] == "adam"
    assert index.manifest["checkpoints"][0]["step"]["mapping"] == "parameter names recorded with the optimizer"


# -- keeping an index current from the training loop ------------------------------------------------

def test_trainer_callback_keeps_an_index_current_and_a_running_server_reloads_it(tmp_path):
    """An index of a checkpoint from before this run (version 1) is served; TracInTrainerCallback with an
    IndexUpdate brings it up to date after each epoch's checkpoint (`tracin index --update` in a child process)
    and POSTs /admin/reload to the server. When training ends the index holds every checkpoint and equals a
    full build of all of them, and the server serves that version."""
    _needs("transformers", "accelerate")
    import httpx
    from transformers import Trainer, TrainingArguments

    from indexer.callbacks import IndexUpdate, TracInTrainerCallback
    from indexer.checkpoints import save_checkpoint
    from tests.service_support import REPO, start_server
    from tests.test_update import assert_same_index

    model = tiny_bert()
    before = save_checkpoint(tmp_path / "before.pt", model, lr=0.05, step=0)  # e.g. the end of an earlier run
    base = tmp_path / "index.toml"
    base.write_text('task = "tests.test_callbacks:TinyBertTask"\nlayers = ["classifier"]\n'
                    '[projection]\nkind = "exact"\n[index]\nfactory = "Flat"\nbatch_size = 16\n'
                    f"[[checkpoints]]\npath = {str(before)!r}\n")
    out = tmp_path / "index"
    assert tracin(["index", str(base), "--out", str(out), "--quiet"]) == 0
    key = "callback-key"
    server = start_server(out, env={"TRACIN_API_KEY": key})
    try:
        update = IndexUpdate(base, out, reload_url=server.base_url, api_key=key, env={"PYTHONPATH": str(REPO)})
        saver = TracInTrainerCallback(tmp_path / "epochs", update_index=update)
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=3, per_device_train_batch_size=8,
                                 learning_rate=0.1, optim="sgd", save_strategy="no", report_to="none", use_cpu=True,
                                 disable_tqdm=True, seed=0, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[saver]).train()
        # on_train_end waited for the last update: every run succeeded and was reloaded, the last one took all
        assert [p.name for p in saver.saved] == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]
        assert update.runs and all(r["returncode"] == 0 for r in update.runs), (update.runs, update.log.read_text())
        assert all("--update" in r["command"] for r in update.runs)
        assert update.runs[-1]["checkpoints"] == [str(p) for p in saver.saved]
        assert all(r["reload"]["status"] == 200 and r["reload"]["body"]["reloaded"] for r in update.runs)
        info = httpx.get(server.base_url + "/index", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
        assert len(info["checkpoints"]) == 4 and info["version"]["number"] == 1 + len(update.runs)
    finally:
        server.stop()
    (tmp_path / "full").mkdir()
    full = _index(tmp_path / "full", "tests.test_callbacks:TinyBertTask", [before, *saver.saved], ["classifier"])
    updated = IndexDirectory.open(out)
    assert updated.version.number == 1 + len(update.runs)
    assert_same_index(updated, full)
    with pytest.raises(ValueError, match="config file not found"):
        IndexUpdate(tmp_path / "missing.toml", out)
    inline = tmp_path / "inline.toml"
    inline.write_text(f'task = "x:Y"\ncheckpoints = [{{ path = {str(before)!r} }}]\n')
    with pytest.raises(ValueError, match="not an inline array"):
        IndexUpdate(inline, out)


def test_a_failed_index_update_is_a_warning_not_an_exception(tmp_path):
    """An update the CLI refuses (here: a task that does not exist) warns with the refusal's line and the log's
    path; training is not interrupted, nothing is reloaded."""
    from indexer.callbacks import IndexUpdate
    from indexer.checkpoints import save_checkpoint
    from tests.service_support import REPO

    ckpt = save_checkpoint(tmp_path / "c.pt", _mlp(), lr=0.1, step=1)
    base = tmp_path / "index.toml"
    base.write_text('task = "tests.test_callbacks:NoSuchTask"\n[projection]\nkind = "exact"\n')
    update = IndexUpdate(base, tmp_path / "index", reload_url="http://127.0.0.1:9", wait=True,
                         env={"PYTHONPATH": str(REPO)})
    with pytest.warns(UserWarning, match=r"failed \(exit 2\): .*NoSuchTask"):
        update.request([ckpt])
    assert [r["returncode"] for r in update.runs] == [2] and update.runs[0]["reload"] is None
    assert f'path = "{ckpt}"' in (tmp_path / "index.update.toml").read_text()
    assert not (tmp_path / "index").exists()
