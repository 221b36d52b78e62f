"""Sharded extraction: ``torchrun --nproc-per-node N -m routeaudit extract ADAPTER -o DIR``.

Why it is shaped this way:

* Batch i of ``Adapter.batches(split)`` runs on rank ``i % world_size`` (every rank iterates
  the batches and forwards only its own), and the reader joins the shards back in batch
  order (routeaudit.traces.reading), so the joined TraceSet equals a single-process
  extraction whatever N is: same rows, same order, same dtypes, same meta.
* Each rank builds and validates its shard exactly as ``ModelSession.traces()`` builds the
  whole set, and writes it into one staging folder that rank 0 made next to DIR. Rank 0
  writes the manifest that joins the shards, loads the result back (every check the reader
  makes) and only then renames the folder to DIR. A rank that fails makes every rank stop
  with an error and rank 0 removes the staging folder: DIR never holds a partial set.
* Without torchrun (no ``WORLD_SIZE``, or 1) nothing here runs. torch loads only when a
  sharded extraction starts; the process group is initialised here when the caller has not
  done it (gloo, plus nccl for CUDA tensors when CUDA is present), and destroyed after.
* Only small Python objects travel between ranks (paths, digests, error text), never arrays:
  the shards go through the file system, which all ranks must share.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from routeaudit.errors import RouteAuditError, UsageError, show_path
from routeaudit.model.adapter import Adapter
from routeaudit.traces import TraceSet
from routeaudit.traces.writing import (
    Staging,
    discard,
    publish,
    start_staging,
    write_shard,
    write_sharded_manifest,
)


class ShardedExtractionError(RouteAuditError):
    """A rank of a sharded extraction failed, so no trace directory was written (exit 4)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


def distributed_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The launch torchrun describes in the environment; None without one (or with one
    process), which leaves ``routeaudit extract`` as it always was."""
    environ = os.environ if environ is None else environ
    if not environ.get("WORLD_SIZE"):
        return None
    world = _env_int(environ, "WORLD_SIZE", "WORLD_SIZE")
    if world < 1:
        raise UsageError(f"WORLD_SIZE is {world}; torchrun sets it to the number of processes (≥ 1)")
    if world == 1:
        return None
    rank = _env_int(environ, "RANK", "RANK")
    if not 0 <= rank < world:
        raise UsageError(f"RANK is {rank}, outside [0, {world}) for WORLD_SIZE {world}")
    local = _env_int(environ, "LOCAL_RANK", "RANK") if environ.get("LOCAL_RANK") else rank
    return DistEnv(rank, world, local)


def _env_int(environ: Mapping[str, str], name: str, what: str) -> int:
    text = environ.get(name)
    try:
        return int(str(text))
    except ValueError:
        raise UsageError(f"{name} is {text!r}, not an integer; run sharded extraction with "
                         f"torchrun, which sets {what}") from None


class _Group:
    """The few collectives sharded extraction needs, over gloo (small Python objects)."""

    def __init__(self, env: DistEnv, device: Any) -> None:
        import torch
        import torch.distributed as dist

        self.dist, self.env, self.owned, self.group = dist, env, False, None
        if not dist.is_available():
            raise UsageError("this torch build has no torch.distributed; sharded extraction needs it")
        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and dist.is_nccl_available()
            try:
                dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"torch.distributed could not start ({type(exc).__name__}: {exc}); "
                                 "launch with torchrun --nproc-per-node N -m routeaudit extract ..."
                                 ) from exc
            self.owned = True
        elif (dist.get_world_size(), dist.get_rank()) != (env.world_size, env.rank):
            raise UsageError(f"torch.distributed is initialised with rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, but the environment says rank {env.rank} "
                             f"of {env.world_size}")
        if "gloo" not in str(dist.get_backend()):  # e.g. the caller chose nccl only
            self.group = dist.new_group(backend="gloo")

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self._call(self.dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.env.world_size
        self._call(self.dist.all_gather_object, out, value, group=self.group)
        return out

    def _call(self, collective: Any, *args: Any, **kwargs: Any) -> None:
        try:
            collective(*args, **kwargs)
        except RuntimeError as exc:  # a rank died or timed out
            raise ShardedExtractionError(f"rank {self.env.rank} of {self.env.world_size} lost "
                                         f"contact with the other ranks ({exc})") from exc

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def extract_sharded(adapter: Any, output: str | os.PathLike[str], *, env: DistEnv,
                    force: bool = False, device: Any = None, progress: bool | str = "auto",
                    autocast: str | None = None, cache: bool = True,
                    cache_dir: str | os.PathLike[str] | None = None,
                    stream: TextIO | None = None) -> TraceSet | None:
    """Extract this rank's shard into a staging folder next to ``output``; on rank 0 join
    the shards into the trace directory ``output`` and return the joined TraceSet (None
    on the other ranks). Any rank's failure is a ShardedExtractionError on every rank and
    leaves ``output`` as it was.

    ``cache`` only decides whether the cache key is recorded in the meta, as a single
    process records it; the trace cache itself is neither read nor written.
    """
    if isinstance(adapter, type) and issubclass(adapter, Adapter):
        adapter = adapter()
    if not isinstance(adapter, Adapter):
        raise UsageError(f"sharded extraction needs a model adapter (load, batches, forward); "
                         f"{type(adapter).__name__} provides traces itself: run `routeaudit "
                         "extract` without torchrun")
    group = _Group(env, device)
    try:
        return _extract(group, Path(os.fsdecode(output)), adapter=adapter, force=force,
                        device=device, progress=progress, autocast=autocast, cache=cache,
                        cache_dir=cache_dir, stream=stream)
    finally:
        group.close()


def _extract(group: _Group, output: Path, *, force: bool, **options: Any) -> TraceSet | None:
    """Rank 0: make the staging folder, extract its shard, join everyone's, publish."""
    env = group.env
    if env.rank != 0:
        _follow(group, output, **options)
        return None
    try:
        staging = start_staging(output, force=force)
    except BaseException as exc:  # the other ranks wait for this broadcast: always send it
        group.broadcast({"error": _describe(exc)})
        raise
    previous = _on_sigterm()
    try:  # from here on, whatever happens, the staging folder goes
        group.broadcast({"folder": str(staging.folder)})
        report, failure, mask = _shard(env, staging.folder, **options)
        reports = group.all_gather(report)
        _raise_failed(env, output, reports, failure)
        try:
            traces = _join(staging, reports, mask)
        except BaseException as exc:
            group.broadcast(_describe(exc))
            raise
        group.broadcast(None)
        return traces
    except BaseException:
        discard(staging)  # after publish() the folder is gone and this does nothing
        raise
    finally:
        _restore_sigterm(previous)


