"""Stage A extraction: equality with a bare forward, the content-addressed cache, progress,
bf16 autocast, per-token metadata, ModelSession interventions and the ``extract`` command.

The toy adapter is written into ``tmp_path`` as a real file, because the cache key hashes
the adapter's source file and its checkpoint, and the CLI imports adapters from files.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from routeaudit.cli import main
from routeaudit.errors import AdapterError, TraceValidationError
from routeaudit.model.cache import CACHE_ENV, CacheWarning, TraceCache, compute_key
from routeaudit.model.extract import ModelSession, Progress, extract_traces, traces_from_adapter
from routeaudit.model.intervention import RoutingIntervention
from routeaudit.traces import TraceSet

TOY_SOURCE = textwrap.dedent('''
    """A tiny Full-AttnRes-like classifier: layer l mixes the outputs of layers < l."""
    import contextlib

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    import routeaudit

    CALLS = {"load": 0, "forward": 0}
    D, K, L, N, BATCH = 8, 3, 3, 100, 32


    def write_checkpoint(path, seed):
        g = torch.Generator().manual_seed(seed)
        tensors = {"embed": torch.randn(D, D, generator=g) / D ** 0.5,
                   "query": torch.randn(L, D, generator=g),
                   "mix": torch.randn(L, D, D, generator=g) / D ** 0.5,
                   "head": torch.randn(D, K, generator=g)}
        save_file(tensors, str(path))


    class ToyModel(torch.nn.Module):
        def __init__(self, tensors):
            super().__init__()
            for name, value in tensors.items():
                self.register_buffer(name, value)
            self.removed = None  # [L, S] bool: sources masked by an intervention

        def forward(self, x):
            states = [torch.tanh(x @ self.embed)]
            weights = []
            valid = torch.ones(L, L, dtype=torch.bool).tril()
            for layer in range(L):
                stack = torch.stack(states + [torch.zeros_like(x)] * (L - len(states)), 1)
                scores = stack @ self.query[layer]  # [B, S]
                keep = valid[layer].clone()
                if self.removed is not None:
                    keep &= ~self.removed[layer]
                alpha = scores.masked_fill(~keep, float("-inf")).softmax(-1)
                weights.append(alpha)
                mixed = (alpha.unsqueeze(-1) * stack).sum(1)
                states.append(torch.tanh(mixed @ self.mix[layer]) + mixed)
            return states[-1] @ self.head, torch.stack(weights, 1)


    class ToyBase(routeaudit.Adapter):
        name = "toy"
        checkpoint = "toy.safetensors"
        source_mask = np.tril(np.ones((L, L), dtype=bool))
        meta = {"family": "attnres-full"}
        fail_at = None

        def load(self, device):
            CALLS["load"] += 1
            return ToyModel(load_file(str(self.checkpoint_path()))).to(device).eval()

        def checkpoint_path(self):
            import pathlib

            return pathlib.Path(__file__).with_name(self.checkpoint)

        def __len__(self):
            return -(-N // BATCH)

        def batches(self, split):
            g = torch.Generator().manual_seed(7)
            x = torch.randn(N, D, generator=g)
            y = torch.randint(0, K, (N,), generator=g)
            for start in range(0, N, BATCH):
                yield x[start:start + BATCH], y[start:start + BATCH]

        def forward(self, model, batch):
            CALLS["forward"] += 1
            if self.fail_at is not None and CALLS["forward"] > self.fail_at:
                raise RuntimeError("simulated crash")
            x, y = batch
            logits, routing = model(x.to(next(iter(model.buffers())).device))
            return routeaudit.ForwardOutput(logits, y, routing)

        @contextlib.contextmanager
        def intervene(self, model, intervention):
            removed = torch.zeros(L, L, dtype=torch.bool)
            sites = intervention.site_mask(None, L)
            sources = intervention.source_mask(None, L)
            removed[torch.from_numpy(sites)] = torch.from_numpy(sources)
            model.removed = removed
            try:
                yield
            finally:
                model.removed = None


    @routeaudit.adapter
    class Toy(ToyBase):
        pass


    class NoIntervene(ToyBase):  # unmarked: the mark is inherited, and a file holds one adapter
        intervene = routeaudit.Adapter.intervene


    class PerToken(ToyBase):
        per_token = True
''')


def load_toy(directory: Path, extra: str = "", seed: int = 0) -> types.ModuleType:
    """Write the toy adapter (plus ``extra`` source) and its checkpoint, and import it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "toy_adapter.py"
    path.write_text(TOY_SOURCE + extra)
    name = f"toy_adapter_{abs(hash(str(path)))}_{len(extra)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.write_checkpoint(directory / "toy.safetensors", seed)
    return module


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return load_toy(tmp_path / "adapter")


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".")) \
        if cache_dir.exists() else []


