"""Speed of the reference calibrators against their obvious baselines, single-threaded.

Prints, in one run:

(a) Nadaraya–Watson 2-D bandwidth selection: 5-fold CV-NLL over 10 Scott multipliers
    (0.25..4, geometric) at n = 1e4 and 1e5 with the default binned method, against
    - the exact dense per-fold evaluation, as a user would write it: for every fold and
      bandwidth, ``NadarayaWatson(bandwidth=κ, method="exact").fit(train).predict(held-out)``
      (timed in full at 1e4; at 1e5 one fold × one bandwidth is timed and multiplied by 50);
    - our optimised exact CV (``cv_nll_scores(method="exact")``: one distance matrix per
      fold shared by all bandwidths), at 1e4;
    and the largest NLL difference between the binned and exact CV curves.
(b) the batched MLP control set, 3 seeds × 4 variants (full profile, zeroed profile,
    within-confidence-bin shuffled, globally shuffled), n = 10k, d = 1 + 8, 3 restarts each
    = 36 networks, via ``fit_many``, against scikit-learn ``MLPClassifier`` with the same
    architecture and optimiser trained one network at a time (36 fits, in float64 as
    scikit-learn does by default; fit_many trains in float32). The two stop at different
    epochs (scikit-learn's early stopping watches validation *accuracy*), so the time per
    network-epoch is printed too, and an equal-work run (every network exactly 20 epochs
    on 8k rows, no early stopping) gives the like-for-like throughput ratio.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_calibrators.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from routeaudit.calibrators import NadarayaWatson, fit_many
from routeaudit.calibrators import kernel as K

torch.set_num_threads(1)
GRID = tuple(float(k) for k in np.geomspace(0.25, 4.0, 10))


def nw_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skewed confidence and a bounded depth-variance-like feature, mild routing signal."""
    rng = np.random.default_rng(seed)
    c = rng.beta(5.0, 1.5, n) * 0.9 + 0.1
    v = 0.05 + 0.1 * rng.random(n) ** 2 + 0.05 * (1 - c) * rng.random(n)
    p = np.clip(c - 0.3 * (v - 0.1), 0.0, 1.0)
    return np.column_stack([c, v]), (rng.random(n) < p).astype(np.float64)


def _folds(n: int) -> list[np.ndarray]:
    perm = np.random.default_rng(0).permutation(n)
    return [np.sort(f) for f in np.array_split(perm, 5)]


def naive_exact_cv(X, y, grid, *, folds=None, limit=None) -> tuple[np.ndarray, int]:
    """The per-fold, per-bandwidth exact loop; ``limit`` stops after that many fits."""
    folds = _folds(len(y)) if folds is None else folds
    nll = np.zeros((len(grid), len(y)))
    done = 0
    for f in folds:
        tr = np.setdiff1d(np.arange(len(y)), f)
        for k, kappa in enumerate(grid):
            if limit is not None and done >= limit:
                return nll, done
            est = NadarayaWatson(bandwidth=kappa, method="exact").fit(X[tr], y[tr])
            p = np.clip(est.predict(X[f]), 1e-6, 1 - 1e-6)
            nll[k, f] = -(y[f] * np.log(p) + (1 - y[f]) * np.log1p(-p))
            done += 1
    return nll, done


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_nw(sizes=(10_000, 100_000)) -> dict:
    out = {}
    for n in sizes:
        X, y = nw_data(n)
        binned, t_binned = _timed(lambda X=X, y=y: K.cv_nll_scores(X, y, GRID))
        row = {"binned_s": t_binned, "kappa_binned": GRID[int(np.argmin(binned))]}
        if n <= 20_000:
            exact, t_opt = _timed(lambda X=X, y=y: K.cv_nll_scores(X, y, GRID, method="exact"))
            (naive, _), t_naive = _timed(lambda X=X, y=y: naive_exact_cv(X, y, GRID))
            row.update(
                optimised_exact_s=t_opt,
                naive_exact_s=t_naive,
                naive_extrapolated=False,
                max_nll_diff=float(np.max(np.abs(binned - exact))),
                naive_vs_optimised=float(np.max(np.abs(naive.mean(axis=1) - exact))),
                kappa_exact=GRID[int(np.argmin(exact))],
            )
        else:
            folds = _folds(n)
            _, t_one = _timed(
                lambda X=X, y=y, f=folds: naive_exact_cv(X, y, GRID[4:5], folds=f, limit=1)
            )
            row.update(
                naive_exact_s=t_one * 5 * len(GRID), naive_extrapolated=True, naive_one_fit_s=t_one
            )
        out[n] = row
    return out


