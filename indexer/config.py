"""The index configuration (TOML) and its validation. Every error names the offending field.

    task = "indexer.demo.digits:DigitsTask"      # module:attr -> Task subclass, instance or factory
    task_args = { seed = 0 }                      # optional keyword arguments for the factory
    layers = ["fc1", "fc2"]                       # module names or globs; omitted = all trainable
    [[checkpoints]]
    path = "checkpoints/epoch-05.pt"             # relative to the config file
    lr = 0.1                                      # optional when the file records its lr
    [projection]
    kind = "sketch"                               # exact | sketch | kronecker | gaussian
    dim = 1024                                    # numbers per example, whatever the layers and checkpoints
    seed = 0
    [index]
    factory = "Flat"                              # any FAISS factory string (inner product)
    batch_size = 256
    device = "cpu"
    compute_dtype = "auto"                        # auto (float64 models: float64, else float32) | float32 | float64
"""
from __future__ import annotations

import importlib
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECTION_KINDS = ("exact", "sketch", "kronecker", "gaussian")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


@dataclass(frozen=True)
class CheckpointSpec:
    path: Path
    lr: float | None = None


@dataclass(frozen=True)
class ProjectionSpec:
    kind: str = "sketch"
    dim: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class IndexSpec:
    factory: str = "Flat"
    batch_size: int = 256
    device: str = "cpu"
    search_params: dict[str, Any] = field(default_factory=dict)
    train_sample: int = 50_000
    compute_dtype: str = "auto"


@dataclass(frozen=True)
class TaskRef:
    ref: str
    args: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """Import `module:attr` and return a Task instance."""
        from indexer.task import Task

        module_name, sep, attr = self.ref.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(f"task: {self.ref!r} must look like 'package.module:Name'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"task: cannot import module {module_name!r}: {exc}") from exc
        target: Any = module
        for part in attr.split("."):
            if not hasattr(target, part):
                raise ConfigError(f"task: module {module_name!r} has no attribute {attr!r}")
            target = getattr(target, part)
        task = target if isinstance(target, Task) else target(**self.args)
        if not isinstance(task, Task):
            raise ConfigError(f"task: {self.ref!r} did not produce an indexer.Task (got {type(task).__name__})")
        return task


@dataclass(frozen=True)
class IndexConfig:
    task: TaskRef
    checkpoints: list[CheckpointSpec]
    layers: list[str] | None = None
    projection: ProjectionSpec = ProjectionSpec()
    index: IndexSpec = IndexSpec()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoints"] = [{"path": str(c.path), "lr": c.lr} for c in self.checkpoints]
        return data


def _expect(value: Any, kinds: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"{name}: expected {kinds}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{name}: expected {getattr(kinds, '__name__', kinds)}, got {value!r}")
    return value


def parse_config(data: dict[str, Any], base_dir: Path) -> IndexConfig:
    known = {"task", "task_args", "layers", "checkpoints", "projection", "index"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; known: {sorted(known)}")
    if "task" not in data:
        raise ConfigError("task: missing (e.g. task = 'mypkg.tasks:MyTask')")
    task = TaskRef(_expect(data["task"], str, "task"), dict(_expect(data.get("task_args", {}), dict, "task_args")))

    raw_ckpts = data.get("checkpoints")
    if not raw_ckpts:
        raise ConfigError("checkpoints: at least one [[checkpoints]] entry is required")
    checkpoints = []
    for i, raw in enumerate(_expect(raw_ckpts, list, "checkpoints")):
        where = f"checkpoints[{i}]"
        _expect(raw, dict, where)
        if "path" not in raw:
            raise ConfigError(f"{where}.path: missing")
        path = Path(_expect(raw["path"], str, f"{where}.path")).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        if not path.is_file():
            raise ConfigError(f"{where}.path: checkpoint file not found: {path}")
        lr = raw.get("lr")
        if lr is not None:
            from indexer.checkpoints import CheckpointError, checked_lr

            try:
                lr = checked_lr(lr, f"{where}.lr")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
        checkpoints.append(CheckpointSpec(path.resolve(), lr))

    layers = data.get("layers")
    if layers is not None:
        _expect(layers, list, "layers")
        if not layers or not all(isinstance(x, str) and x for x in layers):
            raise ConfigError("layers: expected a non-empty list of module names or globs")

    p = dict(_expect(data.get("projection", {}), dict, "projection"))
    bad = sorted(set(p) - {"kind", "dim", "seed"})
    if bad:
        raise ConfigError(f"projection: unknown keys {bad}")
    projection = ProjectionSpec(
        kind=_expect(p.get("kind", "sketch"), str, "projection.kind"),
        dim=_expect(p.get("dim", ProjectionSpec.dim), int, "projection.dim"),
        seed=_expect(p.get("seed", 0), int, "projection.seed"),
    )
    if projection.kind not in PROJECTION_KINDS:
        raise ConfigError(f"projection.kind: {projection.kind!r} is not one of {PROJECTION_KINDS}")
    if projection.dim < 1:
        raise ConfigError(f"projection.dim: must be >= 1, got {projection.dim}")

    x = dict(_expect(data.get("index", {}), dict, "index"))
    bad = sorted(set(x) - {"factory", "batch_size", "device", "search_params", "train_sample", "compute_dtype"})
    if bad:
        raise ConfigError(f"index: unknown keys {bad}")
    index = IndexSpec(
        factory=_expect(x.get("factory", "Flat"), str, "index.factory"),
        batch_size=_expect(x.get("batch_size", 256), int, "index.batch_size"),
        device=_expect(x.get("device", "cpu"), str, "index.device"),
        search_params=dict(_expect(x.get("search_params", {}), dict, "index.search_params")),
        train_sample=_expect(x.get("train_sample", 50_000), int, "index.train_sample"),
        compute_dtype=_expect(x.get("compute_dtype", "auto"), str, "index.compute_dtype"),
    )
    if index.compute_dtype not in ("auto", "float32", "float64"):
        raise ConfigError(f"index.compute_dtype: {index.compute_dtype!r} is not one of auto, float32, float64")
    if index.batch_size < 1:
        raise ConfigError(f"index.batch_size: must be >= 1, got {index.batch_size}")
    return IndexConfig(task, checkpoints, layers, projection, index)


def load_config(path: str | Path) -> IndexConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return parse_config(data, path.resolve().parent)
