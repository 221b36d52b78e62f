"""Writing traces without losing anything: under a temporary name next to the target,
synced, then renamed into place; nothing routeaudit did not write is deleted or
overwritten (``force`` replaces only a previous trace directory, or a file the caller
names).

A sharded trace directory is written the same way: rank 0 makes one staging folder, every
rank writes its shard there (``write_shard``), rank 0 writes the manifest that joins them
(``write_sharded_manifest``) and renames the folder into place (``publish``), so the
target name never holds a directory with a shard missing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from routeaudit._version import __version__
from routeaudit.errors import TraceFileError, show_path
from routeaudit.traces._common import MANIFEST, SCHEMA_VERSION, _fsync_dir, _os_error, _sha256
from routeaudit.traces.reading import SHARD_ASSIGNMENT, _plain_name, _read_json


# ------------------------------------------------------------------------------ writing files
class _OldTarget(NamedTuple):
    mode: int
    files: tuple[str, ...]  # empty: an empty folder; else the trace directory's files


def _existing_save_target(target: Path, shown: Path, force: bool) -> _OldTarget | None:
    """What is at ``target`` now, if ``save`` may write there; refuse everything else."""
    expected = "a new folder, an empty folder, or (with force=True) a previous trace directory"
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error(shown, exc, expected, action="written") from None
    except ValueError as exc:  # an embedded NUL byte
        raise TraceFileError(shown, f"is not a usable path ({exc})", expected=expected) from None
    if stat.S_ISLNK(info.st_mode):
        raise TraceFileError(shown, "is a symbolic link", expected=expected,
                             hint="Give the real folder; routeaudit does not write through links. "
                                  "Nothing was written")
    if not stat.S_ISDIR(info.st_mode):
        raise TraceFileError(shown, "is a file, not a folder", expected=expected,
                             hint="Choose another name; routeaudit never overwrites a file it did "
                                  "not write. Nothing was written")
    try:
        names = sorted(os.listdir(target))
    except OSError as exc:
        raise _os_error(shown, exc, expected) from None
    mode = stat.S_IMODE(info.st_mode)
    if not names:
        return _OldTarget(mode, ())
    held = ", ".join(show_path(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    if not force:
        raise TraceFileError(shown, f"already exists and is not empty (it holds {held})",
                             expected=expected,
                             hint="Choose a new folder, or pass force=True (routeaudit: --force) to "
                                  "replace a trace directory that routeaudit wrote. Nothing was written")
    reason = _not_trace_directory(target, names)
    if reason:
        raise TraceFileError(shown, f"is not a routeaudit trace directory ({reason}), so force=True "
                             "does not replace it", expected=expected,
                             hint="Choose a new folder; routeaudit replaces only trace directories it "
                                  "wrote and never deletes other files. Nothing was written")
    return _OldTarget(mode, tuple(names))


def _not_trace_directory(folder: Path, names: list[str]) -> str:
    """Why ``folder`` is not a trace directory routeaudit may replace ('' when it is one):
    a manifest.json with schema_version, and only regular files that the manifest lists."""
    if MANIFEST not in names:
        return "it has no manifest.json"
    try:
        manifest = _read_json(folder / MANIFEST, "a manifest")
    except TraceFileError as exc:
        return f"its manifest.json is unreadable: {exc.problem}"
    if not isinstance(manifest, dict) or type(manifest.get("schema_version")) is not int:
        return "its manifest.json has no schema_version"
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        return "its manifest.json lists no arrays"
    listed = {MANIFEST}
    shard_arrays = []
    shards = manifest.get("shards")
    if shards is not None:  # a sharded directory: its shard manifests list the other files
        items = shards.get("files") if isinstance(shards, dict) else None
        if not isinstance(items, list):
            return "its manifest.json lists no shard files"
        for item in items:
            file = item.get("file") if isinstance(item, dict) else None
            if not (isinstance(file, str) and _plain_name(file)):
                return "its manifest.json lists a shard that is not a plain file name"
            listed.add(file)
            try:
                shard = _read_json(folder / file, "a shard manifest")
            except TraceFileError as exc:
                return f"its shard manifest {show_path(file)!r} is unreadable: {exc.problem}"
            listing = shard.get("arrays") if isinstance(shard, dict) else None
            if not isinstance(listing, dict):
                return f"its shard manifest {show_path(file)!r} lists no arrays"
            shard_arrays.extend(listing.values())
    for entry in [*arrays.values(), *shard_arrays]:
        file = entry.get("file") if isinstance(entry, dict) else None
        if not (isinstance(file, str) and _plain_name(file)):
            return "its manifest.json lists a file that is not a plain name"
        listed.add(file)
    extra = [n for n in names if n not in listed]
    if extra:
        return f"it also holds {show_path(extra[0])!r}, which its manifest does not list"
    for name in names:
        try:
            if not stat.S_ISREG(os.lstat(folder / name).st_mode):
                return f"{show_path(name)!r} is not a regular file"
        except OSError as exc:
            return f"{show_path(name)!r} cannot be checked ({exc.strerror})"
    return ""


def _make_parents(parent: Path, shown: Path) -> None:
    expected = "a path inside folders routeaudit can create"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TraceFileError(shown, "cannot be created: a part of its path is a file, not a folder",
                             expected=expected, hint="Check the path; nothing was written") from None
    except OSError as exc:
        raise _os_error(shown, exc, expected, action="written", hint="Nothing was written") from None


def _new_private_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` (normal permissions, unlike mkdtemp's 0700)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent))


def _new_private_file(parent: Path, prefix: str) -> tuple[int, Path]:
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent))


def _link_no_clobber(temp: Path, target: Path, shown: Path) -> None:
    """Give ``temp`` the name ``target`` unless something already has it (atomic check)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise TraceFileError(shown, "appeared while it was being written", expected="a new .npz "
                             "file name", hint="Choose a new file name, or pass force=True") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise TraceFileError(shown, "appeared while it was being written", expected="a new .npz "
                                 "file name", hint="Choose a new file name, or pass force=True") from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _swap_in(staging: Path, target: Path, old_files: tuple[str, ...]) -> None:
    """Replace the trace directory ``target`` with ``staging``: rename the old one aside, the
    new one in, then delete the old one's files (only those). On failure the old one is put
    back."""
    holder = _new_private_dir(target.parent, f".{target.name}.old-")
    aside = holder / "old"
    try:
        os.rename(target, aside)
    except BaseException:
        os.rmdir(holder)
        raise
    try:
        os.rename(staging, target)
    except BaseException:
        try:
            os.rename(aside, target)
        except OSError as exc:
            raise TraceFileError(target, f"could not be restored ({exc.strerror})",
                                 hint=f"The previous trace directory is intact at {show_path(aside)}: "
                                      "move it back by hand") from None
        os.rmdir(holder)
        raise
    try:
        for name in old_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside / name)
        os.rmdir(aside)
        os.rmdir(holder)
    except OSError as exc:
        warnings.warn(f"routeaudit: the replaced trace directory was kept at {show_path(aside)} "
                      f"({exc.strerror}); delete it when you no longer need it",
                      RuntimeWarning, stacklevel=3)




