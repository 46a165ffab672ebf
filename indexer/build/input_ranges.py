"""Ranges of the training inputs, recorded at index time, so that the service can say when a query is
unlike anything the model was trained on (`warnings` in the POST /influence answer).

What is recorded (input_ranges.json in the index directory, covered by the manifest's sha256), per input
tensor (one tensor, or each of a dict's / tuple's tensors), in the form a query reaches the model
(`Task.encode` of a JSON example), over the training set:

  floating inputs   per feature (pixel, column; up to MAX_FEATURES per example): min, max, mean, std;
                    per example: the spread (max - min), the mean, and the share of its features that are
                    "far off" (more than FAR_SD standard deviations from its training mean), as quantiles
                    over the training examples
  integer inputs    the smallest and largest value (token ids)

The ranges describe inputs in the form `encode` gives a query. When the training set stores them in
that form (checked on a probe of PROBE_ROWS examples passed through `example_of` and `encode`), or in a
form that one affine map per tensor turns into it (Fashion-MNIST: uint8 pixels 0..255 stored, floats
0..1 encoded: x / 255, checked on the probe), every training example is used; otherwise up to
ENCODE_SAMPLE examples are encoded exactly as a query.

Thresholds (measured on Fashion-MNIST, FAR_SD 6: 99.9% of training images have at most 4.2% of their
pixels far off, the most 7.5%; of the 10,000 test images at most 8.8%; of 200 test images whose dark
background was made white (a white-background PNG) at least 12%): a query is warned about above
max(FAR_SHARE_MIN, FAR_SHARE_FACTOR x the training 99.9% quantile) = 10.5% there.

`InputRanges.check(inputs)` gives the warnings for one encoded query, in words (at most one per kind of
problem and tensor):
  * the values' spread is far below (or above) that of every training example: another scale (an image
    scaled to 0..1 where 0..255 is expected, or twice);
  * many features are far off (a white background where training images are dark): more than
    max(FAR_SHARE_MIN, FAR_SHARE_FACTOR x the 99.9% quantile of the training examples' share);
  * the example's mean is outside the training examples' range by more than a tenth of that range;
  * integer ids outside the training range.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from indexer.task import ExampleSet, Task, input_tensors, take_rows

INPUT_RANGES_FILE = "input_ranges.json"
FORMAT = "tracin-input-ranges/1"
MAX_FEATURES = 1 << 16  # per-feature statistics only for examples of at most this many numbers per tensor
ENCODE_SAMPLE = 2048  # training examples encoded like a query when the stored form differs
PROBE_ROWS = 16
FAR_SD = 6.0
FAR_SHARE_MIN = 0.10
FAR_SHARE_FACTOR = 2.5
SCALE_FACTOR = 4.0
QUANTILES = (0.0, 0.001, 0.5, 0.999, 1.0)
CHUNK = 4096


class InputRangesError(ValueError):
    """An input_ranges.json that does not fit (one line)."""


# -- recording (indexer) -------------------------------------------------------------------------------

def record_input_ranges(task: Task, examples: ExampleSet) -> dict[str, Any]:
    """The JSON document of input_ranges.json for a training set (see the module docstring)."""
    rows, source = _rows_in_query_space(task, examples)
    names = _names(examples.inputs)
    tensors = []
    for i, name in enumerate(names):
        entry = _tensor_ranges(name, lambda start, stop, i=i: _flat(rows(start, stop)[i]), rows.count)
        entry["shape"] = [int(d) for d in rows(0, 1)[i].shape[1:]]
        tensors.append(entry)
    return {"format": FORMAT, "source": source, "rows": rows.count, "tensors": tensors}


class _Rows:
    """Rows start..stop of the training inputs in query form, as a list of tensors (one per input)."""

    def __init__(self, fetch, count: int):
        self.fetch, self.count = fetch, count

    def __call__(self, start: int, stop: int) -> list[torch.Tensor]:
        return self.fetch(start, stop)


def _names(inputs: Any) -> list[str]:
    if isinstance(inputs, torch.Tensor):
        return ["inputs"]
    if isinstance(inputs, dict):
        return [str(k) for k in inputs]
    return [str(i) for i in range(len(inputs))]


def _rows_in_query_space(task: Task, examples: ExampleSet) -> tuple[_Rows, str]:
    stored = _Rows(lambda a, b: input_tensors(examples.batch(a, b)[0]), len(examples))
    schema = getattr(task, "example_schema", None)
    if examples.examples is None or schema is None:
        return stored, "training inputs as stored (the task gives no JSON examples to encode)"
    try:
        probe = list(range(min(PROBE_ROWS, len(examples))))
        encoded = input_tensors(_encode(task, schema, examples, probe))
        same = _same_form(encoded, input_tensors(take_rows(examples.inputs, torch.as_tensor(probe))))
    except Exception as exc:  # noqa: BLE001 - the task's own encode; ranges are advisory
        return stored, f"training inputs as stored (encoding training examples failed: {type(exc).__name__})"
    if same:
        return stored, "training inputs as stored (the same form as encoded queries)"
    maps = _affine_maps(encoded, input_tensors(take_rows(examples.inputs, torch.as_tensor(probe))))
    if maps is not None:  # e.g. uint8 pixels 0..255 stored, floats 0..1 encoded: every row, mapped
        def mapped(a: int, b: int) -> list[torch.Tensor]:
            return [t.to(torch.float64) * scale + shift if (scale, shift) != (1.0, 0.0) else t
                    for t, (scale, shift) in zip(input_tensors(examples.batch(a, b)[0]), maps)]

        shown = "; ".join(f"x {scale:.6g} + {shift:.6g}" for scale, shift in maps)
        return _Rows(mapped, len(examples)), (f"training inputs as stored, mapped to the encoded form ({shown}, "
                                              f"checked on {len(probe)} examples)")
    picked = np.unique(np.linspace(0, len(examples) - 1, min(ENCODE_SAMPLE, len(examples))).round().astype(np.int64))

    def fetch(a: int, b: int) -> list[torch.Tensor]:
        return input_tensors(_encode(task, schema, examples, picked[a:b].tolist()))

    return _Rows(fetch, int(picked.size)), (f"{picked.size} training examples encoded like a query (the training "
                                            "set stores its inputs in another form)")


def _affine_maps(encoded: list[torch.Tensor], stored: list[torch.Tensor]) -> list[tuple[float, float]] | None:
    """Per tensor (scale, shift) with encoded = stored * scale + shift on every probe value (to 1e-5 of the
    encoded spread), or None when no such map holds (then a sample of examples is encoded instead)."""
    if len(encoded) != len(stored):
        return None
    maps = []
    for e, s in zip(encoded, stored):
        if e.shape != s.shape:
            return None
        if not e.is_floating_point():
            if s.is_floating_point() or not torch.equal(e, s):
                return None
            maps.append((1.0, 0.0))
            continue
        x, y = s.detach().double().reshape(-1).numpy(), e.detach().double().reshape(-1).numpy()
        if x.var() == 0:
            return None
        scale = float(np.cov(x, y, bias=True)[0, 1] / x.var())
        shift = float(y.mean() - scale * x.mean())
        spread = float(y.max() - y.min()) or 1.0
        if abs(shift) <= 1e-6 * spread:
            shift = 0.0  # least-squares rounding of an exact 0
        if not (math.isfinite(scale) and math.isfinite(shift)) or \
                np.abs(x * scale + shift - y).max() > 1e-5 * spread:
            return None
        maps.append((scale, shift))
    return maps


def _encode(task: Task, schema, examples: ExampleSet, rows: list[int]):
    return task.encode([schema.model_validate(examples.example_of(r)) for r in rows])


def _same_form(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.is_floating_point() != y.is_floating_point():
            return False
        if not torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6):
            return False
    return True


def _flat(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.is_floating_point():
        return t.reshape(t.shape[0], -1).to(torch.float64).numpy()
    return t.reshape(t.shape[0], -1).numpy()


def _tensor_ranges(name: str, rows, count: int) -> dict[str, Any]:
    first = rows(0, min(count, CHUNK))
    if not np.issubdtype(first.dtype, np.floating):
        lo, hi = int(first.min()), int(first.max())
        for s in range(CHUNK, count, CHUNK):
            block = rows(s, min(count, s + CHUNK))
            lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
        return {"name": name, "kind": "integer", "min": lo, "max": hi}
    features = first.shape[1]
    per_feature = features <= MAX_FEATURES
    total = np.zeros(features) if per_feature else None
    squares = np.zeros(features) if per_feature else None
    lo = np.full(features, np.inf) if per_feature else None
    hi = np.full(features, -np.inf) if per_feature else None
    spreads, means = [], []
    for s in range(0, count, CHUNK):
        block = first if s == 0 else rows(s, min(count, s + CHUNK))
        spreads.append(block.max(axis=1) - block.min(axis=1))
        means.append(block.mean(axis=1))
        if per_feature:
            total += block.sum(axis=0)
            squares += np.square(block).sum(axis=0)
            lo, hi = np.minimum(lo, block.min(axis=0)), np.maximum(hi, block.max(axis=0))
    spreads, means = np.concatenate(spreads), np.concatenate(means)
    out = {"name": name, "kind": "float", "features": int(features),
           "example_spread": _quantiles(spreads), "example_mean": _quantiles(means)}
    if per_feature:
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
        out.update(min=lo.tolist(), max=hi.tolist(), mean=mean.tolist(), std=std.tolist())
        ranges = _FeatureRanges(lo, hi, mean, std, float(np.quantile(spreads, 0.5)))
        shares = np.concatenate([ranges.far_share(rows(s, min(count, s + CHUNK))) for s in range(0, count, CHUNK)])
        out["example_far_share"] = _quantiles(shares)
    return out


def _quantiles(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(values, QUANTILES)]


@dataclass
class _FeatureRanges:
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    typical_spread: float

    def far(self, x: np.ndarray) -> np.ndarray:
        """[B, F] bool: more than FAR_SD standard deviations from the feature's training mean (the sd at
        least 1e-3 of a typical example's spread, so that a constant feature needs a visible step)."""
        floor = 1e-3 * self.typical_spread if self.typical_spread > 0 else 1e-12
        return np.abs(x - self.mean) > FAR_SD * np.maximum(self.std, floor)

    def far_share(self, x: np.ndarray) -> np.ndarray:
        return self.far(x).mean(axis=1)


