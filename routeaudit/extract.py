"""Stage A: run a model adapter over its batches and collect a TraceSet.

Runs under ``torch.inference_mode`` on the best device present (CUDA when available), moves
each batch's outputs to the host as it goes, so the device never holds more than one batch
of traces.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from routeaudit.adapter import Adapter, ForwardOutput
from routeaudit.errors import AdapterError
from routeaudit.traces import TraceMeta, TraceSet


def pick_device(requested: str | None = None) -> Any:
    """The requested torch device, else CUDA when present, else CPU."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


def extract_traces(adapter: Adapter, *, device: str | None = None,
                   progress: bool = True) -> TraceSet:
    """Run ``adapter.forward`` over ``adapter.batches(adapter.split)`` and validate the result."""
    import torch

    dev = pick_device(device)
    try:
        model = adapter.load(dev)
    except Exception as exc:
        raise AdapterError(f"{type(adapter).__name__}.load failed: {exc}") from exc
    parts: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    n_seen = 0
    with torch.inference_mode():
        for i, batch in enumerate(adapter.batches(adapter.split)):
            out = adapter.forward(model, batch)
            if not isinstance(out, ForwardOutput):
                out = ForwardOutput(*out)
            for name, value in out._asdict().items():
                array = _to_numpy(value)
                if array is not None:
                    parts.setdefault(name, []).append(array)
            n_seen += len(parts["labels"][-1])
            if progress and sys.stderr.isatty():
                rate = n_seen / max(time.perf_counter() - started, 1e-9)
                print(f"\rextracting: batch {i + 1}, {n_seen} examples ({rate:.0f}/s)",
                      end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    if not parts:
        raise AdapterError(f"{type(adapter).__name__}.batches yielded no batches")
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    meta = TraceMeta(**{"name": adapter.name, **dict(adapter.meta)})
    return TraceSet(arrays["logits"].astype(np.float32), arrays["labels"],
                    arrays["routing"].astype(np.float32), source_mask=adapter.source_mask,
                    expert_logits=arrays.get("expert_logits"), group=arrays.get("group"),
                    meta=meta)
