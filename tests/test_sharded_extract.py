"""Sharded extraction: torchrun with N gloo processes on CPU writes one shard per rank and a
manifest that joins them; the joined traces equal a single-process extraction byte for byte
(routeaudit.model.shards, routeaudit.traces.reading / writing)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from routeaudit.cli import main
from routeaudit.errors import RouteAuditError, TraceFileError, UsageError
from routeaudit.model.shards import distributed_env
from routeaudit.traces import TraceSet
from routeaudit.traces.writing import publish, start_staging, write_shard, write_sharded_manifest

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "fixtures" / "digits" / "block_adapter.py"
FAST = ["--seeds", "0", "--permutations", "99", "--bootstrap", "100", "-q"]
SIZES = (7, 3, 5, 2, 6, 4, 1)  # 7 uneven batches: rank 0 gets 4 of them, rank 1 gets 3

TINY = f'''"""A tiny model adapter: uneven batches, group and token_index, failures on request."""
import os

import numpy as np
import torch

import routeaudit

SIZES = {SIZES}


@routeaudit.adapter
class Tiny(routeaudit.Adapter):
    name = "tiny"
    source_mask = np.array([[True, True, False], [True, True, True]])
    meta = {{"family": "attnres-full"}}

    def load(self, device):
        g = torch.Generator().manual_seed(3)
        return {{"w": torch.randn(4, 3, generator=g), "r": torch.randn(4, 2, 3, generator=g)}}

    def batches(self, split):
        g = torch.Generator().manual_seed(5)
        start = 0
        for size in SIZES:
            yield (torch.randn(size, 4, generator=g), torch.randint(0, 3, (size,), generator=g),
                   torch.arange(start, start + size))
            start += size

    def forward(self, model, batch):
        rank = os.environ.get("RANK")
        if rank is not None and rank == os.environ.get("TINY_FAIL_RANK"):
            raise RuntimeError("simulated failure on this rank")
        if rank is not None and rank == os.environ.get("TINY_EXIT_RANK"):
            os._exit(9)  # a hard crash: no exception, the rank just disappears
        x, y, index = batch
        scores = torch.einsum("bd,dls->bls", x, model["r"])
        scores = scores.masked_fill(~torch.from_numpy(self.source_mask), float("-inf"))
        return {{"logits": x @ model["w"], "labels": y, "routing": scores.softmax(-1),
                 "group": index % 2, "token_index": index}}
'''


def torchrun(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m routeaudit extract ...`` (a free port, so
    parallel runs cannot collide), one thread per process."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environ.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "routeaudit", "extract", *args]
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=180)


def assert_identical(single: Path, sharded: Path) -> None:
    """Every array equal, with the same dtype and order, and the same meta."""
    a, b = TraceSet.load(single), TraceSet.load(sharded)
    arrays_a, arrays_b = a.arrays(), b.arrays()
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, value in arrays_a.items():
        assert value.dtype == arrays_b[name].dtype, name
        assert value.shape == arrays_b[name].shape, name
        assert value.tobytes() == arrays_b[name].tobytes(), name
    assert a.meta.model_dump(mode="json") == b.meta.model_dump(mode="json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny adapter, extracted by one process and by two (cache on, in its own folder)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny_adapter.py").write_text(TINY)
    cache = ["--cache-dir", str(root / "cache")]
    done = torchrun("tiny_adapter.py", "-o", "sharded", *cache, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["extract", str(root / "tiny_adapter.py"), "-o", str(root / "single"), "-q",
                 *cache]) == 0
    return root


# ----------------------------------------------------------------------------- end to end
def test_digits_sharded_equals_single_process_and_gives_the_same_verdicts(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    done = torchrun(str(DIGITS), "-o", "sharded", "--no-cache", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shards" in done.stdout
    assert main(["extract", str(DIGITS), "-o", str(tmp_path / "single"), "--no-cache", "-q"]) == 0
    assert_identical(tmp_path / "single", tmp_path / "sharded")
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest["shards"]["world_size"] == 2 and "logits" not in manifest["arrays"]
    verdicts = {}
    for name in ("single", "sharded"):
        out = tmp_path / f"{name}.json"
        assert main(["run", str(tmp_path / name), *FAST, "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        verdicts[name] = [{k: v for k, v in verdict.items() if k not in ("duration_s", "target")}
                          for verdict in report["verdicts"]]
    assert verdicts["single"] == verdicts["sharded"]
    assert any(v["status"] == "pass" for v in verdicts["sharded"])


def test_uneven_batches_join_in_batch_order_with_every_field_and_the_cache_key(tiny):
    assert_identical(tiny / "single", tiny / "sharded")
    joined = TraceSet.load(tiny / "sharded")
    assert joined.token_index.tolist() == list(range(sum(SIZES)))  # the batch order, not rank order
    assert joined.meta.extraction["cache_key"] is not None  # recorded as a single process does
    rows = [json.loads((tiny / "sharded" / f"shard-{r:05d}-of-00002.json").read_text())["batch_rows"]
            for r in (0, 1)]
    assert rows == [list(SIZES[0::2]), list(SIZES[1::2])]


@pytest.mark.parametrize("how", ["TINY_FAIL_RANK", "TINY_EXIT_RANK"])
def test_a_failing_rank_leaves_nothing_behind(tiny, tmp_path, how):
    shutil.copy(tiny / "tiny_adapter.py", tmp_path)
    done = torchrun("tiny_adapter.py", "-o", "out", "--no-cache", cwd=tmp_path, **{how: "1"})
    assert done.returncode != 0
    assert not (tmp_path / "out").exists()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "tiny_adapter.py")
    if how == "TINY_FAIL_RANK":
        assert left == []  # no staging folder
        assert "rank 1 of 2" in done.stderr and "simulated failure" in done.stderr
        assert "nothing was written to out" in done.stderr
    else:
        # a peer that dies outright gets rank 0 killed by torchrun too, which may come before
        # rank 0's clean-up ends: at most a hidden staging folder is left, never `out`
        assert all(name.startswith(".out.staging-") for name in left), left
        assert "lost contact" in done.stderr or left


# ----------------------------------------------------------------------------- the join alone
@pytest.mark.parametrize("world", [1, 3, 4])
def test_join_does_not_depend_on_the_number_of_shards(tmp_path, world):
    rng = np.random.default_rng(world)
    sizes = [5, 1, 4, 4, 2, 3, 6]
    n = sum(sizes)
    routing = rng.dirichlet(np.ones(3), size=(n, 2)).astype(np.float32)
    whole = TraceSet(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 4, n), routing,
                     group=rng.integers(0, 3, n), meta={"name": "join"})
    starts = np.cumsum([0, *sizes])
    staging = start_staging(tmp_path / "joined")
    records = []
    for rank in range(world):
        mine = list(range(rank, len(sizes), world))
        index = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in mine])
        arrays = {k: v[index] for k, v in whole.arrays().items() if k != "source_mask"}
        records.append(write_shard(staging.folder, rank, world, arrays, [sizes[b] for b in mine]))
    write_sharded_manifest(staging.folder, whole._meta_json(), records,
                           {"source_mask": whole.source_mask})
    publish(staging)
    joined = TraceSet.load(tmp_path / "joined")
    for name, value in whole.arrays().items():
        assert joined.arrays()[name].dtype == value.dtype and np.array_equal(joined.arrays()[name], value)


# ----------------------------------------------------------------------------- untrusted shards
def _damaged(tiny: Path, tmp_path: Path) -> Path:
    target = tmp_path / "traces"
    shutil.copytree(tiny / "sharded", target)
    return target


def _rewrite_shard(directory: Path, rank: int, change) -> Path:
    """Edit shard ``rank``'s manifest and record its new sha256 (so only ``change`` is wrong)."""
    name = f"shard-{rank:05d}-of-00002.json"
    shard = json.loads((directory / name).read_text())
    change(shard)
    raw = json.dumps(shard).encode()
    (directory / name).write_bytes(raw)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"]["files"][rank]["sha256"] = hashlib.sha256(raw).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / name