def mlp_problem(n: int, seed: int, L: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    """The four control variants of one seed (null case: routing ~ confidence only)."""
    rng = np.random.default_rng(seed)
    c = rng.beta(4.0, 1.5, n) * 0.9 + 0.1
    H = -0.8 * (c[:, None] - c.mean()) / c.std() + 0.6 * rng.normal(size=(n, L))
    y = (rng.random(n) < np.clip(c**1.3, 0, 1)).astype(np.float64)
    X = np.column_stack([c, H])
    zeros = X.copy()
    zeros[:, 1:] = 0.0
    within = X.copy()
    for chunk in np.array_split(np.argsort(c), 15):
        within[chunk, 1:] = X[rng.permutation(chunk), 1:]
    shuffled = X.copy()
    shuffled[:, 1:] = X[rng.permutation(n), 1:]
    return [X, zeros, within, shuffled], y


def _sklearn_mlp(seed: int, *, fixed_epochs: int | None = None):
    from sklearn.neural_network import MLPClassifier

    common = dict(
        hidden_layer_sizes=(64, 64),
        activation="relu",
        solver="adam",
        learning_rate_init=1e-3,
        alpha=1e-4,
        batch_size=256,
        tol=0.0,
        random_state=seed,
    )
    if fixed_epochs is None:  # its own early stopping (on validation accuracy)
        return MLPClassifier(
            **common,
            max_iter=200,
            early_stopping=True,
            validation_fraction=0.2,
            n_iter_no_change=10,
        )
    return MLPClassifier(
        **common, max_iter=fixed_epochs, early_stopping=False, n_iter_no_change=fixed_epochs + 1
    )


def bench_mlp(n: int = 10_000, seeds=(0, 1, 2), restarts: int = 3, fixed_epochs: int = 20) -> dict:
    """fit_many vs scikit-learn one network at a time; as specified and at equal work."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    Xs, ys, ss = [], [], []
    for s in seeds:
        variants, y = mlp_problem(n, s)
        for X in variants:
            Xs.append(X)
            ys.append(y)
            ss.append(s)

    def ours(**kw):
        models = fit_many(Xs, ys, ss, restarts=restarts, **kw)
        return models, int(sum(m.restart_n_epochs_.sum() for m in models))

    def sklearn_all(fixed=None):
        epochs = 0
        for X, y, s in zip(Xs, ys, ss, strict=True):
            Z = StandardScaler().fit_transform(X)
            if fixed is not None:  # train on as many rows as fit_many trains on (80%)
                keep = np.random.default_rng(s).permutation(len(y))[round(0.2 * len(y)) :]
                Z, y = Z[keep], y[keep]
            for r in range(restarts):
                clf = _sklearn_mlp(1000 * s + r, fixed_epochs=fixed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    clf.fit(Z, y)
                epochs += clf.n_iter_
        return epochs

    (models, ours_epochs), t_ours = _timed(ours)
    sk_epochs, t_sk = _timed(sklearn_all)
    # equal work: every network trains exactly `fixed_epochs` epochs on 8k rows
    (_, fixed_ours), t_fixed_ours = _timed(
        lambda: ours(max_epochs=fixed_epochs, patience=fixed_epochs)
    )
    fixed_sk, t_fixed_sk = _timed(lambda: sklearn_all(fixed_epochs))
    assert fixed_ours == fixed_sk == len(Xs) * restarts * fixed_epochs
    return {
        "networks": len(Xs) * restarts,
        "ours_s": t_ours,
        "sklearn_s": t_sk,
        "ours_epochs": ours_epochs,
        "sklearn_epochs": sk_epochs,
        "fixed_epochs": fixed_epochs,
        "fixed_ours_s": t_fixed_ours,
        "fixed_sklearn_s": t_fixed_sk,
        "val_loss": [m.best_val_loss_ for m in models],
    }


def run(quick: bool = False) -> dict:
    """Run both benchmarks and print a report; returns the raw numbers."""
    print(
        f"threads: torch={torch.get_num_threads()} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print("\n(a) NW 2-D, 5-fold CV-NLL over 10 Scott multipliers (0.25..4)")
    nw = bench_nw((10_000,) if quick else (10_000, 100_000))
    for n, r in nw.items():
        naive = r["naive_exact_s"]
        how = " (extrapolated: one fold × one bandwidth × 50)" if r["naive_extrapolated"] else ""
        print(
            f"  n={n:>7,}: binned {r['binned_s']:.3f}s | exact per-fold loop {naive:.1f}s{how}"
            f" | ratio {naive / r['binned_s']:.0f}x"
        )
        if "optimised_exact_s" in r:
            print(
                f"           optimised exact CV (shared distances) {r['optimised_exact_s']:.1f}s"
                f" | ratio {r['optimised_exact_s'] / r['binned_s']:.0f}x"
                f" | max |NLL binned - exact| {r['max_nll_diff']:.1e}"
                f" | chosen κ {r['kappa_binned']:.3g} vs {r['kappa_exact']:.3g}"
            )
    n_mlp = 3000 if quick else 10_000
    print(f"\n(b) batched MLP: 3 seeds × 4 variants × 3 restarts, n = {n_mlp:,}, d = 9")
    m = bench_mlp(n=n_mlp)
    per_ours = m["ours_s"] / m["ours_epochs"] * 1e3
    per_sk = m["sklearn_s"] / m["sklearn_epochs"] * 1e3
    print(
        f"  fit_many: {m['networks']} networks in {m['ours_s']:.1f}s ({m['ours_epochs']} "
        f"network-epochs, {per_ours:.1f} ms each)"
    )
    print(
        f"  sklearn MLPClassifier one by one: {m['sklearn_s']:.1f}s ({m['sklearn_epochs']} "
        f"network-epochs, {per_sk:.1f} ms each)"
    )
    print(
        f"  ratio: wall {m['sklearn_s'] / m['ours_s']:.1f}x, per network-epoch "
        f"{per_sk / per_ours:.1f}x (each with its own early stopping: fit_many's watches "
        "the validation loss, as specified; scikit-learn's the validation accuracy)"
    )
    e = m["fixed_epochs"]
    print(
        f"  equal work ({m['networks']} networks × {e} epochs on 8k rows, no early "
        f"stopping): fit_many {m['fixed_ours_s']:.1f}s vs sklearn {m['fixed_sklearn_s']:.1f}s"
        f" | ratio {m['fixed_sklearn_s'] / m['fixed_ours_s']:.1f}x"
    )
    return {"nw": nw, "mlp": m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1e4 only; small MLP set")
    run(quick=parser.parse_args().quick)


if __name__ == "__main__":
    main()
