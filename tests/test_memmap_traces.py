"""Memory-mapped trace directories: the same arrays and the same verdicts as reading them,
damaged files still a clear error naming the file, and validation and summaries that work
block by block instead of copying [N, L, S] routing as float64."""

from __future__ import annotations

import hashlib
import json
import mmap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import routeaudit.traces._common as common
import routeaudit.traces.reading as reading
from routeaudit.cli import main
from routeaudit.errors import TraceFileError, TraceValidationError
from routeaudit.summaries import default_registry
from routeaudit.traces import TraceSet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAST = ["--seeds", "0,1", "--permutations", "99", "--bootstrap", "100", "-q"]


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a file map (walking its chain of bases)."""
    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


def _planted_dir(tmp_path: Path) -> Path:
    return TraceSet.load(FIXTURES / "planted.npz").save(tmp_path / "planted")


def _traces(n: int, n_layers: int, n_sources: int, seed: int = 0) -> TraceSet:
    """Depth routing (layer l mixes sources 0..l) with random softmax rows."""
    rng = np.random.default_rng(seed)
    mask = np.arange(n_sources)[None, :] <= np.arange(n_layers)[:, None]
    scores = 2.0 * rng.standard_normal((n, n_layers, n_sources)).astype(np.float32)
    scores[:, ~mask] = -np.inf
    routing = np.exp(scores - scores.max(axis=2, keepdims=True))
    routing /= routing.sum(axis=2, keepdims=True)
    logits = rng.standard_normal((n, 4)).astype(np.float32)
    return TraceSet(logits, rng.integers(0, 4, n), routing, source_mask=mask)


def _fix_digest(directory: Path, name: str) -> None:
    """Make the manifest list the current digest of ``name``.npy, so the damage inside the
    file is what the reader meets (not a digest mismatch)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["arrays"][name]["sha256"] = hashlib.sha256((directory / f"{name}.npy").read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _verdicts(path: Path) -> list[dict]:
    """The verdicts of a JSON report without wall-clock fields."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "duration" not in k and "time" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(json.loads(path.read_text())["verdicts"])


def test_mapped_arrays_equal_read_arrays(tmp_path):
    directory = _planted_dir(tmp_path)
    read = TraceSet.load(directory, mmap=False)
    mapped = TraceSet.load(directory, mmap=True)
    source = TraceSet.load(FIXTURES / "planted.npz")
    assert _mapped(mapped.routing) and _mapped(mapped.logits)
    assert not _mapped(read.routing)
    assert not mapped.routing.flags.writeable  # read-only: an audit cannot change the file
    for name, array in source.arrays().items():
        for loaded in (read, mapped):
            got = loaded.arrays()[name]
            assert got.dtype == array.dtype and got.shape == array.shape
            assert np.array_equal(got, array), name
    registry = default_registry()
    for summary in [*registry.applicable(source), "H2", "H3_norm"]:
        want = registry.get(summary).fn(source)
        assert np.array_equal(registry.get(summary).fn(mapped), want), summary


def test_default_maps_only_large_arrays(tmp_path, monkeypatch):
    directory = _planted_dir(tmp_path)
    assert not _mapped(TraceSet.load(directory).routing)  # 10,000 x 4 x 4: read
    routing_bytes = (directory / "routing.npy").stat().st_size
    monkeypatch.setattr(reading, "MMAP_MIN_BYTES", routing_bytes - 200)
    loaded = TraceSet.load(directory)
    assert _mapped(loaded.routing) and not _mapped(loaded.labels)


def test_verdicts_identical_mapped_and_read(tmp_path, monkeypatch):
    directory = _planted_dir(tmp_path)
    monkeypatch.setattr(reading, "MMAP_MIN_BYTES", 1 << 62)  # never map
    assert main(["run", str(directory), *FAST, "--json", str(tmp_path / "read.json")]) == 0
    monkeypatch.setattr(reading, "MMAP_MIN_BYTES", 1)  # map every array
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 1000)  # and work in many small blocks
    assert main(["run", str(directory), *FAST, "--json", str(tmp_path / "mapped.json")]) == 0
    read, mapped = _verdicts(tmp_path / "read.json"), _verdicts(tmp_path / "mapped.json")
    assert [v["status"] for v in read].count("pass") >= 9  # the planted signal is found
    assert mapped == read


def test_truncated_npy_under_mmap_names_the_file(tmp_path, monkeypatch, capsys):
    directory = _planted_dir(tmp_path)
    file = directory / "routing.npy"
    file.write_bytes(file.read_bytes()[:-100])
    _fix_digest(directory, "routing")
    with pytest.raises(TraceFileError) as caught:
        TraceSet.load(directory, mmap=True)
    assert "routing.npy" in str(caught.value) and "only" in str(caught.value)
    monkeypatch.setattr(reading, "MMAP_MIN_BYTES", 1)
    assert main(["run", str(directory)]) == 4
    assert "routing.npy" in capsys.readouterr().err


def test_damaged_header_and_digest_under_mmap(tmp_path, monkeypatch, capsys):
    directory = _planted_dir(tmp_path)
    file = directory / "routing.npy"
    data = bytearray(file.read_bytes())
    data[:6] = b"NOTNPY"
    file.write_bytes(bytes(data))
    monkeypatch.setattr(reading, "MMAP_MIN_BYTES", 1)
    assert main(["run", str(directory)]) == 4  # digest mismatch: the manifest no longer fits
    assert "routing.npy" in capsys.readouterr().err
    _fix_digest(directory, "routing")
    with pytest.raises(TraceFileError, match=r"routing\.npy.*not an \.npy array"):
        TraceSet.load(directory, mmap=True)


def test_validation_errors_name_the_whole_array_index(monkeypatch):
    """Blocks report the first failing kind of check, at its index in the whole array."""
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 50)  # 5 rows of 2 x 5 per block
    ts = _traces(40, 2, 5)
    logits, labels, routing = ts.logits, ts.labels, ts.routing.copy()
    routing[3, 1, :] *= 1.5  # a bad sum in block 0 ...
    routing[27, 1, 0] = -0.25  # ... and a negative weight in block 5 (reported first)
    with pytest.raises(TraceValidationError) as caught:
        TraceSet(logits, labels, routing, source_mask=ts.source_mask)
    assert "negative weight" in str(caught.value) and "(27, 1, 0)" in str(caught.value)
    routing[27, 1, 0] = 0.0
    routing[27, 1, 1] += 0.25
    with pytest.raises(TraceValidationError, match=r"index \(3, 1\): row sums to 1.5 "):
        TraceSet(logits, labels, routing, source_mask=ts.source_mask)
    routing = ts.routing.copy()
    routing[33, 0, 0] = np.nan
    with pytest.raises(TraceValidationError, match=r"index \(33, 0, 0\): non-finite value nan"):
        TraceSet(logits, labels, routing, source_mask=ts.source_mask)


def test_mapped_validation_and_summaries_do_not_copy_routing(tmp_path, monkeypatch):
    n, n_layers, n_sources = 40_000, 12, 13
    directory = _traces(n, n_layers, n_sources).save(tmp_path / "big")
    float64_copy = n * n_layers * n_sources * 8  # 50 MB
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 1 << 18)  # blocks of 2 MB as float64
    tracemalloc.start()
    try:
        loaded = TraceSet.load(directory, mmap=True)
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        registry = default_registry()
        for name in ("r_agg", "depth_variance", "depth_variance_across"):
            registry.get(name).fn(loaded)
        _, summary_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _mapped(loaded.routing)
    # block work: a few blocks plus O(N x L) results, far below one float64 copy
    assert load_peak < float64_copy / 4, load_peak
    assert summary_peak < float64_copy / 2, summary_peak
