"""The two Hugging Face MoE fixtures (fixtures/moe): checkpoints, families, data splits.

Nothing here trains. The checkpoints must reproduce the NLL, accuracy and ECE15 their header
records (recomputed independently of the code that wrote the header), each model must be
the routing family it claims (its MoE blocks are recomputed from the raw weight tensors), the
routing must be balanced and content-dependent, and the code/prose splits must be
deterministic, disjoint and measurably different.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from torch.nn import functional as F

from routeaudit.fixtures.charlm.data import HOLD_OUT_EVERY, decode, stdlib_files
from routeaudit.fixtures.moe import build, data

ROOT = Path(__file__).resolve().parents[1]
MOE = ROOT / "fixtures" / "moe"
CHECKPOINT = {kind: MOE / kind / f"{kind}.safetensors" for kind in build.KINDS}


@pytest.fixture(scope="module", params=build.KINDS)
def trained(request):
    torch.set_num_threads(1)
    kind = request.param
    return kind, build.load_checkpoint(CHECKPOINT[kind]), build.read_header(CHECKPOINT[kind])


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def run_split(model, split: str, capture: bool = False):
    """Float64 logits [N, V], labels [N] and, with ``capture``, each MoE block's (input, output)."""
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in moe_blocks(model)]
    handles = [block.register_forward_hook(lambda _m, args, out, i=i: seen[i].append((args[0], out)))
               for i, block in enumerate(moe_blocks(model))] if capture else []
    windows = torch.from_numpy(data.windows(split))
    try:
        logits = torch.cat([model(input_ids=w[:, :-1]).logits.reshape(-1, data.VOCAB_SIZE)
                            for w in windows.split(100)])
    finally:
        for handle in handles:
            handle.remove()
    return logits.double(), windows[:, 1:].reshape(-1), seen


