"""Importing the calibrators is cheap: torch and the heavy scipy submodules load only when used.

Each check runs in a fresh interpreter, so it does not depend on what other tests imported.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Heavy: torch and every scipy submodule (scipy.optimize, .signal, .spatial, .sparse, .fft,
# .special, ...). The prologue runs before the code under test and records, for each heavy
# module, the innermost routeaudit frame that caused its import, so a failure names the
# module to fix.
_PROLOGUE = """
import json, os, sys, traceback
CULPRITS = {}
PACKAGE_DIR = os.sep + "routeaudit" + os.sep

def heavy(name):
    return name == "torch" or name.startswith(("torch.", "scipy."))

class _Spy:
    def find_spec(self, fullname, path=None, target=None):
        if heavy(fullname) and fullname not in CULPRITS:
            frames = [f for f in traceback.extract_stack() if PACKAGE_DIR in f.filename]
            CULPRITS[fullname] = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        return None

sys.meta_path.insert(0, _Spy())
"""

_EPILOGUE = """
loaded = {}  # "torch" / "scipy.<submodule>" -> where it was first imported
for m in sorted(sys.modules):
    if heavy(m):
        key = m.split(".")[0] if m.startswith("torch") else ".".join(m.split(".")[:2])
        if loaded.get(key, "?") == "?":
            loaded[key] = CULPRITS.get(key, CULPRITS.get(m, "?"))
print("RESULT " + json.dumps(loaded))
"""


def run_fresh(code: str, stdin: bytes | None = None) -> tuple[dict, str]:
    """Run ``code`` in a new interpreter; the heavy modules it left loaded (module -> culprit)."""
    script = _PROLOGUE + textwrap.dedent(code) + _EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", script], input=stdin, capture_output=True, cwd=ROOT, check=False
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"subprocess failed:\n{out}\n{err}"
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), out


def test_importing_the_registry_loads_no_torch_and_no_heavy_scipy():
    loaded, _ = run_fresh(
        """
        import routeaudit.calibrators as cal
        from routeaudit.calibrators import (
            MLPCalibrator, NadarayaWatson, TemperatureScaling, fit_many, kernel_sums,
            mlp_profile, oracle_bandwidth, scott_factor, spec_of,
        )
        from routeaudit.calibrators import bandwidth, checks, kde, kernel, mlp, simple
        for spec in cal.REFERENCE_CALIBRATORS.values():
            assert spec_of(spec) is spec and spec_of(spec.factory) is spec
            est = spec.make()
            repr(est), est.get_params()
            getattr(est, "sensitivity_grid", dict)()
        # benchmarks/speed.py still reaches these through the estimator module
        assert kernel.cv_nll_scores is bandwidth.cv_nll_scores
        assert kernel._fallback_model is bandwidth._fallback_model
        assert kernel._exact_predict is kde._exact_predict
        assert scott_factor(1000, 2) == 1000 ** (-1 / 6)
        assert fit_many([], [], []) == []  # nothing to train: the trainer is not imported
        """
    )
    assert loaded == {}, f"imported at import time (module: first importer): {loaded}"


def test_fit_many_loads_its_trainer_only_when_called():
    """On CPU the compiled trainer runs and torch is never imported; with compiled kernels
    off the torch trainer runs (and imports torch) on the first fit."""
    code = """
        import numpy as np
        import routeaudit.stats._kernels as kernels
        from routeaudit.calibrators import fit_many
        kernels.USE_NUMBA = {use_numba}
        print("BEFORE", "torch" in sys.modules, "routeaudit.calibrators.mlp_training" in sys.modules)
        rng = np.random.default_rng(0)
        X = rng.random((200, 2))
        y = (rng.random(200) < X[:, 0]).astype(float)
        (model,) = fit_many([X], [y], [0], max_epochs=2, restarts=1)
        print("AFTER", "torch" in sys.modules, model.n_epochs_)
        """
    loaded, out = run_fresh(code.format(use_numba=True))
    assert "BEFORE False False" in out
    assert "AFTER False 2" in out
    assert "torch" not in loaded
    loaded, out = run_fresh(code.format(use_numba=False))
    assert "BEFORE False False" in out
    assert "AFTER True 2" in out
    assert "mlp_torch.py" in loaded["torch"], loaded["torch"]


def test_fitted_mlp_predicts_without_torch():
    from routeaudit.calibrators import MLPCalibrator

    rng = np.random.default_rng(1)
    X = rng.random((300, 3))
    y = (rng.random(300) < X[:, 0]).astype(float)
    est = MLPCalibrator(max_epochs=3, restarts=1).fit(X, y)
    payload = pickle.dumps((est, X))
    loaded, out = run_fresh(
        """
        import pickle
        est, X = pickle.loads(sys.stdin.buffer.read())
        print("PRED " + est.predict(X).tobytes().hex())
        """,
        stdin=payload,
    )
    assert "torch" not in loaded, loaded
    line = next(x for x in out.splitlines() if x.startswith("PRED "))
    assert line[len("PRED ") :] == est.predict(X).tobytes().hex()


def test_exact_nadaraya_watson_on_cpu_loads_no_torch():
    loaded, out = run_fresh(
        """
        import numpy as np
        from routeaudit.calibrators import NadarayaWatson
        rng = np.random.default_rng(0)
        X = rng.random((300, 2))
        y = (rng.random(300) < X[:, 0]).astype(float)
        p = NadarayaWatson(method="exact").fit(X, y).predict(X[:20])
        print("OK", bool(np.isfinite(p).all()))
        """
    )
    assert "OK True" in out
    assert "torch" not in loaded, loaded
