"""The manifest of an index directory: its one validated shape (pydantic).

`manifest.json` is data that people copy and share, so nothing in it is trusted before it passed
`parse_manifest`: the schema version, the task reference (``module:attr`` syntax only; resolving it is
`indexer.config.TaskRef`'s job, which imports nothing but a `Task` subclass), checkpoints (a relative
file inside ``checkpoints/``, a learning rate that is a finite number > 0, a sha256), counts, dims, the
FAISS settings and the files map. Every figure is strictly typed: booleans are not numbers, strings are
not numbers, and a float where a count belongs is refused.

The model is permissive for keys this version does not know (``extra="allow"``), so a newer indexer
can add fields without breaking older services; the fields it does validate are strict. Consistency
*across* files (FAISS rows and dim, self-influence, examples) is checked by
`indexer.store.directory.IndexDirectory.open`, which calls `parse_manifest` first.

`manifest.sha256` (``sha256sum`` format) covers ``manifest.json`` itself; `write_manifest` writes both.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_TASK_REF = re.compile(rf"^{_NAME}:{_NAME}$")


class ManifestError(ValueError):
    """The manifest is missing, not covered by its digest, or not of the expected shape; one line."""


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("must be 64 lowercase hex digits (a sha256)")
    return value


def _relative_file(value: str) -> str:
    """A plain relative path inside the index directory (no '..', no absolute path, no backslash)."""
    path = PurePosixPath(value)
    if not value or "\\" in value or path.is_absolute() or any(p in ("..", "") for p in value.split("/")) \
            or value.startswith("."):
        raise ValueError(f"must be a relative path inside the index directory, got {value[:100]!r}")
    return value


def _task_ref(value: str) -> str:
    if not _TASK_REF.match(value):
        raise ValueError(f"must look like 'package.module:ClassName', got {value[:100]!r}")
    return value


def _positive_lr(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return value


Sha256 = Annotated[StrictStr, AfterValidator(_sha256)]
RelativeFile = Annotated[StrictStr, AfterValidator(_relative_file)]
LearningRate = Annotated[StrictFloat, AfterValidator(_positive_lr)]
Count = Annotated[StrictInt, Field(ge=1)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TaskEntry(_Part):
    ref: Annotated[StrictStr, AfterValidator(_task_ref)]
    args: dict[StrictStr, Any] = Field(default_factory=dict)
    class_names: Optional[list[StrictStr]] = None
    label_kind: Optional[Literal["class", "regression", "multilabel"]] = None
    label_width: Optional[Annotated[StrictInt, Field(ge=0)]] = None


class StepGroup(_Part):
    """One parameter group of a checkpoint's step (`indexer.optimizer.step`): its lr, the traced parameters it
    holds, the momentum factor when applied, and the optimizer's hyperparameters (kept as extra keys)."""

    lr: LearningRate
    params: list[StrictStr] = Field(min_length=1)
    factor: Optional[LearningRate] = None


class StepEntry(_Part):
    """How a checkpoint's gradients are weighted: the formula, the groups, and (for Adam-type formulas) the
    file of tensor weights lr * Gamma per traced parameter (safetensors, listed in `files`)."""

    formula: Literal["sgd", "adam", "rmsprop", "adagrad"]
    groups: list[StepGroup] = Field(min_length=1)
    file: Optional[Annotated[RelativeFile, AfterValidator(lambda v: _under("checkpoints", v))]] = None
    bounded: Annotated[StrictInt, Field(ge=0)] = 0
    why: Optional[StrictStr] = None
    source: Optional[StrictStr] = None
    mapping: Optional[StrictStr] = None


class CheckpointEntry(_Part):
    file: Annotated[RelativeFile, AfterValidator(lambda v: _under("checkpoints", v))]
    lr: LearningRate
    sha256: Sha256
    source: Optional[StrictStr] = None
    step: Optional[StepEntry] = None


def _under(folder: str, value: str) -> str:
    if not value.startswith(folder + "/"):
        raise ValueError(f"must be a file under {folder}/, got {value[:100]!r}")
    return value


class ProjectionEntry(_Part):
    kind: StrictStr
    dim: Count
    seed: StrictInt
    fingerprint: StrictStr
    layer_patterns: Optional[list[StrictStr]] = None
    dim_per_checkpoint: Optional[Count] = None


class FaissEntry(_Part):
    factory: StrictStr
    metric: Literal["inner_product"]
    file: RelativeFile
    approximate: StrictBool
    search_params: dict[StrictStr, StrictInt | StrictFloat] = Field(default_factory=dict)


