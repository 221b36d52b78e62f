"""One machine, large N: the audit battery on N examples × 24 routing layers, traces
memory-mapped rather than loaded whole.

Traces: a cheap synthetic full-AttnRes trace set (L = 24 routing layers, S = 25 depth
sources, layer l mixing sources 0..l, K = 10 classes) with a planted routing-conditional
miscalibration, written straight into a trace directory chunk by chunk (the generator never
holds more than one chunk), with the manifest ``TraceSet.save`` writes. Then ``routeaudit
run DIR`` runs in a subprocess with default options (3 seeds, 999 permutations, 1,000
bootstrap replicates), once with OMP_NUM_THREADS=1 and once with 2; wall time and the
child's own peak RSS (``os.wait4``) are measured per run. The default battery on trace
files runs the trace-only audits (stratification, permutation_null, content_dependence);
``--calibrator NAME`` adds the calibrator audits for a registered reference calibrator.

Targets at N = 1e6: ≤ 300 s wall and ≤ 24 GiB peak RSS on 2 cores.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/scale.py [--sizes 1e4,1e5,1e6] [--threads 1,2]
[--calibrator NAME] [--profile] [--out benchmarks/results/scale.txt]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._output import Tee

N_LAYERS, N_SOURCES, N_CLASSES = 24, 25, 10
CHUNK_ROWS = 20_000
WALL_TARGET_S, MEMORY_TARGET_GIB = 300.0, 24.0
#: A child that allocates more private memory than this fails (MemoryError) instead of
#: pushing a shared machine into the OOM killer; file-backed maps do not count.
DATA_LIMIT_GIB = 20.0


class _NpyWriter:
    """An ``.npy`` file written in row chunks, hashed as it is written."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            head, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                   "shape": shape})
        self.digest = hashlib.sha256(head.getvalue())
        self.handle: BinaryIO = open(path, "xb")  # noqa: SIM115 (closed in close())
        self.handle.write(head.getvalue())
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype).tobytes()
        self.digest.update(data)
        self.handle.write(data)
        self.rows += block.shape[0]

    def close(self) -> dict[str, object]:
        self.handle.close()
        assert self.rows == self.shape[0], (self.path, self.rows, self.shape)
        return {"file": self.path.name, "shape": list(self.shape), "dtype": str(self.dtype),
                "sha256": self.digest.hexdigest()}


