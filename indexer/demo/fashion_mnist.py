"""Fashion-MNIST (Debian `dataset-fashion-mnist`): a small CNN on 28x28 grayscale images, the
benchmark size (60k training images).

Data: the four idx files (gzip or plain) under `data_dir`, by default
/usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`); nothing is downloaded.

Model: conv 1->16 3x3 (pad 1) . relu . maxpool 2 . conv 16->32 3x3 (pad 1) . relu . maxpool 2 .
fc 1568->128 . relu . fc 128->10 (two Conv2d + two Linear, ~207k parameters). Its input is either
uint8 pixels 0..255 (what the training set holds, 4x less memory than float) or float pixels already
scaled to 0..1; both are turned into float 0..1 inside the model.

JSON example (the service's request body): {"image": ...} with either
  - a nested 28x28 array of numbers in 0..255 (row-major, 0 = black background as in the dataset), or
  - a base64 PNG string (optionally a `data:image/png;base64,` URL) of a 28x28 8-bit image
    (grayscale, gray+alpha, RGB or RGBA; colour is reduced to luma, alpha is ignored), decoded by a
    small zlib-based decoder here (no Pillow).

Optional label noise: `flip_fraction` of the training labels are replaced by another class,
deterministically from `seed`; each training example's display fields record `flipped` and
`original_label`.

Optional augmentation (`size`, the scale benchmark's million-row training set): row r is image
r mod n of the n base images, unchanged for r < n, else shifted by (dy, dx) in -2..2 (not both 0,
zero fill) and mirrored left-right with probability 1/2, drawn per row from `seed`
(`augment_images`). Labels follow their base image; display fields add `base` and `augmentation`.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import math
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator
from torch import nn

from indexer.checkpoints import save_checkpoint
from indexer.images import png_data_url
from indexer.task import ExampleSet, Task

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
SIDE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNISTDataError(FileNotFoundError):
    """The Fashion-MNIST idx files are missing or malformed."""


# -- data ------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise FashionMNISTDataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise FashionMNISTDataError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FashionMNISTDataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}; install the Debian package "
        f"`dataset-fashion-mnist` or pass data_dir"
    )


@lru_cache(maxsize=4)
def load_split(split: str, data_dir: str = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' (60k) or 'test' (10k), read-only."""
    images_stem, labels_stem = FILES[split]
    root = Path(data_dir)
    images = _read_idx(_find(root, images_stem))
    labels = _read_idx(_find(root, labels_stem)).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or labels.shape != (images.shape[0],):
        raise FashionMNISTDataError(f"{root}: unexpected shapes {images.shape} / {labels.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def data_available(data_dir: str = DEFAULT_DATA_DIR) -> bool:
    try:
        for stems in FILES.values():
            for stem in stems:
                _find(Path(data_dir), stem)
    except FashionMNISTDataError:
        return False
    return True


@lru_cache(maxsize=8)
def training_labels(data_dir: str, limit: int | None, flip_fraction: float, seed: int):
    """(images, labels used for training (possibly flipped), original labels, flipped mask)."""
    images, original = load_split("train", data_dir)
    if limit is not None:
        images, original = images[:limit], original[:limit]
    flipped = np.zeros(len(original), dtype=bool)
    count = int(round(flip_fraction * len(original)))
    labels = original.copy()
    if count:
        rng = np.random.default_rng(seed)
        flipped[rng.choice(len(original), size=count, replace=False)] = True
        labels[flipped] = (original[flipped] + rng.integers(1, 10, size=count)) % 10
    labels.setflags(write=False)
    flipped.setflags(write=False)
    return images, labels, original, flipped


def augmentation_plan(size: int, base: int, seed: int) -> np.ndarray:
    """int8 [size, 3]: (dy, dx, mirror) of each row of an augmented set of `size` rows over `base`
    images; rows < base are (0, 0, 0) (the originals), the others a nonzero shift in -2..2 and a mirror
    flag, drawn from `seed`."""
    plan = np.zeros((size, 3), dtype=np.int8)
    extra = size - base
    if extra > 0:
        rng = np.random.default_rng([seed, 0xA06])
        shifts = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)], np.int8)
        plan[base:, :2] = shifts[rng.integers(0, len(shifts), size=extra)]
        plan[base:, 2] = rng.integers(0, 2, size=extra)
    return plan