def test_a_damaged_shard_manifest_is_exit_4_naming_the_file(tiny, tmp_path, capsys):
    directory = _damaged(tiny, tmp_path)
    shard = directory / "shard-00001-of-00002.json"
    shard.write_bytes(shard.read_bytes().replace(b'"rank": 1', b'"rank": 0'))
    assert main(["run", str(directory), *FAST]) == 4
    err = capsys.readouterr().err
    assert "shard-00001-of-00002.json" in err and "sha256" in err


def test_declared_sizes_are_checked_before_allocation(tiny, tmp_path):
    directory = _damaged(tiny, tmp_path)

    def huge(shard):
        shard["batch_rows"][0] = 10**15
        for entry in shard["arrays"].values():
            entry["shape"][0] = sum(shard["batch_rows"])

    _rewrite_shard(directory, 0, huge)
    with pytest.raises(RouteAuditError, match=r"\.shard-00000-of-00002\.npy; expected shape "
                                              r"\[1000000000000012.*shard manifest"):
        TraceSet.load(directory)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["batch_rows"].append(1), "batch_rows"),  # rows no longer sum to the arrays
    (lambda s: s.update(batch_rows=s["batch_rows"][:1],
                        arrays={k: {**e, "shape": [7, *e["shape"][1:]]} for k, e in s["arrays"].items()}),
     "batches"),  # not what round-robin gives rank 0
    (lambda s: s["arrays"]["logits"].update(file="../escape.npy"), "plain file name"),
    (lambda s: s["arrays"].pop("group"), "holds arrays"),
    (lambda s: s["arrays"]["logits"].update(dtype="float64"), "float32"),
])
def test_inconsistent_shard_manifests_are_refused_naming_the_file(tiny, tmp_path, change, message):
    directory = _damaged(tiny, tmp_path)
    _rewrite_shard(directory, 0 if message != "holds arrays" else 1, change)
    with pytest.raises(TraceFileError, match=message) as caught:
        TraceSet.load(directory)
    assert "shard-0000" in str(caught.value)


