"""The self-check catches every silently-wrong case of the model zoo when its fix is switched off.

Each test builds the capture plan the fix prevents (two blocks for one tied tensor, axis 0 for a
sequence-first layer, the hook route for attention's out_proj or for a functionally reused weight,
batched capture for batch statistics) and checks that the self-check refuses it, naming the layer; the
real plan passes. Then `tracin index` refuses such a plan in one line, and `tracin check` prints routes."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from indexer.capture.blocks import TracedBlock, Use, select_blocks
from indexer.capture.routes import CapturePlan
from indexer.config import ConfigError, parse_config
from indexer.sketch.embedding import ProjectionPlan, plan_embedding
from indexer.capture.selfcheck import self_check
from tests import zoo
from tests.conftest import make_checkpoints
from tests.service_support import REPO


def _setup(cls, tmp_path):
    task = cls()
    ckpts = make_checkpoints(task, tmp_path, count=2)
    ts = task.training_set()
    return task, ckpts, ts, plan_embedding(task, ckpts, None, "exact", 1, 0, ts.batch(0, 3))


def _with(plan: ProjectionPlan, capture: CapturePlan, blocks=None) -> ProjectionPlan:
    blocks = blocks or capture.blocks
    return ProjectionPlan.build(blocks, capture, "exact", 1, 0, len(plan.projectors), plan.compute_dtype)


def _force_hook(plan: ProjectionPlan, name: str, **axes) -> ProjectionPlan:
    capture = plan.capture
    routes = dict(capture.routes, **{name: "hook"})
    return _with(plan, replace(capture, routes=routes, axes={**capture.axes, **axes}))



def test_tied_weights_as_two_blocks_are_caught(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.TiedLMHead, tmp_path)
    assert self_check(task, ckpts, plan, ts).ok
    model = task.build_model()
    V, E = model.emb.weight.shape
    broken = [TracedBlock("emb", "embedding", V, E, ("emb.weight",), ((V, E),), (Use("emb", "weight"),)),
              TracedBlock("head", "linear", V, E + 1, ("emb.weight", "head.bias"), ((V, E), (V,)),
                          (Use("head", "weight+bias"),))]
    blocks = broken + [b for b in plan.blocks if b.name == "mix"]
    capture = CapturePlan(blocks, {b.name: "hook" for b in blocks}, {"emb": 0, "head": 0, "mix": 0})
    report = self_check(task, ckpts, _with(plan, capture, blocks), ts)
    assert not report.ok and {b.name for b in report.failures()} == {"emb", "head"}
    assert "'emb'" in report.refusal() and "hook route" in report.refusal()


def test_sequence_first_rows_taken_as_examples_are_caught(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.SeqFirstLinear, tmp_path)
    assert plan.capture.axes["proj"] == 1
    assert self_check(task, ckpts, plan, ts).ok
    broken = _with(plan, replace(plan.capture, axes={**plan.capture.axes, "proj": 0}))
    report = self_check(task, ckpts, broken, ts, rows=[0, 3, 6, 9])  # 4 examples, T = 4: shapes cannot tell
    assert [b.name for b in report.failures()] == ["proj"]


def test_attention_out_proj_on_the_hook_route_is_caught(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.MultiheadAttention, tmp_path)
    assert plan.capture.routes["att.out_proj"] != "hook"
    report = self_check(task, ckpts, _force_hook(plan, "att.out_proj", **{"att.out_proj": 0}), ts)
    assert [b.name for b in report.failures()] == ["att.out_proj"]


def test_functional_reuse_on_the_hook_route_is_caught(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.FunctionalTie, tmp_path)
    assert plan.capture.routes["emb"] != "hook"
    report = self_check(task, ckpts, _force_hook(plan, "emb", emb=0), ts)
    assert [b.name for b in report.failures()] == ["emb"]


def test_batch_statistics_captured_batched_are_caught(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.BatchStatsNorm, tmp_path)
    assert plan.capture.per_example and plan.capture.mixing == "norm"
    assert self_check(task, ckpts, plan, ts).ok
    report = self_check(task, ckpts, _with(plan, replace(plan.capture, per_example=False)), ts)
    assert not report.ok and "conv" in {b.name for b in report.failures()}


def test_a_deliberately_broken_route_is_caught(tmp_path, monkeypatch):
    """A hook route that forgets the bias column: nothing but the self-check can notice."""
    import indexer.capture.routes as capture_module
    from indexer.capture.grads import Outer

    task, ckpts, ts, plan = _setup(zoo.MLP, tmp_path)
    real = capture_module._Recorder.terms

    def no_bias(self, use):
        terms = real(self, use)
        if use.role == "weight+bias" and isinstance(terms[0], Outer):
            v = terms[0].v.clone()
            v[..., -1] = 0
            return [Outer(terms[0].u, v)]
        return terms

    monkeypatch.setattr(capture_module._Recorder, "terms", no_bias)
    report = self_check(task, ckpts, plan, ts)
    assert {b.name for b in report.failures()} == {"0", "2"}


def test_tracin_index_refuses_a_plan_that_fails_the_self_check(tmp_path, monkeypatch):
    import indexer.build.pipeline as pipeline

    task, ckpts, ts, plan = _setup(zoo.MultiheadAttention, tmp_path)
    monkeypatch.setattr(pipeline, "plan_embedding",
                        lambda *a, **k: _force_hook(plan, "att.out_proj", **{"att.out_proj": 0}))
    data = {"task": "tests.zoo:MultiheadAttention", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
            "projection": {"kind": "exact"}}
    with pytest.raises(ConfigError, match="'att.out_proj'.*are all zero while torch.autograd.grad"):  # never called: no hook fires
        pipeline.build_index(parse_config(data, tmp_path), tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_the_self_check_runs_at_the_index_batch_size(tmp_path):
    """A model that misuses a shared row only in batches larger than the planner's and the self-check's rows
    is refused at the index's batch size, not indexed wrongly."""
    task, ckpts, ts, plan = _setup(zoo.RowZeroInLargeBatches, tmp_path)
    data = {"task": "tests.zoo:RowZeroInLargeBatches", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
            "projection": {"kind": "exact"}, "index": {"batch_size": 7}}
    import indexer.build.pipeline as pipeline

    with pytest.raises(ConfigError, match="self-check: the per-example gradients of 'pos'"):
        pipeline.build_index(parse_config(data, tmp_path), tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_tracin_check_prints_each_block_route_and_agreement(tmp_path):
    ckpts = make_checkpoints(zoo.LSTM(), tmp_path, count=2)
    config = tmp_path / "config.toml"
    config.write_text('task = "tests.zoo:LSTM"\n' + "".join(
        f'[[checkpoints]]\npath = "{c.path}"\nlr = {c.lr}\n' for c in ckpts))
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "check", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rnn.weight_hh_l0" in out and " loop " in out and "head" in out and " hook " in out
    assert "torch.func cannot batch the forward" in out and out.strip().endswith("the query path works")


def test_blocks_of_a_tied_tensor_are_one(tmp_path):
    blocks = select_blocks(zoo.TiedLMHead().build_model(), None)
    tied = [b for b in blocks if b.kind == "tied"]
    assert len(tied) == 1 and {u.module for u in tied[0].uses} == {"emb", "head"}
    assert sum("emb.weight" in b.params for b in blocks) == 1


# -- issue 22: an all-zero capture is never indexed --------------------------------------------------------

def test_hooks_that_lose_their_output_gradients_are_caught_as_all_zero(tmp_path, monkeypatch):
    """A capture that silently gives zeros (what reentrant activation checkpointing did to the hooks): the sum
    check and the self-check both fail loudly, naming the block and saying 'all zero'."""
    import torch

    import indexer.capture.routes as capture_module

    task, ckpts, ts, plan = _setup(zoo.MLP, tmp_path)
    assert self_check(task, ckpts, plan, ts).ok
    monkeypatch.setattr(capture_module._Recorder, "_store", lambda self, slot, grad: None)
    report = self_check(task, ckpts, plan, ts)
    assert {b.name for b in report.failures()} == {"0", "2"} and all(b.captured_zero for b in report.failures())
    assert "are all zero while torch.autograd.grad on each example alone is not" in report.refusal()
    assert "'0', '2'" in report.refusal() and "\n" not in report.refusal()
    from indexer.sketch.embedding import CheckpointEmbedder

    embedder = CheckpointEmbedder(task, ckpts[0], 0, plan)
    x, y = ts.batch(0, 4)
    with pytest.raises(capture_module.CaptureError, match="layer '0': its per-example gradients are all zero while "
                                                          "the batch gradient is not"):
        embedder.embed(x, y, check=True)
    assert torch.is_grad_enabled()


def test_a_loss_that_does_not_depend_on_the_traced_parameters_is_refused(tmp_path):
    task, ckpts, ts, plan = _setup(zoo.DetachedOnly, tmp_path)
    report = self_check(task, ckpts, plan, ts)
    assert report.all_zero and not report.ok and report.zero == ["encoder"]
    assert report.refusal().startswith("self-check: every traced block's gradient is exactly zero")


def test_an_unused_traced_layer_is_reported_not_refused(tmp_path):
    class WithSpare(zoo.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = zoo.nn.Sequential(zoo.nn.Linear(6, 8), zoo.nn.Tanh(), zoo.nn.Linear(8, 3))
            self.spare = zoo.nn.Linear(3, 3)  # traced (layers = all), never called

        def forward(self, x):
            return self.net(x)

    class Unused(zoo.MLP):
        def make_model(self):
            return WithSpare()

    task = Unused()
    ckpts = make_checkpoints(task, tmp_path, count=2)
    ts = task.training_set()
    plan = plan_embedding(task, ckpts, None, "exact", 1, 0, ts.batch(0, 3))
    report = self_check(task, ckpts, plan, ts)
    assert report.ok and report.zero == ["spare"] and "'spare' has an exactly zero gradient" in report.notes[0]


def test_without_plain_checkpoints_a_reentrant_checkpointed_model_is_refused_not_zero(tmp_path, monkeypatch):
    """Should torch's checkpoint internals change so that they cannot be run plainly, a checkpointed model is
    refused (here: its layers run under no_grad), never indexed as zeros."""
    import torch.utils.checkpoint as ckpt_module

    import indexer.capture.plain_checkpoints as plain

    monkeypatch.setattr(plain, "_NAMES", ("CheckpointFunction", "_no_such_name_in_torch"))
    task = zoo.CheckpointReentrant()
    ckpts = make_checkpoints(task, tmp_path, count=2)
    data = {"task": "tests.zoo:CheckpointReentrant", "checkpoints": [{"path": str(c.path), "lr": c.lr} for c in ckpts],
            "projection": {"kind": "exact"}}
    from indexer.build.pipeline import build_index

    with pytest.raises(ConfigError) as err:
        build_index(parse_config(data, tmp_path), tmp_path / "index")
    assert "block." in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "index").exists()
    assert ckpt_module.CheckpointFunction.__name__ == "CheckpointFunction"  # nothing left replaced


def test_plain_checkpoints_restore_torch_and_count_nested_uses():
    import threading

    import torch
    import torch.utils.checkpoint as ckpt_module

    from indexer.capture.plain_checkpoints import run_checkpoints_plainly

    original = ckpt_module.CheckpointFunction
    with run_checkpoints_plainly() as active:
        assert active and ckpt_module.CheckpointFunction is not original
        with run_checkpoints_plainly() as inner:
            assert inner
        assert ckpt_module.CheckpointFunction is not original  # still held by the outer block
        seen = []
        thread = threading.Thread(target=lambda: seen.append(ckpt_module.CheckpointFunction is not original))
        thread.start()
        thread.join()
        assert seen == [True]
        weight = torch.ones(3, requires_grad=True)
        out = ckpt_module.checkpoint(lambda x: x * weight, torch.arange(3.0), use_reentrant=True)
        assert torch.equal(torch.autograd.grad(out.sum(), weight)[0], torch.arange(3.0))
    assert ckpt_module.CheckpointFunction is original
    assert ckpt_module._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"