class LabelReviewEntry(_Part):
    """label_review.npy (`indexer.build.review`): per-example losses, margins and predictions for label review."""

    format: Literal["tracin-label-review/1"]
    file: Literal["label_review.npy"]
    fields: list[StrictStr]
    rankings: list[StrictStr]
    default: StrictStr


class Manifest(_Part):
    """manifest.json. Strict where validated; unknown keys are kept (``extra="allow"``)."""

    schema_version: Literal[1]
    task: TaskEntry
    checkpoints: list[CheckpointEntry] = Field(min_length=1)
    layers: list[dict[StrictStr, Any]] = Field(default_factory=list)
    projection: ProjectionEntry
    embedding_dim: Count
    count: Count
    faiss: FaissEntry
    files: dict[RelativeFile, Sha256]
    created_at: Optional[StrictStr] = None
    versions: dict[StrictStr, Any] = Field(default_factory=dict)
    label_review: Optional[LabelReviewEntry] = None

    def required_files(self) -> dict[str, str]:
        """Every file the manifest covers (files map + checkpoints) -> sha256."""
        out = dict(self.files)
        for c in self.checkpoints:
            out[c.file] = c.sha256
        return out


REQUIRED_FILES = ("index.faiss", "self_influence.npy", "examples.jsonl")


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def parse_manifest(data: Any, where: str = MANIFEST) -> Manifest:
    """Validate a decoded manifest; raise ManifestError naming the first bad fields (one line).

    Checks, besides types: the files map holds index.faiss, self_influence.npy and examples.jsonl, the
    FAISS file is listed in it, no checkpoint file appears twice."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{where}: {_first_error(exc)}") from None
    missing = [name for name in REQUIRED_FILES if name not in manifest.files]
    if missing:
        raise ManifestError(f"{where}: files: {missing} must be listed with their sha256")
    if manifest.faiss.file not in manifest.files:
        raise ManifestError(f"{where}: faiss.file {manifest.faiss.file!r} is not in files")
    if manifest.label_review is not None:
        review = manifest.label_review
        if review.file not in manifest.files:
            raise ManifestError(f"{where}: label_review.file {review.file!r} is not in files")
        if review.default not in review.rankings:
            raise ManifestError(f"{where}: label_review.default {review.default!r} is not one of its rankings")
    names = [c.file for c in manifest.checkpoints]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: checkpoints: a file is listed twice")
    for i, c in enumerate(manifest.checkpoints):
        if c.step is None:
            continue
        if c.step.file is not None and c.step.file not in manifest.files:
            raise ManifestError(f"{where}: checkpoints[{i}].step.file {c.step.file!r} is not in files")
        if c.step.formula != "sgd" and c.step.file is None:
            raise ManifestError(f"{where}: checkpoints[{i}].step: formula {c.step.formula!r} needs its weights file")
        traced = [p for g in c.step.groups for p in g.params]
        if len(set(traced)) != len(traced):
            raise ManifestError(f"{where}: checkpoints[{i}].step.groups: a parameter is listed twice")
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, allow_nan=False).encode("utf-8")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json and manifest.sha256 (its digest, ``sha256sum`` format) into `directory`.
    The manifest is validated first (ManifestError), so the indexer cannot write one it would refuse."""
    parse_manifest(manifest, "manifest (being written)")
    data = manifest_bytes(manifest)
    (Path(directory) / MANIFEST).write_bytes(data)
    (Path(directory) / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")


def read_manifest(directory: Path, verify_digest: bool = True) -> tuple[Manifest, dict[str, Any]]:
    """(validated Manifest, the raw dict) of `directory`, checked against manifest.sha256 first.

    Raises ManifestError (one line) when manifest.json is missing, is not covered by its digest, is
    not JSON, or fails `parse_manifest`. Nothing in it is used before these checks pass."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} is not an index directory: {MANIFEST} is missing")
    data = path.read_bytes()
    if verify_digest:
        digest_file = directory / MANIFEST_DIGEST
        if not digest_file.is_file():
            raise ManifestError(f"{directory}: {MANIFEST_DIGEST} is missing, so {MANIFEST} is not covered by the "
                                "integrity check (rebuild the index with this tracin version)")
        expected = digest_file.read_text(errors="replace").split()[:1]
        if expected != [hashlib.sha256(data).hexdigest()]:
            raise ManifestError(f"{directory}: {MANIFEST} does not match {MANIFEST_DIGEST} (edited or damaged)")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return parse_manifest(raw, str(path)), raw


def is_index_directory(directory: Path) -> bool:
    """True when `directory` holds a manifest.json written by tracin (a JSON object whose schema_version
    is an integer): what `--force` may replace."""
    try:
        raw = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and type(raw.get("schema_version")) is int and "files" in raw