# -- checking (service) --------------------------------------------------------------------------------

@dataclass
class InputRanges:
    """An opened input_ranges.json."""

    data: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> "InputRanges":
        """Validate a decoded input_ranges.json; InputRangesError (one line) when it does not fit."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputRangesError(f"is not a {FORMAT} document")
        tensors = data.get("tensors")
        if not isinstance(tensors, list) or not tensors:
            raise InputRangesError("has no tensors")
        for i, t in enumerate(tensors):
            where = f"tensors[{i}]"
            if not isinstance(t, dict) or t.get("kind") not in ("float", "integer") or not isinstance(t.get("name"), str):
                raise InputRangesError(f"{where} is not a tensor entry")
            if t["kind"] == "integer":
                if not all(isinstance(t.get(k), int) and not isinstance(t.get(k), bool) for k in ("min", "max")) \
                        or t["min"] > t["max"]:
                    raise InputRangesError(f"{where}: min/max must be integers, min <= max")
                continue
            features = t.get("features")
            if not isinstance(features, int) or isinstance(features, bool) or features < 1:
                raise InputRangesError(f"{where}.features must be a positive integer")
            for key in ("example_spread", "example_mean") + (("example_far_share",) if "mean" in t else ()):
                _numbers(t.get(key), len(QUANTILES), f"{where}.{key}")
            if any(k in t for k in ("min", "max", "mean", "std")):
                for key in ("min", "max", "mean", "std"):
                    _numbers(t.get(key), features, f"{where}.{key}")
        return cls(data)

    @property
    def tensors(self) -> list[dict[str, Any]]:
        return self.data["tensors"]

    def check(self, inputs: Any) -> list[str]:
        """Warnings (in words) for one encoded query (a batch of one); [] when it looks like training data."""
        tensors = input_tensors(inputs)
        if len(tensors) != len(self.tensors):
            return []
        out: list[str] = []
        for entry, tensor in zip(self.tensors, tensors):
            what = "the input" if len(self.tensors) == 1 else f"input {entry['name']!r}"
            x = _flat(tensor)
            if x.shape[0] != 1:
                continue
            if entry["kind"] == "integer":
                out += _integer_warnings(entry, x[0], what)
            elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
                out += _float_warnings(entry, x[0].astype(np.float64), what)
        return out


def _numbers(value: Any, length: int, where: str) -> None:
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise InputRangesError(f"{where} must be {length} finite numbers")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _integer_warnings(entry: dict, x: np.ndarray, what: str) -> list[str]:
    lo, hi = entry["min"], entry["max"]
    outside = (x < lo) | (x > hi)
    if not outside.any():
        return []
    shown = ", ".join(str(int(v)) for v in np.unique(x[outside])[:5])
    return [f"{what} holds ids outside the training range {lo}..{hi} ({shown}; {int(outside.sum())} of {x.size} "
            "positions): the model never saw them in training"]


def _float_warnings(entry: dict, x: np.ndarray, what: str) -> list[str]:
    out = []
    spread = float(x.max() - x.min()) if x.size else 0.0
    s_lo, s_low, s_mid, s_high, s_hi = entry["example_spread"]
    scale_off = False
    if s_low > 0 and spread < s_low / SCALE_FACTOR:
        scale_off = True
        if spread == 0:
            out.append(f"{what} is constant ({x.size} values, all {_fmt(float(x[0]))}), while training examples span "
                       f"{_fmt(s_mid)} (typical max - min): was it sent blank, or on another scale?")
        else:
            out.append(f"{what}'s values span {_fmt(float(x.min()))}..{_fmt(float(x.max()))} (max - min "
                       f"{_fmt(spread)}), about {_fmt(s_mid / spread)} times less than a typical training example "
                       f"({_fmt(s_mid)}; 99.9% of them span at least {_fmt(s_low)}): is it on another scale, e.g. "
                       "scaled to 0..1 where the API expects the training range (or scaled twice)?")
    elif spread > s_high * SCALE_FACTOR and s_high > 0:
        scale_off = True
        out.append(f"{what}'s values span {_fmt(float(x.min()))}..{_fmt(float(x.max()))} (max - min {_fmt(spread)}), "
                   f"about {_fmt(spread / s_mid)} times more than a typical training example ({_fmt(s_mid)}; 99.9% "
                   f"of them span at most {_fmt(s_high)}): is it on another scale?")
    if "mean" in entry and len(entry["mean"]) == x.size and not scale_off:
        typical = s_mid
        ranges = _FeatureRanges(np.asarray(entry["min"]), np.asarray(entry["max"]), np.asarray(entry["mean"]),
                                np.asarray(entry["std"]), typical)
        far = ranges.far(x[None, :])[0]
        share = float(far.mean())
        limit = max(FAR_SHARE_MIN, FAR_SHARE_FACTOR * entry["example_far_share"][3])
        if share > limit:
            above = int((far & (x > ranges.mean)).sum())
            direction = "above" if above * 2 >= int(far.sum()) else "below"
            j = int(np.argmax(np.where(far, np.abs(x - ranges.mean) / np.maximum(ranges.std, 1e-12), -1)))
            shape = entry.get("shape")
            where = (f"position {list(int(v) for v in np.unravel_index(j, shape))}"
                     if isinstance(shape, list) and shape and int(np.prod(shape)) == x.size else f"feature {j}")
            out.append(f"{int(far.sum())} of {x.size} values of {what} ({share:.0%}) are far from anything training "
                       f"examples have at the same position, mostly {direction} it (more than {FAR_SD:g} standard "
                       f"deviations from the training mean; {entry['example_far_share'][3]:.1%} at most for 99.9% of "
                       f"training examples), e.g. {where}: {_fmt(float(x[j]))} where training "
                       f"has {_fmt(float(ranges.lo[j]))}..{_fmt(float(ranges.hi[j]))} (mean {_fmt(float(ranges.mean[j]))})"
                       " — a background or border unlike the training data?")
    m_lo, _, _, _, m_hi = entry["example_mean"]
    margin = 0.1 * (m_hi - m_lo)
    mean = float(x.mean()) if x.size else 0.0
    if not scale_off and (mean > m_hi + margin or mean < m_lo - margin):
        side = "above" if mean > m_hi else "below"
        out.append(f"the mean of {what}'s values, {_fmt(mean)}, is {side} that of every training example "
                   f"({_fmt(m_lo)}..{_fmt(m_hi)})")
    return out


def dumps(document: dict[str, Any]) -> str:
    """input_ranges.json's text (deterministic: the same bytes for the same training set)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