def test_a_missing_or_foreign_shard_is_refused(tiny, tmp_path):
    directory = _damaged(tiny, tmp_path)
    (directory / "shard-00001-of-00002.json").unlink()
    with pytest.raises(TraceFileError, match=r"shard-00001-of-00002\.json.*does not exist"):
        TraceSet.load(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"]["files"][1]["file"] = "/etc/passwd"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceFileError, match="shard 1"):
        TraceSet.load(directory)


def test_force_replaces_a_sharded_directory_but_not_one_with_a_foreign_file(tiny, tmp_path):
    directory = _damaged(tiny, tmp_path)
    traces = TraceSet.load(directory)
    traces.save(directory, force=True)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f"{name}.npy" for name in traces.arrays()] + ["manifest.json"])
    other = _damaged(tiny, tmp_path / "b")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TraceFileError, match=r"notes\.txt"):
        traces.save(other, force=True)
    assert (other / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- the launch
def test_distributed_env_reads_torchrun_and_leaves_plain_runs_alone():
    assert distributed_env({}) is None
    assert distributed_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = distributed_env({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "0"})
    assert (env.rank, env.world_size, env.local_rank) == (2, 3, 0)
    for bad in ({"WORLD_SIZE": "two", "RANK": "0"}, {"WORLD_SIZE": "2", "RANK": "2"},
                {"WORLD_SIZE": "2"}):
        with pytest.raises(UsageError):
            distributed_env(bad)


def test_import_routeaudit_model_shards_loads_no_torch():
    code = ("import sys, routeaudit.model.shards, routeaudit.cli; "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
