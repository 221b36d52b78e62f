"""The HTML report: its figures come from what the audits record, every figure is well-formed
SVG, user text is escaped, and reports written before the figure data existed still render.

One cheap real run (three targets: planted traces with a registered calibrator, synthetic
soft-MoE traces, a toy model with routing interventions) feeds every figure kind; the
recorded figure data are checked against independent computations on the same traces.
"""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from routeaudit.audit import seeds_for
from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.metrics import confidence_and_correct
from routeaudit.report.html import render
from routeaudit.simulation.experts import generate_moe
from routeaudit.stats.gaps import stratum_reliability
from routeaudit.summaries import default_registry
from routeaudit.verdict import Report, Status, Summary, Verdict

CAL_ADAPTER = '''
import routeaudit
from routeaudit.calibrators import ARCondCal
from routeaudit.fixtures.synthetic import make_traces


@routeaudit.adapter
def traces():
    return make_traces("planted", 3000, seed=11, effect=0.5, confound=0.3)


@routeaudit.calibrator(["confidence", "depth_variance"], name="ar_condcal")
def ar_condcal():
    return ARCondCal()
'''

# two routing sites over a constant source a and the input b (tests/test_causal_content.py)
TOY_MODEL = '''
import contextlib
import numpy as np
import torch
import routeaudit


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.intervention = None

    def forward(self, x):
        logits = torch.tensor([2.0, 0.0], dtype=torch.float64).expand(2, 2).clone()
        weights = []
        h = x
        for site in range(2):
            z = logits[site].clone()
            iv = self.intervention
            if iv is not None and iv.site_mask(["mlp", "mlp"], 2)[site]:
                drop = torch.from_numpy(iv.source_mask({"a": [0], "b": [1]}, 2))
                z = z.masked_fill(drop, float("-inf"))
            a = torch.softmax(z, dim=0)
            weights.append(a.expand(x.shape[0], 2))
            h = a[0] * torch.zeros_like(h) + a[1] * h
        out = torch.stack([torch.zeros(x.shape[0], dtype=h.dtype), 20.0 * h[:, 0]], dim=1)
        return out, torch.stack(weights, dim=1)


@routeaudit.adapter
class Toy(routeaudit.Adapter):
    name = "toy"
    meta = {"layer_types": ["mlp", "mlp"], "layer_depth": [0, 1],
            "source_families": {"a": [0], "b": [1]}}

    def load(self, device):
        return Net().eval()

    def batches(self, split):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1000, 1))
        y = (x[:, 0] > 0).astype(np.int64)
        for i in range(0, 1000, 500):
            yield torch.from_numpy(x[i:i + 500]), torch.from_numpy(y[i:i + 500])

    def forward(self, model, batch):
        x, y = batch
        logits, routing = model(x)
        return routeaudit.ForwardOutput(logits, y, routing)

    @contextlib.contextmanager
    def intervene(self, model, intervention):
        model.intervention = intervention
        try:
            yield
        finally:
            model.intervention = None
'''

AUDITS = ["stratification", "permutation_null", "capacity_control", "shuffled_profile",
          "baseline_gain", "content_dependence", "causal_ablation", "expert_calibration"]