def swiglu_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` applied to ``x`` straight from the stored tensors (gate/up concatenated)."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def reference_routing(block, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dense [n, E] mixing weights: softmax of the router, top-k kept, renormalised."""
    probs = torch.softmax(x @ block.gate.weight.T, dim=-1)
    top, index = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, index, top / top.sum(-1, keepdim=True))


# --------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", build.KINDS)
def test_checkpoint_is_a_small_safetensors_with_one_header(kind):
    path = CHECKPOINT[kind]
    assert path.exists(), f"{path} missing: run python fixtures/moe/train.py {kind}"
    assert path.stat().st_size < 2_000_000
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.metadata()) == [build.HEADER_KEY]  # one entry: reproducible bytes
    header = build.read_header(path)
    assert header["kind"] == kind and header["config"] == build.CONFIGS[kind]


def ece15_loop(conf: np.ndarray, correct: np.ndarray) -> float:
    """ECE with 15 right-closed equal-width bins, the slow obvious way."""
    total = 0.0
    for b in range(15):
        inside = (conf > b / 15) & (conf <= (b + 1) / 15)
        if inside.any():
            total += abs(float((conf[inside] - correct[inside]).sum()))
    return total / len(conf)


def test_checkpoint_reproduces_its_recorded_metrics(trained):
    kind, model, header = trained
    if header["data"]["python"] != data.source_description()["python"]:
        pytest.skip(f"trained on Python {header['data']['python']}'s stdlib text; this one differs")
    assert not model.training and not model.config.output_router_logits
    for split in data.SPLITS:
        logits, labels, _ = run_split(model, split)
        recorded = header["metrics"][split]
        nll = F.cross_entropy(logits, labels).item()
        assert nll == pytest.approx(recorded["nll"], abs=1e-4), (kind, split)
        conf, pred = torch.softmax(logits, -1).max(-1)
        correct = (pred == labels).double().numpy()
        assert correct.mean() == pytest.approx(recorded["acc"], abs=1e-4)
        assert ece15_loop(conf.numpy(), correct) == pytest.approx(recorded["ece15"], abs=1e-4), (kind, split)


def test_bad_kind_and_foreign_checkpoint_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        build.build_model("dense")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a routeaudit MoE fixture"):
        build.read_header(tmp_path / "x.safetensors")


# --------------------------------------------------------------------- families
def test_family_and_routing_match_the_claim(trained):
    """Each MoE block's output equals the top-k mixture recomputed from the raw tensors: hard
    = Mixtral, weight exactly 1 on one expert; soft = Qwen3-MoE, two experts, weights < 1."""
    kind, model, _ = trained
    expected = {"hard": ("MixtralForCausalLM", 1), "soft": ("Qwen3MoeForCausalLM", 2)}[kind]
    assert (type(model).__name__, model.config.num_experts_per_tok) == expected
    windows = torch.from_numpy(data.windows("eval")[:8])
    captured = []
    handles = [block.gate.register_forward_hook(lambda _m, _i, out: captured.append(out))
               for block in moe_blocks(model)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles += [block.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
                for block in moe_blocks(model)]
    with torch.no_grad():
        model(input_ids=windows[:, :-1])
    for handle in handles:
        handle.remove()
    top_k = expected[1]
    for block, (x, out), (_, weights, index) in zip(moe_blocks(model), seen, captured, strict=True):
        x = x.reshape(-1, x.shape[-1])
        dense = reference_routing(block, x, top_k)
        mine = sum(dense[:, e:e + 1] * swiglu_expert(block.experts, e, x) for e in range(build.N_EXPERTS))
        torch.testing.assert_close(out.reshape(-1, x.shape[-1]), mine, atol=1e-5, rtol=1e-4)
        assert torch.equal(dense.argmax(1), index[:, 0])
        nonzero = (dense > 0).sum(1)
        assert torch.equal(nonzero, torch.full_like(nonzero, top_k))
        if kind == "hard":
            assert torch.equal(weights, torch.ones_like(weights))  # exactly one-hot
        else:
            torch.testing.assert_close(weights.sum(-1), torch.ones(len(x)))
            assert weights.min() > 0 and weights.max() < 1 and weights.std() > 0.01  # soft, and varying


def test_routing_is_balanced_and_content_dependent(trained):
    """No expert starves in any layer; the token's character predicts its top-1 expert far
    better than the busiest expert alone does (routing follows content), but not perfectly
    (the context matters too: routing is not a lookup table of the current character)."""
    kind, model, _ = trained
    _, _, seen = run_split(model, "eval", capture=True)
    inputs = torch.from_numpy(data.windows("eval")[:, :-1].reshape(-1))
    for layer, (block, pairs) in enumerate(zip(moe_blocks(model), seen, strict=True)):
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in pairs])
        top1 = reference_routing(block, x, 1).argmax(1)
        load = torch.bincount(top1, minlength=build.N_EXPERTS) / len(top1)
        assert load.min() > 0.05, (kind, layer, load)
        joint = torch.zeros(data.VOCAB_SIZE, build.N_EXPERTS)
        joint.index_put_((inputs, top1), torch.ones(len(top1)), accumulate=True)
        by_character = float(joint.max(1).values.sum()) / len(top1)  # predict the character's usual expert
        assert float(load.max()) + 0.1 < by_character < 0.95, (kind, layer, by_character, load)


# --------------------------------------------------------------------- adapters
ADAPTER_KIND = {"hard": ("MixtralForCausalLM", "hard", 1), "soft": ("Qwen3MoeForCausalLM", "soft", 2)}


def test_adapter_serves_the_fixture(trained):
    """The registered adapter loads this checkpoint and feeds the windows unchanged: its
    logits are the model's own on the same characters, its groups the window ids."""
    hf = pytest.importorskip("routeaudit.hf")
    from routeaudit.model.adapter import find_adapters
    from routeaudit.session.plugins import import_user_file

    kind, model, _ = trained
    (cls,) = find_adapters(import_user_file(MOE / kind / "adapter.py"))
    adapter = cls()
    assert isinstance(adapter, hf.MoEAdapter) and adapter.extra_splits == ("shift",) and adapter.per_token
    with pytest.raises(ValueError, match="splits"):
        next(iter(adapter.batches("train")))
    for split in data.SPLITS:
        batches = list(adapter.batches(split))
        ids = torch.cat([b["input_ids"] for b in batches])
        assert torch.equal(ids, torch.from_numpy(data.windows(split)))
        assert torch.equal(torch.cat([b["sequence"] for b in batches]), torch.arange(data.N_WINDOWS))
        assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    loaded = adapter.load("cpu")
    assert type(loaded).__name__ == ADAPTER_KIND[kind][0] and not loaded.training
    batch = next(iter(adapter.batches("eval")))
    with torch.no_grad():
        out = adapter.forward(loaded, batch)
        mine = model(input_ids=batch["input_ids"][:, :-1]).logits
    torch.testing.assert_close(torch.as_tensor(out.logits).reshape(mine.shape), mine)
    assert torch.equal(torch.as_tensor(out.labels), batch["input_ids"][:, 1:].reshape(-1))
    assert torch.equal(torch.as_tensor(out.group), batch["sequence"].repeat_interleave(data.SEQ_LEN))
    assert (adapter.meta["routing_mode"], adapter.meta["top_k"]) == ADAPTER_KIND[kind][1:]


# --------------------------------------------------------------------- data
def test_splits_differ_measurably(trained):
    kind, _, header = trained
    scores = header["metrics"]
    assert scores["shift"]["nll"] > scores["eval"]["nll"] + 0.3, kind
    assert abs(scores["shift"]["ece15"] - scores["eval"]["ece15"]) > 0.01, kind


def test_train_and_held_out_text_come_from_disjoint_files():
    files = stdlib_files()
    held = {p.name for i, p in enumerate(files) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1}
    names = [f.name for f in data.source_files()]
    assert held and len(held) < len(names) and len(set(names)) == len(names)
    train_code = data.domain_text("train", "code")
    for f in data.source_files():
        assert f.held_out == (f.name in held)
        assert (f.code in train_code) != f.held_out, f.name


def test_eval_windows_are_held_out_code_and_shift_windows_held_out_prose():
    code, prose = data.domain_text("eval", "code"), data.domain_text("eval", "prose")
    starts = data.window_starts(len(code))
    assert np.all(np.diff(starts) >= data.SEQ_LEN + 1)
    for split, own, other in (("eval", code, prose), ("shift", prose, code)):
        windows = data.windows(split)
        assert windows.shape == (data.N_WINDOWS, data.SEQ_LEN + 1) and windows.dtype == np.int64
        texts = [decode(w) for w in windows]
        assert all(t in own for t in texts if "\ufffd" not in t), split
        assert not any(t in other for t in texts), split
        assert len(set(texts)) == len(texts), split


def test_windows_are_deterministic_across_processes():
    """Same bytes in a fresh interpreter with another hash seed (no set/dict order leaks in)."""
    script = ("import hashlib; from routeaudit.fixtures.moe import data\n"
              "print(*(hashlib.sha256(data.windows(s).tobytes()).hexdigest() for s in data.SPLITS),"
              " hashlib.sha256(data.training_ids().tobytes()).hexdigest())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    here = [hashlib.sha256(data.windows(s).tobytes()).hexdigest() for s in data.SPLITS]
    here.append(hashlib.sha256(data.training_ids().tobytes()).hexdigest())
    assert done.stdout.split() == here


SOURCE = '''"""Module docstring."""
import os  # trailing comment

# a full-line comment
def f(x):
    """Function docstring
    over two lines."""
    s = "# not a comment"
    "bare string statement"
    return s  # done
'''


def test_split_code_prose_on_a_hand_written_file():
    code, prose = data.split_code_prose(SOURCE)
    assert code == 'import os\n\ndef f(x):\n    s = "# not a comment"\n    return s\n'
    assert prose == ('"""Module docstring."""\n# trailing comment\n# a full-line comment\n'
                     '"""Function docstring\n    over two lines."""\n"bare string statement"\n# done\n')


def test_split_code_prose_partitions_every_held_out_file():
    """Brute force over real files: no non-space character is lost or duplicated, and the code
    part holds no prose left to remove."""
    for i, path in enumerate(stdlib_files()):
        if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        code, prose = data.split_code_prose(source)
        assert sorted(c for c in code + prose if not c.isspace()) == sorted(
            c for c in source if not c.isspace()), path.name
        assert data.split_code_prose(code) == (code, "\n"), path.name


@given(n_windows=st.integers(1, 50), extra=st.integers(0, 10_000))
def test_window_starts_never_overlap_and_stay_inside(n_windows, extra):
    n_chars = n_windows * (data.SEQ_LEN + 1) + extra
    starts = data.window_starts(n_chars, n_windows)
    assert len(starts) == n_windows and starts[0] == 0 and starts[-1] + data.SEQ_LEN + 1 <= n_chars
    assert np.all(np.diff(starts) >= data.SEQ_LEN + 1)


def test_too_short_text_and_unknown_split_are_rejected():
    with pytest.raises(RuntimeError, match="need"):
        data.window_starts(10 * (data.SEQ_LEN + 1) - 1, 10)
    with pytest.raises(ValueError, match="split must be one of"):
        data.windows("train")
    with pytest.raises(ValueError, match="part"):
        data.domain_text("test", "code")