def direct_forward(module: types.ModuleType) -> dict[str, np.ndarray]:
    adapter = module.Toy()
    model = adapter.load(torch.device("cpu"))
    parts: dict[str, list[np.ndarray]] = {"logits": [], "labels": [], "routing": []}
    with torch.inference_mode():
        for batch in adapter.batches("eval"):
            out = adapter.forward(model, batch)
            for name in parts:
                parts[name].append(getattr(out, name).numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def test_extraction_equals_direct_forward(toy):
    traces = extract_traces(toy.Toy(), cache=False, progress=False)
    expected = direct_forward(toy)
    assert traces.n_examples == toy.N
    for name, value in expected.items():
        np.testing.assert_array_equal(getattr(traces, name), value)
    assert traces.logits.dtype == np.float32 and traces.labels.dtype == np.int64
    assert traces.meta.per_token is False and traces.meta.family == "attnres-full"
    assert traces.meta.extraction["autocast"] == "none"
    assert not (Path.cwd() / ".routeaudit_cache").exists()  # cache=False writes nothing


def test_cache_hit_skips_load_and_forward(toy, tmp_path):
    cache = tmp_path / "cache"
    first = extract_traces(toy.Toy(), cache_dir=cache, progress=False)
    assert toy.CALLS == {"load": 1, "forward": 4}
    (entry,) = entries(cache)
    assert (entry / "manifest.json").exists()
    recorded = json.loads((entry / "cache_key.json").read_text())
    assert recorded["split"] == "eval" and len(recorded["checkpoints"]) == 1
    assert recorded["local_modules"] == []  # the toy imports nothing local
    session = ModelSession(toy.Toy, cache_dir=cache, progress=False)
    second = session.traces()
    assert session.cache_hit and toy.CALLS == {"load": 1, "forward": 4}
    assert session.cache_report() == f"reused traces from the cache (key {entry.name[:12]}…)"
    np.testing.assert_array_equal(first.routing, second.routing)
    assert second.meta.extraction["cache_key"] == entry.name


def test_cache_misses_when_checkpoint_bytes_change(toy, tmp_path):
    cache = tmp_path / "cache"
    first = extract_traces(toy.Toy(), cache_dir=cache, progress=False)
    toy.write_checkpoint(tmp_path / "adapter" / "toy.safetensors", seed=1)
    sessions: list[ModelSession] = []
    second = extract_traces(toy.Toy(), cache_dir=cache, progress=False, on_session=sessions.append)
    assert toy.CALLS["load"] == 2 and len(entries(cache)) == 2
    assert not np.allclose(first.logits, second.logits)
    (session,) = sessions
    assert session.cache_changes == ["checkpoint toy.safetensors changed"]
    assert session.cache_report().endswith("of Toy: checkpoint toy.safetensors changed")


def test_cache_misses_when_adapter_source_changes(toy, tmp_path):
    key = compute_key(toy.Toy(), split="eval", autocast="none")
    edited = load_toy(tmp_path / "adapter", extra="\n# an edit\n")
    edited_key = compute_key(edited.Toy(), split="eval", autocast="none")
    assert key.digest != edited_key.digest
    assert key.digest != compute_key(toy.Toy(), split="test", autocast="none").digest
    assert key.digest != compute_key(toy.Toy(), split="eval", autocast="bf16").digest
    assert key.digest != compute_key(toy.PerToken(), split="eval", autocast="none").digest


def test_cache_key_includes_adapter_cache_key(toy):
    class Versioned(toy.Toy):
        checkpoint = str(Path(toy.__file__).with_name("toy.safetensors"))  # absolute

        def __init__(self, version: str) -> None:
            self.version = version

        def cache_key(self) -> str:
            return self.version

    assert (compute_key(Versioned("a"), split="eval", autocast="none").digest
            != compute_key(Versioned("b"), split="eval", autocast="none").digest)


def test_crash_mid_extraction_leaves_no_entry(toy, tmp_path):
    cache = tmp_path / "cache"
    adapter = toy.Toy()
    adapter.fail_at = 2
    with pytest.raises(AdapterError, match=r"batch 2.*simulated crash"):
        extract_traces(adapter, cache_dir=cache, progress=False)
    assert entries(cache) == []


def test_crash_while_writing_leaves_no_entry(toy, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save = TraceSet.save

    def half_save(self, directory):
        real_save(self, directory)
        raise OSError("disk full")

    monkeypatch.setattr(TraceSet, "save", half_save)
    session = ModelSession(toy.Toy(), cache_dir=cache, progress=False)
    with pytest.warns(CacheWarning, match="disk full"):
        traces = session.traces()
    assert traces.n_examples == toy.N
    assert session.cache_status.startswith("extracted (cache miss: no entry for key ")
    assert session.cache_status.endswith("…; not stored)")
    assert list(cache.iterdir()) == []  # neither an entry nor a leftover staging directory


def test_corrupt_entry_is_rebuilt(toy, tmp_path):
    cache = tmp_path / "cache"
    first = extract_traces(toy.Toy(), cache_dir=cache, progress=False)
    (entry,) = entries(cache)
    logits = entry / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-4] + b"\0\0\0\0")
    rebuilt = ModelSession(toy.Toy(), cache_dir=cache, progress=False)
    with pytest.warns(CacheWarning, match="sha256"):
        second = rebuilt.traces()
    assert toy.CALLS["load"] == 2
    assert rebuilt.cache_status == f"extracted (cache miss: the entry for key {entry.name[:12]}… " \
                                   "was unusable, rebuilt)"
    np.testing.assert_array_equal(first.logits, second.logits)
    third = ModelSession(toy.Toy(), cache_dir=cache, progress=False)
    third.traces()
    assert third.cache_hit and toy.CALLS["load"] == 2


