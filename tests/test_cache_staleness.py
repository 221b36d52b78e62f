"""The trace cache is never stale, says what it did, and relative paths mean "next to the adapter".

A reviewer multiplied the logits by 5 in the ``model.py`` next to an adapter and the rerun
silently reused the old traces: the key covered the adapter file, not what it imports. These
tests build a tiny adapter project in ``tmp_path`` (an adapter file importing sibling modules,
a numpy-only model so they stay fast) and check that an edit to any module it imports, directly,
transitively or lazily, misses the cache, that the session's status line says hit or miss and
what changed, that the key is the same in a fresh process (nothing from pytest leaks in), and
that a relative ``checkpoint`` works from any working directory.

Python caches imported modules, so every in-process "run" drops the project's modules from
``sys.modules`` first (as a new process would start without them), and bytecode is not written,
so an edit of the same size within the same second cannot be served from a stale ``.pyc``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import routeaudit
from routeaudit.errors import AdapterError
from routeaudit.model.adapter import adapter_path, find_adapters
from routeaudit.model.cache import (
    CacheWarning,
    TraceCache,
    compute_key,
    describe_changes,
    local_modules,
)
from routeaudit.model.extract import ModelSession
from routeaudit.session.plugins import import_user_file

REPO = Path(__file__).resolve().parents[1]
MODULES = ["toy_model", "toy_pkg", "toy_pkg.lazy", "toy_util"]  # by path

ADAPTER = '''
import numpy as np

import routeaudit
import toy_model
import toy_pkg


@routeaudit.adapter
class ToyAdapter(routeaudit.Adapter):
    """Two routing sites over three sources; the model code lives in toy_model.py."""

    name = "toy-staleness"
    checkpoint = "weights.npz"  # relative: next to this file, wherever the run starts

    def load(self, device):
        from toy_pkg import lazy  # a lazy import: not in sys.modules when the key is computed

        with np.load(self.resolve(self.checkpoint)) as stored:
            return {**stored, "bias": lazy.BIAS}

    def batches(self, split):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 4)).astype(np.float32)
        y = rng.integers(0, 3, size=40)
        for start in range(0, 40, 16):
            yield x[start:start + 16], y[start:start + 16]

    def forward(self, model, batch):
        x, y = batch
        logits, routing = toy_model.forward(model, x)
        return routeaudit.ForwardOutput(logits, y, routing)
'''

MODEL = '''
import numpy as np

from toy_util import SCALE


def forward(weights, x):
    logits = (x @ weights["head"] + weights["bias"]) * SCALE
    scores = (x @ weights["route"]).reshape(len(x), 2, 3)
    routing = np.exp(scores - scores.max(-1, keepdims=True))
    return logits, routing / routing.sum(-1, keepdims=True)
'''


def write_project(root: Path) -> Path:
    """The adapter project: adapter file, its model (two modules), a lazy import, weights."""
    (root / "toy_pkg").mkdir(parents=True, exist_ok=True)
    (root / "toy_pkg" / "__init__.py").write_text("")
    (root / "toy_pkg" / "lazy.py").write_text("BIAS = 0.0\n")
    (root / "toy_adapter.py").write_text(ADAPTER)
    (root / "toy_model.py").write_text(MODEL)
    (root / "toy_util.py").write_text("SCALE = 1.0\n")
    rng = np.random.default_rng(1)
    np.savez(root / "weights.npz", head=rng.normal(size=(4, 3)), route=rng.normal(size=(4, 6)))
    return root / "toy_adapter.py"


def forget(project: Path) -> None:
    """Drop every module imported from the project, as a fresh process would not have them."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and Path(file).resolve().is_relative_to(project.resolve()):
            del sys.modules[name]
    importlib.invalidate_caches()


def fresh_adapter(adapter_file: Path) -> routeaudit.Adapter:
    forget(adapter_file.parent)
    (found,) = find_adapters(import_user_file(adapter_file))
    return found()


def run_once(adapter_file: Path, cache_dir: Path) -> ModelSession:
    session = ModelSession(fresh_adapter(adapter_file), cache_dir=cache_dir, progress=False,
                           device="cpu")
    session.traces()
    return session


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    adapter_file = write_project(tmp_path / "project")
    yield adapter_file
    forget(adapter_file.parent)


