"""Reading traces from files that are untrusted input (``.npz`` archives, ``.npy`` files,
trace directories with a manifest): headers are parsed from bounded buffers and every
declared size is checked against the bytes present before anything is allocated; pickles
are refused. Whatever a file holds, the result is arrays or a RouteAuditError naming it.

A sharded trace directory (``torchrun ... routeaudit extract``, routeaudit.model.shards)
has a ``shards`` object in its manifest naming one shard manifest per rank; every shard
manifest gets the same scrutiny, and the per-example arrays are joined back in batch order
(batch i is batch i // world_size of shard i % world_size), so the result does not depend
on how many processes wrote it."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from routeaudit.errors import TraceFileError, TraceValidationError, show_path
from routeaudit.traces._common import (
    _CHUNK,
    _DIR_EXPECTED,
    _NPZ_EXPECTED,
    _PARSE_ERRORS,
    _PICKLE_HINT,
    _PICKLE_PROBLEM,
    _REWRITE,
    _SAVE_HINT,
    ARRAY_NAMES,
    MANIFEST,
    MAX_DEFLATE_RATIO,
    MAX_JSON_BYTES,
    MAX_NPY_HEADER,
    MMAP_MIN_BYTES,
    REQUIRED_ARRAYS,
    SCHEMA_VERSION,
    _brief,
    _exc_text,
    _file_size,
    _open_regular,
    _os_error,
    _read_some,
    _sha256_of,
)


def _not_a_zip(head: bytes, size: int) -> tuple[str, str]:
    """What a file that should be a ``.npz`` looks like instead, and what to do."""
    if size == 0:
        return "is empty (0 bytes)", _REWRITE
    if head.startswith(b"\x93NUMPY"):
        return "is a single .npy array, not a .npz archive (a .npy file renamed .npz?)", _SAVE_HINT
    if head[:1] == b"\x80":
        return ("is a Python pickle, not a .npz archive; routeaudit never loads pickles, it reads "
                "only plain numeric arrays"), _SAVE_HINT
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed data, not a .npz archive", _SAVE_HINT
    try:
        text = head.decode("utf-8")
        printable = all(c.isprintable() or c in "\t\r\n" for c in text)
    except UnicodeDecodeError:
        printable = False
    if printable:
        return ("is a text file, not a .npz archive; routeaudit reads numeric arrays, not text",
                "Convert the text to arrays and " + _SAVE_HINT[0].lower() + _SAVE_HINT[1:])
    return f"is not a .npz (zip) archive: it starts with bytes {head.hex(' ')}", _REWRITE


def _npz_members(archive: zipfile.ZipFile, path: Path, disk_size: int) -> dict[str, zipfile.ZipInfo]:
    """The ``.npy`` members of a ``.npz`` by key, each checked against the archive's size."""
    members: dict[str, zipfile.ZipInfo] = {}
    infos = archive.infolist()
    if not infos:
        raise TraceFileError(path, "is an empty .npz archive (it holds no arrays)",
                             expected=_NPZ_EXPECTED, hint=_SAVE_HINT)
    for info in infos:
        name = info.filename
        if info.is_dir() or not name.endswith(".npy"):
            raise TraceFileError(path, f"holds {name!r}, which is not an .npy array",
                                 expected=f"{_NPZ_EXPECTED} (only .npy members)")
        key = name[: -len(".npy")]
        if key in members:
            raise TraceFileError(path, f"holds {name!r} twice", expected=_NPZ_EXPECTED, hint=_REWRITE)
        if info.flag_bits & 0x1:
            raise TraceFileError(path, f"member {name!r} is encrypted", expected=_NPZ_EXPECTED)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise TraceFileError(path, f"member {name!r} uses zip compression method "
                                 f"{info.compress_type}",
                                 expected="stored or deflated members, as numpy.savez and "
                                          "numpy.savez_compressed write")
        if info.header_offset + info.compress_size > disk_size:
            raise TraceFileError(
                path, f"member {name!r} declares {info.compress_size:,} bytes at offset "
                f"{info.header_offset:,}, past the end of the {disk_size:,}-byte file",
                expected=_NPZ_EXPECTED, hint=_REWRITE)
        most = (info.compress_size if info.compress_type == zipfile.ZIP_STORED
                else info.compress_size * MAX_DEFLATE_RATIO + 1024)
        if info.file_size > most:
            raise TraceFileError(
                path, f"member {name!r} declares {info.file_size:,} bytes uncompressed from "
                f"{info.compress_size:,} compressed bytes, more than the data can hold",
                expected=_NPZ_EXPECTED, hint=_REWRITE)
        members[key] = info
    return members


