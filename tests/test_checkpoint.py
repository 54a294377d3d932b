"""Checkpoints: round trip, atomic writes, and refusal of every file that is not ours."""

import os
import stat
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from symbp import checkpoint as ckpt
from symbp.errors import TrainingError


def arrays(k=1.0):
    return {"param/W1": np.full((3, 4), k, np.float32), "param/b1": np.arange(4.0)[None] * k,
            "perm": np.arange(7), "flag": np.array(True)}


def test_round_trip(tmp_path):
    p = tmp_path / "run.ckpt"  # the name is used as given, no .npz appended
    meta = {"epoch": 3, "rng": {"state": 2**100 + 7}, "losses": [0.1, 1 / 3]}
    ckpt.save(p, arrays(), meta)
    c = ckpt.load(p)
    assert c.meta == meta  # JSON keeps big ints and floats exactly
    assert set(c.arrays) == set(arrays())
    for k, v in arrays().items():
        assert c.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(c.arrays[k], v)
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary left behind


def test_refuses_object_arrays_on_save(tmp_path):
    with pytest.raises(TrainingError, match="only numbers"):
        ckpt.save(tmp_path / "c.npz", {"x": np.array([object()])})


# --- hostile and broken files -----------------------------------------------------------


class Evil:
    """Unpickling this writes a sentinel file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


def good_file(tmp_path):
    p = tmp_path / "good.npz"
    ckpt.save(p, arrays(), {"epoch": 1})
    return p


def truncated(tmp_path):
    data = good_file(tmp_path).read_bytes()
    p = tmp_path / "cut.npz"
    p.write_bytes(data[: len(data) // 2])
    return p


def flipped(tmp_path):
    # Corrupt bytes inside the first array member's data: caught by the zip CRC.
    p = good_file(tmp_path)
    with zipfile.ZipFile(p) as z:
        info = z.infolist()[-1]
    data = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 128 + 8
    data[start:start + 8] = b"\xff" * 8
    p.write_bytes(bytes(data))
    return p


def foreign(tmp_path):
    p = tmp_path / "plain.npz"
    np.savez(p, W=np.ones((2, 2)))
    return p


def npy(tmp_path):
    p = tmp_path / "single.npz"
    with open(p, "wb") as f:
        np.save(f, np.ones(3))
    return p


def text(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("epoch = 3\n")
    return p


def empty(tmp_path):
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    return p


def pickled(tmp_path):
    p = tmp_path / "evil.npz"
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(tmp_path / "PWNED")
    np.savez(p, **{ckpt.MARKER: np.array(ckpt.VERSION), ckpt.META: np.array("{}"), "W": evil})
    return p


def wrong_version(tmp_path):
    p = tmp_path / "future.npz"
    np.savez(p, **{ckpt.MARKER: np.array(99), ckpt.META: np.array("{}")})
    return p


def bad_meta(tmp_path):
    p = tmp_path / "meta.npz"
    np.savez(p, **{ckpt.MARKER: np.array(ckpt.VERSION), ckpt.META: np.array("{epoch: 1")})
    return p


BROKEN = [
    (truncated, "not an .npz|truncated|corrupt"),
    (flipped, "corrupt"),
    (foreign, "not a symbp checkpoint"),
    (npy, "not an .npz"),
    (text, "not an .npz"),
    (empty, "not an .npz"),
    (pickled, "pickled object array"),
    (wrong_version, "format"),
    (bad_meta, "metadata"),
]


@pytest.mark.parametrize("make,message", BROKEN, ids=[m.__name__ for m, _ in BROKEN])
def test_broken_files_are_refused(tmp_path, make, message):
    p = make(tmp_path)
    with pytest.raises(TrainingError, match=message) as err:
        ckpt.load(p)
    assert str(p) in str(err.value)  # the error names the file
    assert not (tmp_path / "PWNED").exists()  # and no code ran


def test_the_evil_payload_is_real(tmp_path):
    # Guard against a test that cannot fail: with pickle allowed, the payload does run.
    p = pickled(tmp_path)
    with np.load(p, allow_pickle=True) as z:
        z["W"]
    assert (tmp_path / "PWNED").read_text() == "pwned"


def test_missing_file(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        ckpt.load(tmp_path / "nope.npz")


# --- atomicity --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["replace", "write", "interrupt"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    p = tmp_path / "run.npz"
    ckpt.save(p, arrays(1.0), {"epoch": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt if fault == "interrupt" else OSError("disk full")

    target = {"replace": (os, "replace"), "write": (np, "savez"), "interrupt": (np, "savez")}
    monkeypatch.setattr(*target[fault], boom)
    with pytest.raises((OSError, KeyboardInterrupt)):
        ckpt.save(p, arrays(2.0), {"epoch": 2})
    monkeypatch.undo()
    c = ckpt.load(p)
    assert c.meta["epoch"] == 1
    np.testing.assert_array_equal(c.arrays["param/W1"], arrays(1.0)["param/W1"])
    assert os.listdir(tmp_path) == ["run.npz"]  # the temporary was removed


WRITER = """
import sys, numpy as np
from symbp import checkpoint as ckpt
path = sys.argv[1]
k = 0
while True:
    k += 1
    ckpt.save(path, {"W": np.full((1000, 1000), float(k))}, {"k": k})
    if k == 1:
        print("ready", flush=True)
"""


def test_process_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path):
    # A writer saving 8 MB checkpoints in a loop is killed (SIGKILL, no cleanup) at
    # several moments; every time the file on disk is one complete checkpoint.
    p = tmp_path / "run.npz"
    for delay in (0.0, 0.05, 0.13):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(p)], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        c = ckpt.load(p)
        k = c.meta["k"]
        assert np.all(c.arrays["W"] == float(k))
    leftovers = [f for f in os.listdir(tmp_path) if f != "run.npz"]
    assert all(f.startswith(".run.npz.") and f.endswith(".tmp") for f in leftovers)


def test_next_save_removes_temp_files_left_by_a_killed_writer(tmp_path):
    path = tmp_path / "m.npz"
    ckpt.save(path, {"w": np.ones(3)})
    stale, fresh = tmp_path / ".m.npz.dead.tmp", tmp_path / ".m.npz.busy.tmp"
    stale.write_bytes(b"half a zip")
    fresh.write_bytes(b"another writer, still going")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    ckpt.save(path, {"w": np.zeros(3)})
    assert not stale.exists()  # left by a dead writer: gone
    assert fresh.exists()  # young: may belong to a concurrent writer, kept
    assert (ckpt.load(path).arrays["w"] == 0).all()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_respects_the_umask(tmp_path, umask):
    # as open() would: 0o666 & ~umask, for a new file and for one replaced in place
    old = os.umask(umask)
    try:
        path = tmp_path / "ck.npz"
        ckpt.save(path, {"w": np.ones(3)})
        first = stat.S_IMODE(path.stat().st_mode)
        ckpt.save(path, {"w": np.zeros(3)})
        second = stat.S_IMODE(path.stat().st_mode)
        with open(tmp_path / "plain", "w"):
            pass
        plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    finally:
        os.umask(old)
    assert first == second == plain == 0o666 & ~umask, (oct(first), oct(second), oct(plain))
    np.testing.assert_array_equal(ckpt.load(path).arrays["w"], np.zeros(3))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