PERMUTATIONS = 199
SEEDS = [0, 1]
#: Every figure kind the report can draw, and the audit whose data it needs.
KINDS = {"reliability": "stratification", "reliability-gap": "stratification",
         "null": "permutation_null", "gain-ece": "capacity_control", "gain": "capacity_control",
         "causal": "causal_ablation", "expert-ece": "expert_calibration",
         "expert-reliability": "expert_calibration", "worst-shift": "expert_calibration",
         "intervals": "content_dependence", "effect": "stratification"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run over three targets; returns (report, html text, {name: target path})."""
    d = tmp_path_factory.mktemp("html")
    (d / "cal_adapter.py").write_text(CAL_ADAPTER)
    (d / "toy_model.py").write_text(TOY_MODEL)
    generate_moe("soft", 4000, seed=0, truth=False).save_npz(d / "moe.npz")
    targets = {"cal": str(d / "cal_adapter.py"), "moe": str(d / "moe.npz"),
               "toy": str(d / "toy_model.py")}
    args = ["run", *targets.values(), "--seeds", ",".join(map(str, SEEDS)), "--permutations",
            str(PERMUTATIONS), "--bootstrap", "100", "--no-cache", "-q",
            "--json", str(d / "r.json"), "--html", str(d / "r.html")]
    for audit in AUDITS:
        args += ["--audit", audit]
    assert main(args) in (0, 1)
    report = Report.model_validate_json((d / "r.json").read_text())
    return report, (d / "r.html").read_text(encoding="utf-8"), targets


def verdicts(report: Report, audit: str, target: str | None = None) -> list[Verdict]:
    return [v for v in report.verdicts if v.audit == audit and v.status is not Status.SKIP
            and (target is None or v.target == target)]


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def kinds(page: str) -> list[str]:
    return [ET.fromstring(s).get("data-fig") for s in svgs(page)]


# --------------------------------------------------------------------------- recorded data


def test_stratum_reliability_matches_a_loop():
    rng = np.random.default_rng(0)
    n, n_bins, n_strata = 500, 6, 3
    b = rng.integers(0, n_bins, n)
    s = rng.integers(0, n_strata, n)
    s[b == 2] = 0  # bin 2 has one stratum only: the others must be absent, not NaN
    conf = rng.uniform(0.3, 1.0, n)
    correct = (rng.uniform(size=n) < conf).astype(np.int64)
    got = stratum_reliability(b, s, conf, correct, n_bins=n_bins, n_strata=n_strata)
    expected = [(i, t, int(m.sum()), float(conf[m].mean()), float(correct[m].mean()))
                for i in range(n_bins) for t in range(n_strata)
                if (m := (b == i) & (s == t)).any()]
    rows = list(zip(got["bin"], got["stratum"], got["count"], got["confidence"], got["accuracy"],
                    strict=True))
    assert len(rows) == len(expected) == n_bins * n_strata - 2
    for row, exp in zip(rows, expected, strict=True):
        assert row[:3] == exp[:3]
        assert row[3] == pytest.approx(exp[3], abs=1e-6) and row[4] == pytest.approx(exp[4], abs=1e-6)
    json.dumps(got)  # plain data


def test_matched_audits_record_the_first_seeds_reliability(run):
    report, _, targets = run
    ts = make_traces("planted", 3000, seed=11, effect=0.5, confound=0.3)
    seed0 = seeds_for([ts], [0], default_registry())[0]
    conf, correct = confidence_and_correct(ts.logits, ts.labels)
    conf, correct = conf[seed0.eval_index], correct[seed0.eval_index]
    for audit in ("stratification", "permutation_null"):
        for v in verdicts(report, audit, targets["cal"]):
            rel = v.evidence["reliability"]
            assert rel["seed"] == 0 and rel["strata"] == "within_bin"
            n = np.array(rel["count"])
            assert n.sum() == conf.size  # every evaluation example of seed 0, once
            assert np.dot(n, rel["confidence"]) / n.sum() == pytest.approx(conf.mean(), abs=1e-6)
            assert np.dot(n, rel["accuracy"]) / n.sum() == pytest.approx(correct.mean(), abs=1e-6)
            bins = np.array(rel["bin"])
            per_bin = [np.dot(n[bins == b], np.array(rel["confidence"])[bins == b]) / n[bins == b].sum()
                       for b in np.unique(bins)]
            assert np.all(np.diff(per_bin) > 0)  # confidence bins are ordered
            for b in np.unique(bins):  # tertiles within each bin: sizes differ by a few at most
                sizes = n[bins == b]
                assert sizes.size == 3 and sizes.max() - sizes.min() <= 2
            assert len(json.dumps(rel)) < 4000
    assert "reliability" not in json.dumps([e for v in verdicts(report, "stratification")
                                            for e in v.per_seed])  # evidence only, not per seed


def test_permutation_null_records_a_histogram_per_seed(run):
    report, _, targets = run
    checked = 0
    for v in verdicts(report, "permutation_null", targets["cal"]) + \
            verdicts(report, "permutation_null", targets["moe"]):
        assert [e["seed"] for e in v.per_seed] == SEEDS
        for e in v.per_seed:
            h = e["null_histogram"]
            counts, edges = np.array(h["counts"]), np.array(h["edges"])
            assert counts.size == 30 and edges.size == 31 and np.all(np.diff(edges) > 0)
            assert counts.sum() == h["draws"] == e["n_permutations"] <= PERMUTATIONS
            assert h["statistic"] == pytest.approx(e["weighted_gap"], abs=1e-12)
            centres = (edges[1:] + edges[:-1]) / 2
            mean = float(np.dot(counts, centres) / counts.sum())
            # null_mean leaves out the last draw after a Besag-Clifford stop (methods §2.5):
            # that moves a mean of L draws by at most the histogram's range / L
            assert mean == pytest.approx(e["null_mean"], abs=np.diff(edges)[0] / 2
                                         + (edges[-1] - edges[0]) / counts.sum())
            # the recorded p-value counts the draws at or above the statistic: h / L after
            # a Besag-Clifford stop, else (1 + #) / (1 + L)
            above = counts[edges[:-1] >= h["statistic"]].sum()
            bound = (above / counts.sum() if e["stopped_early"]
                     else (1 + above) / (1 + counts.sum()))
            assert bound <= e["p_value"] + 1e-12
            checked += 1
    assert checked >= 2 * len(SEEDS)


def test_expert_calibration_records_reliability_tables(run):
    report, _, targets = run
    rows = {v.cell["claim"]: v for v in verdicts(report, "expert_calibration", targets["moe"])}
    assert {"experts", "aggregate", "shift"} <= set(rows)
    for claim in ("experts", "aggregate"):
        first, *rest = rows[claim].per_seed
        assert all("reliability" not in e for e in rest)  # the first seed only
        rel = first["reliability"]
        agg = rel["aggregate"]
        assert sum(agg["count"]) == first["n"]
        for table in [agg, *rel["experts"]]:
            for b, c in zip(table["bin"], table["confidence"], strict=True):
                assert b / 15 - 1e-9 <= c <= (b + 1) / 15 + 1e-9  # ECE15, (lo, hi] bins
        if claim == "experts":
            assert rel["expert_prediction"] == "own"
            n_of = {x["expert"]: x["n"] for x in first["experts"]}
            assert {x["expert"]: sum(x["count"]) for x in rel["experts"]} == n_of


# --------------------------------------------------------------------------- figures


def test_every_figure_kind_is_drawn_from_a_real_run(run):
    report, page, _ = run
    found = kinds(page)
    assert set(KINDS) <= set(found), set(KINDS) - set(found)
    # one null histogram per seed and permutation_null verdict; one pair of reliability
    # diagrams per summary (stratification and permutation_null share it)
    recorded = [e for v in verdicts(report, "permutation_null") for e in v.per_seed
                if "null_histogram" in e]
    assert found.count("null") == len(recorded) >= 2 * len(SEEDS)
    strat = [v for v in verdicts(report, "stratification") if "reliability" in v.evidence]
    assert found.count("reliability") == len(strat) >= 2
    assert found.count("causal") == len(verdicts(report, "causal_ablation"))


def test_each_svg_is_well_formed_and_draws_its_data(run):
    report, page, _ = run
    pieces = svgs(page)
    assert len(pieces) == page.count("<svg")
    for piece in pieces:
        root = ET.fromstring(piece)  # raises on malformed XML
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    ns = "{http://www.w3.org/2000/svg}"
    first = next(ET.fromstring(p) for p in pieces if 'data-fig="reliability"' in p)
    strat = verdicts(report, "stratification")[0]
    assert len(first.findall(f"{ns}circle")) == len(strat.evidence["reliability"]["count"])
    null = next(ET.fromstring(p) for p in pieces if 'data-fig="null"' in p)
    e = verdicts(report, "permutation_null")[0].per_seed[0]
    bars = [r for r in null.findall(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(bars) == sum(1 for c in e["null_histogram"]["counts"] if c > 0)
    causal = next(ET.fromstring(p) for p in pieces if 'data-fig="causal"' in p)
    labels = {t.text for t in causal.findall(f"{ns}text")}
    slices = {r["slice"] for r in verdicts(report, "causal_ablation")[0].per_seed}
    assert slices <= labels


def test_the_page_is_self_contained_and_filterable(run):
    report, page, _ = run
    assert "<title>routeaudit report</title>" in page[:4096]  # check_target's marker
    without_ns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert not re.search(r"https?://|<link\b|\bsrc\s*=|@import|url\(", without_ns)
    assert page.count("<script") == 1
    body = page.split("<main>")[0]
    for status in ("pass", "fail", "inconclusive", "error", "skip"):
        # the CSS-only filter: a checkbox before <main>, a rule hiding that status inside it
        assert f"id='f-{status}'" in body
        assert f"#f-{status}:not(:checked)~main .st-{status}{{display:none}}" in page
    assert page.count("<tr class='v st-") == len(report.verdicts)


def test_configuration_and_its_sources_are_shown(run):
    report, page, _ = run
    section = page.split("id='config'")[1]
    for key in report.config:
        assert f"<td>{key}</td>" in section
    for key, source in report.config_sources.items():
        assert re.search(rf"<td>{re.escape(key)}</td><td>[^<]*(<code>[^<]*</code>)?[^<]*</td>"
                         rf"<td[^>]*>{re.escape(source)}</td>", section), key
    old = report.model_copy(update={"config_sources": {}, "config": {"alpha": 0.05}})
    assert "does not record where each value came from" in render(old)
    new = report.model_copy(update={"config_sources": {"alpha": "pyproject.toml"},
                                    "config": {"alpha": 0.01}})
    assert re.search(r"<td>alpha</td><td>0.01</td><td>pyproject.toml</td>", render(new))


# --------------------------------------------------------------------------- old reports


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("reliability", "null_histogram")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def test_a_report_without_the_figure_data_still_renders(run):
    report, _, _ = run
    data = _strip(json.loads(report.to_json()))
    data.pop("config_sources")
    old = Report.model_validate(data)
    found = kinds(render(old))
    assert not {"reliability", "reliability-gap", "null", "expert-reliability"} & set(found)
    assert {"gain", "gain-ece", "causal", "expert-ece", "worst-shift", "effect"} <= set(found)


def test_a_minimal_old_report_renders():
    data = {"routeaudit_version": "0.0.1", "exit_code": 1, "targets": ["t.npz"], "seeds": [0],
            "config": {"alpha": 0.05}, "summary": {"fail": 1},
            "verdicts": [{"audit": "stratification", "claim": "c", "status": "fail",
                          "per_seed": [{"seed": 0, "excess": 0.1, "null_mean": 0.02}]},
                         {"audit": "causal_ablation", "claim": "c", "status": "inconclusive",
                          "per_seed": [{"slice": "a", "mass": 0.5}]}]}
    page = render(Report.model_validate(data))
    assert "stratification" in page and svgs(page) == []


# --------------------------------------------------------------------------- escaping

EVIL = "<script>alert(1)</script>"
EVIL_ATTR = "x' onmouseover='alert(2)\" <img src=x onerror=alert(3)>&amp;"


def _evil_report(run_report: Report) -> Report:
    vs = []
    for v in run_report.verdicts:
        v = copy.deepcopy(v)
        v.target = EVIL
        v.audit = f"{v.audit}{EVIL}"
        v.reason = EVIL_ATTR
        v.claim = EVIL
        v.cell = {**v.cell, "summary": EVIL_ATTR} if "summary" in v.cell else {**v.cell, EVIL: EVIL}
        for e in v.per_seed:
            if "slice" in e:
                e["slice"] = EVIL
            if "gains" in e:
                e["gains"] = {EVIL + k: g for k, g in e["gains"].items()}
                e["metrics"] = {(EVIL + k if k not in ("candidate", "raw") else k): m
                                for k, m in e["metrics"].items()}
        vs.append(v)
    vs.append(Verdict(audit=EVIL, claim=EVIL, status=Status.ERROR, reason=EVIL,
                      traceback=EVIL, target=EVIL, statistic=EVIL, effect=0.1, ci=(0.0, 0.2),
                      threshold={EVIL: EVIL}, evidence={EVIL: [EVIL]},
                      per_seed=[{EVIL: EVIL, "ci": [0.0, 1.0], "x": 0.5}]))
    return run_report.model_copy(update={
        "verdicts": vs, "targets": [EVIL], "summary": Summary.of(vs),
        "config": {EVIL: EVIL_ATTR, "alpha": EVIL}, "config_sources": {EVIL: EVIL},
        "routeaudit_version": EVIL})


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]


def test_user_text_is_escaped_everywhere(run):
    report, _, _ = run
    page = render(_evil_report(report))
    assert EVIL not in page and "<img" not in page and "onerror=" not in page.replace(
        "onerror=alert(3)", "")  # only as escaped text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parser = _Elements()
    parser.feed(page)
    assert parser.tags.count("script") == 1 and "img" not in parser.tags
    assert not [a for a in parser.attrs if a.startswith("on")]
    for piece in svgs(page):
        ET.fromstring(piece)  # still well-formed with hostile labels
    assert "gain" in kinds(page) and "causal" in kinds(page)


def test_text_that_xml_forbids_is_dropped():
    v = Verdict(audit="a\x00b\x1bc", claim="c", status=Status.FAIL, target="t",
                per_seed=[{"slice": "s\x07", "mass": 0.5, "delta_nll": 0.1, "ci": [0.0, 0.2]},
                          {"slice": "u", "mass": 0.2, "delta_nll": 0.3, "ci": [0.2, 0.4]}])
    report = Report(routeaudit_version="x", exit_code=1, targets=["t"], seeds=[0], config={},
                    verdicts=[v], summary=Summary.of([v]))
    page = render(report)
    assert "\x00" not in page and "\x1b" not in page and "\x07" not in page
    (piece,) = svgs(page)
    ET.fromstring(piece)


def test_non_finite_numbers_are_not_drawn():
    v = Verdict(audit="causal_ablation", claim="c", status=Status.FAIL, target="t",
                per_seed=[{"slice": "s", "mass": float("nan"), "delta_nll": 0.1},
                          {"slice": "u", "mass": 0.2, "delta_nll": float("inf")}])
    report = Report(routeaudit_version="x", exit_code=1, targets=["t"], seeds=[0], config={},
                    verdicts=[v], summary=Summary.of([v]))
    assert svgs(render(report)) == [] and "NaN" not in render(report)


def test_the_cli_page_is_the_rendering_of_the_json_report(run):
    report, page, _ = run
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert render(report) == page  # --html and --json describe one Report