def augment_images(images: np.ndarray, size: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """uint8 [size, 28, 28]: row r = images[r % n] shifted and mirrored by `augmentation_plan` row r."""
    n = len(images)
    plan = augmentation_plan(size, n, seed)
    out = np.empty((size, SIDE, SIDE), dtype=np.uint8)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    for start in range(0, size, chunk):
        rows = np.arange(start, min(size, start + chunk))
        for (dy, dx, mirror) in np.unique(plan[rows], axis=0):
            pick = rows[(plan[rows] == (dy, dx, mirror)).all(axis=1)]
            crop = padded[pick % n, 2 - dy:2 - dy + SIDE, 2 - dx:2 - dx + SIDE]
            out[pick] = crop[:, :, ::-1] if mirror else crop
    return out


@lru_cache(maxsize=2)
def augmented_training_set(data_dir: str, limit: int | None, flip_fraction: float, seed: int, size: int):
    """(images [size, 28, 28] uint8, labels, original labels, flipped mask, plan) of the augmented set."""
    images, labels, original, flipped = training_labels(data_dir, limit, flip_fraction, seed)
    n = len(labels)
    rows = np.arange(size) % n
    out = augment_images(images, size, seed)  # writable: torch.from_numpy shares it without a copy
    return out, labels[rows], original[rows], flipped[rows], augmentation_plan(size, n, seed)


# -- PNG decoding (8-bit, non-interlaced) ---------------------------------------------------------
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def decode_png(data: bytes) -> np.ndarray:
    """8-bit non-interlaced PNG (gray, gray+alpha, RGB, RGBA) -> uint8 [H, W] gray (luma, alpha dropped)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG file")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated PNG chunk")
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise ValueError(f"only 8-bit non-interlaced gray/RGB(A) PNGs are supported (bit depth {depth}, "
                         f"colour type {colour}, interlace {interlace})")
    if width * height > 4096 * 4096:
        raise ValueError("PNG too large")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ValueError(f"corrupt PNG data: {exc}") from None
    bpp = _CHANNELS[colour]
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError("PNG data length does not match its size")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for r in range(height):
        kind, line = rows[r, 0], rows[r, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind in (1, 3, 4):  # these depend on the reconstructed left neighbour: go pixel by pixel
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                left = cur[i - bpp] if i >= bpp else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + prev[i]) >> 1
                else:
                    up_left = prev[i - bpp] if i >= bpp else 0
                    p = left + prev[i] - up_left
                    pa, pb, pc = abs(p - left), abs(p - prev[i]), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (prev[i] if pb <= pc else up_left)
                cur[i] = (line[i] + pred) & 0xFF
        else:
            raise ValueError(f"bad PNG filter type {kind}")
        out[r] = cur
        prev = cur
    pixels = out.reshape(height, width, bpp)
    if bpp >= 3:
        gray = np.rint(0.299 * pixels[..., 0] + 0.587 * pixels[..., 1] + 0.114 * pixels[..., 2])
        return gray.astype(np.uint8)
    return pixels[..., 0].astype(np.uint8)


def _png_from_string(value: str) -> np.ndarray:
    text = value.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ValueError("image: a data URL must be base64-encoded")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: a string must be a base64-encoded PNG (or a data:image/png;base64 URL)") from None
    try:
        return decode_png(data)
    except ValueError as exc:
        raise ValueError(f"image: {exc}") from None


class FashionMNISTExample(BaseModel):
    """One 28x28 grayscale image: a nested array of 28 rows of 28 numbers in 0..255 (0 = background),
    or a base64 PNG (8-bit, 28x28) string / data URL."""

    image: Union[list[list[float]], str] = Field(
        description="28x28 nested array of numbers in 0..255 (row-major), or a base64 28x28 8-bit PNG"
    )

    @field_validator("image")
    @classmethod
    def _decode(cls, value):
        if isinstance(value, str):
            pixels = _png_from_string(value)
            if pixels.shape != (SIDE, SIDE):
                raise ValueError(f"image: PNG is {pixels.shape[1]}x{pixels.shape[0]}, expected {SIDE}x{SIDE}")
            return pixels.astype(float).tolist()
        if len(value) != SIDE or any(len(row) != SIDE for row in value):
            raise ValueError(f"image: expected {SIDE} rows of {SIDE} numbers")
        for r, row in enumerate(value):
            for c, v in enumerate(row):
                if not math.isfinite(v) or v < 0 or v > 255:
                    raise ValueError(f"image[{r}][{c}] = {v} is outside 0..255")
        return value


# -- model and task --------------------------------------------------------------------------------
class FashionCNN(nn.Module):
    """Two Conv2d + two Linear. Input [B, 1, 28, 28] (or [B, 28, 28]): uint8 0..255 or float 0..1."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.conv1.weight.dtype) / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _thumbnail(image: np.ndarray) -> str:
    # stored at 1x (28x28): the dashboard scales thumbnails up with CSS (pixelated); 2x took ~8 s more
    # of a 60k build and 30 MB more of examples.jsonl
    return png_data_url(image)


class FashionMNISTTask(Task):
    """Fashion-MNIST with the small CNN. `limit` keeps the first `limit` training images."""

    example_schema = FashionMNISTExample
    class_names = CLASS_NAMES

    def __init__(self, data_dir: str = DEFAULT_DATA_DIR, limit: int | None = None, flip_fraction: float = 0.0,
                 seed: int = 0, held_out: int = 200, size: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = None if size is None else int(size)
        if not 0.0 <= flip_fraction < 1.0:
            raise ValueError(f"flip_fraction must be in [0, 1), got {flip_fraction}")
        self.data_dir, self.limit, self.flip_fraction = str(data_dir), limit, float(flip_fraction)
        self.seed, self.held_out = int(seed), int(held_out)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return FashionCNN()

    def encode(self, examples: Sequence[FashionMNISTExample]) -> torch.Tensor:
        images = np.asarray([e.image for e in examples], dtype=np.float32).reshape(-1, 1, SIDE, SIDE)
        return torch.from_numpy(images / 255.0)

    def training_set(self) -> ExampleSet:
        if self.size is not None:
            return self._augmented_set()
        images, labels, original, flipped = training_labels(self.data_dir, self.limit, self.flip_fraction, self.seed)
        names = CLASS_NAMES
        return ExampleSet(
            torch.from_numpy(np.array(images)).unsqueeze(1), torch.from_numpy(np.array(labels)),
            ids=[f"train-{i}" for i in range(len(labels))],
            display=lambda i: {"image": _thumbnail(images[i]), "class_name": names[int(labels[i])],
                               "flipped": bool(flipped[i]), "original_label": int(original[i])},
            examples=lambda i: {"image": images[i].tolist()},
        )

    def _augmented_set(self) -> ExampleSet:
        images, labels, original, flipped, plan = augmented_training_set(
            self.data_dir, self.limit, self.flip_fraction, self.seed, self.size)
        n = len(training_labels(self.data_dir, self.limit, self.flip_fraction, self.seed)[1])

        def display(i: int) -> dict:
            dy, dx, mirror = (int(v) for v in plan[i])
            return {"image": _thumbnail(images[i]), "class_name": CLASS_NAMES[int(labels[i])],
                    "flipped": bool(flipped[i]), "original_label": int(original[i]), "base": f"train-{i % n}",
                    "augmentation": "none" if i < n else f"shift {dy:+d},{dx:+d}" + (" mirrored" if mirror else "")}

        return ExampleSet(
            torch.from_numpy(images).unsqueeze(1), torch.from_numpy(np.array(labels)),
            ids=[f"train-{i}" for i in range(len(labels))], display=display,
            examples=lambda i: {"image": images[i].tolist()},
        )

    def held_out_set(self) -> ExampleSet:
        images, labels = load_split("test", self.data_dir)
        images, labels = images[:self.held_out], labels[:self.held_out]
        return ExampleSet(
            torch.from_numpy(np.array(images)).unsqueeze(1), torch.from_numpy(np.array(labels)),
            ids=[f"test-{i}" for i in range(len(labels))],
            display=lambda i: {"image": _thumbnail(images[i]), "class_name": CLASS_NAMES[int(labels[i])]},
            examples=lambda i: {"image": images[i].tolist()},
        )


OPTIMIZERS = {"sgd": 0.1, "adamw": 1e-3}  # optimizer -> its default initial learning rate


def fit_sgd(model: nn.Module, loss_fn, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
            final_lr: float, batch_size: int, seed: int, on_step=None, log=None,
            optimizer: str = "sgd") -> torch.optim.Optimizer:
    """The training loop of this example: plain SGD (or `optimizer="adamw"`: torch.optim.AdamW with its
    default hyperparameters) on the mean per-example loss of shuffled batches (order from `seed`), lr
    decaying exponentially from `lr` to `final_lr` at the last step. `on_step(step, epoch, optimizer)` runs
    after each step (1-based), before the lr decays. Raises ValueError for an unknown optimizer."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    optimizer = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=lr)
    count = int(labels.shape[0])
    steps_per_epoch = (count + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    decay = (final_lr / lr) ** (1.0 / max(1, total - 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(count, generator=generator)
        model.train()
        running = 0.0
        for start in range(0, count, batch_size):
            rows = order[start:start + batch_size]
            loss = loss_fn(model(inputs[rows]), labels[rows]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            running += loss.item() * len(rows)
            if on_step is not None:
                on_step(step, epoch, optimizer)
            scheduler.step()
        if log:
            log(f"epoch {epoch}/{epochs}: mean loss {running / count:.4f}, lr {optimizer.param_groups[0]['lr']:.4g}")
    return optimizer


def train_fashion_mnist(out_dir: str | Path, epochs: int = 3, checkpoints: int = 5, limit: int | None = None,
                        flip_fraction: float = 0.0, seed: int = 0, lr: float | None = None,
                        final_lr: float | None = None, batch_size: int = 64, data_dir: str = DEFAULT_DATA_DIR,
                        dim: int | None = None, kind: str | None = None, log=None, schedule: str = "even",
                        size: int | None = None, factory: str = "Flat", search_params: str | None = None,
                        optimizer: str = "sgd") -> Path:
    """Train the CNN with plain SGD (or `optimizer="adamw"`) and an exponentially decaying lr (lr -> final_lr
    over the run; defaults: SGD 0.1 -> 0.01, AdamW 1e-3 -> 1e-4), save `checkpoints` checkpoints with the
    optimizer's state (`save_checkpoint(path, model, optimizer)`: the lr in force, Adam's moments), and
    write a TOML config that indexes them. Returns the config path. `schedule`: "even" (evenly spaced in
    steps, the last at the end) or "log" (log-spaced in epochs from the end of the first epoch to the end of
    the run: most checkpoints early in training). Raises ValueError for an unknown optimizer or schedule.

    `kind` / `dim` go into the config's [projection] table when given (else the library defaults);
    `size` trains on (and indexes) the augmented set of that many rows; `factory` / `search_params`
    (a TOML inline table) go into [index]."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    lr = OPTIMIZERS[optimizer] if lr is None else lr
    final_lr = lr / 10 if final_lr is None else final_lr
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    task = FashionMNISTTask(data_dir=data_dir, limit=limit, flip_fraction=flip_fraction, seed=seed, size=size)
    train = task.training_set()
    model = task.build_model()
    per_epoch = (len(train) + batch_size - 1) // batch_size
    steps = epochs * per_epoch
    if schedule == "even":
        save_at = {round(steps * (c + 1) / checkpoints) for c in range(checkpoints)}
    elif schedule == "log":
        save_at = {int(round(per_epoch * e)) for e in np.geomspace(1, epochs, checkpoints)} | {steps}
    else:
        raise ValueError(f"schedule must be 'even' or 'log', got {schedule!r}")
    saved = []

    def on_step(step: int, epoch: int, optimizer) -> None:
        if step in save_at:
            saved.append(save_checkpoint(out_dir / "checkpoints" / f"step-{step:06d}.pt", model, optimizer,
                                         step=step, epoch=epoch))

    fit_sgd(model, task.loss, train.inputs, train.labels, epochs=epochs, lr=lr, final_lr=final_lr,
            batch_size=batch_size, seed=seed, on_step=on_step, log=log, optimizer=optimizer)
    args = [f'data_dir = "{data_dir}"', f"seed = {seed}"]
    if limit is not None:
        args.append(f"limit = {limit}")
    if flip_fraction:
        args.append(f"flip_fraction = {flip_fraction}")
    if size is not None:
        args.append(f"size = {size}")
    lines = ['task = "indexer.demo.fashion_mnist:FashionMNISTTask"', f"task_args = {{ {', '.join(args)} }}", ""]
    for path in saved:
        lines += ["[[checkpoints]]", f'path = "checkpoints/{path.name}"', ""]
    projection = []
    if kind is not None:
        projection.append(f'kind = "{kind}"')
    if dim is not None:
        projection.append(f"dim = {dim}")
    if projection:
        lines += ["[projection]", *projection, "seed = 0", ""]
    lines += ["[index]", f'factory = "{factory}"', "batch_size = 256"]
    if search_params:
        lines.append(f"search_params = {search_params}")
    lines.append("")
    config = out_dir / "fashion_mnist.toml"
    config.write_text("\n".join(lines))
    return config


def evaluate_accuracy(model: nn.Module, data_dir: str = DEFAULT_DATA_DIR, limit: int | None = None) -> float:
    images, labels = load_split("test", data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            x = torch.from_numpy(np.array(images[start:start + 1000])).unsqueeze(1)
            correct += int((model(x).argmax(1).numpy() == labels[start:start + 1000]).sum())
    return correct / len(labels)


# -- command line: python -m indexer.demo.fashion_mnist train --out DIR ------------------------------
def _cmd_train(args) -> int:
    import sys
    import time

    from indexer.checkpoints import load_checkpoint, load_state_into
    from indexer.config import load_config

    if not data_available(args.data_dir):
        print(f"error: Fashion-MNIST files not found in {args.data_dir}; install the Debian package "
              f"`dataset-fashion-mnist` or pass --data-dir", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = train_fashion_mnist(args.out, epochs=args.epochs, checkpoints=args.checkpoints, limit=args.limit,
                                 flip_fraction=args.flip_fraction, seed=args.seed, lr=args.lr, final_lr=args.final_lr,
                                 batch_size=args.batch_size, data_dir=args.data_dir, dim=args.dim, kind=args.kind,
                                 log=print, size=args.size, factory=args.factory, optimizer=args.optimizer)
    seconds = time.perf_counter() - t0
    checkpoints = load_config(config).checkpoints
    for c in checkpoints:
        print(f"checkpoint {c.path.name}  lr={load_checkpoint(c.path)[1]['lr']:.4g}")
    model = FashionMNISTTask(data_dir=args.data_dir).build_model()
    load_state_into(model, load_checkpoint(checkpoints[-1].path)[0], str(checkpoints[-1].path))
    accuracy = evaluate_accuracy(model, args.data_dir)
    print(f"trained in {seconds:.1f}s; test accuracy {accuracy:.4f} (10k test images); config {config}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m indexer.demo.fashion_mnist",
                                     description="Fashion-MNIST example: train the CNN, save checkpoints, write a config")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and write <out>/fashion_mnist.toml (then: tracin index it)")
    p.add_argument("--out", default=".tracin/fashion-mnist", help="work directory (checkpoints, config)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints saved evenly over the run")
    p.add_argument("--limit", type=int, default=None, help="only the first N training images (a quick run)")
    p.add_argument("--flip-fraction", type=float, default=0.0, help="fraction of training labels flipped (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                   help="sgd (plain SGD) or adamw (torch.optim.AdamW); its state is saved with each checkpoint")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: SGD 0.1, AdamW 1e-3)")
    p.add_argument("--final-lr", type=float, default=None,
                   help="lr at the last step (exponential decay; default: lr / 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--kind", default=None, help="[projection] kind in the config (default: the library's)")
    p.add_argument("--dim", type=int, default=None, help="[projection] dim in the config (default: the library's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--size", type=int, default=None,
                   help="train on an augmented set of this many rows (shifted/mirrored copies; e.g. 1000000)")
    p.add_argument("--factory", default="Flat", help="[index] factory in the config")
    p.set_defaults(fn=_cmd_train)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(main())
