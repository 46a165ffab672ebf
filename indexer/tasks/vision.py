"""Built-in task `torchvision.image_classification`: a torchvision classification architecture named in the
config, the checkpoints' state dicts, and an image folder or a table of image paths and labels.

    task = "torchvision.image_classification"
    task_args = { arch = "resnet18", num_classes = 10, data = "images/train", resize = 64, center_crop = 56,
                  mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }

Model: `torchvision.models.get_model(arch, weights=None, num_classes=num_classes)`, the architecture torchvision
itself builds (nothing is re-implemented here; `weights=None`: no download, each checkpoint's state dict is
loaded into it). Checkpoints are `torch.save(model.state_dict())` files of that model (or any format `tracin
index` reads); a state dict of another architecture is refused in one line listing its keys and the expected ones.

Data: `data` is either an image folder laid out as torchvision's ImageFolder reads it (data/<class>/*.png, the
classes sorted by folder name give the class ids) or a table (CSV / JSONL / Parquet / a `datasets` folder) with
`path_column` (image files, relative to `image_root`, default the table's folder) and `label_column` (class ids,
or names listed in `classes`). Every image is opened with Pillow, converted to `mode` ("RGB"; "L" for one
channel) and transformed as in training, with torchvision's transforms in this order: Resize(`resize`) when
given, CenterCrop(`center_crop`) when given, ToImage + ToDtype(float32, scale=True) (0..1), Normalize(`mean`,
`std`) when given. Images must all have one size after these.

The JSON example is {"image": "<base64 PNG or JPEG>"} (a `data:image/...;base64,` URL too); it goes through the
same conversion and transforms. Each training example displays a PNG thumbnail (at most `thumbnail` pixels a side).

torchvision is imported when the task is built: a missing or broken one (a torchvision built for another torch)
is refused in one line naming the extra, `tracin-service[vision]`.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from indexer.config import ConfigError
from indexer.task import ExampleSet, Task
from indexer.tasks.data import class_ids, read_table

VISION_EXTRA = "pip install 'tracin-service[vision]' (torchvision from the same index as your torch)"
MAX_PIXELS = 16_000_000  # larger query images are refused (decompression bombs)
MAX_BYTES = 20_000_000


def _torchvision():
    try:
        import torchvision
        import torchvision.transforms.v2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"task: torchvision.image_classification needs torchvision ({exc.name} is missing): "
                          f"{VISION_EXTRA}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. "operator torchvision::nms does not exist": a build mismatch
        raise ConfigError(f"task: torchvision is installed but cannot be imported beside torch {torch.__version__} "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}): it was built for another "
                          f"torch; {VISION_EXTRA}") from None
    return torchvision


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(f"task: torchvision.image_classification needs Pillow: {VISION_EXTRA}") from None
    return Image


def decode_image(text: str) -> Any:
    """A base64 PNG / JPEG (or a data URL of one) -> a PIL image (loaded). Raises ValueError (one line)."""
    Image = _pil()
    data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    if len(data) > MAX_BYTES * 4 // 3 + 4:
        raise ValueError(f"image: larger than {MAX_BYTES // 1_000_000} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: not base64 (expected a base64 PNG or JPEG, or a data:image/...;base64, URL)") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG"):
            raise ValueError(f"image: a {image.format} file; expected PNG or JPEG")
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"image: {image.width}x{image.height} pixels is too large")
        image.load()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's errors for a damaged file
        raise ValueError(f"image: cannot be decoded as PNG or JPEG ({type(exc).__name__})") from None
    return image


class ImageExample(BaseModel):
    """One image: what POST /influence accepts for this task."""

    image: str = Field(min_length=8, description="a base64 PNG or JPEG (or a data:image/png;base64, URL); converted "
                                                 "and transformed as the training images")

    @field_validator("image")
    @classmethod
    def _decodable(cls, value: str) -> str:
        decode_image(value)
        return value


def _size(value: Any, arg: str) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                           for v in value):
        return value
    raise ConfigError(f"task_args.{arg}: expected a size in pixels or [height, width], got {value!r}")


class ImageClassificationTask(Task):
    """Built-in `torchvision.image_classification` (see the module docstring). Arguments (task_args):

    arch: a torchvision classification model name ("resnet18", "mobilenet_v3_small", ...); num_classes: its
    outputs; data: an image folder or a table; path_column ("path"), label_column ("label"), image_root (for a
    table); classes: class names in id order (a table's names; checked against an image folder's); mode:
    "RGB" | "L"; resize, center_crop: sizes; mean, std: per-channel normalisation; held_out: a folder or table
    of example queries; thumbnail: display size (64); seed. Raises ConfigError (one line naming the argument)."""

    example_schema = ImageExample

    def __init__(self, arch: str, num_classes: int, data: str, path_column: str = "path", label_column: str = "label",
                 image_root: str | None = None, classes: Sequence[str] | None = None, mode: str = "RGB",
                 resize: Any = None, center_crop: Any = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, held_out: str | None = None, thumbnail: int = 64, seed: int = 0):
        self.tv = _torchvision()
        names = self.tv.models.list_models(module=self.tv.models)  # classification architectures only
        if arch not in names:
            close = [n for n in names if n.startswith(str(arch)[:3])][:8] or names[:8]
            raise ConfigError(f"task_args.arch: {arch!r} is not a torchvision classification model (e.g. {close})")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"task_args.num_classes: expected the model's number of outputs (>= 2), got {num_classes!r}")
        if mode not in ("RGB", "L"):
            raise ConfigError(f"task_args.mode: {mode!r} is not one of ['RGB', 'L']")
        channels = 3 if mode == "RGB" else 1
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and (not isinstance(values, list) or len(values) != channels
                                       or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise ConfigError(f"task_args.{name}: expected {channels} numbers (one per channel of mode {mode}), "
                                  f"got {values!r}")
        if (mean is None) != (std is None):
            raise ConfigError("task_args.mean / std: give both or neither")
        if std is not None and any(v <= 0 for v in std):
            raise ConfigError(f"task_args.std: every value must be > 0, got {std!r}")
        if not isinstance(thumbnail, int) or isinstance(thumbnail, bool) or not 8 <= thumbnail <= 512:
            raise ConfigError(f"task_args.thumbnail: expected a size in pixels in 8..512, got {thumbnail!r}")
        self.arch, self.num_classes, self.mode, self.seed, self.thumbnail = arch, num_classes, mode, seed, thumbnail
        self.model_name = f"torchvision {arch} (num_classes {num_classes})"
        self.path_column, self.label_column = path_column, label_column
        self.transform = self._transform(_size(resize, "resize"), _size(center_crop, "center_crop"), mean, std)
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                                    or len(set(classes)) != len(classes)):
            raise ConfigError(f"task_args.classes: expected a list of distinct class names, got {classes!r}")
        self.files, self.labels, found = self._listing(data, image_root, classes, "data")
        self.class_names = found
        if self.class_names is not None and len(self.class_names) > num_classes:
            raise ConfigError(f"task_args.num_classes: {num_classes}, but the data has {len(self.class_names)} "
                              f"classes {self.class_names[:10]}")
        if int(self.labels.max()) >= num_classes:
            raise ConfigError(f"task_args.num_classes: {num_classes}, but the data has the class id "
                              f"{int(self.labels.max())}")
        self._sets: dict[str, ExampleSet] = {}
        self.held_out = (self._listing(held_out, image_root, self.class_names or classes, "held_out")
                         if held_out is not None else None)

    # -- data --------------------------------------------------------------------------------------
    def _transform(self, resize, center_crop, mean, std):
        v2 = self.tv.transforms.v2
        steps = []
        if resize is not None:
            steps.append(v2.Resize(resize))
        if center_crop is not None:
            steps.append(v2.CenterCrop(center_crop))
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if mean is not None:
            steps.append(v2.Normalize([float(v) for v in mean], [float(v) for v in std]))
        return v2.Compose(steps)

    def _listing(self, data: str, image_root: str | None, classes, arg: str):
        """(image files, class ids [N], class names or None) of an image folder or a table."""
        path = Path(data)
        if path.is_dir() and not any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                    "dataset_dict.json")):
            return self._folder(path, classes, arg)
        table = read_table(path, None, arg)
        root = Path(image_root) if image_root is not None else table.path.parent
        files = []
        for row, value in enumerate(table.column(self.path_column, "path_column")):
            file = Path(str(value))
            file = file if file.is_absolute() else root / file
            if not file.is_file():
                raise ConfigError(f"task_args.{self.path_column if arg == 'data' else arg}: row {row} of {table.path}: "
                                  f"image file not found: {file}")
            files.append(file)
        labels = class_ids(table.column(self.label_column, "label_column"), classes,
                           f"task_args.label_column ({table.path.name} column {self.label_column!r})")
        return files, labels, list(classes) if classes is not None else None

    def _folder(self, root: Path, classes, arg: str):
        folder = self.tv.datasets.folder
        try:
            names, index = folder.find_classes(str(root))
        except FileNotFoundError:
            raise ConfigError(f"task_args.{arg}: the image folder {root} has no classes: expected one subfolder per "
                              f"class holding its images ({root}/<class>/*.png)") from None
        if classes is not None and list(classes) != names:
            raise ConfigError(f"task_args.classes: {list(classes)[:10]} but the image folder {root} has the classes "
                              f"{names[:10]} (sorted folder names give the class ids, as torchvision's ImageFolder)")
        try:
            samples = folder.make_dataset(str(root), index, extensions=folder.IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise ConfigError(f"task_args.{arg}: the image folder {root}: {str(exc).strip().splitlines()[0][:200]}") from None
        return ([Path(p) for p, _ in samples], torch.tensor([c for _, c in samples], dtype=torch.long), names)

    def _open(self, file: Path):
        Image = _pil()
        try:
            with Image.open(file) as image:
                return image.convert(self.mode)
        except Exception as exc:  # noqa: BLE001 - Pillow's errors: a damaged or non-image file
            raise ConfigError(f"task_args.data: cannot read the image {file}: {type(exc).__name__}: "
                              f"{str(exc).strip()[:200]}") from None

    def _tensor(self, images: Sequence[Any], names: Sequence[str]) -> torch.Tensor:
        tensors = [self.transform(image) for image in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            first = tuple(tensors[0].shape)
            other = next(i for i, t in enumerate(tensors) if tuple(t.shape) != first)
            raise ValueError(f"images differ in size after the transforms: {names[0]} is {first[1:]} but {names[other]} "
                             f"is {tuple(tensors[other].shape)[1:]}; set resize and center_crop")
        return torch.stack(tensors)

    def _thumbnail(self, image) -> str:
        small = image.copy()
        small.thumbnail((self.thumbnail, self.thumbnail))
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def _set(self, which: str) -> ExampleSet:
        if which not in self._sets:  # read and transformed once per task object
            self._sets[which] = self._read_set(which)
        return self._sets[which]

    def _read_set(self, which: str) -> ExampleSet:
        files, labels, _ = (self.files, self.labels, None) if which == "data" else self.held_out
        images = [self._open(f) for f in files]
        try:
            inputs = self._tensor(images, [str(f) for f in files])
        except ValueError as exc:
            raise ConfigError(f"task_args.{which}: {exc}") from None
        thumbs = [self._thumbnail(image) for image in images]
        names = self.class_names

        def display(i: int) -> dict[str, Any]:
            label = int(labels[i])
            return {"image": thumbs[i], "file": files[i].name,
                    **({"class_name": names[label]} if names is not None and label < len(names) else {})}

        return ExampleSet(inputs, labels, ids=_ids(files), display=display,
                          examples=lambda i: {"image": _file_b64(files[i])})

    def training_set(self) -> ExampleSet:
        return self._set("data")

    def held_out_set(self) -> ExampleSet | None:
        return self._set("held_out") if self.held_out is not None else None

    # -- model -------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # every weight is then replaced by a checkpoint's
        return self.tv.models.get_model(self.arch, weights=None, num_classes=self.num_classes)

    def encode(self, examples: Sequence[ImageExample]) -> torch.Tensor:
        images = [decode_image(e.image).convert(self.mode) for e in examples]
        return self._tensor(images, [f"example {i}" for i in range(len(images))])


def _ids(files: Sequence[Path]) -> list[str]:
    """The images' ids: their paths below the folder that holds them all ("cat/001.png")."""
    import os

    root = os.path.commonpath([str(f.parent) for f in files])
    return [os.path.relpath(f, root) for f in files]


def _file_b64(file: Path) -> str:
    """A PNG / JPEG file as a data URL (a held-out example query); other formats are re-encoded as PNG."""
    data = file.read_bytes()
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg" if data.startswith(b"\xff\xd8") else None
    if kind is None:
        Image = _pil()
        buffer = io.BytesIO()
        with Image.open(file) as image:
            image.save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()
