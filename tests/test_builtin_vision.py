"""Built-in task `torchvision.image_classification` end to end: Fashion-MNIST images written to an image folder, a
torchvision resnet18 trained with torchvision's ImageFolder and transforms and saved with
torch.save(model.state_dict()) per epoch, indexed from a config, served, queried with a base64 PNG, and in exact
mode equal to the float64 oracle.

Needs torchvision (skipped here otherwise: this project's CPU torch has no matching torchvision on PyPI, so
tests/test_builtin_tasks.py runs this file in `.venv-vision`, see `make vision-venv`) and Debian's
dataset-fashion-mnist.
"""
from __future__ import annotations

import base64
import csv

import pytest
import torch

pytest.importorskip("torchvision", reason="torchvision is not installed here (make vision-venv)")

import torchvision  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from indexer.cli import main as tracin  # noqa: E402
from indexer.demo.fashion_mnist import data_available  # noqa: E402
from indexer.store.directory import IndexDirectory  # noqa: E402
from tests import builtin_support as bs  # noqa: E402
from tests.service_support import start_server  # noqa: E402
from tests.test_builtin_tasks import _refused, assert_oracle  # noqa: E402

TRANSFORM_ARGS = {"resize": 36, "center_crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
LAYERS = ["layer1.0.conv1", "fc"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not data_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    work = tmp_path_factory.mktemp("vision")
    root = bs.fashion_folder(work / "images" / "train")
    # the user's training: torchvision's ImageFolder and transforms, resnet18, one state dict per epoch
    transform = v2.Compose([v2.Resize(36), v2.CenterCrop(32), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.25] * 3)])
    data = torchvision.datasets.ImageFolder(str(root), transform=transform,
                                            loader=lambda p: torchvision.datasets.folder.pil_loader(p))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    for epoch in (1, 2):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(model.state_dict(), work / f"epoch-{epoch}.pt")
    return work, data.classes


def test_image_folder_resnet18_equals_the_oracle_and_answers_a_png(run, tmp_path):
    work, classes = run
    assert classes == ["sneaker", "trouser", "tshirt"]
    config = bs.toml_config(tmp_path / "images.toml", "torchvision.image_classification",
                            {"arch": "resnet18", "num_classes": 3, "data": str(work / "images" / "train"),
                             **TRANSFORM_ARGS}, [(work / "epoch-1.pt", 0.01), (work / "epoch-2.pt", 0.01)],
                            layers=LAYERS)
    assert tracin(["index", str(config), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    index = IndexDirectory.open(tmp_path / "index")
    first = index.examples[0]
    assert first["id"].startswith("sneaker/") and first["display"]["class_name"] == "sneaker"
    assert first["display"]["image"].startswith("data:image/png;base64,")
    server = start_server(tmp_path / "index")
    try:
        png = sorted((work / "images" / "train" / "trouser").glob("*.png"))[1]
        example = {"image": base64.b64encode(png.read_bytes()).decode()}
        answer = assert_oracle(config, tmp_path / "index", example, label="trouser", server_url=server.base_url)
        assert answer["label_used"] == 1
        bad = __import__("httpx").post(server.base_url + "/influence", json={"example": {"image": "bm90IGFuIGltYWdl"}},
                                       timeout=30)
        assert bad.status_code == 422 and "PNG or JPEG" in bad.text
    finally:
        server.stop()


def test_a_table_of_paths_and_label_names_reads_the_same_images(run, tmp_path):
    from indexer.tasks.vision import ImageClassificationTask

    work, classes = run
    files = sorted((work / "images" / "train").rglob("*.png"))
    with open(tmp_path / "images.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "kind"])
        for f in files:
            writer.writerow([f.relative_to(work / "images"), f.parent.name])
    table = ImageClassificationTask("resnet18", 3, str(tmp_path / "images.csv"), path_column="file",
                                    label_column="kind", image_root=str(work / "images"), classes=classes,
                                    **TRANSFORM_ARGS).training_set()
    folder = ImageClassificationTask("resnet18", 3, str(work / "images" / "train"), **TRANSFORM_ARGS).training_set()
    assert torch.equal(table.inputs, folder.inputs) and torch.equal(table.labels, folder.labels)


def test_refusals_name_the_folder_the_keys_and_the_architecture(run, tmp_path, capsys):
    work, _ = run
    (tmp_path / "empty").mkdir()
    config = bs.toml_config(tmp_path / "c.toml", "torchvision.image_classification",
                            {"arch": "resnet18", "num_classes": 3, "data": "empty"}, [(work / "epoch-1.pt", 0.01)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "the image folder" in err and "has no classes" in err and "<class>/*.png" in err
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), tmp_path / "other.pt")
    config = bs.toml_config(tmp_path / "c.toml", "torchvision.image_classification",
                            {"arch": "resnet18", "num_classes": 3, "data": str(work / "images" / "train"),
                             **TRANSFORM_ARGS}, [(tmp_path / "other.pt", 0.01)])
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "checkpoints[0] (other.pt) for torchvision resnet18 (num_classes 3) does not match the model" in err
    assert "missing keys ['bn1.bias'" in err and "unexpected keys ['classifier.0.bias'" in err
    config.write_text(config.read_text().replace('"resnet18"', '"resnet181"'))
    err = _refused(capsys, ["index", str(config), "--out", str(tmp_path / "index")])
    assert "task_args.arch: 'resnet181' is not a torchvision classification model" in err and "resnet18" in err
    assert not (tmp_path / "index").exists()