def test_progress_only_when_forced_on_a_non_tty(toy, capsys):
    extract_traces(toy.Toy(), cache=False)  # auto: stderr under capsys is not a tty
    assert capsys.readouterr().err == ""
    extract_traces(toy.Toy(), cache=False, progress=False)
    assert capsys.readouterr().err == ""
    extract_traces(toy.Toy(), cache=False, progress="always")
    err = capsys.readouterr().err
    assert "batch 4/4" in err and f"{toy.N} examples" in err and "examples/s" in err


def test_progress_on_a_tty_redraws_with_eta():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = Progress("extracting", total=4, stream=stream)
    bar.last_draw = -1e9
    bar.update(10)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\rextracting: batch 1/4, 10 examples") and "ETA" in text
    assert text.endswith("\n")


def test_bf16_autocast_runs_on_cpu(toy, tmp_path):
    plain = extract_traces(toy.Toy(), cache=False, progress=False)
    bf16 = extract_traces(toy.Toy(), cache_dir=tmp_path / "cache", autocast="bf16",
                          progress=False, device="cpu")
    assert bf16.meta.extraction["autocast"] == "bf16"
    assert bf16.logits.dtype == np.float32
    np.testing.assert_allclose(bf16.logits, plain.logits, atol=0.15)
    np.testing.assert_allclose(bf16.routing.sum(-1), 1.0, atol=1e-5)
    assert entries(tmp_path / "cache")[0].name == bf16.meta.extraction["cache_key"]