def test_edit_to_the_imported_model_misses_and_re_extracts(project, tmp_path):
    cache = tmp_path / "cache"
    first = run_once(project, cache)
    assert not first.cache_hit
    assert first.cache_status.startswith("extracted (cache miss: no entry for key ")
    assert first.cache_changes == []  # nothing cached before: nothing to compare with
    assert first.cache_key.digest[:12] in first.cache_status

    second = run_once(project, cache)
    assert second.cache_hit and second.n_loads == 0
    assert second.cache_status == f"reused traces from the cache (key {first.cache_key.digest[:12]}…)"
    np.testing.assert_array_equal(second.traces().logits, first.traces().logits)

    util = project.parent / "toy_util.py"
    util.write_text(util.read_text().replace("SCALE = 1.0", "SCALE = 5.0"))  # the reviewer's edit
    third = run_once(project, cache)
    assert not third.cache_hit and third.n_loads == 1
    assert third.cache_key.digest != first.cache_key.digest
    assert third.cache_changes == ["toy_util.py changed"]
    assert "changed since the last cached extraction of ToyAdapter: toy_util.py changed" \
        in third.cache_report()
    verbose = third.cache_report(verbose=True)
    assert "\n    toy_util.py changed" in verbose and str(cache) in verbose
    np.testing.assert_allclose(third.traces().logits, 5 * first.traces().logits, rtol=1e-5)

    assert run_once(project, cache).cache_hit  # and the new entry is reused in turn


def test_every_import_route_is_in_the_key(project):
    """Direct (toy_model), transitive (toy_util, imported by toy_model) and lazy (toy_pkg.lazy,
    imported inside load(), so not yet in sys.modules) imports are all hashed."""
    adapter = fresh_adapter(project)
    assert "toy_pkg.lazy" not in sys.modules
    found = local_modules(adapter)
    folder = project.parent.resolve()
    assert found == [("toy_model", folder / "toy_model.py"), ("toy_pkg", folder / "toy_pkg" / "__init__.py"),
                     ("toy_pkg.lazy", folder / "toy_pkg" / "lazy.py"), ("toy_util", folder / "toy_util.py")]
    key = compute_key(adapter, split="eval", autocast="none")
    assert compute_key(fresh_adapter(project), split="eval", autocast="none").digest == key.digest
    for name, edit in [("toy_model.py", "\n# edited\n"), ("toy_pkg/lazy.py", "BIAS = 0.5\n")]:
        path = project.parent / name
        path.write_text(path.read_text() + edit)
        edited = compute_key(fresh_adapter(project), split="eval", autocast="none")
        assert edited.digest != key.digest, name
        assert describe_changes(key.parts, edited.parts) == [f"{name} changed"]
        key = edited
    recorded = key.parts
    assert recorded["routeaudit_version"] == routeaudit.__version__
    assert [m["module"] for m in recorded["local_modules"]] == MODULES


FRESH_PROCESS = '''
import json, sys
from routeaudit.model.adapter import find_adapters
from routeaudit.model.cache import compute_key
from routeaudit.model.extract import ModelSession
from routeaudit.session.plugins import import_user_file

(found,) = find_adapters(import_user_file(sys.argv[1]))
session = ModelSession(found, cache_dir=sys.argv[2], progress=False, device="cpu")
traces = session.traces()
print(json.dumps({"key": session.cache_key.digest, "hit": session.cache_hit,
                  "report": session.cache_report(),
                  "modules": [m["module"] for m in session.cache_key.parts["local_modules"]],
                  "logit": float(traces.logits[0, 0])}))
'''


def test_the_key_is_the_same_in_a_fresh_process(project, tmp_path):
    """Nothing of this pytest process (conftest, other tests' modules) reaches the key; a
    subprocess started elsewhere computes the same key, and sees the reviewer's edit."""
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = compute_key(fresh_adapter(project), split="eval", autocast="none")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(project), str(cache)],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["key"] == here.digest and not first["hit"]
    assert first["modules"] == MODULES
    model = project.parent / "toy_model.py"
    model.write_text(model.read_text().replace(") * SCALE", ") * SCALE * 5"))
    second = run()
    assert not second["hit"] and second["key"] != first["key"]
    assert "toy_model.py changed" in second["report"]
    assert second["logit"] == pytest.approx(5 * first["logit"], rel=1e-5)


