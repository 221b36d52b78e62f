"""TraceSet: the contract between a model and every audit.

A TraceSet holds, for one model (or one trained replicate), the per-example arrays the
audits consume. It is validated on construction, so an audit never sees NaN, ragged shapes,
routing rows that are not distributions, or metadata (layer names, an analytic schedule,
source families) that does not fit the routing it describes.

Storage never uses pickle: ``save`` writes a trace directory (one ``.npy`` per array plus a
``manifest.json`` with shapes, dtypes and sha256 digests) and ``save_npz`` the ``.npz``
interchange file, both through :mod:`routeaudit.traces.writing`; ``load`` reads either
through :mod:`routeaudit.traces.reading`, which treats every file as untrusted input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from routeaudit._version import __version__
from routeaudit.errors import TraceFileError, TraceValidationError, show_path
from routeaudit.traces._common import (
    _NPZ_EXPECTED,
    _PARSE_ERRORS,
    _REWRITE,
    _SAVE_HINT,
    ARRAY_NAMES,
    MANIFEST,
    REQUIRED_ARRAYS,
    ROUTING_ROW_TOLERANCE,
    SCHEMA_VERSION,
    _exc_text,
    _file_size,
    _first_index,
    _fsync_dir,
    _open_regular,
    _os_error,
    _read_some,
    _sha256,
    _stat,
    _value,
    row_blocks,
)
from routeaudit.traces.meta import TraceMeta
from routeaudit.traces.reading import (
    _not_a_zip,
    _npz_members,
    _read_listed_npy,
    _read_manifest,
    _read_member,
    _read_npz_meta,
)
from routeaudit.traces.writing import (
    _existing_save_target,
    _link_no_clobber,
    _make_parents,
    _new_private_dir,
    _new_private_file,
    _swap_in,
)


# ------------------------------------------------------------------------------ TraceSet
class TraceSet:
    """Validated per-example arrays of one model.

    Arrays: ``logits [N, K]``, ``labels [N]`` (int64), ``routing [N, L, S]`` (a distribution
    over the valid sources of each layer), ``source_mask [L, S]`` (bool, valid sources),
    and optional ``group [N]``, ``expert_logits [N, E, K]``, ``token_index [N]``. N, L and
    S are at least 1 and K at least 2. Too few examples for a particular audit is not
    invalid traces: that audit says how many it needs.
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
        self.meta = TraceMeta.parse(meta)
        self.logits = _as_float("logits", logits)
        n_classes = self.logits.shape[1] if self.logits.ndim == 2 else None
        self.labels = _as_int("labels", labels, expected="integers" if n_classes is None
                              else f"an integer in [0, {n_classes})")
        self.routing = _as_float("routing", routing)
        n_layers = self.routing.shape[1] if self.routing.ndim == 3 else 0
        n_sources = self.routing.shape[2] if self.routing.ndim == 3 else 0
        if source_mask is None:
            source_mask = np.ones((n_layers, n_sources), dtype=bool)
        self.source_mask = _asarray("source_mask", source_mask)
        self.group = None if group is None else _as_int("group", group)
        self.expert_logits = None if expert_logits is None else _as_float("expert_logits", expert_logits)
        self.token_index = None if token_index is None else _as_int("token_index", token_index)
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
        logits, labels, routing = self.logits, self.labels, self.routing
        if logits.ndim != 2:
            raise TraceValidationError("logits", f"has rank {logits.ndim}", expected="rank 2 [N, K]")
        if logits.shape[1] < 2:
            raise TraceValidationError("logits", f"has {logits.shape[1]} classes",
                                       expected="at least 2 classes")
        n = logits.shape[0]
        if n == 0:
            raise TraceValidationError("logits", "has no examples (N = 0)",
                                       expected="at least one example")
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
        if 0 in routing.shape[1:]:
            raise TraceValidationError(
                "routing", f"has shape {routing.shape}, with L = {routing.shape[1]} layers and "
                f"S = {routing.shape[2]} sources", expected="at least one layer and one source")
        _check_finite("logits", logits)
        _check_finite("routing", routing)
        bad = (labels < 0) | (labels >= logits.shape[1])
        if bad.any():
            i = _first_index(bad)
            raise TraceValidationError("labels", f"value {int(labels[i])} out of range", index=i,
                                       expected=f"an integer in [0, {logits.shape[1]})")
        _check_distributions(routing, self._checked_mask())
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
        self._check_meta()

    def _checked_mask(self) -> np.ndarray:
        """``source_mask`` as booleans of shape [L, S] with ≥ 1 valid source per layer."""
        mask = self.source_mask
        if mask.dtype != bool:
            if mask.dtype.kind not in "iuf":
                raise TraceValidationError("source_mask", f"has dtype {mask.dtype}",
                                           expected="booleans (or 0/1)")
            with np.errstate(invalid="ignore"):
                bad = (mask != 0) & (mask != 1)
            if bad.any():
                i = _first_index(bad)
                raise TraceValidationError("source_mask", f"value {_value(mask[i])}", index=i,
                                           expected="booleans (or 0/1)")
            self.source_mask = mask = mask.astype(bool)
        routing = self.routing
        if mask.shape != routing.shape[1:]:
            raise TraceValidationError("source_mask", f"has shape {mask.shape}",
                                       expected=f"[L, S] = {routing.shape[1:]} as in routing")
        empty = ~mask.any(axis=1)
        if empty.any():
            raise TraceValidationError("source_mask", "layer has no valid source",
                                       index=_first_index(empty), expected="≥ 1 valid source")
        return mask

    def _check_meta(self) -> None:
        """The meta fields that describe routing layers and sources must fit the routing."""
        meta = self.meta
        n_layers, n_sources = self.routing.shape[1], self.routing.shape[2]
        for name in ("layer_names", "layer_types", "layer_depth"):
            value = getattr(meta, name)
            if value is not None and len(value) != n_layers:
                raise TraceValidationError(
                    f"meta.{name}", f"has {len(value)} {'entry' if len(value) == 1 else 'entries'}",
                    expected=f"one per routing layer: L = {n_layers} as in routing")
        if meta.schedule is not None:
            rows = meta.schedule
            widths = sorted({len(row) for row in rows})
            if len(rows) != n_layers or widths != [n_sources]:
                shape = (f"[{len(rows)}, {widths[0] if widths else 0}]" if len(widths) <= 1
                         else f"{len(rows)} rows of lengths {widths}")
                raise TraceValidationError("meta.schedule", f"has shape {shape}",
                                           expected=f"[L, S] = [{n_layers}, {n_sources}] as in routing")
            schedule = np.asarray(rows, dtype=np.float64)
            bad = ~np.isfinite(schedule) | (schedule < 0)
            if bad.any():
                i = _first_index(bad)
                raise TraceValidationError("meta.schedule", f"value {_value(schedule[i])}", index=i,
                                           expected="finite weights ≥ 0")
        if meta.top_k is not None and not 1 <= meta.top_k <= n_sources:
            raise TraceValidationError("meta.top_k", f"is {meta.top_k}",
                                       expected=f"an integer in [1, {n_sources}]: S = {n_sources} experts")
        if meta.expert_layer is not None and not -n_layers <= meta.expert_layer < n_layers:
            raise TraceValidationError("meta.expert_layer", f"is {meta.expert_layer}",
                                       expected=f"a routing layer in [0, {n_layers})")
        for family, indices in meta.source_families.items():
            for j, source in enumerate(indices):
                if not 0 <= source < n_sources:
                    raise TraceValidationError(
                        f"meta.source_families[{family!r}]", f"names source {source}", index=j,
                        expected=f"source indices in [0, {n_sources}): S = {n_sources} as in routing")

    def row_blocks(self, row_elements: int | None = None) -> list[slice]:
        """Example slices covering all N rows in blocks of a few million elements (of
        routing rows, L × S, unless ``row_elements`` says otherwise): work done block by
        block on memory-mapped traces keeps peak memory O(block), not O(N × L × S)."""
        if row_elements is None:
            row_elements = self.n_layers * self.n_sources
        return row_blocks(self.n_examples, row_elements)

    def require_examples(self, minimum: int, why: str) -> None:
        """Fail with a TraceValidationError when fewer than ``minimum`` examples are present."""
        if self.n_examples < minimum:
            raise TraceValidationError(
                "labels", f"only {self.n_examples} examples", expected=f"at least {minimum} ({why})")

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | bytes | os.PathLike[str], *, force: bool = False) -> Path:
        """Write a trace directory: one ``.npy`` per array and a ``manifest.json``.

        The target must not exist, or be an empty folder. ``force=True`` also replaces a
        previous trace directory (a manifest.json with ``schema_version`` and only the files
        it lists); nothing else is ever replaced or deleted. The files are written and
        synced in a staging folder next to the target, which is then renamed into place (a
        replaced directory is renamed aside first and removed last), so an interruption or
        failure leaves the original untouched and no staging folder behind.
        """
        shown = Path(os.fsdecode(directory))
        target = Path(os.path.abspath(shown))
        meta = self._meta_json()
        old = _existing_save_target(target, shown, force)
        parent = target.parent
        _make_parents(parent, shown)
        try:
            staging = _new_private_dir(parent, f".{target.name}.staging-")
        except OSError as exc:
            raise _os_error(shown, exc, "a folder routeaudit can write", action="written") from None
        try:
            entries = {}
            for name, array in self.arrays().items():
                path = staging / f"{name}.npy"
                with open(path, "xb") as handle:
                    np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
                entries[name] = {"file": path.name, "shape": list(array.shape),
                                 "dtype": str(array.dtype), "sha256": _sha256(path)}
            manifest = {"schema_version": SCHEMA_VERSION, "routeaudit_version": __version__,
                        "meta": meta, "arrays": entries}
            with open(staging / MANIFEST, "x", encoding="utf-8") as handle:
                handle.write(json.dumps(manifest, indent=2, sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(staging)
            if old is not None:
                with contextlib.suppress(OSError):
                    os.chmod(staging, old.mode)
            if old is not None and old.files:
                _swap_in(staging, target, old.files)
            else:  # a new name, or an empty folder, which rename(2) replaces atomically
                os.replace(staging, target)
            _fsync_dir(parent)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)  # holds only what was written above
            if isinstance(exc, OSError):
                raise _os_error(shown, exc, "a folder routeaudit can write", action="written",
                                hint="Nothing was changed") from exc
            raise
        return shown

    def save_npz(self, path: str | bytes | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the plain ``.npz`` interchange file (meta as a JSON string array).

        ``.npz`` is appended to a name without it (as numpy does); the path written is
        returned. An existing file is refused unless ``force=True``; a folder always is. The
        archive is written to a temporary file in the same folder, synced, and then moved
        into place atomically, so the final name never holds a partial file.
        """
        shown = Path(os.fsdecode(path))
        if shown.suffix != ".npz":
            shown = Path(f"{shown}.npz")
        target = Path(os.path.abspath(shown))
        meta = json.dumps(self._meta_json())
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise _os_error(shown, exc, "a new .npz file name", action="written") from None
        except ValueError as exc:  # an embedded NUL byte
            raise TraceFileError(shown, f"is not a usable path ({exc})",
                                 expected="a new .npz file name") from None
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise TraceFileError(shown, "is a folder", expected="a .npz file name",
                                     hint="Choose another name; nothing was written")
            if not force:
                raise TraceFileError(shown, "already exists", expected="a new .npz file name",
                                     hint="Choose a new file name, or pass force=True to replace "
                                          "it; nothing was written")
            if not (stat.S_ISREG(existing.st_mode) or stat.S_ISLNK(existing.st_mode)):
                raise TraceFileError(shown, "is not a regular file", expected="a .npz file name",
                                     hint="Choose another name; nothing was written")
        parent = target.parent
        _make_parents(parent, shown)
        try:
            fd, temp = _new_private_file(parent, f".{target.name}.")
        except OSError as exc:
            raise _os_error(shown, exc, "a folder routeaudit can write", action="written") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez_compressed(handle, allow_pickle=False, meta=np.array(meta), **self.arrays())
                handle.flush()
                os.fsync(handle.fileno())
            if force:
                os.replace(temp, target)
            else:
                _link_no_clobber(temp, target, shown)
            _fsync_dir(parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(exc, OSError):
                raise _os_error(shown, exc, "a folder routeaudit can write", action="written",
                                hint="Nothing was changed") from exc
            raise
        return shown

    def _meta_json(self) -> dict[str, Any]:
        """The meta as JSON-ready data; a field that JSON cannot hold is a TraceValidationError."""
        try:
            meta = self.meta.model_dump(mode="json")
            json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TraceValidationError(
                "meta", f"cannot be written as JSON ({_exc_text(exc)})",
                expected="JSON values only: strings, numbers, booleans, lists and objects") from None
        return meta

    @classmethod
    def load(cls, path: str | bytes | os.PathLike[str], *, mmap: bool | None = None) -> TraceSet:
        """Load a trace directory or an ``.npz`` file, validating everything.

        Any problem with the file (missing, unreadable, damaged, pickled, not what its name
        says) is a TraceFileError; arrays or meta that break the contract are a
        TraceValidationError naming the field and the file.

        ``mmap`` (trace directories only; ``.npz`` members are compressed and always read):
        None maps the array files of at least 64 MiB read-only instead of reading them, so
        routing larger than memory can be audited; True maps every array, False none. A
        mapped trace directory must not be changed while the TraceSet is in use.
        """
        path = Path(os.fsdecode(path))
        what = "a trace directory (with manifest.json) or a .npz file"
        info = _stat(path, what)
        if stat.S_ISDIR(info.st_mode):
            if path.suffix == ".npz" and not os.path.lexists(path / MANIFEST):
                raise TraceFileError(path, "is a folder, not a .npz file", expected=what)
            return cls._load_directory(path, mmap)
        if path.suffix == ".npz":
            return cls._load_npz(path)
        if path.name == MANIFEST:
            raise TraceFileError(path, "is the manifest of a trace directory", expected=what,
                                 hint=f"Pass its folder instead: {show_path(path.parent)}")
        if path.suffix == ".npy":
            raise TraceFileError(path, "is a single .npy array", expected=what, hint=_SAVE_HINT)
        raise TraceFileError(path, "is neither a trace directory nor a .npz file", expected=what)

    @classmethod
    def _from_file(cls, path: Path, arrays: dict[str, np.ndarray], meta: Any) -> TraceSet:
        try:
            return cls(**arrays, meta=meta)
        except TraceValidationError as exc:
            raise exc.with_source(path) from None

    @classmethod
    def _load_npz(cls, path: Path) -> TraceSet:
        with _open_regular(path, _NPZ_EXPECTED) as handle:
            size = _file_size(handle, path)
            head = _read_some(handle, 8, path)
            if not head.startswith(b"PK"):
                problem, hint = _not_a_zip(head, size)
                raise TraceFileError(path, problem, expected=_NPZ_EXPECTED, hint=hint)
            try:
                handle.seek(0)
                archive = zipfile.ZipFile(handle)
            except _PARSE_ERRORS as exc:
                raise TraceFileError(path, f"is not a readable .npz (zip) archive ({_exc_text(exc)})",
                                     expected=_NPZ_EXPECTED, hint=_REWRITE) from None
            with archive:
                members = _npz_members(archive, path, size)
                keys = set(members)
                missing = [k for k in REQUIRED_ARRAYS if k not in keys]
                if missing:
                    raise TraceValidationError(missing[0], f"missing from {show_path(path.name)}",
                                               expected=f"keys {', '.join(REQUIRED_ARRAYS)}")
                unknown = keys - set(ARRAY_NAMES) - {"meta"}
                if unknown:
                    raise TraceValidationError(sorted(unknown)[0], "unknown key in .npz",
                                               expected=f"only {', '.join(ARRAY_NAMES)} and meta",
                                               source=path)
                arrays = {key: _read_member(archive, members[key], path)
                          for key in sorted(keys - {"meta"})}
                meta = (_read_npz_meta(archive, members["meta"], path) if "meta" in keys
                        else {"name": show_path(path.stem)})
        return cls._from_file(path, arrays, meta)

    @classmethod
    def _load_directory(cls, path: Path, mmap: bool | None = None) -> TraceSet:
        entries, meta = _read_manifest(path)
        arrays = {name: _read_listed_npy(path, name, entry, mmap=mmap)
                  for name, entry in entries.items()}
        return cls._from_file(path, arrays, meta)


# ------------------------------------------------------------------------------ array helpers
def _asarray(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise TraceValidationError(name, f"cannot be made an array ({_exc_text(exc)})",
                                   expected="a rectangular numeric array") from None


def _as_float(name: str, value: Any) -> np.ndarray:
    array = _asarray(name, value)
    if array.dtype.kind not in "fiu":
        raise TraceValidationError(name, f"has dtype {array.dtype}", expected="a float array")
    if array.dtype.kind != "f":
        array = array.astype(np.float32)
    return array


def _as_int(name: str, value: Any, *, expected: str = "integers") -> np.ndarray:
    """int64 values; a value that is not an integer, or does not fit in int64, is reported as
    given (never after a wrapping conversion)."""
    array = _asarray(name, value)
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.int64)
    if kind in "iu":
        if kind == "u" and array.dtype.itemsize >= 8:
            big = array > np.iinfo(np.int64).max
            if big.any():
                i = _first_index(big)
                raise TraceValidationError(name, f"value {_value(array[i])} does not fit in int64",
                                           index=i, expected=expected)
        return array.astype(np.int64, copy=False)
    if kind == "f":
        with np.errstate(invalid="ignore"):
            bad = (~np.isfinite(array) | (array != np.round(array))
                   | (np.abs(array.astype(np.float64)) >= 2.0**63))
        if bad.any():
            i = _first_index(bad)
            raise TraceValidationError(name, f"non-integer value {_value(array[i])}", index=i,
                                       expected=expected)
        return array.astype(np.int64)
    raise TraceValidationError(name, f"has dtype {array.dtype}", expected="an integer array")


def _blocks(array: np.ndarray) -> list[slice]:
    """Row slices of ``array`` (by its first axis) of a few million elements each."""
    return row_blocks(array.shape[0], int(np.prod(array.shape[1:], dtype=np.int64)))


def _shifted(index: tuple[int, ...] | int, start: int) -> tuple[int, ...] | int:
    """An index into a block of rows as an index into the whole array."""
    if isinstance(index, int):
        return index + start
    return (index[0] + start, *index[1:])


def _check_finite(name: str, array: np.ndarray) -> None:
    """Block by block (``array`` has rank ≥ 1), so a memory-mapped array is never copied whole."""
    for rows in _blocks(array):
        block = array[rows]
        bad = ~np.isfinite(block)
        if bad.any():
            i = _first_index(bad)
            raise TraceValidationError(name, f"non-finite value {_value(block[i])}",
                                       index=_shifted(i, rows.start),
                                       expected="finite numbers (no NaN or inf)")


def _check_distributions(routing: np.ndarray, mask: np.ndarray) -> None:
    """Routing rows are distributions over the valid sources: weights ≥ 0, none on a masked
    source, each [example, layer] row summing to 1 within ROUTING_ROW_TOLERANCE. One pass in
    row blocks (peak memory O(block), even for memory-mapped routing); the error reported is
    the one a whole-array check gives: the first kind that fails, at its first index."""
    first: dict[str, tuple[Any, float]] = {}
    for rows in _blocks(routing):
        block = routing[rows]
        checks = (("negative", block < 0),
                  ("off_mask", (block > ROUTING_ROW_TOLERANCE) & ~mask[None]))
        for kind, bad in checks:
            if kind not in first and bad.any():
                first[kind] = (_shifted(_first_index(bad), rows.start), 0.0)
        if "sums" not in first:
            sums = np.where(mask[None], block, 0.0).sum(axis=2, dtype=np.float64)
            off = np.abs(sums - 1.0) > ROUTING_ROW_TOLERANCE
            if off.any():
                i = _first_index(off)
                first["sums"] = (_shifted(i, rows.start), float(sums[i]))
        if "negative" in first:
            break  # the first kind checked: nothing later can be reported before it
    if "negative" in first:
        raise TraceValidationError("routing", "negative weight", index=first["negative"][0],
                                   expected="weights ≥ 0")
    if "off_mask" in first:
        raise TraceValidationError("routing", "weight on a source that source_mask marks invalid",
                                   index=first["off_mask"][0], expected="0 on masked sources")
    if "sums" in first:
        index, total = first["sums"]
        raise TraceValidationError(
            "routing", f"row sums to {total:.6g} over valid sources", index=index,
            expected=f"1 within {ROUTING_ROW_TOLERANCE} (index is [example, layer])")


