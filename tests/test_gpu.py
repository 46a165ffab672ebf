"""CPU vs CUDA: an index built with index.device = "cuda" holds the same embeddings as one built on the CPU,
and the shared embedder (what the service runs for a query) gives the same vectors on both devices.

Projections are drawn on the CPU from the seed and moved to the device, so only floating-point
rounding may differ (cuBLAS/cuFFT summation order, atomic adds). Tolerances, relative to the largest
entry of the compared array:
  * float64 models (tests.tasks):  vectors 1e-6 (the FAISS index stores float32), self-influence 1e-9
  * float32 models (digits MLP, a float32 CNN with TF32 off): vectors and self-influence 1e-4
All tests here need a CUDA device and are skipped elsewhere (`pytest -m cuda` selects them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from torch import nn

from indexer.config import load_config
from indexer.sketch.embedding import load_embedder
from indexer.build.pipeline import build_index
from indexer.store.search import top_k
from indexer.store.directory import IndexDirectory
from indexer.task import ExampleSet, Task
from tests.conftest import make_checkpoints, write_config
from tests.tasks import CNNTask, MLPTask, TokenTask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


class _Pixels(BaseModel):
    x: list[float]


class Float32CNN(Task):
    """A float32 conv net: the case where cuDNN's TF32 default would change the gradients."""

    example_schema = _Pixels

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 3))

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(5)
        return ExampleSet(torch.randn(30, 1, 7, 7, generator=g), torch.randint(0, 3, (30,), generator=g))

    def encode(self, examples):
        return torch.tensor([e.x for e in examples], dtype=torch.float32).reshape(-1, 1, 7, 7)


@pytest.fixture
def ieee_fp32():
    """Full float32 precision on the GPU (cuDNN convolutions default to TF32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _build_both(tmp: Path, ref: str, ckpts, **kw) -> tuple[IndexDirectory, IndexDirectory]:
    out = []
    for device in ("cpu", "cuda"):
        directory = tmp / device
        directory.mkdir()
        config = load_config(write_config(directory, ref, ckpts, extra=f'device = "{device}"', **kw))
        build_index(config, directory / "index")
        out.append(IndexDirectory.open(directory / "index"))
    return out[0], out[1]


def _assert_close(a: np.ndarray, b: np.ndarray, rel: float, what: str) -> None:
    scale = max(float(np.abs(a).max()), 1e-30)
    np.testing.assert_allclose(b, a, rtol=0, atol=rel * scale, err_msg=f"{what}: CUDA differs from CPU")


CASES = [
    ("tests.tasks:MLPTask", MLPTask, "exact", None),
    ("tests.tasks:MLPTask", MLPTask, "sketch", None),
    ("tests.tasks:MLPTask", MLPTask, "kronecker", None),
    ("tests.tasks:MLPTask", MLPTask, "gaussian", None),
    ("tests.tasks:CNNTask", CNNTask, "sketch", None),
    ("tests.tasks:TokenTask", TokenTask, "sketch", None),  # embedding rows + a LayerNorm via torch.func
]


@pytest.mark.parametrize("ref,cls,kind,layers", CASES, ids=[f"{c[0].split(':')[1]}-{c[2]}" for c in CASES])
def test_cuda_index_matches_cpu_float64(tmp_path, ref, cls, kind, layers):
    ckpts = make_checkpoints(cls(), tmp_path)
    cpu, cuda = _build_both(tmp_path, ref, ckpts, kind=kind, dim=16, layers=layers)
    assert cpu.manifest["projection"]["fingerprint"] == cuda.manifest["projection"]["fingerprint"]
    assert cuda.manifest["build"]["device"] == "cuda"
    n = cpu.count
    _assert_close(cpu.index.reconstruct_n(0, n), cuda.index.reconstruct_n(0, n), 1e-6, "vectors")
    _assert_close(cpu.self_influence, cuda.self_influence, 1e-9, "self-influence")


def test_cuda_index_matches_cpu_float32_conv(tmp_path, ieee_fp32):
    ckpts = make_checkpoints(Float32CNN(), tmp_path)
    cpu, cuda = _build_both(tmp_path, "tests.test_gpu:Float32CNN", ckpts, kind="sketch", dim=16)
    n = cpu.count
    _assert_close(cpu.index.reconstruct_n(0, n), cuda.index.reconstruct_n(0, n), 1e-4, "vectors")
    _assert_close(cpu.self_influence, cuda.self_influence, 1e-4, "self-influence")


def test_digits_demo_cuda_matches_cpu_and_query_path(tmp_path):
    """float32 MLP of the embedded demo: the index and the service's query path on both devices."""
    from indexer.demo.digits import train_digits

    config_path = train_digits(tmp_path / "run", epochs=5)
    indexes = {}
    for device in ("cpu", "cuda"):
        text = config_path.read_text()
        assert "[index]" in text and "device" not in text
        text = text.replace("[index]", f'[index]\ndevice = "{device}"')
        path = config_path.with_name(f"digits-{device}.toml")
        path.write_text(text)
        build_index(load_config(path), tmp_path / f"index-{device}")
        indexes[device] = IndexDirectory.open(tmp_path / f"index-{device}")
    cpu, cuda = indexes["cpu"], indexes["cuda"]
    n = cpu.count
    _assert_close(cpu.index.reconstruct_n(0, n), cuda.index.reconstruct_n(0, n), 1e-4, "vectors")
    _assert_close(cpu.self_influence, cuda.self_influence, 1e-4, "self-influence")

    # The service's path: rebuild the embedder from the (CPU-built) index on each device.
    task_cpu, emb_cpu = load_embedder(cpu, "cpu")
    _, emb_cuda = load_embedder(cpu, "cuda")
    examples = [task_cpu.example_schema(**q["example"]) for q in cpu.queries[:16]]
    inputs = task_cpu.encode(examples)
    pred_cpu, prob_cpu = emb_cpu.predict(inputs)
    pred_cuda, prob_cuda = emb_cuda.predict(inputs)
    assert torch.equal(pred_cpu, pred_cuda.cpu())
    _assert_close(prob_cpu.numpy(), prob_cuda.cpu().numpy(), 1e-5, "probabilities")
    q_cpu = emb_cpu.embed(inputs, pred_cpu).vectors.detach().cpu().numpy()
    q_cuda = emb_cuda.embed(inputs, pred_cpu).vectors.detach().cpu().numpy()
    _assert_close(q_cpu, q_cuda, 1e-4, "query vectors")
    for row in range(len(examples)):
        a = top_k(cpu.index, q_cpu[row].astype(np.float32), 5, 1)
        b = top_k(cpu.index, q_cuda[row].astype(np.float32), 5, 1)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3)