class _Header(NamedTuple):
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    count: int
    nbytes: int


def _read_npy_header(handle: BinaryIO, available: int, where: object) -> _Header:
    """Parse an ``.npy`` header from ``handle`` (left at the first data byte) and check that
    the data it declares is exactly the ``available - header`` bytes that follow, before
    anything is allocated. Pickled (object) arrays are refused here."""
    expected = "an .npy array written by numpy (format 1.0 or 2.0)"
    magic = _read_some(handle, 8, where)
    if len(magic) < 8 or not magic.startswith(b"\x93NUMPY"):
        if not magic:
            problem = "is empty (0 bytes)"
        elif b"\x93NUMPY".startswith(magic[:6]):
            problem = "is truncated inside its .npy header"
        else:
            problem = "is not an .npy array (it does not start with the .npy magic bytes)"
        raise TraceFileError(where, problem, expected=expected, hint=_REWRITE)
    major, minor = magic[6], magic[7]
    if (major, minor) not in ((1, 0), (2, 0)):
        raise TraceFileError(where, f"has .npy format version {major}.{minor}",
                             expected="format 1.0 or 2.0 (plain numeric arrays)", hint=_REWRITE)
    width = 2 if major == 1 else 4
    raw = _read_some(handle, width, where)
    length = int.from_bytes(raw, "little") if len(raw) == width else -1
    start = 8 + width
    if length < 0 or start + length > available:
        raise TraceFileError(where, "is truncated inside its .npy header", expected=expected,
                             hint=_REWRITE)
    if length > MAX_NPY_HEADER:
        raise TraceFileError(where, f"has an .npy header of {length:,} bytes",
                             expected=f"at most {MAX_NPY_HEADER:,} (numpy's safe limit)",
                             hint=_REWRITE)
    text = _read_some(handle, length, where)
    stream = io.BytesIO(magic + raw + text)  # parse from a bounded buffer, never the file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's note on Python 2 headers
            np.lib.format.read_magic(stream)
            reader = (np.lib.format.read_array_header_1_0 if major == 1
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(stream, max_header_size=MAX_NPY_HEADER)
    except _PARSE_ERRORS as exc:
        raise TraceFileError(where, f"has a damaged .npy header ({_exc_text(exc)})",
                             expected=expected, hint=_REWRITE) from None
    if dtype.hasobject:
        raise TraceFileError(where, _PICKLE_PROBLEM, hint=_PICKLE_HINT)
    if dtype.kind not in "biufcUS" or dtype.fields is not None or dtype.subdtype is not None:
        raise TraceFileError(where, f"holds an array of dtype {dtype}",
                             expected="a plain numeric array (bool, integer or float)",
                             hint=_PICKLE_HINT)
    if dtype.itemsize == 0 or any(d < 0 for d in shape):
        raise TraceFileError(where, f"declares shape {shape} of dtype {dtype}",
                             expected=expected, hint=_REWRITE)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    left = available - start - length
    if nbytes != left:
        if nbytes > left:
            problem = (f"declares shape {shape} of {dtype} ({nbytes:,} bytes), but only {left:,} "
                       "bytes follow its header")
        else:
            problem = (f"has {left - nbytes:,} bytes more than the {nbytes:,} its header declares "
                       f"(shape {shape} of {dtype})")
        raise TraceFileError(where, problem, expected=expected, hint=_REWRITE)
    return _Header(tuple(shape), bool(fortran), dtype, count, nbytes)


def _read_npy_data(handle: BinaryIO, header: _Header, where: object) -> np.ndarray:
    """The array data after a checked header (exactly ``header.nbytes`` bytes)."""
    _check_memory(header.nbytes, where)
    try:
        buffer = bytearray(header.nbytes)
    except MemoryError:
        raise TraceFileError(where, f"needs {header.nbytes:,} bytes of memory, which could not be "
                             "allocated", expected="an array that fits in memory") from None
    view = memoryview(buffer)
    got = 0
    try:
        while got < header.nbytes:
            n = handle.readinto(view[got: got + _CHUNK])
            if not n:
                break
            got += n
    except OSError as exc:
        raise _os_error(where, exc, "a readable file") from None
    finally:
        view.release()
    if got != header.nbytes:
        raise TraceFileError(where, f"ended after {got:,} of the {header.nbytes:,} data bytes its "
                             "header declares", expected="a complete .npy array", hint=_REWRITE)
    array = np.frombuffer(buffer, dtype=header.dtype, count=header.count)
    return array.reshape(header.shape, order="F" if header.fortran else "C")


def _check_memory(nbytes: int, where: object) -> None:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if physical > 0 and nbytes > physical:
        raise TraceFileError(where, f"holds an array of {nbytes:,} bytes, more than this machine's "
                             f"{physical:,} bytes of memory", expected="an array that fits in memory")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One ``.npy`` member of a ``.npz``, its size checked before allocation, its CRC after."""
    where = f"{show_path(path)} (member {info.filename!r})"
    try:
        with archive.open(info) as member:
            header = _read_npy_header(member, info.file_size, where)
            array = _read_npy_data(member, header, where)
            if member.read(1):  # reading to the end also checks the CRC
                raise TraceFileError(where, "holds more data than the zip declares",
                                     expected=_NPZ_EXPECTED, hint=_REWRITE)
    except _PARSE_ERRORS as exc:
        raise TraceFileError(where, f"cannot be read ({_exc_text(exc)})", expected=_NPZ_EXPECTED,
                             hint=_REWRITE) from None
    return array


def _read_npz_meta(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Any:
    """The JSON meta string of a ``.npz`` (parsed; TraceMeta checks what it holds)."""
    where = f"{show_path(path)} (member {info.filename!r})"
    expected = "a JSON string, as TraceSet.save_npz writes"
    try:
        with archive.open(info) as member:
            header = _read_npy_header(member, info.file_size, where)
            if header.dtype.kind not in "US" or header.count != 1:
                raise TraceValidationError("meta", f"is an array of dtype {header.dtype} and shape "
                                           f"{header.shape}", expected=expected, source=path)
            if header.nbytes > MAX_JSON_BYTES:
                raise TraceValidationError("meta", f"is a string of {header.nbytes:,} bytes",
                                           expected=f"at most {MAX_JSON_BYTES:,}", source=path)
            value = _read_npy_data(member, header, where).reshape(-1)[0].item()
    except _PARSE_ERRORS as exc:
        raise TraceFileError(where, f"cannot be read ({_exc_text(exc)})", expected=_NPZ_EXPECTED,
                             hint=_REWRITE) from None
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TraceValidationError("meta", f"is not a JSON string ({_exc_text(exc)})",
                                   expected=expected, source=path) from None


def _read_manifest(directory: Path) -> tuple[dict[str, dict[str, Any]], Any]:
    """The checked array entries and the meta of a trace directory's manifest.json."""
    path = directory / MANIFEST
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise TraceFileError(directory, "has no manifest.json, so it is not a trace directory",
                             expected=f"{_DIR_EXPECTED}, or a .npz file") from None
    except OSError as exc:  # e.g. a folder without read/search permission
        raise _os_error(directory, exc, _DIR_EXPECTED) from None
    expected = f"the manifest.json of {_DIR_EXPECTED}"
    manifest = _read_json(path, expected)
    if not isinstance(manifest, dict):
        raise TraceFileError(path, f"holds {_brief(manifest)}",
                             expected="a JSON object with schema_version, meta and arrays")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise TraceFileError(path, f"has schema_version {_brief(version)}",
                             expected=f"schema_version {SCHEMA_VERSION}",
                             hint="Write the traces again with this version of routeaudit")
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        found = "has no \"arrays\"" if arrays is None else f"has \"arrays\" {_brief(arrays)}"
        raise TraceFileError(path, found, expected="\"arrays\": an object of "
                             "{name: {file, shape, dtype, sha256}}", hint=_REWRITE)
    entries = {}
    files: dict[str, str] = {MANIFEST: "the manifest"}
    for name, entry in arrays.items():
        entries[name] = _check_entry(path, name, entry)
        _claim_file(path, files, entries[name]["file"], repr(name))
    if "shards" in manifest:
        for name, entry in _read_shards(directory, path, manifest["shards"], files).items():
            if name in entries:
                raise TraceFileError(path, f"lists {name!r} both in \"arrays\" and in its shards",
                                     expected="per-example arrays in the shards only", hint=_REWRITE)
            entries[name] = entry
    for name in REQUIRED_ARRAYS:
        if name not in entries:
            raise TraceValidationError(name, f"missing from {MANIFEST}",
                                       expected=f"arrays {', '.join(REQUIRED_ARRAYS)}",
                                       source=directory)
    return entries, manifest.get("meta", {})


def _read_json(path: Path, expected: str) -> Any:
    return _parse_json(path, _read_json_bytes(path, expected), expected)


def _read_json_bytes(path: Path, expected: str) -> bytes:
    """The bytes of a small JSON file, its size checked before reading."""
    with _open_regular(path, expected) as handle:
        size = _file_size(handle, path)
        if size > MAX_JSON_BYTES:
            raise TraceFileError(path, f"is {size:,} bytes", expected=f"{expected} "
                                 f"(at most {MAX_JSON_BYTES:,} bytes)")
        # read what the file holds (plus one byte, should it have grown), never a buffer of
        # MAX_JSON_BYTES: Python allocates the whole requested size up front
        return _read_some(handle, size + 1, path)


def _parse_json(path: Path, raw: bytes, expected: str) -> Any:
    if not raw:
        raise TraceFileError(path, "is empty (0 bytes)", expected=expected, hint=_REWRITE)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TraceFileError(path, f"is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})",
                             expected=expected, hint=_REWRITE) from None
    except (ValueError, RecursionError) as exc:
        raise TraceFileError(path, f"is not valid JSON ({_exc_text(exc)})", expected=expected,
                             hint=_REWRITE) from None


def _check_entry(path: Path, name: Any, entry: Any) -> dict[str, Any]:
    """One ``arrays`` entry of a manifest: a known array, a plain file name in the directory,
    a shape, a dtype and a sha256 digest."""
    shape_of = "an object with file, shape, dtype and sha256"
    if name not in ARRAY_NAMES:
        raise TraceFileError(path, f"lists an unknown array {_brief(name)}",
                             expected=f"only {', '.join(ARRAY_NAMES)}")
    if not isinstance(entry, dict):
        raise TraceFileError(path, f"entry {name!r} is {_brief(entry)}", expected=shape_of)
    missing = [key for key in ("file", "shape", "dtype", "sha256") if key not in entry]
    if missing:
        raise TraceFileError(path, f"entry {name!r} has no {', '.join(missing)}", expected=shape_of,
                             hint=_REWRITE)
    file = entry["file"]
    if not (isinstance(file, str) and _plain_name(file)):
        raise TraceFileError(path, f"entry {name!r} names the file {_brief(file)}, which is not a "
                             "plain file name inside the trace directory",
                             expected="a name such as logits.npy (no folder, no '..', no absolute path)")
    digest = entry["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise TraceFileError(path, f"entry {name!r} has sha256 {_brief(digest)}",
                             expected="64 lower-case hex digits", hint=_REWRITE)
    shape = entry["shape"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise TraceFileError(path, f"entry {name!r} has shape {_brief(shape)}",
                             expected="a list of non-negative integers", hint=_REWRITE)
    if not isinstance(entry["dtype"], str):
        raise TraceFileError(path, f"entry {name!r} has dtype {_brief(entry['dtype'])}",
                             expected="a dtype name such as float32", hint=_REWRITE)
    return entry


def _plain_name(file: str) -> bool:
    """A file name that stays inside its directory: no separators, no '..', not absolute."""
    return (file not in ("", ".", "..") and "/" not in file and "\\" not in file
            and "\x00" not in file and not os.path.isabs(file) and os.path.basename(file) == file)


def _claim_file(path: Path, files: dict[str, str], file: str, label: str) -> None:
    """Record that ``label`` uses ``file``; a file listed twice is a damaged manifest."""
    if file in files:
        raise TraceFileError(path, f"lists {file!r} for both {files[file]} and {label}",
                             expected="one file per array", hint=_REWRITE)
    files[file] = label


# ------------------------------------------------------------------------------ sharded directories
#: The one way batches are assigned to ranks: batch i is batch i // world_size of rank i % world_size.
SHARD_ASSIGNMENT = "round-robin batches"
#: More shards than this is a damaged manifest, not a real run.
MAX_SHARDS = 1 << 16
_SHARDS_EXPECTED = ("\"shards\": {\"assignment\": \"round-robin batches\", \"world_size\": N, "
                    "\"files\": [{\"file\", \"sha256\"} per rank]}")
_SHARD_EXPECTED = ("a shard manifest written by sharded `routeaudit extract`: rank, world_size, "
                   "batch_rows and arrays")


def _read_shards(directory: Path, path: Path, shards: Any, files: dict[str, str]
                 ) -> dict[str, dict[str, Any]]:
    """The joined entries of the per-example arrays a sharded manifest's shards hold.

    Each shard manifest is read like the top one (size-checked JSON, its sha256 checked
    against the top manifest), its entries like any entry; the shards must agree on which
    arrays exist and on their dtype and trailing shape, and each rank's batch count must be
    what round-robin assignment of the total gives it. Nothing is allocated here.
    """
    if not isinstance(shards, dict):
        raise TraceFileError(path, f"has \"shards\" {_brief(shards)}", expected=_SHARDS_EXPECTED,
                             hint=_REWRITE)
    if shards.get("assignment") != SHARD_ASSIGNMENT:
        raise TraceFileError(path, f"has shard assignment {_brief(shards.get('assignment'))}",
                             expected=f"{SHARD_ASSIGNMENT!r}, the only one this version reads",
                             hint="Write the traces again with this version of routeaudit")
    world = shards.get("world_size")
    listed = shards.get("files")
    if type(world) is not int or not 1 <= world <= MAX_SHARDS:
        raise TraceFileError(path, f"has shard world_size {_brief(world)}",
                             expected=f"an integer in [1, {MAX_SHARDS}]", hint=_REWRITE)
    if not isinstance(listed, list) or len(listed) != world:
        raise TraceFileError(path, f"has shard files {_brief(listed)}",
                             expected=f"a list of world_size = {world} entries", hint=_REWRITE)
    parts: list[tuple[list[int], dict[str, dict[str, Any]]]] = []
    for rank, item in enumerate(listed):
        if not (isinstance(item, dict) and isinstance(item.get("file"), str)
                and _plain_name(item["file"]) and _is_digest(item.get("sha256"))):
            raise TraceFileError(path, f"shard {rank} is {_brief(item)}",
                                 expected="{\"file\": a plain file name, \"sha256\": 64 hex digits}",
                                 hint=_REWRITE)
        _claim_file(path, files, item["file"], f"shard {rank}")
        parts.append(_read_shard(directory, item, rank, world, files))
    n_batches = sum(len(rows) for rows, _ in parts)
    first = parts[0][1]
    for rank, (rows, arrays) in enumerate(parts):
        where = directory / listed[rank]["file"]
        want = n_batches // world + (rank < n_batches % world)
        if len(rows) != want:
            raise TraceFileError(where, f"has {len(rows)} batches", expected=f"{want}: rank {rank} of "
                                 f"{world} under round-robin assignment of {n_batches} batches",
                                 hint=_REWRITE)
        if set(arrays) != set(first):
            raise TraceFileError(where, f"holds arrays {sorted(arrays)}",
                                 expected=f"{sorted(first)}, as shard 0", hint=_REWRITE)
        for name, entry in arrays.items():
            if entry["dtype"] != first[name]["dtype"] or entry["shape"][1:] != first[name]["shape"][1:]:
                raise TraceFileError(where, f"entry {name!r} has shape {entry['shape']} dtype "
                                     f"{entry['dtype']}", expected=f"dtype {first[name]['dtype']} and "
                                     f"shape [*, {', '.join(map(str, first[name]['shape'][1:]))}] as in "
                                     "shard 0", hint=_REWRITE)
    return {name: {"shape": [sum(arrays[name]["shape"][0] for _, arrays in parts),
                             *entry["shape"][1:]],
                   "dtype": entry["dtype"], "parts": [arrays[name] for _, arrays in parts],
                   "batch_rows": [rows for rows, _ in parts]}
            for name, entry in first.items()}


def _read_shard(directory: Path, item: dict[str, Any], rank: int, world: int,
                files: dict[str, str]) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """One shard manifest: its digest, then rank, world_size, batch_rows and array entries."""
    path = directory / item["file"]
    raw = _read_json_bytes(path, _SHARD_EXPECTED)
    if hashlib.sha256(raw).hexdigest() != item["sha256"]:
        raise TraceFileError(path, f"does not match the sha256 that {MANIFEST} lists for shard {rank}",
                             expected="an unmodified shard manifest", hint=_REWRITE)
    shard = _parse_json(path, raw, _SHARD_EXPECTED)
    if not isinstance(shard, dict):
        raise TraceFileError(path, f"holds {_brief(shard)}", expected=_SHARD_EXPECTED, hint=_REWRITE)
    for key, want in (("rank", rank), ("world_size", world)):
        if type(shard.get(key)) is not int or shard[key] != want:
            raise TraceFileError(path, f"has {key} {_brief(shard.get(key))}",
                                 expected=f"{want}, as {MANIFEST} lists it", hint=_REWRITE)
    rows = shard.get("batch_rows")
    if not (isinstance(rows, list) and rows and all(type(n) is int and n >= 0 for n in rows)):
        raise TraceFileError(path, f"has batch_rows {_brief(rows)}",
                             expected="a non-empty list of row counts, one per batch", hint=_REWRITE)
    arrays = shard.get("arrays")
    if not isinstance(arrays, dict):
        raise TraceFileError(path, f"has \"arrays\" {_brief(arrays)}",
                             expected="an object of {name: {file, shape, dtype, sha256}}", hint=_REWRITE)
    entries = {}
    for name, entry in arrays.items():
        entries[name] = _check_entry(path, name, entry)
        if name == "source_mask":
            raise TraceFileError(path, "lists 'source_mask', which is not per example",
                                 expected=f"source_mask in {MANIFEST} only", hint=_REWRITE)
        _claim_file(path, files, entries[name]["file"], f"{name!r} of shard {rank}")
        shape = entries[name]["shape"]
        if not shape or shape[0] != sum(rows):
            raise TraceFileError(path, f"entry {name!r} has shape {shape}",
                                 expected=f"{sum(rows)} rows, the sum of its batch_rows", hint=_REWRITE)
    return rows, entries


def _is_digest(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _read_joined(directory: Path, name: str, entry: dict[str, Any]) -> np.ndarray:
    """A per-example array of a sharded directory, rows back in batch order.

    Every part's header is checked against its manifest entry and its file size before the
    joined array is allocated; then the parts are read (digest checked) one at a time.
    """
    parts, batch_rows = entry["parts"], entry["batch_rows"]
    for part in parts:
        file = directory / part["file"]
        with _open_regular(file, f"the .npy file of {name!r} that a shard manifest lists") as handle:
            header = _read_npy_header(handle, _file_size(handle, file), file)
        if list(header.shape) != part["shape"] or str(header.dtype) != part["dtype"]:
            raise TraceValidationError(
                name, f"has shape {header.shape} dtype {header.dtype} in {show_path(file.name)}",
                expected=f"shape {part['shape']} dtype {part['dtype']} as in its shard manifest",
                source=directory)
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    _check_memory(math.prod(shape) * dtype.itemsize, directory)
    joined = np.empty(shape, dtype=dtype)
    world = len(parts)
    starts = _batch_starts(batch_rows)
    for rank, part in enumerate(parts):
        data = _read_listed_npy(directory, name, part)
        local = 0
        for k, rows in enumerate(batch_rows[rank]):
            where = starts[k * world + rank]
            joined[where: where + rows] = data[local: local + rows]
            local += rows
        del data
    return joined


def _batch_starts(batch_rows: list[list[int]]) -> list[int]:
    """The first joined row of each global batch (batch i comes from rank i % world_size)."""
    world = len(batch_rows)
    total = sum(len(rows) for rows in batch_rows)
    starts, at = [], 0
    for i in range(total):
        starts.append(at)
        at += batch_rows[i % world][i // world]
    return starts


def _map_npy_data(file: Path, offset: int, header: _Header) -> np.ndarray:
    """The data of a checked ``.npy`` file as a read-only memory map (nothing is read now;
    pages come from the file as they are used). The header was checked against the file's
    size, so the map covers exactly the declared bytes."""
    try:
        mapped = np.memmap(file, dtype=header.dtype, mode="r", offset=offset, shape=header.shape,
                           order="F" if header.fortran else "C")
    except (OSError, ValueError) as exc:
        raise TraceFileError(file, f"cannot be memory-mapped ({_exc_text(exc)})",
                             expected="a readable .npy file on a file system that supports mmap",
                             hint=_REWRITE) from None
    return mapped


def _wants_map(mmap: bool | None, header: _Header) -> bool:
    """Whether to map rather than read: ``mmap`` when given, else large arrays only."""
    if header.nbytes == 0:  # an empty map is an error in mmap(2)
        return False
    return header.nbytes >= MMAP_MIN_BYTES if mmap is None else mmap


def _read_listed_npy(directory: Path, name: str, entry: dict[str, Any], *,
                     mmap: bool | None = None) -> np.ndarray:
    """One array file of a trace directory: digest, then header, then manifest, then data
    (a per-example array of a sharded directory: its shards, joined in batch order).

    ``mmap``: True maps the data read-only (np.memmap) after every check, False reads it,
    None (default) maps arrays of at least MMAP_MIN_BYTES. Joined shards are always read.
    A mapped file must not be changed while the traces are in use."""
    if "parts" in entry:
        return _read_joined(directory, name, entry)
    file = directory / entry["file"]
    with _open_regular(file, f"the .npy file of {name!r} that manifest.json lists") as handle:
        size = _file_size(handle, file)
        if _sha256_of(handle, file) != entry["sha256"]:
            raise TraceValidationError(name, f"sha256 of {show_path(file.name)} does not match manifest",
                                       expected="an unmodified array file", source=directory)
        handle.seek(0)
        header = _read_npy_header(handle, size, file)
        if list(header.shape) != entry["shape"] or str(header.dtype) != entry["dtype"]:
            raise TraceValidationError(
                name, f"has shape {header.shape} dtype {header.dtype}",
                expected=f"shape {entry['shape']} dtype {entry['dtype']} as in manifest",
                source=directory)
        if _wants_map(mmap, header):
            return _map_npy_data(file, handle.tell(), header)
        return _read_npy_data(handle, header, file)


