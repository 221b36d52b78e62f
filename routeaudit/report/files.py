"""Writing report files without losing anything: atomically, and never over a user's file.

A report path is checked before the run starts (``check_target``), so a run is not spent
only to find it cannot write its result: a path that holds something routeaudit did not
write (any file that is not a report of the same kind) is refused as a usage error. The
file is then written next to its final name and renamed into place (``write_atomic``), so
an interrupted run leaves either the old report or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

from routeaudit.errors import UsageError
from routeaudit.traces.writing import _new_private_file

#: The first bytes that mark a file as one routeaudit wrote, per report kind.
MARKERS = {
    "json": ('"routeaudit_version"',),
    "junitxml": ('<testsuite name="routeaudit"', "<testsuite name='routeaudit'"),
    "html": ("<title>routeaudit report</title>",),
    "markdown": ("<!-- routeaudit markdown report -->",),
}


def check_target(path: str | os.PathLike[str], kind: str, option: str) -> Path:
    """The report path, if routeaudit may write it: absent, or a routeaudit report of this kind."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {target}: is a directory; give a file name for the report")
    if target.exists() or target.is_symlink():
        try:
            head = target.read_bytes()[:4096].decode("utf-8", errors="replace")
        except OSError as exc:
            raise UsageError(f"{option} {target}: cannot read the existing file ({exc}); "
                             "choose another path") from exc
        if not any(marker in head for marker in MARKERS[kind]):
            raise UsageError(f"{option} {target}: the file exists and is not a routeaudit "
                             f"{kind} report, so it is left alone; choose another path or "
                             "move it away")
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{option} {target}: {parent} is a file, not a folder")
    return target


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # the traces' own temp-file maker: a unique name, and the permissions of a normal file
    # (mkstemp's 0600 would leave a report only its writer can read)
    fd, tmp = _new_private_file(target.parent, f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