def _chunk(rng: np.random.Generator, rows: int, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """One chunk of examples: logits, labels, routing. Sharp routing (low latent z) marks
    examples whose correctness runs above their confidence: routing signal beyond confidence."""
    z = rng.random(rows, dtype=np.float32)
    scores = rng.standard_normal((rows, N_LAYERS, N_SOURCES), dtype=np.float32)
    scores *= (0.3 + 2.5 * (1.0 - z))[:, None, None]
    scores[:, ~mask] = -np.inf
    scores -= scores.max(axis=2, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=2, keepdims=True)
    margin = rng.normal(1.5, 1.2, rows).astype(np.float32)
    confidence = 1.0 / (1.0 + np.exp(-margin))
    correct = rng.random(rows) < np.clip(confidence + 0.25 * (0.5 - z), 0.0, 1.0)
    labels = rng.integers(0, N_CLASSES, rows)
    other = (labels + rng.integers(1, N_CLASSES, rows)) % N_CLASSES
    predicted = np.where(correct, labels, other)
    logits = 0.3 * rng.standard_normal((rows, N_CLASSES), dtype=np.float32)
    logits[np.arange(rows), predicted] += margin + 1.0
    return logits, labels.astype(np.int64), scores


def write_traces(directory: Path, n: int, seed: int = 0) -> Path:
    """A trace directory of ``n`` synthetic examples, generated and written chunk by chunk."""
    from routeaudit._version import __version__
    from routeaudit.traces import TraceMeta
    from routeaudit.traces._common import MANIFEST, SCHEMA_VERSION

    directory.mkdir(parents=True)
    mask = np.arange(N_SOURCES)[None, :] <= np.arange(N_LAYERS)[:, None]  # layer l sees 0..l
    writers = {
        "logits": _NpyWriter(directory / "logits.npy", np.float32, (n, N_CLASSES)),
        "labels": _NpyWriter(directory / "labels.npy", np.int64, (n,)),
        "routing": _NpyWriter(directory / "routing.npy", np.float32, (n, N_LAYERS, N_SOURCES)),
    }
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK_ROWS):
        logits, labels, routing = _chunk(rng, min(CHUNK_ROWS, n - start), mask)
        writers["logits"].write(logits)
        writers["labels"].write(labels)
        writers["routing"].write(routing)
    entries = {name: writer.close() for name, writer in writers.items()}
    mask_writer = _NpyWriter(directory / "source_mask.npy", np.bool_, mask.shape)
    mask_writer.write(mask)
    entries["source_mask"] = mask_writer.close()
    meta = TraceMeta.parse({"name": f"scale-{n}", "family": "synthetic",
                            "source_families": {"embedding": [0],
                                                "history": list(range(1, N_SOURCES))}})
    manifest = {"schema_version": SCHEMA_VERSION, "routeaudit_version": __version__,
                "meta": meta.model_dump(mode="json"), "arrays": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return directory


def _limit_memory() -> None:  # in the child, before exec
    limit = int(DATA_LIMIT_GIB * (1 << 30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_audit(directory: Path, threads: int, extra: list[str], profile: Path | None = None
              ) -> dict[str, object]:
    """``routeaudit run DIR`` in a child process: wall seconds, the child's peak RSS (GiB),
    its exit code and the verdict rows of its JSON report."""
    report = directory.parent / f"{directory.name}-{threads}t.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    command = [*prefix, "-m", "routeaudit", "run", str(directory), "--no-config", "-q",
               "--json", str(report), *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=_limit_memory)
    output = child.stdout.read() if child.stdout else b""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    verdicts = []
    if report.exists():
        data = json.loads(report.read_text(encoding="utf-8"))
        verdicts = [(v.get("audit"), v.get("cell"), v.get("status")) for v in data.get("verdicts", [])]
        report.unlink()
    return {"wall": wall, "peak_gib": usage.ru_maxrss / (1 << 20), "rc": child.returncode,
            "load": load, "verdicts": verdicts, "output": output.decode("utf-8", "replace")}


def _profile_table(path: Path, top: int = 25) -> str:
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="N values (default 1e4,1e5,1e6)")
    parser.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values (default 1,2)")
    parser.add_argument("--calibrator", default=None,
                        help="also run the calibrator audits for this registered calibrator")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the largest N's 1-thread run and print the top functions")
    parser.add_argument("--workdir", default=None, help="where traces go (default: a temp folder)")
    parser.add_argument("--out", default=None, help="also write the printout to this file")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    extra = ["--calibrator", args.calibrator] if args.calibrator else []
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    tee = Tee(sys.stdout, *([out] if out else []))
    work = Path(tempfile.mkdtemp(prefix="routeaudit-scale-", dir=args.workdir))
    try:
        print(f"routeaudit run on synthetic traces: L = {N_LAYERS} layers, S = {N_SOURCES} sources, "
              f"K = {N_CLASSES}; default options{' + --calibrator ' + args.calibrator if extra else ''}; "
              f"{os.cpu_count()} CPUs", file=tee)
        print(f"{'N':>9} | {'threads':>7} | {'gen s':>6} | {'wall s':>7} | {'peak GiB':>8} | "
              f"{'µs/example':>10} | {'load1':>5} | rc | audits run (not skipped)", file=tee)
        rows = []
        for n in sizes:
            directory = work / f"n{n}"
            started = time.perf_counter()
            write_traces(directory, n)
            generated = time.perf_counter() - started
            for t in threads:
                profile = work / "profile.out" if args.profile and n == max(sizes) and t == threads[0] \
                    else None
                result = run_audit(directory, t, extra, profile)
                audits = sorted({str(a) for a, _, s in result["verdicts"] if s != "skip"})
                rows.append((n, t, result))
                print(f"{n:>9,} | {t:>7} | {generated:>6.1f} | {result['wall']:>7.1f} | "
                      f"{result['peak_gib']:>8.2f} | {1e6 * result['wall'] / n:>10.1f} | "
                      f"{result['load']:>5.2f} | {result['rc']:>2} | {','.join(audits)}", file=tee)
                if not result["verdicts"]:
                    print(result["output"][-2000:], file=tee)
                if profile is not None and profile.exists():
                    print(f"\ncProfile of N = {n:,}, {t} thread(s), top functions by own time "
                          "(profiling adds overhead):", file=tee)
                    print(_profile_table(profile), file=tee)
            shutil.rmtree(directory)
        largest = [r for n, _, r in rows if n == max(sizes)]
        if max(sizes) >= 1_000_000 and largest:
            best = min(largest, key=lambda r: float(r["wall"]))
            wall_ok = float(best["wall"]) <= WALL_TARGET_S
            mem_ok = max(float(r["peak_gib"]) for r in largest) <= MEMORY_TARGET_GIB
            print(f"\nN = {max(sizes):,}: wall {float(best['wall']):.1f} s (best of thread counts) vs "
                  f"≤ {WALL_TARGET_S:.0f} s: {'MET' if wall_ok else 'MISSED'}; peak "
                  f"{max(float(r['peak_gib']) for r in largest):.2f} GiB vs ≤ {MEMORY_TARGET_GIB:.0f} "
                  f"GiB: {'MET' if mem_ok else 'MISSED'}", file=tee)
        if rows:
            sample = rows[-1][2]["verdicts"]
            print(f"verdicts at N = {rows[-1][0]:,}: "
                  + ", ".join(f"{a}[{c}]={s}" for a, c, s in sample), file=tee)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