def test_per_token_adapter_recorded_in_meta(toy, capsys):
    traces = extract_traces(toy.PerToken(), cache=False, progress="always")
    assert traces.meta.per_token is True
    assert "tokens/s" in capsys.readouterr().err


def test_session_intervention_changes_outputs(toy, tmp_path):
    cache = tmp_path / "cache"
    extract_traces(toy.Toy(), cache_dir=cache, progress=False)
    session = ModelSession(toy.Toy(), cache_dir=cache, progress=False)
    traces = session.traces()
    assert toy.CALLS["load"] == 1  # served from the cache: no model yet
    clean = session.forward()
    np.testing.assert_array_equal(clean["logits"], traces.logits)
    assert set(clean) == {"logits", "labels", "routing"}
    iv = RoutingIntervention(kind="mask", layers=(2,), sources=(0,))
    ablated = session.forward(iv)
    again = session.forward(iv)
    assert toy.CALLS["load"] == 2 and session.n_loads == 1  # loaded once, reused
    np.testing.assert_array_equal(ablated["labels"], traces.labels)
    assert np.all(ablated["routing"][:, 2, 0] == 0)
    np.testing.assert_allclose(ablated["routing"][:, 2].sum(-1), 1.0, atol=1e-6)
    assert not np.allclose(ablated["logits"], traces.logits)
    np.testing.assert_array_equal(ablated["routing"][:, :2], traces.routing[:, :2])
    np.testing.assert_array_equal(again["logits"], ablated["logits"])
    session.close()


def test_session_without_intervene_is_an_adapter_error(toy):
    session = ModelSession(toy.NoIntervene(), cache=False, progress=False)
    with pytest.raises(AdapterError, match="does not implement intervene"):
        session.forward(RoutingIntervention(kind="mask", sources=(0,)))


def test_bad_outputs_name_field_and_index(toy):
    class NaNs(toy.Toy):
        def forward(self, model, batch):
            out = super().forward(model, batch)
            logits = out.logits.clone()
            if toy.CALLS["forward"] == 2:
                logits[3, 1] = float("nan")
            return out._replace(logits=logits)

    with pytest.raises(TraceValidationError) as info:
        extract_traces(NaNs(), cache=False, progress=False)
    assert info.value.field == "logits" and info.value.index == (toy.BATCH + 3, 1)

    class Ragged(toy.Toy):
        def forward(self, model, batch):
            out = super().forward(model, batch)
            return out._replace(logits=out.logits[:, :2]) if toy.CALLS["forward"] == 3 else out

    toy.CALLS["forward"] = 0
    with pytest.raises(TraceValidationError) as info:
        extract_traces(Ragged(), cache=False, progress=False)
    assert info.value.field == "logits" and info.value.index == 2 * toy.BATCH


def test_cache_dir_env_var_and_default(toy, tmp_path, monkeypatch):
    extract_traces(toy.Toy(), progress=False)
    assert len(entries(tmp_path / ".routeaudit_cache")) == 1  # default: the working directory
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert TraceCache().root == tmp_path / "env-cache"
    traces_from_adapter(toy.Toy, progress=False)
    assert len(entries(tmp_path / "env-cache")) == 1
    assert toy.CALLS["load"] == 2


def test_cli_extract_round_trip(toy, tmp_path, capsys):
    adapter_file = str(tmp_path / "adapter" / "toy_adapter.py")
    out, cache = tmp_path / "traces", tmp_path / "cli-cache"
    code = main(["extract", adapter_file, "-o", str(out), "--cache-dir", str(cache), "-q"])
    assert code == 0, capsys.readouterr().err
    loaded = TraceSet.load(out)
    np.testing.assert_array_equal(loaded.logits, direct_forward(toy)["logits"])
    assert len(entries(cache)) == 1
    code = main(["extract", adapter_file, "-o", str(tmp_path / "t2"), "--no-cache",
                 "--autocast", "bf16", "-q"])
    assert code == 0 and TraceSet.load(tmp_path / "t2").meta.extraction["autocast"] == "bf16"
    assert not (tmp_path / ".routeaudit_cache").exists()
    assert main(["extract", adapter_file, "-o", str(out), "--autocast", "fp8"]) == 4


