"""The MoE fixtures through the command line: expert_calibration (on the eval and the prose
shift split) and causal_ablation (removing experts inside the forward pass) both run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from routeaudit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_moe_fixture_runs_expert_calibration_and_causal_ablation(kind, tmp_path):
    out = tmp_path / "r.json"
    code = main(["run", str(ROOT / "fixtures" / "moe" / kind / "adapter.py"),
                 "--audit", "expert_calibration", "--audit", "causal_ablation",
                 "--seeds", "0,1", "--bootstrap", "200", "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(out), "-q"])
    report = json.loads(out.read_text())
    assert code == report["exit_code"] == 1  # the shift split refutes calibration
    rows = {(v["audit"], v["cell"].get("claim"), v["cell"].get("split")): v
            for v in report["verdicts"]}
    for claim in ("experts", "aggregate", "shift"):
        for split in (None, "shift"):
            verdict = rows[("expert_calibration", claim, split)]
            assert verdict["status"] in ("pass", "fail", "inconclusive")
            assert verdict["reason"].startswith(f"{kind} routing")
    # held-out prose is far from calibrated (ECE about 0.1 against 0.02): shown, not guessed
    assert rows[("expert_calibration", "aggregate", "shift")]["status"] == "fail"
    causal = rows[("causal_ablation", None, None)]
    assert causal["cell"] == {"sublayer": "mlp"} and causal["status"] != "error"
    slices = {entry["slice"] for entry in causal["per_seed"]}
    assert slices == {f"mlp/{band}/expert{k}" for band in ("early", "late") for k in range(4)}
