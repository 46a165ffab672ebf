"""The index configuration (TOML) and its validation. Every error names the offending field.

    task = "indexer.demo.digits:DigitsTask"      # module:attr -> a Task subclass (or a Task instance)
    task_args = { seed = 0 }                      # optional keyword arguments for the subclass
    checkpoint_prefix = "model."                  # optional: keep keys with this prefix and strip it
    layers = ["fc1", "fc2"]                       # module names or globs; omitted = all trainable
    [[checkpoints]]
    path = "checkpoints/epoch-05.pt"             # relative to the config file; a file, a save_pretrained folder or
                                                  # a Hugging Face Trainer checkpoint-N/ folder
    lr = 0.1                                      # optional when the file records its lr or optimizer state; or a
                                                  # per-layer table: lr = { "body.*" = 0.03, "head" = 0.3 }
    prefix = "model."                             # optional, overrides checkpoint_prefix for this file
    [optimizer]                                   # optional (indexer.optimizer.step)
    formula = "auto"                              # auto (from the saved optimizer state) | sgd (plain lr * g, forced)
    groups = [["body.*"], ["head.*"]]             # the optimizer's parameter groups, when files record no names
    momentum = "ignore"                           # ignore | effective (SGD/RMSprop: lr (1 - dampening) / (1 - mu))
    [projection]
    kind = "sketch"                               # exact | sketch | kronecker | gaussian
    dim = 512                                     # numbers per example, whatever the layers and checkpoints
    seed = 0
    [index]
    factory = "Flat"                              # any FAISS factory string (inner product)
    batch_size = 256
    device = "cpu"
    compute_dtype = "auto"                        # auto (float64 models: float64, else float32) | float32 | float64
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
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
    lr: float | dict[str, float] | None = None  # one lr, or {parameter pattern: lr} (first match wins)
    prefix: str | None = None  # keep the state_dict keys with this prefix and strip it (e.g. "model.")


@dataclass(frozen=True)
class ProjectionSpec:
    kind: str = "sketch"
    dim: int = 512
    seed: int = 0


@dataclass(frozen=True)
class IndexSpec:
    factory: str = "Flat"
    batch_size: int = 256
    device: str = "cpu"
    search_params: dict[str, Any] = field(default_factory=dict)
    train_sample: int = 50_000
    compute_dtype: str = "auto"
    max_disk_gb: float | None = None  # refuse a build whose estimated disk use exceeds this


_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_REF = re.compile(rf"^{_NAME}:{_NAME}$")


@dataclass(frozen=True)
class TaskRef:
    """`module:attr` naming a `Task` subclass (called with `args`) or a `Task` instance.

    The reference is resolved without calling anything and type-checked before the one call that
    constructs the task: no other callable named in a config or a manifest is ever called."""

    ref: str
    args: dict[str, Any] = field(default_factory=dict)

    def resolve(self, where: str = "task", forbidden_dir: Path | None = None) -> Any:
        """The object `ref` names (imported, not called). Raises ConfigError naming `where` when the
        reference is malformed or its module is missing (its directory must be on PYTHONPATH) or lies
        inside `forbidden_dir` (an index directory is data: code in it is never imported)."""
        if not isinstance(self.ref, str) or not _REF.match(self.ref):
            raise ConfigError(f"{where}: {str(self.ref)[:100]!r} must look like 'package.module:ClassName'")
        module_name, _, attr = self.ref.partition(":")
        top = module_name.split(".", 1)[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise ConfigError(_missing_module(where, module_name, top))
        if forbidden_dir is not None:
            locations = [spec.origin or "", *(spec.submodule_search_locations or [])]
            root = Path(forbidden_dir).resolve()
            for location in locations:
                if location and _within(Path(location), root):
                    raise ConfigError(f"{where}: module {top!r} would be imported from inside the index directory "
                                      f"({location}); an index directory holds data only, its code is never imported")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise ConfigError(_missing_module(where, module_name, exc.name)) from None
            raise ConfigError(f"{where}: importing module {module_name!r} failed: {exc} (a module it imports is "
                              "not installed)") from None
        except Exception as exc:  # noqa: BLE001 - the user's module failing at import is a config problem
            raise ConfigError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
        target: Any = module
        for part in attr.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None
        return target

    def check(self, where: str = "task", forbidden_dir: Path | None = None) -> Any:
        """Resolve `ref` and refuse (ConfigError) unless it names a Task subclass or instance; calls
        nothing. Returns the resolved object."""
        from indexer.task import Task

        target = self.resolve(where, forbidden_dir)
        if not isinstance(target, Task) and not (isinstance(target, type) and issubclass(target, Task)):
            kind = f"class {target.__name__}" if isinstance(target, type) else type(target).__name__
            raise ConfigError(f"{where}: {self.ref!r} is a {kind}, not an indexer.Task subclass; only a Task subclass "
                              "(or instance) is ever called")
        return target

    def build(self, where: str = "task", forbidden_dir: Path | None = None):
        """Resolve `ref` and return a Task: a Task subclass is called with `args`, a Task instance is used
        as it is (then `args` must be empty); anything else is refused before it is called."""
        from indexer.task import Task

        target = self.check(where, forbidden_dir)
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            raise ConfigError(f"{where}: task arguments must be a table of named values")
        if isinstance(target, Task):
            if self.args:
                raise ConfigError(f"{where}: {self.ref!r} is a Task instance, so it takes no task arguments "
                                  f"(got {sorted(self.args)[:5]})")
            return target
        try:
            task = target(**self.args)
        except Exception as exc:  # noqa: BLE001 - user task code failing to construct
            args = repr(self.args)
            raise ConfigError(f"{where}: {self.ref}(**{args[:200]}) failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
        if not isinstance(task, Task):
            raise ConfigError(f"{where}: {self.ref!r} did not produce an indexer.Task (got {type(task).__name__})")
        return task


def _missing_module(where: str, module_name: str, missing: str) -> str:
    return (f"{where}: cannot import module {module_name!r}: no module named {missing!r} on the Python path; the "
            "directory holding it must be on PYTHONPATH (or the package installed)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


@dataclass(frozen=True)
class IndexConfig:
    task: TaskRef
    checkpoints: list[CheckpointSpec]
    layers: list[str] | None = None
    projection: ProjectionSpec = ProjectionSpec()
    index: IndexSpec = IndexSpec()
    source: Path | None = None  # the config file (a build never replaces a directory holding it)
    optimizer: Any = None  # indexer.optimizer.step.StepOptions (None: the defaults)

    @property
    def step_options(self):
        from indexer.optimizer.step import StepOptions

        return self.optimizer if self.optimizer is not None else StepOptions()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source", None)
        data["optimizer"] = asdict(self.step_options)
        data["checkpoints"] = [{"path": str(c.path), "lr": c.lr, **({"prefix": c.prefix} if c.prefix else {})}
                               for c in self.checkpoints]
        return data


def _expect(value: Any, kinds: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"{name}: expected {kinds}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{name}: expected {getattr(kinds, '__name__', kinds)}, got {value!r}")
    return value


def parse_config(data: dict[str, Any], base_dir: Path) -> IndexConfig:
    known = {"task", "task_args", "layers", "checkpoints", "checkpoint_prefix", "projection", "index", "optimizer"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; known: {sorted(known)}")
    if "task" not in data:
        raise ConfigError("task: missing (e.g. task = 'mypkg.tasks:MyTask')")
    task = TaskRef(_expect(data["task"], str, "task"), dict(_expect(data.get("task_args", {}), dict, "task_args")))

    raw_ckpts = data.get("checkpoints")
    if not raw_ckpts:
        raise ConfigError("checkpoints: at least one [[checkpoints]] entry is required")
    default_prefix = data.get("checkpoint_prefix")
    if default_prefix is not None and (not isinstance(default_prefix, str) or not default_prefix):
        raise ConfigError(f"checkpoint_prefix: expected a non-empty string such as \"model.\", got {default_prefix!r}")
    checkpoints = []
    for i, raw in enumerate(_expect(raw_ckpts, list, "checkpoints")):
        where = f"checkpoints[{i}]"
        _expect(raw, dict, where)
        bad = sorted(set(raw) - {"path", "lr", "prefix"})
        if bad:
            raise ConfigError(f"{where}: unknown keys {bad}; known: ['lr', 'path', 'prefix']")
        if "path" not in raw:
            raise ConfigError(f"{where}.path: missing")
        path = Path(_expect(raw["path"], str, f"{where}.path")).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        if not (path.is_file() or path.is_dir()):
            raise ConfigError(f"{where}.path: checkpoint file not found: {path}")
        lr = raw.get("lr")
        if lr is not None:
            from indexer.checkpoints import CheckpointError, checked_lr

            try:
                if isinstance(lr, dict):
                    if not lr or not all(isinstance(k, str) and k for k in lr):
                        raise ConfigError(f"{where}.lr: a table of parameter patterns and learning rates, e.g. "
                                          "lr = { \"body.*\" = 0.03, \"head\" = 0.3 }")
                    lr = {k: checked_lr(v, f"{where}.lr.{k}") for k, v in lr.items()}
                else:
                    lr = checked_lr(lr, f"{where}.lr")
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
        prefix = raw.get("prefix", default_prefix)
        if prefix is not None and (not isinstance(prefix, str) or not prefix):
            raise ConfigError(f"{where}.prefix: expected a non-empty string such as \"model.\", got {prefix!r}")
        checkpoints.append(CheckpointSpec(path.resolve(), lr, prefix))

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
    bad = sorted(set(x) - {"factory", "batch_size", "device", "search_params", "train_sample", "compute_dtype",
                           "max_disk_gb"})
    if bad:
        raise ConfigError(f"index: unknown keys {bad}")
    index = IndexSpec(
        factory=_expect(x.get("factory", "Flat"), str, "index.factory"),
        batch_size=_expect(x.get("batch_size", 256), int, "index.batch_size"),
        device=_expect(x.get("device", "cpu"), str, "index.device"),
        search_params=dict(_expect(x.get("search_params", {}), dict, "index.search_params")),
        train_sample=_expect(x.get("train_sample", 50_000), int, "index.train_sample"),
        compute_dtype=_expect(x.get("compute_dtype", "auto"), str, "index.compute_dtype"),
        max_disk_gb=_expect(x["max_disk_gb"], (int, float), "index.max_disk_gb") if "max_disk_gb" in x else None,
    )
    if index.compute_dtype not in ("auto", "float32", "float64"):
        raise ConfigError(f"index.compute_dtype: {index.compute_dtype!r} is not one of auto, float32, float64")
    if index.batch_size < 1:
        raise ConfigError(f"index.batch_size: must be >= 1, got {index.batch_size}")
    if index.train_sample < 1:
        raise ConfigError(f"index.train_sample: must be >= 1, got {index.train_sample}")
    if index.max_disk_gb is not None and not (math.isfinite(index.max_disk_gb) and index.max_disk_gb > 0):
        raise ConfigError(f"index.max_disk_gb: must be a finite number > 0, got {index.max_disk_gb!r}")
    for name, value in index.search_params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"index.search_params.{name}: expected a number, got {value!r}")
    return IndexConfig(task, checkpoints, layers, projection, index, optimizer=_optimizer_options(data))


def _optimizer_options(data: dict[str, Any]):
    from indexer.optimizer.step import StepOptions

    o = dict(_expect(data.get("optimizer", {}), dict, "optimizer"))
    bad = sorted(set(o) - {"formula", "groups", "momentum"})
    if bad:
        raise ConfigError(f"optimizer: unknown keys {bad}; known: ['formula', 'groups', 'momentum']")
    formula = _expect(o.get("formula", "auto"), str, "optimizer.formula")
    if formula not in ("auto", "sgd"):
        raise ConfigError(f"optimizer.formula: {formula!r} is not one of auto, sgd")
    momentum = _expect(o.get("momentum", "ignore"), str, "optimizer.momentum")
    if momentum not in ("ignore", "effective"):
        raise ConfigError(f"optimizer.momentum: {momentum!r} is not one of ignore, effective")
    groups = o.get("groups")
    if groups is not None:
        if not isinstance(groups, list) or not groups or not all(
                isinstance(g, list) and g and all(isinstance(p, str) and p for p in g) for g in groups):
            raise ConfigError("optimizer.groups: expected a list of lists of parameter patterns, one list per "
                              "optimizer group in order, e.g. [[\"body.*\"], [\"head.*\"]]")
    return StepOptions(formula, groups, momentum)


def load_config(path: str | Path) -> IndexConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    from dataclasses import replace

    return replace(parse_config(data, path.resolve().parent), source=path.resolve())
