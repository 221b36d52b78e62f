"""Bad trace input ends in a RouteAuditError that names the file or field; saving loses nothing.

Each case is what a careless or hostile user might hand over: files that are not what their
name claims, damaged trace directories, ill-typed meta, degenerate shapes, awkward paths.
Loading must raise a RouteAuditError subclass (TraceFileError for the file, TraceValidationError
for the content) whose message names the file or field, and ``routeaudit run`` must answer
exit 4 with that message, never exit 3 with a traceback. Generated corruptions (hypothesis)
check the same property beyond the listed cases.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routeaudit.cli import main
from routeaudit.errors import RouteAuditError, TraceFileError, TraceValidationError
from routeaudit.traces import TraceSet, _common, reading

N, K, L, S = 30, 4, 3, 3


def good_arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.tril(np.ones((L, S), dtype=bool))
    raw = rng.random((n, L, S)) * mask
    return {
        "logits": rng.standard_normal((n, K)).astype(np.float32),
        "labels": rng.integers(0, K, size=n),
        "routing": (raw / raw.sum(axis=2, keepdims=True)).astype(np.float32),
        "source_mask": mask,
    }


GOOD = TraceSet(**good_arrays(), meta={"name": "good", "layer_names": ["a", "b", "c"]})


def npy_bytes(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def huge_header(rows: int = 2**40) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 10), }}".encode()
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def rehash(directory: Path, name: str) -> None:
    """Make manifest.json agree with the (altered) file of array ``name``."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    file = directory / manifest["arrays"][name]["file"]
    manifest["arrays"][name]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def edit_manifest(directory: Path, change) -> None:
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    change(manifest)
    manifest_path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------ file cases
