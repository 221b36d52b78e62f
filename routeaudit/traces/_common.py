"""What the trace modules share: the contract's names and limits, and turning what the
operating system or a hostile file raises into errors that name the file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import reprlib
import stat
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from routeaudit.errors import TraceFileError, show_path

SCHEMA_VERSION = 1
ROUTING_ROW_TOLERANCE = 1e-3
OPTIONAL_ARRAYS = ("source_mask", "group", "expert_logits", "token_index")
REQUIRED_ARRAYS = ("logits", "labels", "routing")
ARRAY_NAMES = REQUIRED_ARRAYS + OPTIONAL_ARRAYS
MANIFEST = "manifest.json"

#: A manifest or a ``.npz`` meta string larger than this is refused (real ones are kilobytes).
MAX_JSON_BYTES = 64 << 20
#: numpy's own limit for parsing an ``.npy`` header safely (``numpy.load`` default).
MAX_NPY_HEADER = 10_000
#: Deflate cannot expand data by more than about 1032:1, so a zip member that declares more
#: is lying about its size (a zip bomb or corruption).
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 24
#: Uncompressed ``.npy`` files of a trace directory at least this large are memory-mapped
#: (read-only) instead of read into memory, so N x L x S routing need not fit in RAM.
MMAP_MIN_BYTES = 64 << 20
#: Elements per row block when validating or summarising [N, ...] arrays block by block: peak
#: memory stays O(block) however large N is (4M elements: 32 MB as float64).
BLOCK_ELEMENTS = 1 << 22

_NPZ_EXPECTED = "a .npz file written by TraceSet.save_npz or numpy.savez"
_DIR_EXPECTED = "a trace directory written by TraceSet.save or `routeaudit extract`"
_REWRITE = "The file is damaged or incomplete: write it again (TraceSet.save / save_npz)"
_PICKLE_PROBLEM = ("holds Python objects (pickle), which routeaudit never loads: it reads only "
                   "plain numeric arrays")
_PICKLE_HINT = ("Store numbers instead, e.g. np.asarray(values, dtype=np.float32) for logits and "
                "routing and dtype=np.int64 for labels")
_SAVE_HINT = ("Save all arrays together with TraceSet.save_npz(path) or "
              "numpy.savez(path, logits=..., labels=..., routing=...)")

#: Everything parsing a hostile file can raise from the standard library or numpy.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, SyntaxError,
                 RuntimeError, MemoryError, EOFError, NotImplementedError, OSError, struct.error,
                 zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile, tokenize.TokenError)

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4
_repr.maxlevel = 2


def _first_index(bad: np.ndarray) -> tuple[int, ...] | int:
    """Index of the first True entry of a boolean array, as an int for 1-D arrays."""
    where = np.argwhere(bad)[0]
    return int(where[0]) if where.size == 1 else tuple(int(i) for i in where)



def row_blocks(n_rows: int, row_elements: int, block_elements: int | None = None) -> list[slice]:
    """Consecutive row slices covering ``range(n_rows)``, each about ``block_elements``
    (default BLOCK_ELEMENTS) elements of rows of ``row_elements`` (at least one row)."""
    size = BLOCK_ELEMENTS if block_elements is None else block_elements
    step = max(1, size // max(1, row_elements))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _value(x: Any) -> str:
    """A numpy scalar as the user wrote it (``nan``, ``1e+300``), not ``np.float64(...)``."""
    return repr(x.item() if isinstance(x, np.generic) else x)


def _brief(value: Any) -> str:
    """A short description of a given value: its abbreviated repr and type."""
    if isinstance(value, np.generic):
        value = value.item()
    kind = type(value).__name__
    kind = {"NoneType": "null", "dict": "an object", "list": "a list", "str": "a string",
            "int": "an integer", "float": "a number", "bool": "a boolean"}.get(kind, f"a {kind}")
    return f"{_repr.repr(value)} ({kind})"


def _exc_text(exc: BaseException) -> str:
    """An exception in one short line, never passing on advice to allow pickle."""
    text = (str(exc).splitlines() or [""])[0]
    if "pickle" in text:
        text = "it needs pickle"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return _sha256_of(handle, path)


def _sha256_of(handle: BinaryIO, where: object) -> str:
    digest = hashlib.sha256()
    try:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    except OSError as exc:
        raise _os_error(where, exc, "a readable file") from None
    return digest.hexdigest()


# ------------------------------------------------------------------------------ reading files
def _os_error(path: object, exc: OSError, expected: str, *, action: str = "read",
              hint: str = "") -> TraceFileError:
    """An OSError as a TraceFileError that says what went wrong in words."""
    if isinstance(exc, PermissionError):
        problem = "permission denied"
        advice = (f"Make it {'readable' if action == 'read' else 'writable'} for this user "
                  "(chmod), or run as a user who may access it")
    elif isinstance(exc, FileNotFoundError):
        problem, advice = "does not exist", "Check the path"
    elif isinstance(exc, IsADirectoryError):
        problem, advice = "is a folder, not a file", ""
    elif isinstance(exc, NotADirectoryError):
        problem, advice = "a part of the path is a file, not a folder", "Check the path"
    elif exc.errno == errno.ELOOP:
        problem, advice = "is a loop of symbolic links", "Fix the link"
    elif exc.errno == errno.ENAMETOOLONG:
        problem, advice = "has a name that is too long", ""
    elif exc.errno == errno.ENOSPC:
        problem, advice = "could not be written: no space left on the device", "Free some space"
    else:
        problem, advice = f"cannot be {action} ({exc.strerror or exc})", ""
    hint = ". ".join(h for h in (advice, hint) if h)
    return TraceFileError(path, problem, expected=expected, hint=hint)


def _stat(path: Path, expected: str) -> os.stat_result:
    """``os.stat`` (following links); every failure is a TraceFileError naming the path."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                points_to = show_path(os.readlink(path))
            except OSError:
                points_to = "a missing file"
            raise TraceFileError(path, f"is a symbolic link to {points_to}, which does not exist",
                                 expected=expected, hint="Fix or remove the link") from None
        raise TraceFileError(path, "does not exist", expected=expected, hint="Check the path") from None
    except OSError as exc:
        raise _os_error(path, exc, expected) from None
    except ValueError as exc:  # an embedded NUL byte
        raise TraceFileError(path, f"is not a usable path ({exc})", expected=expected) from None


def _open_regular(path: Path, expected: str) -> BinaryIO:
    """Open a regular file for reading; a folder, device or pipe is refused before opening
    (opening a pipe would block)."""
    info = _stat(path, expected)
    if stat.S_ISDIR(info.st_mode):
        raise TraceFileError(path, "is a folder, not a file", expected=expected)
    if not stat.S_ISREG(info.st_mode):
        raise TraceFileError(path, "is not a regular file (a device, pipe or socket)",
                             expected=expected)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _os_error(path, exc, expected) from None


def _file_size(handle: BinaryIO, where: object) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise _os_error(where, exc, "a readable file") from None


def _read_some(handle: BinaryIO, size: int, where: object) -> bytes:
    """Up to ``size`` bytes (fewer only at the end of the file)."""
    chunks = []
    try:
        while size > 0:
            chunk = handle.read(size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
    except OSError as exc:
        raise _os_error(where, exc, "a readable file") from None
    return b"".join(chunks)




def _fsync_dir(path: Path) -> None:
    """Make a rename or new entries in ``path`` durable (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
