"""Result files are never torn, never hold a NaN, and a path that cannot be written is refused up front."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from plip_jax.util import io
from plip_jax.util.errors import NonFiniteError, OutputError


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch, tmp_path):
    monkeypatch.setattr(io, "written", [])
    monkeypatch.setenv(io.FALLBACK_ENV, str(tmp_path / "fallback"))


def test_write_json_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "sub" / "r.json"
    io.write_json(out, {"a": 1})
    io.write_json(out, {"a": 2, "x": np.float32(0.5), "v": np.arange(3), "t": (1, 2)})
    assert json.loads(out.read_text()) == {"a": 2, "x": 0.5, "v": [0, 1, 2], "t": [1, 2]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]
    assert io.written == [out, out]


@pytest.mark.parametrize("payload, field", [
    ({"dose_results": [{"kl": 1.0}, {"kl": float("nan")}]}, "dose_results[1].kl"),
    ({"scale_factor": float("inf")}, "scale_factor"),
    ({"a": {"b": [np.float32("-inf")]}}, "a.b[0]"),
    ({"m": np.array([[0.0, np.nan]])}, "m[0][1]"),
])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, payload, field):
    out = tmp_path / "r.json"
    out.write_text('{"old": true}\n')
    with pytest.raises(NonFiniteError, match=re.escape(f"{out}: field {field} is ")):
        io.write_json(out, payload)
    assert json.loads(out.read_text()) == {"old": True}  # nothing written
    assert io.written == []


def test_a_failed_write_keeps_the_old_file_and_saves_the_payload_to_the_fallback(tmp_path, monkeypatch):
    """A full disk midway through the write: the earlier result stays intact, the new payload goes to the
    fallback folder, and the error says where."""
    out = tmp_path / "scan.json"
    io.write_json(out, {"run": 1, "values": list(range(100))})
    before = out.read_bytes()
    real_fsync = os.fsync
    calls = []

    def full_disk(fd):  # the data is partly written; the flush to disk fails, once
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", full_disk)
    with pytest.raises(OutputError) as err:
        io.write_json(out, {"run": 2, "values": list(range(100))})
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    fallback = tmp_path / "fallback" / "scan.json"
    msg = str(err.value)
    assert "No space left on device" in msg and "previous file there is unchanged" in msg
    assert str(fallback) in msg and json.loads(fallback.read_text())["run"] == 2


def test_no_fallback_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_replace_atomically", lambda path, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OutputError, match=r"could not write .*\(I/O error\); nothing was written"):
        io.write_json(tmp_path / "r.json", {"a": 1}, fallback=False)


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    """The probe's row 44 on a real 12 KiB tmpfs (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and a mountable tmpfs")
    try:
        out = mnt / "scan.json"
        io.write_json(out, {"ok": True})
        before = out.read_bytes()
        with pytest.raises(OutputError, match="No space left on device"):
            io.write_json(out, {"big": "x" * 64_000})
        assert out.read_bytes() == before
        assert [p.name for p in mnt.iterdir()] == ["scan.json"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_check_output_path_refuses_what_cannot_be_written(tmp_path):
    assert io.check_output_path(tmp_path / "new" / "dir" / "r.json") == tmp_path / "new" / "dir" / "r.json"
    assert (tmp_path / "new" / "dir").is_dir()
    with pytest.raises(OutputError, match=r"--output=.* is a directory; give a file path such as .*result.json"):
        io.check_output_path(tmp_path)
    with pytest.raises(OutputError, match="is a directory"):
        io.check_output_path(f"{tmp_path}/nothere/")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"cannot create its folder .*file"):
        io.check_output_path(tmp_path / "file" / "r.json")
    with pytest.raises(OutputError, match=r"--report=/proc/x.json: cannot create files in /proc"):
        io.check_output_path("/proc/x.json", "--report")
    assert not [p for p in tmp_path.rglob("*.probe")]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    out = io.write_json(tmp_path / "r.json", {"a": 1})
    assert not out.exists() and io.written == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert io.write_json(tmp_path / "r.json", {"a": 1}).exists()


def test_save_figure_writes_through_the_atomic_writer(tmp_path):
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and io.written == [png]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_check_finite_names_the_quantity_sample_and_step():
    from plip_jax.util.finite import check_finite

    kl = np.zeros((2, 3))
    kl[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"KL\(baseline \|\| steered\): 1 of 6 values are not finite \(NaN 1, "
                                             r"\+inf 0, -inf 0\); first at dose 6.0, sample 'rust_c' \(index \[1, 2\]\)"):
        check_finite("KL(baseline || steered)", kl, [("dose", [0.5, 6.0]), ("sample", ["rust_a", "rust_b", "rust_c"])])
    logits = np.array([[0.0, -np.inf]])
    assert check_finite("logits", logits, allow_neg_inf=True) is not None
    with pytest.raises(NonFiniteError, match="first at step #0"):
        check_finite("logits", logits, [("step", None)])
    assert check_finite("ids", np.array([1, 2])).tolist() == [1, 2]  # integers are always finite


def test_json_text_of_an_unknown_type_names_the_field():
    with pytest.raises(TypeError, match=r"field a\.b has type object"):
        io.to_json_text({"a": {"b": object()}})


def test_interrupt_cleanup_removes_pending_temp_files(tmp_path):
    tmp = tmp_path / ".r.json.123.tmp"
    tmp.write_text("partial")
    io.pending.add(str(tmp))
    try:
        assert io.remove_pending() == [str(tmp)] and not tmp.exists()
    finally:
        io.pending.discard(str(tmp))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