def _follow(group: _Group, output: Path, **options: Any) -> None:
    """A rank other than 0: extract and write its shard where rank 0 says, and hear the end."""
    env = group.env
    start = group.broadcast(None)
    if "error" in start:
        raise ShardedExtractionError(f"rank {env.rank} of {env.world_size}: stopped, rank 0 could "
                                     f"not prepare {show_path(output)} (rank 0 says why)")
    report, failure, _ = _shard(env, Path(start["folder"]), **options)
    _raise_failed(env, output, group.all_gather(report), failure)
    outcome = group.broadcast(None)
    if outcome is not None:
        raise ShardedExtractionError(f"rank {env.rank} of {env.world_size}: stopped, rank 0 could "
                                     f"not finish {show_path(output)}: {outcome}")


def _shard(env: DistEnv, folder: Path, *, adapter: Adapter, device: Any,
           progress: bool | str, autocast: str | None, cache: bool,
           cache_dir: str | os.PathLike[str] | None, stream: TextIO | None
           ) -> tuple[dict[str, Any], BaseException | None, Any]:
    """Extract and write this rank's shard; a report for rank 0, the failure, source_mask.

    Every failure is caught: every rank must reach the gather, or the others wait forever.
    """
    from routeaudit.model.extract import ModelSession

    try:
        with ModelSession(adapter, device=device, autocast=autocast, cache=cache,
                          cache_dir=cache_dir, progress=progress if env.rank == 0 else False,
                          stream=stream) as session:
            shard = session.shard_traces(env.rank, env.world_size)
            rows = session.batch_rows
        arrays = shard.arrays()
        mask = arrays.pop("source_mask")
        record = write_shard(folder, env.rank, env.world_size, arrays, rows)
        return ({"record": record, "meta": shard._meta_json(),
                 "mask": [list(mask.shape), hashlib.sha256(mask.tobytes()).hexdigest()]},
                None, mask)
    except Exception as exc:
        return {"error": _describe(exc)}, exc, None


def _raise_failed(env: DistEnv, output: Path, reports: list[dict[str, Any]],
                  failure: BaseException | None) -> None:
    """Stop every rank when any failed: the failing rank with its own error, the others
    (rank 0 among them) with one that lists every failure."""
    failed = [(rank, r["error"]) for rank, r in enumerate(reports) if "error" in r]
    if not failed:
        return
    if failure is not None and env.rank != 0:
        raise failure
    if env.rank != 0:
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise ShardedExtractionError(f"rank {env.rank} of {env.world_size}: stopped, rank {ranks} "
                                     "failed (rank 0 lists why); nothing was written")
    listed = "; ".join(f"rank {rank} of {env.world_size}: {text}" for rank, text in failed)
    raise ShardedExtractionError(f"sharded extraction failed ({listed}); nothing was written "
                                 f"to {show_path(output)}") from failure


def _on_sigterm() -> Any:
    """torchrun stops the other ranks with SIGTERM when one dies: make that an exception on
    rank 0, so its staging folder is removed (Python's default would just exit)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise ShardedExtractionError("rank 0 was stopped (SIGTERM, usually because another rank "
                                     "died); nothing was written")

    return signal.signal(signal.SIGTERM, stop)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _join(staging: Staging, reports: list[dict[str, Any]], mask: Any) -> TraceSet:
    """Rank 0: check that the shards agree, write the joined manifest, load it back, publish."""
    shown = show_path(staging.shown)
    for rank, report in enumerate(reports[1:], start=1):
        for key, what in (("meta", "meta"), ("mask", "source_mask")):
            if report[key] != reports[0][key]:
                raise ShardedExtractionError(
                    f"rank {rank}'s {what} differs from rank 0's, so the shards are not one "
                    f"extraction (does the adapter depend on the process?); nothing was written "
                    f"to {shown}")
    write_sharded_manifest(staging.folder, reports[0]["meta"], [r["record"] for r in reports],
                           {"source_mask": mask})
    try:
        traces = TraceSet.load(staging.folder)  # every check `routeaudit run DIR` will make
    except RouteAuditError as exc:
        raise ShardedExtractionError(f"the joined shards do not load ({exc}); nothing was "
                                     f"written to {shown}") from exc
    publish(staging)
    return traces


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown failure"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
