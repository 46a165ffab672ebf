"""Reading the training data of the built-in tasks: tables from CSV / TSV / JSONL / JSON / Parquet files or a
Hugging Face `datasets` folder saved with `save_to_disk`, and labels as class ids.

CSV, TSV, JSONL and JSON need nothing beyond the standard library; Parquet needs pyarrow and a `datasets`
folder needs `datasets` (both in the extra `tracin-service[data]`). Every error is a `ConfigError` of one line
that names the task argument, the file and, for a missing column, the columns the file has.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from indexer.config import ConfigError

DATA_EXTRA = "pip install 'tracin-service[data]'"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Table:
    """A table in row order: `columns` (names, file order) and `rows` (one dict per row)."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.rows)

    def require(self, name: str, arg: str) -> str:
        """`name` if the table has that column, else ConfigError naming `arg` and listing the columns."""
        if name not in self.columns:
            shown = list(self.columns[:20]) + (["..."] if len(self.columns) > 20 else [])
            raise ConfigError(f"task_args.{arg}: {self.path} has no column {name!r}; its columns: {shown}")
        return name

    def column(self, name: str, arg: str) -> list[Any]:
        """The values of column `name` in row order (ConfigError naming `arg` when it does not exist, or when
        a row lacks it: JSONL rows may differ)."""
        self.require(name, arg)
        out = []
        for i, row in enumerate(self.rows):
            if name not in row or row[name] is None:
                raise ConfigError(f"task_args.{arg}: row {i} of {self.path} has no value in column {name!r}")
            out.append(row[name])
        return out


def read_table(path: str | Path, split: str | None = None, arg: str = "data") -> Table:
    """The table at `path` (by suffix: .csv, .tsv, .jsonl, .json (a list of objects), .parquet; a folder:
    `datasets.load_from_disk`, with `split` choosing a split of a DatasetDict). CSV values are strings, the
    other formats keep their types. Raises ConfigError (one line naming `arg` and the file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"task_args.{arg}: data file not found: {path}")
    stat = path.stat()
    return _read_table(str(path.resolve()), split, stat.st_mtime_ns, stat.st_size, arg)


@lru_cache(maxsize=8)
def _read_table(path_text: str, split: str | None, _mtime: int, _size: int, arg: str) -> Table:
    path = Path(path_text)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            columns, rows = _read_saved_dataset(path, split, arg)
        elif suffix in (".csv", ".tsv"):
            columns, rows = _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".json"):
            columns, rows = _read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            columns, rows = _read_parquet(path)
        else:
            raise ConfigError(f"task_args.{arg}: {path}: unknown data format {suffix or '(no suffix)'!r}; expected "
                              f"one of {list(TABLE_SUFFIXES)} or a `datasets` folder saved with save_to_disk")
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise ConfigError(f"task_args.{arg}: cannot read {path}: {type(exc).__name__}: {_line(exc)}") from None
    if split is not None and not path.is_dir():
        raise ConfigError(f"task_args.split: {split!r} is for a `datasets` folder with splits; {path} is a file")
    if not rows:
        raise ConfigError(f"task_args.{arg}: {path} has no rows")
    return Table(path, tuple(columns), tuple(rows))


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if len(set(columns)) != len(columns):
        dup = sorted({c for c in columns if columns.count(c) > 1})
        raise ConfigError(f"task_args.data: {path}: the header repeats the columns {dup}")
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):
            raise ConfigError(f"task_args.data: {path}: row {i} (line {i + 2}) does not have {len(columns)} fields")
    return columns, rows


def _read_json(path: Path, lines: bool) -> tuple[list[str], list[dict[str, Any]]]:
    if lines:
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"task_args.data: {path}: line {number} is not JSON: {exc.msg}") from None
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ConfigError(f"task_args.data: {path}: expected a JSON list of objects (one per row), got "
                              f"{type(rows).__name__}")
    columns: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"task_args.data: {path}: row {i} is a {type(row).__name__}, not an object")
        columns += [k for k in row if k not in columns]
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"task_args.data: reading {path} needs pyarrow: {DATA_EXTRA}") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: a bad file for the user
        raise ConfigError(f"task_args.data: cannot read {path}: {type(exc).__name__}: {_line(exc)}") from None
    return list(table.column_names), table.to_pylist()


def _read_saved_dataset(path: Path, split: str | None, arg: str) -> tuple[list[str], list[dict[str, Any]]]:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ConfigError(f"task_args.{arg}: {path} is a folder but not a `datasets` folder saved with "
                          "save_to_disk (no dataset_dict.json / state.json)")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"task_args.{arg}: reading the `datasets` folder {path} needs datasets: {DATA_EXTRA}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad folder for the user
        raise ConfigError(f"task_args.{arg}: cannot read the `datasets` folder {path}: {type(exc).__name__}: "
                          f"{_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        name = split if split is not None else ("train" if "train" in loaded else None)
        if name is None or name not in loaded:
            raise ConfigError(f"task_args.split: {path} holds the splits {splits}; name one with split = \"...\""
                              if split is None else f"task_args.split: {path} has no split {split!r}; its splits: {splits}")
        loaded = loaded[name]
    elif split is not None:
        raise ConfigError(f"task_args.split: {path} is a single dataset without splits; remove split")
    return list(loaded.column_names), loaded.to_list()


def class_ids(values: Sequence[Any], names: Sequence[str] | None, where: str) -> torch.Tensor:
    """Labels as int64 class ids [N]: an integer (or a string of one, as CSV files hold them) is a class id, a
    string that is a class name is that class's id. With `names`, ids must be in 0..len(names)-1 and names are
    looked up first. Raises ConfigError naming `where`, the row and the label (and the known names)."""
    lookup = {str(n): i for i, n in enumerate(names)} if names is not None else {}
    out = []
    for row, value in enumerate(values):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: row {row}: label {value!r} is a boolean, not a class id or name")
        if isinstance(value, str) and value in lookup:
            out.append(lookup[value])
            continue
        number = value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value.strip())
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        if not isinstance(number, int):
            shown = repr(value)[:60]
            if names is None:
                raise ConfigError(f"{where}: row {row}: label {shown} is not a class id; give the class names "
                                  "in order (task_args.classes = [...]) to map names to ids")
            known = [str(n) for n in names[:20]]
            raise ConfigError(f"{where}: row {row}: unknown label {shown}; known labels: {known}"
                              + (" ..." if len(names) > 20 else ""))
        if number < 0 or (names is not None and number >= len(names)):
            bound = f"0..{len(names) - 1}" if names is not None else ">= 0"
            raise ConfigError(f"{where}: row {row}: class id {number} is out of range {bound}")
        out.append(number)
    return torch.tensor(out, dtype=torch.long)


def float_values(values: Sequence[Any], where: str) -> list[float]:
    """Numbers (or strings of numbers, as CSV files hold them) as floats; ConfigError naming the row otherwise
    (an empty cell, a word, NaN or an infinity)."""
    import math

    out = []
    for row, value in enumerate(values):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: row {row}: {repr(value)[:60]} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: row {row}: {value!r} is not a finite number")
        out.append(number)
    return out


def snippet(text: str, chars: int = 200) -> str:
    """The first `chars` characters of `text` on one line (cut at a word, "..." when cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= chars else flat[:chars].rsplit(" ", 1)[0] + " ..."
