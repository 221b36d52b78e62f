"""TraceSet: the contract between a model and every audit.

A TraceSet holds, for one model (or one trained replicate), the per-example arrays the
audits consume. It is validated on construction, so an audit never sees NaN, ragged shapes
or routing rows that are not distributions. Storage never uses pickle: a trace directory
holds one ``.npy`` file per array plus a ``manifest.json`` with shapes, dtypes and sha256
digests; the ``.npz`` interchange file is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routeaudit._version import __version__
from routeaudit.errors import TraceValidationError

SCHEMA_VERSION = 1
ROUTING_ROW_TOLERANCE = 1e-3
OPTIONAL_ARRAYS = ("source_mask", "group", "expert_logits", "token_index")
REQUIRED_ARRAYS = ("logits", "labels", "routing")


class TraceMeta(BaseModel):
    """Descriptive metadata; nothing here changes a statistic."""

    model_config = ConfigDict(extra="allow")

    name: str = "traces"
    family: str = "unknown"  # attnres-full | attnres-block | moe | synthetic | ...
    routing_mode: Literal["soft", "hard"] = "soft"
    source_families: dict[str, list[int]] = Field(default_factory=dict)
    layer_names: list[str] | None = None
    layer_types: list[str] | None = None  # per routing layer: "attn" | "mlp" | "final" | ...
    layer_depth: list[int] | None = None  # per routing layer: transformer block index
    schedule: list[list[float]] | None = None  # analytic routing [L, S] the model declares
    replicate: int | None = None  # index of a trained replicate; replicates become the seeds
    per_token: bool = False


def _first_index(bad: np.ndarray) -> tuple[int, ...] | int:
    """Index of the first True entry of a boolean array, as an int for 1-D arrays."""
    where = np.argwhere(bad)[0]
    return int(where[0]) if where.size == 1 else tuple(int(i) for i in where)


class TraceSet:
    """Validated per-example arrays of one model.

    Arrays: ``logits [N, K]``, ``labels [N]`` (int64), ``routing [N, L, S]`` (a distribution
    over the valid sources of each layer), ``source_mask [L, S]`` (bool, valid sources),
    and optional ``group [N]``, ``expert_logits [N, E, K]``, ``token_index [N]``.
    """

    def __init__(
        self,
        logits: Any,
        labels: Any,
        routing: Any,
        *,
        source_mask: Any = None,
        group: Any = None,
        expert_logits: Any = None,
        token_index: Any = None,
        meta: TraceMeta | Mapping[str, Any] | None = None,
    ) -> None:
        self.logits = _as_float("logits", logits)
        self.labels = _as_int("labels", labels)
        self.routing = _as_float("routing", routing)
        n_layers = self.routing.shape[1] if self.routing.ndim == 3 else 0
        n_sources = self.routing.shape[2] if self.routing.ndim == 3 else 0
        if source_mask is None:
            source_mask = np.ones((n_layers, n_sources), dtype=bool)
        self.source_mask = np.asarray(source_mask)
        self.group = None if group is None else _as_int("group", group)
        self.expert_logits = None if expert_logits is None else _as_float("expert_logits", expert_logits)
        self.token_index = None if token_index is None else _as_int("token_index", token_index)
        if isinstance(meta, TraceMeta):
            self.meta = meta
        else:
            self.meta = TraceMeta(**dict(meta or {}))
        self.validate()

    # ------------------------------------------------------------------ shape helpers
    @property
    def n_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.routing.shape[1])

    @property
    def n_sources(self) -> int:
        return int(self.routing.shape[2])

    def __len__(self) -> int:
        return self.n_examples

    def __repr__(self) -> str:
        return (
            f"TraceSet(name={self.meta.name!r}, N={self.n_examples}, K={self.n_classes}, "
            f"L={self.n_layers}, S={self.n_sources})"
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Every present array by its contract name."""
        out = {"logits": self.logits, "labels": self.labels, "routing": self.routing,
               "source_mask": self.source_mask}
        for name in ("group", "expert_logits", "token_index"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def subset(self, index: np.ndarray) -> TraceSet:
        """A TraceSet with the examples at ``index`` (used for calibration/evaluation splits)."""
        kwargs = {}
        for name in ("group", "expert_logits", "token_index"):
            value = getattr(self, name)
            kwargs[name] = None if value is None else value[index]
        return TraceSet(self.logits[index], self.labels[index], self.routing[index],
                        source_mask=self.source_mask, meta=self.meta, **kwargs)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise TraceValidationError naming the field, first offending index and expectation."""
        logits, labels, routing, mask = self.logits, self.labels, self.routing, self.source_mask
        if logits.ndim != 2:
            raise TraceValidationError("logits", f"has rank {logits.ndim}", expected="rank 2 [N, K]")
        if logits.shape[1] < 2:
            raise TraceValidationError("logits", f"has {logits.shape[1]} classes",
                                       expected="at least 2 classes")
        n = logits.shape[0]
        if labels.ndim != 1:
            raise TraceValidationError("labels", f"has rank {labels.ndim}", expected="rank 1 [N]")
        if labels.shape[0] != n:
            raise TraceValidationError("labels", f"has N={labels.shape[0]}",
                                       expected=f"N={n} as in logits")
        if routing.ndim != 3:
            raise TraceValidationError("routing", f"has rank {routing.ndim}",
                                       expected="rank 3 [N, L, S]")
        if routing.shape[0] != n:
            raise TraceValidationError("routing", f"has N={routing.shape[0]}",
                                       expected=f"N={n} as in logits")
        _check_finite("logits", logits)
        _check_finite("routing", routing)
        bad = (labels < 0) | (labels >= logits.shape[1])
        if bad.any():
            i = _first_index(bad)
            raise TraceValidationError("labels", f"value {int(labels[i])} out of range", index=i,
                                       expected=f"an integer in [0, {logits.shape[1]})")
        if mask.dtype != bool:
            if not np.isin(mask, (0, 1)).all():
                raise TraceValidationError("source_mask", f"has dtype {mask.dtype}",
                                           expected="booleans")
            self.source_mask = mask = mask.astype(bool)
        if mask.shape != routing.shape[1:]:
            raise TraceValidationError("source_mask", f"has shape {mask.shape}",
                                       expected=f"[L, S] = {routing.shape[1:]} as in routing")
        empty = ~mask.any(axis=1)
        if empty.any():
            raise TraceValidationError("source_mask", "layer has no valid source",
                                       index=_first_index(empty), expected="≥ 1 valid source")
        negative = routing < 0
        if negative.any():
            raise TraceValidationError("routing", "negative weight", index=_first_index(negative),
                                       expected="weights ≥ 0")
        off_mask = (routing > ROUTING_ROW_TOLERANCE) & ~mask[None]
        if off_mask.any():
            raise TraceValidationError(
                "routing", "weight on a source that source_mask marks invalid",
                index=_first_index(off_mask), expected="0 on masked sources")
        sums = np.where(mask[None], routing, 0.0).sum(axis=2, dtype=np.float64)
        off = np.abs(sums - 1.0) > ROUTING_ROW_TOLERANCE
        if off.any():
            i = _first_index(off)
            raise TraceValidationError(
                "routing", f"row sums to {float(sums[i]):.6g} over valid sources",
                index=i, expected=f"1 within {ROUTING_ROW_TOLERANCE} (index is [example, layer])")
        for name in ("group", "token_index"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise TraceValidationError(name, f"has shape {value.shape}", expected=f"[N] = ({n},)")
        if self.expert_logits is not None:
            e = self.expert_logits
            if e.ndim != 3 or e.shape[0] != n or e.shape[2] != logits.shape[1]:
                raise TraceValidationError("expert_logits", f"has shape {e.shape}",
                                           expected=f"[N, E, K] with N={n}, K={logits.shape[1]}")
            _check_finite("expert_logits", e)

    def require_examples(self, minimum: int, why: str) -> None:
        """Fail with a TraceValidationError when fewer than ``minimum`` examples are present."""
        if self.n_examples < minimum:
            raise TraceValidationError(
                "labels", f"only {self.n_examples} examples", expected=f"at least {minimum} ({why})")

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write a trace directory: one ``.npy`` per array and a ``manifest.json``, atomically."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        entries = {}
        for name, array in self.arrays().items():
            path = staging / f"{name}.npy"
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            entries[name] = {"file": path.name, "shape": list(array.shape),
                             "dtype": str(array.dtype), "sha256": _sha256(path)}
        manifest = {"schema_version": SCHEMA_VERSION, "routeaudit_version": __version__,
                    "meta": self.meta.model_dump(mode="json"), "arrays": entries}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write the plain ``.npz`` interchange file (meta as a JSON string array)."""
        path = Path(path)
        meta = np.array(json.dumps(self.meta.model_dump(mode="json")))
        np.savez_compressed(path, meta=meta, **self.arrays())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceSet:
        """Load a trace directory or an ``.npz`` file, validating everything."""
        path = Path(path)
        if path.is_dir():
            return cls._load_directory(path)
        if path.suffix == ".npz":
            return cls._load_npz(path)
        raise TraceValidationError("path", f"{path} is neither a trace directory nor a .npz file",
                                   expected="a directory with manifest.json or a .npz file")

    @classmethod
    def _load_npz(cls, path: Path) -> TraceSet:
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TraceValidationError("path", f"cannot read {path}: {exc}",
                                       expected="a .npz file without pickled objects") from exc
        with data:
            keys = set(data.files)
            missing = [k for k in REQUIRED_ARRAYS if k not in keys]
            if missing:
                raise TraceValidationError(missing[0], f"missing from {path.name}",
                                           expected=f"keys {', '.join(REQUIRED_ARRAYS)}")
            unknown = keys - set(REQUIRED_ARRAYS) - set(OPTIONAL_ARRAYS) - {"meta"}
            if unknown:
                raise TraceValidationError(sorted(unknown)[0], "unknown key in .npz",
                                           expected=f"only {REQUIRED_ARRAYS + OPTIONAL_ARRAYS}")
            arrays = {}
            for key in sorted(keys - {"meta"}):
                try:
                    arrays[key] = data[key]
                except ValueError as exc:  # object arrays need pickle, which is refused
                    raise TraceValidationError(key, f"cannot be read from {path.name}: {exc}",
                                               expected="a numeric array (pickle is refused)"
                                               ) from exc
            try:
                meta = json.loads(str(data["meta"])) if "meta" in keys else {"name": path.stem}
            except (ValueError, json.JSONDecodeError) as exc:
                raise TraceValidationError("meta", f"is not a JSON string: {exc}",
                                           expected="meta stored as a JSON string") from exc
        return cls(**arrays, meta=meta)

    @classmethod
    def _load_directory(cls, path: Path) -> TraceSet:
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise TraceValidationError("manifest.json", f"missing in {path}",
                                       expected="a directory written by `routeaudit extract`")
        manifest = json.loads(manifest_path.read_text())
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TraceValidationError("manifest.json", f"schema_version {version!r}",
                                       expected=f"schema_version {SCHEMA_VERSION}")
        arrays = {}
        for name, entry in manifest["arrays"].items():
            file = path / entry["file"]
            if _sha256(file) != entry["sha256"]:
                raise TraceValidationError(name, f"sha256 of {file.name} does not match manifest",
                                           expected="an unmodified array file")
            array = np.load(file, allow_pickle=False)
            if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
                raise TraceValidationError(
                    name, f"has shape {array.shape} dtype {array.dtype}",
                    expected=f"shape {entry['shape']} dtype {entry['dtype']} as in manifest")
            arrays[name] = array
        return cls(**arrays, meta=manifest.get("meta", {}))


def _as_float(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                     or np.issubdtype(array.dtype, np.integer)):
        raise TraceValidationError(name, f"has dtype {array.dtype}", expected="a float array")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array


def _as_int(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int64, copy=False)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise TraceValidationError(name, f"non-integer value {array[_first_index(bad)]!r}",
                                       index=_first_index(bad), expected="integers")
        return array.astype(np.int64)
    raise TraceValidationError(name, f"has dtype {array.dtype}", expected="an integer array")


def _check_finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        i = _first_index(bad)
        raise TraceValidationError(name, f"non-finite value {array[i]!r}", index=i,
                                   expected="finite numbers (no NaN or inf)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