# Each builder makes one bad target under ``root`` and returns (path, text the message must
# contain); the exception type is given in the table.
def _write(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    return path


def _npz_members(**members: bytes) -> bytes:
    arrays = good_arrays()
    payload = {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}
    payload.update({f"{k}.npy": v for k, v in members.items()})
    return zip_of(payload)


def _good_npz(root: Path) -> bytes:
    return GOOD.save_npz(root / "source.npz").read_bytes()


def _declared_size_lie(root: Path) -> bytes:
    """A stored member whose central-directory entry declares 2 GiB uncompressed."""
    data = bytearray(_npz_members())
    at = data.index(b"PK\x01\x02")  # the first central-directory entry
    data[at + 24: at + 28] = struct.pack("<I", 2**31)
    return bytes(data)


def _bit_flip(root: Path) -> bytes:
    data = bytearray(zip_of({f"{k}.npy": npy_bytes(v) for k, v in good_arrays().items()}))
    data[300] ^= 0x04  # inside the data of the first (stored) member: its CRC no longer holds
    return bytes(data)


def _trace_dir(root: Path, change=None) -> Path:
    directory = GOOD.save(root / "traces")
    if change is not None:
        change(directory)
    return directory


def _manifest_bytes(data: bytes):
    return lambda d: (d / "manifest.json").write_bytes(data)


def _replace_npy(name: str, data: bytes):
    def change(d: Path) -> None:
        (d / f"{name}.npy").write_bytes(data)
        rehash(d, name)
    return change


def _entry(name: str, value):
    return lambda d: edit_manifest(d, lambda m: m["arrays"].__setitem__(name, value))


def _entry_field(name: str, key: str, value=None, *, drop: bool = False):
    def change(m):
        if drop:
            del m["arrays"][name][key]
        else:
            m["arrays"][name][key] = value
    return lambda d: edit_manifest(d, change)


def _escape(d: Path) -> None:
    outside = d.parent / "x.npy"
    outside.write_bytes((d / "labels.npy").read_bytes())  # the right bytes, in the wrong place
    edit_manifest(d, lambda m: m["arrays"]["labels"].__setitem__("file", "../x.npy"))


def _entry_is_folder(d: Path) -> None:
    (d / "labels.npy").unlink()
    (d / "labels.npy").mkdir()


def _dangling(root: Path) -> Path:
    link = root / "dangling.npz"
    link.symlink_to(root / "nowhere.npz")
    return link


def _non_utf8(root: Path) -> Path:
    path = os.fsencode(str(root)) + b"/bad-\xff.npz"
    with open(path, "wb") as handle:
        handle.write(b"not an archive")
    return Path(os.fsdecode(path))


FILE_CASES = {
    # .npz files that are not what they claim
    "empty_npz": (lambda r: _write(r, "empty.npz", b""), TraceFileError, "empty.npz"),
    "npy_renamed_npz": (lambda r: _write(r, "renamed.npz", npy_bytes(np.arange(3))), TraceFileError,
                        "single .npy array"),
    "truncated_zip": (lambda r: _write(r, "cut.npz", _good_npz(r)[:700]), TraceFileError, "cut.npz"),
    "bit_flipped_zip": (lambda r: _write(r, "flip.npz", _bit_flip(r)), TraceFileError, "flip.npz"),
    "garbled_npy_header": (lambda r: _write(r, "garbled.npz", _npz_members(
        labels=b"\x93NUMPY\x01\x00\x14\x00{'descr': ((((((((((")), TraceFileError, "labels.npy"),
    "huge_npy_header": (lambda r: _write(r, "huge.npz", _npz_members(logits=huge_header())),
                        TraceFileError, "logits.npy"),
    "zip_declares_2gib": (lambda r: _write(r, "lie.npz", _declared_size_lie(r)), TraceFileError,
                          "lie.npz"),
    "text_file": (lambda r: _write(r, "text.npz", b"logits,labels\n0.1,1\n"), TraceFileError,
                  "text file"),
    "pickle_file": (lambda r: _write(r, "pickle.npz", pickle.dumps({"logits": [1.0]})),
                    TraceFileError, "pickle"),
    "empty_zip": (lambda r: _write(r, "nothing.npz", zip_of({})), TraceFileError, "no arrays"),
    "object_member": (lambda r: _write(r, "objects.npz", _npz_members(
        labels=npy_bytes(np.array([{"a": 1}] * N, dtype=object), allow_pickle=True))),
        TraceFileError, "Python objects (pickle)"),
    "not_npy_member": (lambda r: _write(r, "extra.npz", zip_of({"readme.txt": b"hi"})),
                       TraceFileError, "readme.txt"),
    "missing_key": (lambda r: _write(r, "nokey.npz", zip_of(
        {f"{k}.npy": npy_bytes(v) for k, v in good_arrays().items() if k != "routing"})),
        TraceValidationError, "routing"),
    "meta_not_json": (lambda r: _write(r, "meta.npz", _npz_members(meta=npy_bytes(np.array("{x")))),
                      TraceValidationError, "meta"),
    "meta_ill_typed": (lambda r: _write(r, "meta2.npz", _npz_members(
        meta=npy_bytes(np.array(json.dumps({"replicate": "x"}))))), TraceValidationError,
        "meta.replicate"),
    "meta_a_list": (lambda r: _write(r, "meta3.npz", _npz_members(meta=npy_bytes(np.array("[1, 2]")))),
                    TraceValidationError, "meta"),
    "content_in_file": (lambda r: _write(r, "nan.npz", _npz_members(
        logits=npy_bytes(np.full((N, K), np.nan, np.float32)))), TraceValidationError, "nan.npz"),
    # trace directories
    "manifest_not_json": (lambda r: _trace_dir(r, _manifest_bytes(b"{not json")), TraceFileError,
                          "manifest.json"),
    "manifest_a_list": (lambda r: _trace_dir(r, _manifest_bytes(b"[1, 2]")), TraceFileError,
                        "manifest.json"),
    "manifest_zero_bytes": (lambda r: _trace_dir(r, _manifest_bytes(b"")), TraceFileError,
                            "manifest.json"),
    "manifest_not_utf8": (lambda r: _trace_dir(r, _manifest_bytes(b'{"a": "\xff"}')), TraceFileError,
                          "UTF-8"),
    "manifest_without_arrays": (lambda r: _trace_dir(r, _manifest_bytes(b'{"schema_version": 1}')),
                                TraceFileError, "arrays"),
    "manifest_wrong_schema": (lambda r: _trace_dir(r, lambda d: edit_manifest(
        d, lambda m: m.__setitem__("schema_version", True))), TraceFileError, "schema_version"),
    "no_manifest": (lambda r: _trace_dir(r, lambda d: (d / "manifest.json").unlink()), TraceFileError,
                    "manifest.json"),
    "entry_not_a_dict": (lambda r: _trace_dir(r, _entry("labels", [1, 2])), TraceFileError, "labels"),
    "entry_without_file": (lambda r: _trace_dir(r, _entry_field("labels", "file", drop=True)),
                           TraceFileError, "file"),
    "entry_without_sha256": (lambda r: _trace_dir(r, _entry_field("labels", "sha256", drop=True)),
                             TraceFileError, "sha256"),
    "entry_unknown_array": (lambda r: _trace_dir(r, _entry("junk", {})), TraceFileError, "junk"),
    "file_escapes_directory": (lambda r: _trace_dir(r, _escape), TraceFileError, "../x.npy"),
    "file_absolute_path": (lambda r: _trace_dir(r, _entry_field("labels", "file", "/etc/passwd")),
                           TraceFileError, "/etc/passwd"),
    "listed_file_missing": (lambda r: _trace_dir(r, lambda d: (d / "labels.npy").unlink()),
                            TraceFileError, "labels.npy"),
    "entry_is_a_folder": (lambda r: _trace_dir(r, _entry_is_folder), TraceFileError, "labels.npy"),
    "pickled_npy_hash_matches": (lambda r: _trace_dir(r, _replace_npy(
        "labels", npy_bytes(np.array([{"a": 1}] * N, dtype=object), allow_pickle=True))),
        TraceFileError, "pickle"),
    "huge_npy_hash_matches": (lambda r: _trace_dir(r, _replace_npy("logits", huge_header())),
                              TraceFileError, "logits.npy"),
    "truncated_npy_hash_matches": (lambda r: _trace_dir(r, _replace_npy(
        "routing", npy_bytes(good_arrays()["routing"])[:-7])), TraceFileError, "routing.npy"),
    "tampered_npy": (lambda r: _trace_dir(r, lambda d: (d / "labels.npy").write_bytes(
        npy_bytes(np.zeros(N, np.int64)))), TraceValidationError, "sha256"),
    "meta_wrong_length_in_dir": (lambda r: _trace_dir(r, lambda d: edit_manifest(
        d, lambda m: m["meta"].__setitem__("layer_types", ["attn"]))), TraceValidationError,
        "meta.layer_types"),
    # paths
    "missing_path": (lambda r: r / "missing.npz", TraceFileError, "missing.npz"),
    "dangling_symlink": (_dangling, TraceFileError, "dangling.npz"),
    "npz_that_is_a_folder": (lambda r: (r / "folder.npz").mkdir() or r / "folder.npz", TraceFileError,
                             "folder.npz"),
    "non_utf8_name": (_non_utf8, TraceFileError, "bad-\\xff.npz"),
    "single_npy": (lambda r: _write(r, "one.npy", npy_bytes(np.arange(3))), TraceFileError, "one.npy"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file_is_a_named_error(case, tmp_path):
    build, kind, text = FILE_CASES[case]
    path = build(tmp_path)
    with pytest.raises(kind) as info:
        TraceSet.load(path)
    message = str(info.value)
    assert text in message
    assert "allow_pickle" not in message


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file_through_the_cli_is_exit_4(case, tmp_path, capsys):
    build, _, text = FILE_CASES[case]
    path = build(tmp_path)
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "Traceback" not in err and "internal error" not in err
    assert text in err or Path(path).name in err


def test_zip_size_check_happens_before_allocation(tmp_path, monkeypatch):
    """A header that declares 44 TB is refused from its size alone: nothing is allocated."""
    path = _write(tmp_path, "huge.npz", _npz_members(labels=huge_header()))  # read first

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated before checking the declared size")

    monkeypatch.setattr(reading, "_read_npy_data", no_allocation)
    with pytest.raises(TraceFileError, match=r"declares shape \(1099511627776, 10\)"):
        TraceSet.load(path)


# ------------------------------------------------------------------------------ paths that work
def test_symlinked_npz_loads(tmp_path):
    target = GOOD.save_npz(tmp_path / "real.npz")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    np.testing.assert_array_equal(TraceSet.load(link).routing, GOOD.routing)


def test_non_utf8_names_save_and_load(tmp_path):
    base = os.fsencode(str(tmp_path))
    npz = GOOD.save_npz(base + b"/\xff.npz")
    directory = GOOD.save(base + b"/\xfe-traces")
    for path in (npz, directory, os.fsencode(npz)):
        np.testing.assert_array_equal(TraceSet.load(path).labels, GOOD.labels)


# ------------------------------------------------------------------------------ permissions
@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not deny root")
@pytest.mark.parametrize("what", ["file", "directory"])
def test_permission_denied_names_the_path(tmp_path, what):
    path = GOOD.save_npz(tmp_path / "t.npz") if what == "file" else GOOD.save(tmp_path / "t")
    os.chmod(path, 0)
    try:
        with pytest.raises(TraceFileError, match="permission denied") as info:
            TraceSet.load(path)
    finally:
        os.chmod(path, 0o755)
    assert str(path) in str(info.value)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """The same messages where chmod cannot deny (root): the OS refusal is simulated."""
    npz = GOOD.save_npz(tmp_path / "t.npz")
    directory = GOOD.save(tmp_path / "d")

    def denied_open(path, *args, **kwargs):
        if Path(path) == npz:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    real_lstat = os.lstat

    def denied_lstat(path, *args, **kwargs):
        if Path(path).parent == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(_common, "open", denied_open, raising=False)
    with pytest.raises(TraceFileError, match=r"t\.npz: permission denied"):
        TraceSet.load(npz)
    monkeypatch.setattr(os, "lstat", denied_lstat)
    with pytest.raises(TraceFileError, match="d: permission denied"):
        TraceSet.load(directory)


# ------------------------------------------------------------------------------ content cases
def _arrays(**changes):
    arrays = good_arrays()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _labels_with(value, dtype):
    labels = good_arrays()["labels"].astype(dtype)
    labels[5] = value
    return labels


CONTENT_CASES = {
    "no_examples": (dict(logits=np.zeros((0, K), np.float32), labels=np.zeros(0, np.int64),
                         routing=np.zeros((0, L, S), np.float32)), None, "logits", "no examples"),
    "no_layers": (_arrays(routing=np.zeros((N, 0, S), np.float32), source_mask=None), None,
                  "routing", "L = 0"),
    "no_sources": (_arrays(routing=np.zeros((N, L, 0), np.float32), source_mask=None), None,
                   "routing", "S = 0"),
    "huge_unsigned_label": (_arrays(labels=_labels_with(2**64 - 1, np.uint64)), None, "labels",
                            "18446744073709551615"),
    "huge_float_label": (_arrays(labels=_labels_with(1e300, np.float64)), None, "labels", "1e+300"),
    "text_mask": (_arrays(source_mask=np.full((L, S), "x")), None, "source_mask", "dtype"),
    "mask_of_twos": (_arrays(source_mask=np.full((L, S), 2)), None, "source_mask", "2"),
    "ragged_logits": (_arrays(logits=[[1.0, 2.0], [3.0]]), None, "logits", "array"),
    "meta_a_list": (good_arrays(), [1, 2], "meta", "[1, 2]"),
    "meta_a_string": (good_arrays(), "5", "meta", "'5'"),
    "meta_routing_mode": (good_arrays(), {"routing_mode": "x"}, "meta.routing_mode", "'soft' or 'hard'"),
    "meta_replicate": (good_arrays(), {"replicate": "x"}, "meta.replicate", "'x'"),
    "meta_schedule_type": (good_arrays(), {"schedule": [["a"]]}, "meta.schedule[0][0]", "'a'"),
    "meta_schedule_shape": (good_arrays(), {"schedule": [[1.0, 0.0]] * L}, "meta.schedule",
                            f"[L, S] = [{L}, {S}]"),
    "meta_schedule_not_finite": (good_arrays(), {"schedule": [[float("nan")] * S] * L},
                                 "meta.schedule", "nan"),
    "meta_layer_names": (good_arrays(), {"layer_names": ["a"]}, "meta.layer_names", f"L = {L}"),
    "meta_layer_types": (good_arrays(), {"layer_types": ["attn"] * 5}, "meta.layer_types", "5 entries"),
    "meta_layer_depth": (good_arrays(), {"layer_depth": [0, 1]}, "meta.layer_depth", "2 entries"),
    "meta_family_out_of_range": (good_arrays(), {"source_families": {"current": [0, S]}},
                                 "meta.source_families['current']", f"[0, {S})"),
    "meta_family_negative": (good_arrays(), {"source_families": {"x": [-1]}},
                             "meta.source_families['x']", "-1"),
    "meta_key_not_a_string": (good_arrays(), {1: "x"}, "meta", "1"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_bad_content_names_the_field(case):
    arrays, meta, field, text = CONTENT_CASES[case]
    with pytest.raises(TraceValidationError) as info:
        TraceSet(**arrays, meta=meta)
    assert info.value.field == field
    assert text in str(info.value)
    assert "validation error" not in str(info.value)  # not pydantic's raw text


@pytest.mark.parametrize("case", [c for c in sorted(CONTENT_CASES)
                                  if c not in ("ragged_logits", "meta_key_not_a_string")])
def test_bad_content_through_the_cli_is_exit_4(case, tmp_path, capsys):
    arrays, meta, field, _ = CONTENT_CASES[case]
    path = tmp_path / "t.npz"
    if meta is not None:
        arrays = {**arrays, "meta": np.array(json.dumps(meta))}
    np.savez(path, **arrays)
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "Traceback" not in err
    assert "t.npz" in err and field.split("[")[0] in err


def test_small_n_is_not_invalid():
    """1 ≤ N < 100 is valid traces: each audit that needs more says so (inconclusive)."""
    ts = TraceSet(**good_arrays(n=1))
    assert ts.n_examples == 1


# ------------------------------------------------------------------------------ saving
def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_into_a_folder_with_other_files_refuses_and_keeps_them(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    (folder / "data").mkdir()
    (folder / "data" / "x.bin").write_bytes(b"\x00\x01")
    before = snapshot(folder)
    with pytest.raises(TraceFileError, match="not empty") as info:
        GOOD.save(folder)
    assert "force=True" in str(info.value) and "thesis.tex" in str(info.value)
    with pytest.raises(TraceFileError, match="not a routeaudit trace directory"):
        GOOD.save(folder, force=True)
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_force_refuses_a_trace_directory_with_extra_files(tmp_path):
    directory = GOOD.save(tmp_path / "t")
    (directory / "notes.txt").write_text("mine")
    before = snapshot(directory)
    with pytest.raises(TraceFileError, match=r"notes\.txt"):
        GOOD.save(directory, force=True)
    assert snapshot(directory) == before


def test_force_replaces_a_previous_trace_directory_and_leaves_nothing_else(tmp_path):
    old = TraceSet(**good_arrays(seed=1), group=np.arange(N) % 2)
    directory = old.save(tmp_path / "t")
    GOOD.save(directory, force=True)
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no staging or backup folder
    back = TraceSet.load(directory)
    np.testing.assert_array_equal(back.logits, GOOD.logits)
    assert back.group is None and not (directory / "group.npy").exists()
    assert back.meta.name == "good"


def test_save_into_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    GOOD.save(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    TraceSet.load(tmp_path / "empty")


@pytest.mark.parametrize("force", [False, True])
def test_save_onto_a_file_refuses_and_leaves_nothing(tmp_path, force):
    (tmp_path / "t").write_text("a file")
    with pytest.raises(TraceFileError, match="is a file"):
        GOOD.save(tmp_path / "t", force=force)
    assert sorted(os.listdir(tmp_path)) == ["t"]
    assert (tmp_path / "t").read_text() == "a file"


def test_save_below_a_file_refuses(tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(TraceFileError, match="part of the path is a file"):
        GOOD.save(tmp_path / "f" / "t")
    assert (tmp_path / "f").read_text() == "a file"


def test_save_refuses_a_symlink_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(TraceFileError, match="symbolic link"):
        GOOD.save(tmp_path / "link", force=True)


def _fail_after_first(monkeypatch, error: BaseException) -> None:
    real_save = np.save
    calls = []

    def flaky_save(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise error
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", flaky_save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["disk_full", "interrupt"])
def test_failure_mid_write_keeps_the_original_and_no_staging(tmp_path, monkeypatch, error):
    directory = TraceSet(**good_arrays(seed=3)).save(tmp_path / "t")
    before = snapshot(directory)
    _fail_after_first(monkeypatch, error)
    with pytest.raises(TraceFileError if isinstance(error, OSError) else KeyboardInterrupt):
        GOOD.save(directory, force=True)
    assert snapshot(directory) == before
    with pytest.raises(TraceFileError if isinstance(error, OSError) else KeyboardInterrupt):
        GOOD.save(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no new target, no staging folder


def test_failure_while_swapping_puts_the_original_back(tmp_path, monkeypatch):
    directory = TraceSet(**good_arrays(seed=3)).save(tmp_path / "t")
    before = snapshot(directory)
    real_rename = os.rename

    def rename(src, dst):
        if ".staging-" in str(src):
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(TraceFileError, match="Nothing was changed"):
        GOOD.save(directory, force=True)
    assert snapshot(directory) == before
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_save_npz_refuses_an_existing_file_unless_forced(tmp_path):
    path = tmp_path / "t.npz"
    path.write_bytes(b"precious")
    with pytest.raises(TraceFileError, match="already exists"):
        GOOD.save_npz(path)
    assert path.read_bytes() == b"precious"
    GOOD.save_npz(path, force=True)
    np.testing.assert_array_equal(TraceSet.load(path).logits, GOOD.logits)
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(TraceFileError, match="is a folder"):
        GOOD.save_npz(tmp_path / "d.npz", force=True)


def test_save_npz_appends_the_suffix_and_returns_the_real_path(tmp_path):
    path = GOOD.save_npz(tmp_path / "t")
    assert path == tmp_path / "t.npz" and path.is_file()


@pytest.mark.parametrize("force", [False, True])
def test_save_npz_failure_leaves_no_partial_file(tmp_path, monkeypatch, force):
    path = tmp_path / "t.npz"
    if force:
        GOOD.save_npz(path)
    before = snapshot(tmp_path)

    def half_written(file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", half_written)
    with pytest.raises(TraceFileError, match="no space left"):
        TraceSet(**good_arrays(seed=4)).save_npz(path, force=force)
    assert snapshot(tmp_path) == before  # the original (or nothing) and no temporary file


# ------------------------------------------------------------------------------ generated
_BASE = TraceSet(**good_arrays(n=12), meta={"name": "base", "layer_depth": [0, 1, 2]})


def _npz_bytes(compressed: bool) -> bytes:
    buf = io.BytesIO()
    meta = np.array(json.dumps(_BASE.meta.model_dump(mode="json")))
    (np.savez_compressed if compressed else np.savez)(buf, meta=meta, **_BASE.arrays())
    return buf.getvalue()


VALID_NPZ = {True: _npz_bytes(True), False: _npz_bytes(False)}
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    out = bytearray(data)
    how = draw(st.sampled_from(["truncate", "flip", "random", "splice", "zip_random"]))
    if how == "truncate":
        del out[draw(st.integers(0, max(len(out) - 1, 0))):]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "random":
        out = bytearray(draw(st.binary(max_size=600)))
    elif how == "splice":
        i = draw(st.integers(0, len(out)))
        out[i:i + draw(st.integers(0, 64))] = draw(st.binary(max_size=64))
    else:
        out = bytearray(b"PK\x03\x04" + draw(st.binary(max_size=400)))
    return bytes(out)


def load_or_refuse(path: Path | str) -> None:
    """Loading either succeeds or raises a RouteAuditError; anything else fails the test."""
    with contextlib.suppress(RouteAuditError):
        TraceSet.load(path)


@SETTINGS
@given(compressed=st.booleans(), data=st.data())
def test_generated_corrupt_npz_raise_only_routeaudit_errors(compressed, data):
    blob = data.draw(corrupted(VALID_NPZ[compressed]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.npz"
        path.write_bytes(blob)
        load_or_refuse(path)


_DIR_FILES = ["manifest.json", "logits.npy", "labels.npy", "routing.npy", "source_mask.npy"]


@SETTINGS
@given(file=st.sampled_from(_DIR_FILES), rehash_after=st.booleans(), data=st.data())
def test_generated_corrupt_trace_directories_raise_only_routeaudit_errors(file, rehash_after, data):
    with tempfile.TemporaryDirectory() as tmp:
        directory = _BASE.save(Path(tmp) / "t")
        target = directory / file
        target.write_bytes(data.draw(corrupted(target.read_bytes())))
        if rehash_after and file != "manifest.json":  # a corruption the digest does not catch
            rehash(directory, file[: -len(".npy")])
        load_or_refuse(directory)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                        max_size=4),
    max_leaves=12)
_META_FIELDS = ["name", "family", "routing_mode", "source_families", "layer_names", "layer_types",
                "layer_depth", "schedule", "replicate", "per_token", "model_config", "extraction"]


@SETTINGS
@given(meta=_JSON | st.dictionaries(st.sampled_from(_META_FIELDS) | st.text(max_size=6), _JSON,
                                    max_size=4))
def test_generated_meta_raise_only_validation_errors(meta):
    with contextlib.suppress(TraceValidationError):
        ts = TraceSet(**good_arrays(n=5), meta=meta)
        with tempfile.TemporaryDirectory() as tmp:  # what was accepted can be stored and read back
            back = TraceSet.load(ts.save(Path(tmp) / "t")).meta
        assert json.dumps(back.model_dump(mode="json"), sort_keys=True) == json.dumps(
            ts.meta.model_dump(mode="json"), sort_keys=True)
