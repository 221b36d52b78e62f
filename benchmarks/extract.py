"""Cost of trace extraction against a bare forward pass over the same batches.

Both rows run the same model on the same batches under ``torch.inference_mode`` (and the
same autocast); the bare row calls ``adapter.forward`` and drops the outputs, the extraction
row is ``routeaudit.model.extract.extract_traces(..., cache=False)``: host copies, per-batch
checks, concatenation and TraceSet validation. The model is loaded once, outside the timed
region, so the ratio is the collection overhead alone. Rows are medians over interleaved
repeats (the machine may be shared); the overhead is the ratio of the medians, and the
median of the per-repeat ratios is printed beside it. Targets: ≤ 10% on CPU, ≤ 5% on GPU.

Model: a small Full-AttnRes-like classifier defined here: every block first mixes all
earlier block outputs (and the embedding) with a softmax over depth (its routing weights,
averaged over tokens per example), then applies an MLP; mean-pooled tokens feed the head.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/extract.py [--n 2048] [--batch 128] [--repeats 5]
        [--device cpu|cuda] [--autocast none|bf16] [--adapter path/to/adapter.py]

``--adapter FILE`` benchmarks the registered model adapter of FILE instead (for example the
digits fixtures, ``fixtures/digits/...``, once they exist).
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from routeaudit.model.adapter import Adapter, ForwardOutput  # noqa: E402
from routeaudit.model.extract import autocast_context, extract_traces, pick_device  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# CPU autocast runs RMSNorm with bf16 input and fp32 weight unfused; the warning is noise here.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")


class AttnResLike(torch.nn.Module):
    """Blocks that route over all earlier outputs (softmax over depth), then an MLP."""

    def __init__(self, n_in: int, dim: int, n_blocks: int, n_classes: int) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(n_in, dim)
        self.queries = torch.nn.Parameter(torch.randn(n_blocks, dim) / dim ** 0.5)
        self.norm = torch.nn.RMSNorm(dim)
        self.mlps = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                torch.nn.Linear(4 * dim, dim)) for _ in range(n_blocks))
        self.head = torch.nn.Linear(dim, n_classes)
        self.n_blocks = n_blocks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_sources = x.shape[0], self.n_blocks + 1
        sources = [self.embed(x)]  # each [B, T, D]
        routing = x.new_zeros(batch, self.n_blocks, n_sources)
        for layer, mlp in enumerate(self.mlps):
            stack = torch.stack(sources, dim=2)  # [B, T, l+1, D]
            scores = self.norm(stack) @ self.queries[layer]  # [B, T, l+1]
            alpha = scores.softmax(-1)
            mixed = (alpha.unsqueeze(-1) * stack).sum(2)
            routing[:, layer, : layer + 1] = alpha.mean(1).to(routing.dtype)
            sources.append(mixed + mlp(mixed))
        return self.head(sources[-1].mean(1)), routing


class BenchAdapter(Adapter):
    """Serves a prebuilt model and pinned host batches, so both rows share them exactly."""

    name = "attnres-like"
    meta = {"family": "attnres-full"}  # noqa: RUF012

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                 n_blocks: int) -> None:
        self.model, self.x, self.y, self.batch = model, x, y, batch
        self.source_mask = np.tril(np.ones((n_blocks, n_blocks + 1), dtype=bool))
        self.device = next(model.parameters()).device

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)

    def load(self, device: Any) -> torch.nn.Module:
        return self.model

    def batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.y), self.batch):
            yield self.x[start:start + self.batch], self.y[start:start + self.batch]

    def forward(self, model: torch.nn.Module, batch: Any) -> ForwardOutput:
        x, y = batch
        logits, routing = model(x.to(self.device, non_blocking=True))
        return ForwardOutput(logits, y, routing)


def build_toy(args: argparse.Namespace, device: torch.device) -> tuple[Adapter, str]:
    torch.manual_seed(0)
    model = AttnResLike(args.features, args.dim, args.blocks, args.classes).to(device).eval()
    x = torch.randn(args.n, args.tokens, args.features)
    y = torch.randint(0, args.classes, (args.n,))
    if device.type == "cuda":
        x = x.pin_memory()
    adapter = BenchAdapter(model, x, y, args.batch, args.blocks)
    what = (f"AttnRes-like (blocks={args.blocks}, dim={args.dim}, tokens={args.tokens}), "
            f"N={args.n}, batch={args.batch}")
    return adapter, what


def build_from_file(path: str, device: torch.device) -> tuple[Any, str]:
    """The registered model adapter of ``path``, its model loaded once and then reused."""
    from routeaudit.model.adapter import find_adapters
    from routeaudit.session.plugins import import_user_file

    (found,) = find_adapters(import_user_file(path))
    adapter = found() if isinstance(found, type) else found
    model = adapter.load(device)
    adapter.load = lambda _device: model  # loading stays outside the timed region
    return adapter, f"{path} ({type(adapter).__name__})"


def bare_forward(adapter: Any, device: torch.device, autocast: str) -> None:
    model = adapter.load(device)
    with torch.inference_mode(), autocast_context(device, autocast):
        for batch in adapter.batches(adapter.split):
            adapter.forward(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()


def extraction(adapter: Any, device: torch.device, autocast: str) -> None:
    extract_traces(adapter, device=device, autocast=autocast, cache=False, progress=False)


class ForwardClock:
    """Wraps ``adapter.forward`` to add up the time spent inside it.

    Total time minus forward time is what a pass spends elsewhere; comparing that between
    the two rows of one repeat is immune to the machine's load drifting between runs. On
    CUDA ``forward`` returns before the kernels finish, so only the CPU figure means much.
    """

    def __init__(self, adapter: Any) -> None:
        self.inner, self.seconds = adapter.forward, 0.0
        adapter.forward = self

    def __call__(self, model: Any, batch: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner(model, batch)
        finally:
            self.seconds += time.perf_counter() - started


def timed(clock: ForwardClock, fn: Any, *args: Any) -> tuple[float, float]:
    """(wall seconds, seconds outside adapter.forward) of one pass."""
    clock.seconds = 0.0
    started = time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - started
    return wall, wall - clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="examples (2048)")
    parser.add_argument("--batch", type=int, default=128, help="examples per batch (128)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per example (16)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--adapter", metavar="FILE", help="benchmark this adapter file instead")
    args = parser.parse_args()

    device = pick_device(args.device)
    adapter, what = (build_from_file(args.adapter, device) if args.adapter
                     else build_toy(args, device))
    threads = torch.get_num_threads()
    print(f"extraction benchmark: {what}")
    print(f"device={device}, torch threads={threads}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, autocast={args.autocast}, "
          f"repeats={args.repeats} (interleaved, after one warm-up each)")
    bare_forward(adapter, device, args.autocast)
    extraction(adapter, device, args.autocast)
    clock = ForwardClock(adapter)
    bare, full, outside = [], [], []
    for _ in range(args.repeats):
        wall_bare, out_bare = timed(clock, bare_forward, adapter, device, args.autocast)
        wall_full, out_full = timed(clock, extraction, adapter, device, args.autocast)
        bare.append(wall_bare)
        full.append(wall_full)
        outside.append((out_full - out_bare) / (wall_bare - out_bare))
    ratios = [f / b for f, b in zip(full, bare, strict=True)]
    med_bare, med_full = statistics.median(bare), statistics.median(full)
    n = len(adapter.y) if hasattr(adapter, "y") else None
    for label, times in (("bare forward", bare), ("extraction", full)):
        rate = f", {n / statistics.median(times):,.0f} examples/s" if n else ""
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"{label:<13} median {statistics.median(times):.3f} s{rate}   (runs: {runs})")
    target = 5.0 if device.type == "cuda" else 10.0
    overhead = 100.0 * (med_full / med_bare - 1.0)
    verdict = "within" if overhead <= target else "OVER"
    print(f"overhead      {overhead:+.1f}% (ratio of medians {med_full / med_bare:.3f}; median "
          f"per-repeat ratio {statistics.median(ratios):.3f}); target <= {target:.0f}% on "
          f"{device.type}: {verdict}")
    print(f"min-time      {100.0 * (min(full) / min(bare) - 1.0):+.1f}% (ratio of the fastest runs)")
    if device.type == "cpu":
        print(f"in-run        {100.0 * statistics.median(outside):+.2f}% (median over repeats of the "
              "extra time spent outside adapter.forward, relative to forward time)")


if __name__ == "__main__":
    main()
