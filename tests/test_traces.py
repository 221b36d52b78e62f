"""TraceSet contract: validation names field and index; storage round-trips without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routeaudit import TraceSet, TraceValidationError
from routeaudit.errors import TraceFileError


def good_arrays(n: int = 20, k: int = 4, layers: int = 3, sources: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = np.tril(np.ones((layers, sources), dtype=bool))
    raw = rng.random((n, layers, sources)) * mask
    routing = (raw / raw.sum(axis=2, keepdims=True)).astype(np.float32)
    return {
        "logits": rng.standard_normal((n, k)).astype(np.float32),
        "labels": rng.integers(0, k, size=n),
        "routing": routing,
        "source_mask": mask,
    }


def test_valid_traces_construct_and_report_shapes():
    ts = TraceSet(**good_arrays())
    assert (ts.n_examples, ts.n_classes, ts.n_layers, ts.n_sources) == (20, 4, 3, 3)
    assert ts.labels.dtype == np.int64


@pytest.mark.parametrize(
    ("mutate", "field", "index_text"),
    [
        (lambda a: a["logits"].__setitem__((7, 2), np.nan), "logits", "(7, 2)"),
        (lambda a: a["logits"].__setitem__((3, 0), np.inf), "logits", "(3, 0)"),
        (lambda a: a["routing"].__setitem__((5, 1, 0), np.nan), "routing", "(5, 1, 0)"),
        (lambda a: a["labels"].__setitem__(11, 4), "labels", "index 11"),
        (lambda a: a["labels"].__setitem__(2, -1), "labels", "index 2"),
        (lambda a: a["routing"].__setitem__((9, 2, 0), 0.9), "routing", "(9, 2)"),
        (lambda a: a.__setitem__("labels", a["labels"][:-1]), "labels", "N=20"),
        (lambda a: a.__setitem__("routing", a["routing"][:, 0]), "routing", "rank 3"),
        (lambda a: a.__setitem__("logits", a["logits"][:, :, None]), "logits", "rank 2"),
        (lambda a: a.__setitem__("source_mask", a["source_mask"][:2]), "source_mask", "[L, S]"),
        (lambda a: a["routing"].__setitem__((4, 0, 2), 0.5), "routing", "masked"),
        (lambda a: a["routing"].__setitem__((6, 2, 1), -0.1), "routing", "(6, 2, 1)"),
    ],
)
def test_each_kind_of_bad_input_names_field_and_index(mutate, field, index_text):
    arrays = good_arrays()
    mutate(arrays)
    with pytest.raises(TraceValidationError) as info:
        TraceSet(**arrays)
    assert info.value.field == field
    assert index_text in str(info.value) or index_text in info.value.expected


def test_routing_tolerance_is_1e_3():
    arrays = good_arrays()
    arrays["routing"][0, 2, 0] += 5e-4
    TraceSet(**arrays)  # inside tolerance
    arrays["routing"][0, 2, 0] += 1e-3
    with pytest.raises(TraceValidationError, match="row sums"):
        TraceSet(**arrays)


def test_require_examples():
    ts = TraceSet(**good_arrays())
    ts.require_examples(20, "x")
    with pytest.raises(TraceValidationError, match="at least 21"):
        ts.require_examples(21, "audit needs more")


def test_directory_round_trip_with_manifest(tmp_path):
    ts = TraceSet(**good_arrays(), group=np.arange(20) % 2, meta={"name": "m", "family": "moe"})
    out = ts.save(tmp_path / "traces")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["arrays"]["routing"]["shape"] == [20, 3, 3]
    assert len(manifest["arrays"]["logits"]["sha256"]) == 64
    back = TraceSet.load(out)
    for name, array in ts.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], array)
    assert back.meta.family == "moe"


def test_tampered_array_is_rejected(tmp_path):
    out = TraceSet(**good_arrays()).save(tmp_path / "t")
    labels = np.load(out / "labels.npy")
    labels[0] = (labels[0] + 1) % 4
    np.save(out / "labels.npy", labels)
    with pytest.raises(TraceValidationError, match="sha256"):
        TraceSet.load(out)


def test_npz_round_trip_and_pickle_refused(tmp_path):
    ts = TraceSet(**good_arrays())
    path = ts.save_npz(tmp_path / "t.npz")
    back = TraceSet.load(path)
    np.testing.assert_array_equal(back.routing, ts.routing)
    arrays = good_arrays()
    arrays["labels"] = np.array([{"evil": 1}] * 20, dtype=object)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceFileError, match=r"labels\.npy.*pickle") as info:
        TraceSet.load(tmp_path / "bad.npz")
    assert "allow_pickle" not in str(info.value)


def test_npz_missing_key(tmp_path):
    arrays = good_arrays()
    del arrays["routing"]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(TraceValidationError, match="routing"):
        TraceSet.load(tmp_path / "m.npz")


def test_subset_keeps_contract():
    ts = TraceSet(**good_arrays(), group=np.arange(20))
    sub = ts.subset(np.array([3, 1]))
    assert sub.n_examples == 2
    np.testing.assert_array_equal(sub.group, [3, 1])
