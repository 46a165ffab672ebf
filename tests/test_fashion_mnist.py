"""Fashion-MNIST demo task: data loading, label flips, example schema (nested array and PNG), and a tiny
train + index run. Skipped when the Debian package `dataset-fashion-mnist` is not installed."""
from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from indexer.demo.fashion_mnist import (
    CLASS_NAMES, FashionMNISTExample, FashionMNISTTask, data_available, decode_png, train_fashion_mnist,
)
from indexer.images import png_bytes

needs_data = pytest.mark.skipif(
    not data_available(), reason="Fashion-MNIST data not installed (apt-get install dataset-fashion-mnist)"
)


def _png(pixels: np.ndarray, colour: int = 0, filters: tuple[int, ...] = (0,)) -> bytes:
    """A PNG with the given colour type and per-row filter types (cycled), to exercise the decoder."""
    h, w = pixels.shape[:2]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    data = pixels.reshape(h, w * channels).astype(np.int32)
    rows, prev = [], np.zeros(w * channels, dtype=np.int32)
    for r in range(h):
        kind = filters[r % len(filters)]
        line = data[r]
        left = np.concatenate([np.zeros(channels, np.int32), line[:-channels]])
        up_left = np.concatenate([np.zeros(channels, np.int32), prev[:-channels]])
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) >> 1
        else:
            p = left + prev - up_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        rows.append(bytes([kind]) + ((line - pred) & 0xFF).astype(np.uint8).tobytes())
        prev = line

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def test_png_decoder_handles_every_filter_and_colour_type():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    assert np.array_equal(decode_png(png_bytes(gray)), gray)  # the project's own encoder
    assert np.array_equal(decode_png(_png(gray, 0, (0, 1, 2, 3, 4))), gray)
    assert np.array_equal(decode_png(_png(np.stack([gray, gray], -1), 4, (4, 3))), gray)  # alpha dropped
    rgb = np.stack([gray, gray, gray], -1)
    assert np.array_equal(decode_png(_png(rgb, 2, (1, 4))), gray)
    assert np.array_equal(decode_png(_png(np.concatenate([rgb, gray[..., None]], -1), 6, (2,))), gray)


def test_example_schema_accepts_nested_array_and_png_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    task = FashionMNISTTask()
    nested = FashionMNISTExample(image=gray.tolist())
    b64 = FashionMNISTExample(image=base64.b64encode(png_bytes(gray)).decode())
    url = FashionMNISTExample.model_validate_json(json.dumps(
        {"image": "data:image/png;base64," + base64.b64encode(png_bytes(gray)).decode()}))
    encoded = task.encode([nested, b64, url])
    assert encoded.shape == (3, 1, 28, 28) and encoded.dtype == torch.float32
    assert torch.allclose(encoded[0, 0], torch.from_numpy(gray).float() / 255)
    assert torch.equal(encoded[0], encoded[1]) and torch.equal(encoded[1], encoded[2])
    for bad in ([[0] * 28] * 27, [[0] * 27] * 28, [[300] * 28] * 28, [[-1] * 28] * 28, "not base64!",
                base64.b64encode(b"GIF89a").decode(), base64.b64encode(png_bytes(gray[:14])).decode()):
        with pytest.raises(ValidationError):
            FashionMNISTExample(image=bad)


def test_model_takes_uint8_and_float_pixels_alike():
    task = FashionMNISTTask()
    model = task.build_model().eval()
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.float() / 255), atol=1e-6)


@needs_data
def test_training_set_flips_are_recorded_and_deterministic():
    task = FashionMNISTTask(limit=500, flip_fraction=0.1, seed=3)
    ts = task.training_set()
    assert len(ts) == 500 and ts.inputs.shape == (500, 1, 28, 28) and ts.inputs.dtype == torch.uint8
    flips = [ts.display_of(i) for i in range(500)]
    flipped = [i for i, d in enumerate(flips) if d["flipped"]]
    assert len(flipped) == 50
    for i, d in enumerate(flips):
        assert (d["original_label"] != int(ts.labels[i])) == d["flipped"]
        assert d["class_name"] == CLASS_NAMES[int(ts.labels[i])]
        assert d["image"].startswith("data:image/png;base64,")
    again = FashionMNISTTask(limit=500, flip_fraction=0.1, seed=3).training_set()
    assert torch.equal(again.labels, ts.labels)
    clean = FashionMNISTTask(limit=500).training_set()
    assert not any(clean.display_of(i)["flipped"] for i in range(500))
    held = task.held_out_set()
    assert len(held) == 200 and FashionMNISTExample(**held.example_of(0)).image == held.inputs[0, 0].tolist()


@needs_data
def test_tiny_train_and_index(tmp_path):
    from indexer.config import load_config
    from indexer.sketch.embedding import load_embedder
    from indexer.build.pipeline import build_index
    from indexer.store.directory import IndexDirectory

    config_path = train_fashion_mnist(tmp_path / "run", epochs=1, checkpoints=2, limit=256, flip_fraction=0.05,
                                      dim=32)
    config = load_config(config_path)
    assert len(config.checkpoints) == 2 and config.projection.dim == 32
    result = build_index(config, tmp_path / "index")
    assert result.count == 256
    index = IndexDirectory.open(result.path)
    assert index.count == 256 and len(index.queries) == 200
    assert sum(e["display"]["flipped"] for e in index.examples) == 13
    assert [layer["name"] for layer in index.manifest["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    task, embedder = load_embedder(index)
    query = task.example_schema(**index.queries[0]["example"])
    emb = embedder.embed(task.encode([query]), torch.tensor([index.queries[0]["label"]]))
    assert emb.vectors.shape == (1, index.manifest["embedding_dim"])
    # a training example embedded as a query reproduces its stored vector and self-influence
    row = task.example_schema(**task.training_set().example_of(7))
    again = embedder.embed(task.encode([row]), torch.tensor([index.examples[7]["label"]]))
    stored = index.index.reconstruct(7)
    assert np.allclose(again.vectors[0].numpy(), stored, rtol=1e-4, atol=1e-6 * np.abs(stored).max())
    assert np.isclose(float(again.self_influence[0]), index.self_influence[7], rtol=1e-4)
