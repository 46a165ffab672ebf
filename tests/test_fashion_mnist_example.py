"""The Fashion-MNIST example of examples/fashion_mnist/README.md, reduced (512 images, 1 epoch) and run
end to end through the same commands: train (python -m indexer.demo.fashion_mnist train), tracin index,
tracin inspect, tracin serve (a real uvicorn subprocess), and queries posted as a 28x28 nested array and
as a base64 PNG. Skipped when the Debian package `dataset-fashion-mnist` is not installed."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.demo.fashion_mnist import data_available, decode_png, load_split
from indexer.images import png_bytes
from tests.service_support import REPO, start_server

pytestmark = pytest.mark.skipif(
    not data_available(), reason="Fashion-MNIST data not installed (apt-get install dataset-fashion-mnist)"
)

LIMIT = 512
K = 5


def _tracin() -> list[str]:
    """The venv's `tracin` console script when installed next to this Python, else `python -m indexer.cli`."""
    script = Path(sys.executable).with_name("tracin")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "indexer.cli"]


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's commands with --limit/--epochs: (work directory, index directory, train/inspect output)."""
    work = tmp_path_factory.mktemp("fashion-mnist")
    train_out = _run([sys.executable, "-m", "indexer.demo.fashion_mnist", "train", "--out", str(work),
                      "--limit", str(LIMIT), "--epochs", "1"], REPO)
    index_dir = work / "index"
    index_out = _run(_tracin() + ["index", str(work / "fashion_mnist.toml"), "--out", str(index_dir), "--quiet"], REPO)
    inspect_out = _run(_tracin() + ["inspect", str(index_dir), "--top", "3"], REPO)
    yield work, index_dir, {"train": train_out, "index": index_out, "inspect": inspect_out}
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def client(example):
    server = start_server(example[1], env={"TRACIN_COMPUTE_THREADS": "1"})
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            yield http
    finally:
        server.stop()


def test_train_index_inspect_outputs(example):
    work, index_dir, out = example
    assert len(list((work / "checkpoints").glob("step-*.pt"))) == 5
    assert out["train"].count("checkpoint step-") == 5 and "test accuracy" in out["train"]
    assert f"indexed {LIMIT} examples" in out["index"]
    assert f"examples   {LIMIT}" in out["inspect"]
    assert [line.split()[1] for line in out["inspect"].splitlines() if line.startswith("layer ")] == [
        "conv1", "conv2", "fc1", "fc2"]
    assert sum(line.startswith("checkpoint ") for line in out["inspect"].splitlines()) == 5


def _png_b64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def test_nested_array_and_base64_png_give_the_same_answer(client):
    images, labels = load_split("test")
    image = np.array(images[1234])  # a held-out test image (not among the 200 shipped with the index)
    answers = []
    for body in ({"example": {"image": image.tolist()}, "k": K},
                 {"example": {"image": _png_b64(image)}, "k": K},
                 {"example": {"image": "data:image/png;base64," + _png_b64(image)}, "k": K}):
        response = client.post("/influence", json=body)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    first = answers[0]
    assert len(first["proponents"]) == K and len(first["opponents"]) == K
    pro = [h["score"] for h in first["proponents"]]
    opp = [h["score"] for h in first["opponents"]]
    assert all(s > 0 for s in pro) and pro == sorted(pro, reverse=True)
    assert all(s < 0 for s in opp) and opp == sorted(opp)
    for hit in first["proponents"] + first["opponents"]:
        assert hit["id"].startswith("train-") and hit["display"]["image"].startswith("data:image/png;base64,")
    for other in answers[1:]:
        assert other["prediction"] == first["prediction"] and other["label_used"] == first["label_used"]
        for name in ("proponents", "opponents"):
            assert [h["id"] for h in other[name]] == [h["id"] for h in first[name]]
            assert np.allclose([h["score"] for h in other[name]], [h["score"] for h in first[name]], rtol=1e-6)
    # an explicit label is honoured the same way for both encodings
    labelled = [client.post("/influence", json={"example": {"image": im}, "k": K, "label": int(labels[1234])}).json()
                for im in (image.tolist(), _png_b64(image))]
    assert labelled[0]["label_used"] == labelled[1]["label_used"] == int(labels[1234])
    assert [h["id"] for h in labelled[0]["proponents"]] == [h["id"] for h in labelled[1]["proponents"]]


def test_bad_images_get_a_4xx_naming_the_field(client):
    for image in ([[0] * 28] * 27, [[300] * 28] * 28, "not a png", _png_b64(np.zeros((14, 28), np.uint8))):
        response = client.post("/influence", json={"example": {"image": image}, "k": K})
        assert 400 <= response.status_code < 500, response.text
        assert "image" in response.text


def test_training_example_thumbnail_is_the_image(client):
    images, labels = load_split("train")
    response = client.get("/examples/train-7")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["label"] == int(labels[7]) and info["display"]["flipped"] is False
    url = info["display"]["image"]
    assert url.startswith("data:image/png;base64,")
    png = base64.b64decode(url.split(",", 1)[1], validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = decode_png(png)
    scale = pixels.shape[0] // 28  # the image itself, or a nearest-neighbour upscale of it
    assert scale >= 1 and pixels.shape == (28 * scale, 28 * scale)
    assert np.array_equal(pixels[::scale, ::scale], images[7])
    top = client.get("/self-influence/top", params={"k": 3}).json()
    assert len(top["items"]) == 3 and all(i["display"]["image"].startswith("data:image/png") for i in top["items"])