def test_runner_load_target_passes_extraction_options(toy, tmp_path):
    from routeaudit.session.targets import load_target

    adapter_file = str(tmp_path / "adapter" / "toy_adapter.py")
    options = types.SimpleNamespace(device="cpu", quiet=1, cache_dir=str(tmp_path / "rc"),
                                    no_cache=False, autocast="bf16")
    target = load_target(adapter_file, types.SimpleNamespace(options=options),
                         {adapter_file: sys.modules[toy.__name__]})
    assert target.traces[0].meta.extraction["autocast"] == "bf16"
    assert len(entries(tmp_path / "rc")) == 1


def test_mapping_outputs_carry_token_index(toy):
    class Tokens(toy.PerToken):
        def forward(self, model, batch):
            out = super().forward(model, batch)
            return {"logits": out.logits, "labels": out.labels, "routing": out.routing,
                    "token_index": torch.arange(len(out.labels)) % 5}

    traces = extract_traces(Tokens(), cache=False, progress=False)
    assert traces.meta.per_token and traces.token_index[:6].tolist() == [0, 1, 2, 3, 4, 0]

    class Unknown(toy.Toy):
        def forward(self, model, batch):
            return {**super().forward(model, batch)._asdict(), "hidden": None}

    with pytest.raises(AdapterError, match="unknown fields"):
        extract_traces(Unknown(), cache=False, progress=False)


def test_store_keeps_an_entry_written_concurrently(toy, tmp_path):
    cache = TraceCache(tmp_path / "cache")
    traces = extract_traces(toy.Toy(), cache=False, progress=False)
    key = compute_key(toy.Toy(), split="eval", autocast="none")
    first = cache.store(key, traces)
    assert cache.store(key, traces) == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key.digest]
    np.testing.assert_array_equal(cache.load(key).logits, traces.logits)


SHIFTED = '''

class Shifted(ToyBase):
    extra_splits = ("shift",)

    def batches(self, split):
        if split not in ("eval", "shift"):
            raise ValueError(split)
        g = torch.Generator().manual_seed(7 if split == "eval" else 8)
        x = torch.randn(N, D, generator=g) * (1.0 if split == "eval" else 3.0)
        y = torch.randint(0, K, (N,), generator=g)
        for start in range(0, N, BATCH):
            yield x[start:start + BATCH], y[start:start + BATCH]
'''


def test_extra_split_is_extracted_once_with_the_same_model(tmp_path, monkeypatch):
    from routeaudit.audit import AuditContext

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    toy = load_toy(tmp_path / "adapter", extra=SHIFTED)
    cache = tmp_path / "cache"
    session = ModelSession(toy.Shifted(), cache_dir=cache, progress=False)
    ctx = AuditContext.for_traces(session.traces(), seeds=(0,), session=session)
    assert ctx.split_traces("nope") is None
    shift = ctx.split_traces("shift")
    assert shift is ctx.split_traces("shift")  # memoised
    assert session.n_loads == 1 and toy.CALLS["load"] == 1  # one model for both splits
    module = toy
    adapter, model = module.Shifted(), module.Shifted().load(torch.device("cpu"))
    with torch.inference_mode():
        outs = [adapter.forward(model, b) for b in adapter.batches("shift")]
    np.testing.assert_array_equal(shift.logits, np.concatenate([o.logits.numpy() for o in outs]))
    assert not np.allclose(shift.logits[:10], session.traces().logits[:10])
    assert len(entries(cache)) == 2  # each split has its own cache entry
    again = ModelSession(toy.Shifted(), cache_dir=cache, progress=False).for_split("shift")
    np.testing.assert_array_equal(again.traces().logits, shift.logits)
    assert again.cache_hit
