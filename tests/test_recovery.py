"""Recovery at mount after a crash: replay, and a corrupt record in the middle of the log."""

from __future__ import annotations

import os

from mirrorfs.store import record
from tests.log_util import unsync
from tests.util import cleanup, kill_mount, mkfs, mount, needs_fuse, run_cli, umount

pytestmark = needs_fuse


def crash_after_fsyncs(vol: str, mnt: str, count: int) -> None:
    """Mount, write ``count`` files with fsync (one transaction each), SIGKILL the mount."""
    m = mount(vol, mnt)
    try:
        for i in range(count):
            with open(os.path.join(mnt, f"f{i}"), "wb") as f:
                f.write(bytes([i]) * 10000)
                f.flush()
                os.fsync(f.fileno())
    finally:
        kill_mount(m)  # a crash: no final commit, no checkpoint


def record_offsets(path: str) -> list[tuple[int, int]]:
    """(offset, seq) of every TXN record in a segment file."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 64  # segment header
    out = []
    while pos < len(data) and data[pos:].strip(b"\0"):  # (a crash leaves zeros ahead)
        rec, nxt = record.decode(data, pos)
        if rec.type == record.RecordType.TXN:
            out.append((pos, rec.seq))
        pos = nxt
    return out


def test_crash_is_replayed_and_a_corrupt_middle_record_is_refused(tmp_path):
    vol, mnt = str(tmp_path / "vol"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    mkfs(vol, "64M")
    crash_after_fsyncs(vol, mnt, 6)
    logdir = os.path.join(vol, "log")
    seg = os.path.join(logdir, sorted(os.listdir(logdir))[-1])
    offsets = record_offsets(seg)
    assert len(offsets) >= 6
    # Flip a byte inside a record that has valid records after it.
    off, seq = offsets[-3]
    with open(seg, "r+b") as f:
        f.seek(off + 60)
        b = f.read(1)
        f.seek(off + 60)
        f.write(bytes([b[0] ^ 0xFF]))
    res = run_cli("mount", vol, mnt)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert os.path.basename(seg) in err and f"offset {off}" in err and f"seq {seq}" in err

    # fsck --repair cuts the log at the damage; what was before it is there, nothing after.
    res = run_cli("fsck", vol, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    m = mount(vol, mnt)
    try:
        names = sorted(os.listdir(mnt))
        for n in names:
            with open(os.path.join(mnt, n), "rb") as f:
                assert len(f.read()) == 10000
        assert len(names) < 6  # the damaged transaction and those after it are gone
    finally:
        cleanup(m)
    assert run_cli("fsck", vol).returncode == 0


def test_torn_tail_after_crash_is_dropped(tmp_path):
    vol, mnt = str(tmp_path / "vol"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    mkfs(vol, "64M")
    crash_after_fsyncs(vol, mnt, 4)
    logdir = os.path.join(vol, "log")
    seg = os.path.join(logdir, sorted(os.listdir(logdir))[-1])
    last, last_seq = record_offsets(seg)[-1]
    with open(seg, "rb") as f:
        end = record.decode(f.read(), last)[1]
    os.truncate(seg, end - 7)  # the last record is torn
    unsync(logdir, last_seq)  # ... by the crash: its fdatasync never returned (the mark says so)
    m = mount(vol, mnt)
    try:
        assert {"f0", "f1", "f2"} <= set(os.listdir(mnt))
        # Said to the user, not only to the log file (it once mounted without a word).
        warned = [line for line in m.stderr.splitlines() if line.startswith("mirrorfs: warning:")]
        assert len(warned) == 1 and "dropped a torn tail of" in warned[0], m.stderr
        assert "replayed" in warned[0]
    finally:
        cleanup(m)
    with open(os.path.join(vol, "mirrorfs.log")) as f:
        assert "torn" in f.read()
    assert run_cli("fsck", vol).returncode == 0


def test_losing_the_last_acknowledged_record_is_refused(tmp_path):
    """The same cut without a crash to explain it: the last record's fsync returned (the
    sync mark names it), so storage lost one acknowledged write. Refused, not replayed."""
    vol, mnt = str(tmp_path / "vol"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    mkfs(vol, "64M")
    crash_after_fsyncs(vol, mnt, 4)
    logdir = os.path.join(vol, "log")
    seg = os.path.join(logdir, sorted(os.listdir(logdir))[-1])
    off, seq = record_offsets(seg)[-1]
    with open(seg, "rb") as f:
        end = record.decode(f.read(), off)[1]
    os.truncate(seg, end - 7)  # (not the file's end: zeros are written ahead of the log)
    try:
        res = run_cli("mount", vol, mnt)
        err = res.stderr.strip()
        assert res.returncode == 1 and not os.path.ismount(mnt), res.stdout + res.stderr
    finally:
        if os.path.ismount(mnt):  # (mounted after all: the test fails, and cleans up)
            umount(mnt)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"seq {seq}..{seq} were durable" in err, err
    assert f"offset {off} of segment {os.path.basename(seg)}" in err, err
    res = run_cli("fsck", vol)
    assert res.returncode == 1 and res.stderr.strip() == err, res.stdout + res.stderr
