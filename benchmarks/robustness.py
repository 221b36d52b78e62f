"""Bad input never crashes: a generated campaign of corrupted traces, files and directories.

Every case is handed to ``routeaudit run`` (in process, through ``routeaudit.cli.main``)
and must end with exit code 0, 1, 4 or 5 (never 3, the internal error), print no traceback,
and, when it is refused (exit 4), name the file or the field at fault. The cases are
generated with hypothesis from a small valid TraceSet:

* ``arrays``: arrays and meta of an ``.npz`` changed one way or several (missing, extra or
  renamed keys; wrong dtypes, shapes, sizes; NaN, inf, huge and negative values; routing rows
  that do not sum to 1; object arrays that need pickle; meta that is not JSON, not a dict, or
  ill-typed);
* ``bytes``: a valid ``.npz`` or ``.npy`` truncated, bit-flipped, emptied or replaced by
  random bytes;
* ``directory``: a valid trace directory whose manifest or array files are corrupted,
  removed, swapped or made folders;
* ``target``: paths that are not what they claim (missing, a folder for a file, a bad
  adapter ``.py``).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/robustness.py [--examples 12000] [--seed 0]``
(a few hundred run in the tests: ``tests/test_robustness.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces

#: A fast battery: every case that loads still runs real audits, but cheaply.
RUN_ARGS = ["--seeds", "0", "--permutations", "19", "--bootstrap", "20", "--audit",
            "permutation_null", "--audit", "content_dependence", "--summary", "r_agg", "-q"]
ALLOWED = {0, 1, 4, 5}
_BASE = make_traces("planted", 240, seed=0)
BASE_ARRAYS = {k: np.asarray(v) for k, v in _BASE.arrays().items()}
BASE_META = _BASE.meta.model_dump(mode="json")

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=10)
META_FIELDS = ["name", "family", "routing_mode", "source_families", "layer_names",
               "layer_types", "layer_depth", "schedule", "replicate", "per_token"]


@dataclass
class Outcome:
    kind: str
    code: int
    stderr: str

    @property
    def crashed(self) -> bool:
        return self.code not in ALLOWED or "Traceback" in self.stderr

    @property
    def unnamed(self) -> bool:
        """An exit-4 message that names neither a file nor a field."""
        if self.code != 4:
            return False
        text = self.stderr
        names = [*BASE_ARRAYS, "meta", "manifest", ".npz", ".npy", ".py", "file", "folder",
                 "directory", "target", "path"]
        return not any(name in text for name in names)


def run_target(path: Path | str) -> tuple[int, str]:
    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["--no-entry-points", "run", str(path), *RUN_ARGS])
    return code, err.getvalue()


# ----------------------------------------------------------------------------- mutations
def _mutate_array(draw, name: str, value: np.ndarray) -> np.ndarray | object:
    how = draw(st.sampled_from(["nan", "inf", "huge", "negative", "dtype", "transpose",
                                "extra_dim", "drop_dim", "truncate", "empty", "scalar",
                                "object", "strings", "complex", "bool", "unsigned"]))
    v = np.array(value, copy=True)
    if v.dtype.kind not in "biufc":  # an earlier mutation made it strings or objects
        return v[:1] if v.ndim else v
    if how in ("nan", "inf", "huge", "negative") and v.size:
        flat = v.astype(np.float64).reshape(-1)
        i = draw(st.integers(0, flat.size - 1))
        flat[i] = {"nan": np.nan, "inf": np.inf, "huge": 1e300, "negative": -7.0}[how]
        with np.errstate(all="ignore"):  # casting inf to an integer dtype is the point
            return flat.reshape(v.shape).astype(v.dtype if how != "nan" else np.float64,
                                                 copy=False)
    if how == "dtype":
        with np.errstate(all="ignore"):
            return v.astype(draw(st.sampled_from([np.float16, np.int8, np.uint64, np.float64])))
    if how == "transpose":
        return v.T
    if how == "extra_dim":
        return v[..., None]
    if how == "drop_dim":
        return v.reshape(-1) if v.ndim > 1 else v.reshape(-1)[:0]  # 0-d or 1-d: empty
    if how == "truncate":
        return v[: draw(st.integers(0, max(len(v) - 1, 0)))] if v.ndim else v
    if how == "empty":
        return np.zeros((0, *v.shape[1:]), dtype=v.dtype)
    if how == "scalar":
        return np.array(3.0)
    if how == "object":
        return np.array([{"x": 1}, None], dtype=object)
    if how == "strings":
        return np.array(["a", "b"] * max(1, len(v) // 2))
    if how == "complex":
        return v.astype(np.complex128)
    if how == "bool":
        return v.astype(bool)
    return (np.abs(v) * 2**40).astype(np.uint64) if v.size else v.astype(np.uint64)


@st.composite
def array_cases(draw):
    arrays = dict(BASE_ARRAYS)
    meta: object = dict(BASE_META)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["mutate", "drop", "extra", "meta_field", "meta_whole",
                                     "meta_garbage", "routing_sum", "mask"]))
        if what == "mutate":
            name = draw(st.sampled_from(sorted(arrays)))
            arrays[name] = _mutate_array(draw, name, arrays[name])
        elif what == "drop" and arrays:
            arrays.pop(draw(st.sampled_from(sorted(arrays))))
        elif what == "extra":
            arrays[draw(st.sampled_from(["junk", "group", "expert_logits", "token_index"]))] = \
                np.arange(draw(st.integers(0, 300)))
        elif what == "meta_field" and isinstance(meta, dict):
            meta[draw(st.sampled_from(META_FIELDS))] = draw(JSONISH)
        elif what == "meta_whole":
            meta = draw(JSONISH)
        elif what == "meta_garbage":
            meta = draw(st.binary(max_size=30))
        elif what == "routing_sum" and "routing" in arrays:
            r = np.array(arrays["routing"], copy=True)
            if r.dtype.kind in "biuf" and r.ndim == 3 and r.size:
                r = r.astype(np.float64)
                r[draw(st.integers(0, r.shape[0] - 1))] *= draw(st.floats(0, 3))
            arrays["routing"] = r
        elif what == "mask":
            arrays["source_mask"] = draw(st.sampled_from(
                [np.zeros((2, 2), bool), np.ones((99, 1), bool), np.array([[2, 3]]),
                 np.zeros(BASE_ARRAYS["source_mask"].shape, bool)]))
    return arrays, meta


def _write_npz(path: Path, arrays: dict[str, object], meta: object) -> None:
    payload = dict(arrays)
    if isinstance(meta, bytes):
        payload["meta"] = np.frombuffer(meta, dtype=np.uint8)
    else:
        try:
            payload["meta"] = np.array(json.dumps(meta, allow_nan=True))
        except (TypeError, ValueError):
            payload["meta"] = np.array(str(meta))
    np.savez(path, **payload)  # object arrays are pickled here; loading must refuse them


@st.composite
def byte_cases(draw):
    kind = draw(st.sampled_from(["npz", "npy"]))
    buf = io.BytesIO()
    if kind == "npz":
        np.savez(buf, **BASE_ARRAYS)
    else:
        np.save(buf, BASE_ARRAYS["logits"])
    data = bytearray(buf.getvalue())
    how = draw(st.sampled_from(["truncate", "flip", "empty", "random", "header"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "empty":
        data = bytearray()
    elif how == "random":
        data = bytearray(draw(st.binary(min_size=1, max_size=400)))
    else:  # a header that declares a huge array
        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 10), }"
        data = bytearray(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    suffix = draw(st.sampled_from([".npz", ".npz", ".npy"]))
    return bytes(data), suffix


@st.composite
def directory_cases(draw):
    how = draw(st.sampled_from(["manifest_json", "manifest_bytes", "drop_file", "swap_file",
                                "garbage_file", "file_as_dir", "entry_field", "escape",
                                "empty_manifest", "no_manifest"]))
    detail = draw(JSONISH) if how in ("manifest_json", "entry_field") else draw(
        st.binary(max_size=40))
    return how, detail, draw(st.sampled_from(sorted(BASE_ARRAYS)))


def _build_directory(root: Path, case) -> Path:
    how, detail, name = case
    target = root / "traces"
    _BASE.save(target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["arrays"].get(name, {})
    if how == "manifest_json":
        manifest_path.write_text(json.dumps(detail, allow_nan=True))
    elif how == "manifest_bytes":
        manifest_path.write_bytes(detail)
    elif how == "drop_file":
        (target / entry.get("file", f"{name}.npy")).unlink(missing_ok=True)
    elif how == "swap_file":
        other = next(e for k, e in manifest["arrays"].items() if k != name)
        shutil.copy(target / other["file"], target / entry["file"])
    elif how == "garbage_file":
        (target / entry["file"]).write_bytes(detail or b"\x00")
    elif how == "file_as_dir":
        (target / entry["file"]).unlink()
        (target / entry["file"]).mkdir()
    elif how == "entry_field":
        manifest["arrays"][name] = detail
        manifest_path.write_text(json.dumps(manifest, allow_nan=True))
    elif how == "escape":
        manifest["arrays"][name]["file"] = "../outside.npy"
        manifest_path.write_text(json.dumps(manifest))
    elif how == "empty_manifest":
        manifest_path.write_bytes(b"")
    else:
        manifest_path.unlink()
    return target


TARGET_CASES = ["missing.npz", "folder.npz", "bad_syntax.py", "raises.py", "no_adapter.py",
                "two_adapters.py", "returns_junk.py", "dangling_link.npz"]


def _build_target(root: Path, name: str) -> Path:
    path = root / name
    if name == "folder.npz":
        path.mkdir()
    elif name == "bad_syntax.py":
        path.write_text("def (:\n")
    elif name == "raises.py":
        path.write_text("raise RuntimeError('adapter file exploded')\n")
    elif name == "no_adapter.py":
        path.write_text("x = 1\n")
    elif name == "two_adapters.py":
        path.write_text("import routeaudit\n@routeaudit.adapter\ndef a():\n    return 1\n"
                        "@routeaudit.adapter\ndef b():\n    return 2\n")
    elif name == "returns_junk.py":
        path.write_text("import routeaudit\n@routeaudit.adapter\ndef a():\n    return {'x': 1}\n")
    elif name == "dangling_link.npz":
        path.symlink_to(root / "nowhere.npz")
    return path


CASES = st.one_of(
    st.tuples(st.just("arrays"), array_cases()),
    st.tuples(st.just("bytes"), byte_cases()),
    st.tuples(st.just("directory"), directory_cases()),
    st.tuples(st.just("target"), st.sampled_from(TARGET_CASES)),
)


def check_case(case) -> Outcome:
    """Write one generated case to a fresh folder and run ``routeaudit run`` on it."""
    kind, detail = case
    with tempfile.TemporaryDirectory(prefix="ra-robust-") as tmp:
        root = Path(tmp)
        if kind == "arrays":
            path = root / "t.npz"
            _write_npz(path, *detail)
        elif kind == "bytes":
            data, suffix = detail
            path = root / f"t{suffix}"
            path.write_bytes(data)
        elif kind == "directory":
            path = _build_directory(root, detail)
        else:
            path = _build_target(root, detail)
        code, err = run_target(path)
    return Outcome(kind, code, err)


def campaign(examples: int, seed: int) -> tuple[Counter, list[Outcome]]:
    counts: Counter = Counter()
    bad: list[Outcome] = []

    @hyp_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(CASES)
    def one(case):
        outcome = check_case(case)
        counts[(outcome.kind, outcome.code)] += 1
        if outcome.crashed or outcome.unnamed:
            bad.append(outcome)

    one()
    return counts, bad


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    counts, bad = campaign(args.examples, args.seed)
    total = sum(counts.values())
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {total} generated "
          f"cases in {time.perf_counter() - started:.0f} s")
    for (kind, code), n in sorted(counts.items()):
        print(f"  {kind:<10} exit {code}: {n}")
    crashes = [o for o in bad if o.crashed]
    unnamed = [o for o in bad if not o.crashed]
    print(f"crashes (exit not in {{0, 1, 4, 5}} or a traceback): {len(crashes)}")
    print(f"exit-4 messages naming no file or field: {len(unnamed)}")
    for o in bad[:10]:
        print(f"--- {o.kind} exit {o.code}\n{o.stderr[-1500:]}")


if __name__ == "__main__":
    main_cli()