def test_relative_checkpoint_resolves_next_to_the_adapter(project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = fresh_adapter(project)
    folder = project.parent.resolve()
    assert adapter.resolve("weights.npz") == folder / "weights.npz"
    assert adapter_path(type(adapter), "data/x.bin") == folder / "data" / "x.bin"
    assert adapter.resolve(elsewhere / "w.npz") == elsewhere / "w.npz"  # absolute: as is
    session = ModelSession(adapter, cache_dir=tmp_path / "cache", progress=False, device="cpu")
    traces = session.traces()
    assert traces.n_examples == 40
    assert [c["path"] for c in session.cache_key.parts["checkpoints"]] == [str(folder / "weights.npz")]
    assert not (elsewhere / "weights.npz").exists()


def test_a_cwd_relative_open_in_load_says_how_to_fix_it(project, tmp_path, monkeypatch):
    adapter = fresh_adapter(project)

    class CwdRelative(type(adapter)):
        def load(self, device):
            return dict(np.load(self.checkpoint))  # the bug: relative to the working directory

    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterError, match=r"use self\.resolve\('weights\.npz'\)"):
        ModelSession(CwdRelative(), cache=False, progress=False, device="cpu").traces()


def test_status_when_the_cache_is_off_or_cannot_key(project):
    session = ModelSession(fresh_adapter(project), cache=False, progress=False, device="cpu")
    assert session.cache_status == "not extracted yet"
    session.traces()
    assert session.cache_report() == "extracted (cache disabled)" and session.cache_key is None

    # typed in, as at a REPL: no file, so nothing to key by (and relative paths mean the cwd)
    namespace = {"__name__": "toy_nowhere", "base": type(fresh_adapter(project)),
                 "weights": str(project.parent / "weights.npz")}
    exec(compile("class Typed(base):\n    checkpoint = weights\n", "<typed>", "exec"), namespace)
    session = ModelSession(namespace["Typed"](), progress=False, device="cpu")
    with pytest.warns(CacheWarning, match="no source file"):
        session.traces()
    assert session.cache_status == "extracted (cache disabled: Typed has no source file to key it by)"


def test_closest_entry_prefers_the_same_file_and_explains_other_inputs(project, tmp_path):
    cache = TraceCache(tmp_path / "cache")
    first = run_once(project, cache.root)
    key = compute_key(fresh_adapter(project), split="eval", autocast="bf16")
    entry, parts = cache.closest(key)
    assert entry.name == first.cache_key.digest
    assert describe_changes(parts, key.parts) == ["autocast 'none' → 'bf16'"]
    legacy = {k: v for k, v in parts.items() if k not in ("local_modules", "routeaudit_version")}
    changes = describe_changes(legacy, first.cache_key.parts)
    assert "the cached entry predates local-module tracking" in changes
    assert f"routeaudit version None → {routeaudit.__version__!r}" in changes
    weights = project.parent / "weights.npz"
    np.savez(weights, head=np.zeros((4, 3)), route=np.zeros((4, 6)))
    assert run_once(project, cache.root).cache_changes == ["checkpoint weights.npz changed"]


def test_digits_fixture_key_covers_its_model_and_data_modules():
    """The bundled adapters import their model code from the package next to them."""
    module = import_user_file(REPO / "fixtures" / "digits" / "block_adapter.py")
    (adapter_class,) = find_adapters(module)
    names = {name for name, _ in local_modules(adapter_class)}
    assert {"routeaudit.fixtures.digits.model", "routeaudit.fixtures.digits.data",
            "routeaudit.fixtures.digits.adapter_base"} <= names
    assert not any(name.startswith(("torch", "numpy", "tests", "conftest")) for name in names)
    assert all(not path.is_relative_to(REPO / "routeaudit") for _, path in local_modules(adapter_class))