# ------------------------------------------------------------------------------ sharded directories
class Staging(NamedTuple):
    """A staging folder next to ``target`` that becomes the trace directory on ``publish``."""

    shown: Path  # the path as the user gave it
    target: Path
    folder: Path
    old: _OldTarget | None


def start_staging(directory: str | os.PathLike[str], *, force: bool = False) -> Staging:
    """Check ``directory`` as ``TraceSet.save`` does (new, empty, or with ``force`` a previous
    trace directory; nothing else) and make the staging folder next to it."""
    shown = Path(os.fsdecode(directory))
    target = Path(os.path.abspath(shown))
    old = _existing_save_target(target, shown, force)
    _make_parents(target.parent, shown)
    try:
        folder = _new_private_dir(target.parent, f".{target.name}.staging-")
    except OSError as exc:
        raise _os_error(shown, exc, "a folder routeaudit can write", action="written") from None
    return Staging(shown, target, folder, old)


def shard_stem(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}"


def write_shard(folder: Path, rank: int, world_size: int, arrays: dict[str, np.ndarray],
                batch_rows: list[int]) -> dict[str, str]:
    """Write one rank's per-example arrays and its shard manifest into the staging folder;
    the entry the top manifest lists for it (file, sha256)."""
    stem = shard_stem(rank, world_size)
    entries = {name: _write_npy(folder / f"{name}.{stem}.npy", array)
               for name, array in arrays.items()}
    shard = {"rank": rank, "world_size": world_size, "batch_rows": [int(n) for n in batch_rows],
             "arrays": entries}
    file = f"{stem}.json"
    return {"file": file, "sha256": _write_json(folder / file, shard)}


def write_sharded_manifest(folder: Path, meta: dict[str, object], shards: list[dict[str, str]],
                           common: dict[str, np.ndarray]) -> None:
    """Rank 0's manifest: the meta, the arrays that are not per example (source_mask) and
    the shard manifests, in rank order (``SHARD_ASSIGNMENT``)."""
    entries = {name: _write_npy(folder / f"{name}.npy", array) for name, array in common.items()}
    manifest = {"schema_version": SCHEMA_VERSION, "routeaudit_version": __version__, "meta": meta,
                "arrays": entries,
                "shards": {"assignment": SHARD_ASSIGNMENT, "world_size": len(shards),
                           "files": shards}}
    _write_json(folder / MANIFEST, manifest)


def publish(staging: Staging) -> None:
    """Rename the complete staging folder into place (replacing a previous trace directory
    only as ``TraceSet.save`` does); on failure the staging folder is removed."""
    try:
        _fsync_dir(staging.folder)
        if staging.old is not None:
            with contextlib.suppress(OSError):
                os.chmod(staging.folder, staging.old.mode)
        if staging.old is not None and staging.old.files:
            _swap_in(staging.folder, staging.target, staging.old.files)
        else:
            os.replace(staging.folder, staging.target)
        _fsync_dir(staging.target.parent)
    except BaseException as exc:
        discard(staging)
        if isinstance(exc, OSError):
            raise _os_error(staging.shown, exc, "a folder routeaudit can write", action="written",
                            hint="Nothing was changed") from exc
        raise


def discard(staging: Staging) -> None:
    """Remove the staging folder (it holds only what the ranks wrote there)."""
    shutil.rmtree(staging.folder, ignore_errors=True)


def _write_npy(path: Path, array: np.ndarray) -> dict[str, object]:
    with open(path, "xb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": path.name, "shape": list(array.shape), "dtype": str(array.dtype),
            "sha256": _sha256(path)}


def _write_json(path: Path, data: object) -> str:
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    return _sha256(path)
