"""fsck: clean after real workloads, detects injected damage, repairs what it promises."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.filesystem import ROOT_INO, Filesystem, FsError, SetAttr
from mirrorfs.store.volume import Volume

MiB = 1 << 20
R = ROOT_INO


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 32 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=3000)
    vol.close()
    return path


def run_check(path: str, *, repair: bool = False) -> fsck.FsckReport:
    vol = Volume.open(path)
    try:
        return fsck.check(vol, repair=repair)
    finally:
        vol.close()


def with_fs(path: str, fn) -> None:
    vol = Volume.open(path)
    fs = Filesystem(vol)
    try:
        fn(fs)
    finally:
        fs.close()
        vol.close()


def random_workload(fs: Filesystem, seed: int, steps: int = 1500) -> None:
    """Random namespace and data operations; errors (ENOENT, ENOTEMPTY...) are fine."""
    rng = random.Random(seed)
    dirs = [R]
    names = [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]

    def pick_dir() -> int:
        return rng.choice(dirs)

    for _ in range(steps):
        op = rng.randrange(12)
        d, name = pick_dir(), rng.choice(names) + b"%d" % rng.randrange(4)
        try:
            if op <= 2:
                a = fs.create(d, name, 0o644, 0, 0)
                fs.write(a.ino, rng.randrange(20000), os.urandom(rng.randrange(1, 9000)))
                fs.release(a.ino)
            elif op == 3:
                dirs.append(fs.mkdir(d, name, 0o755, 0, 0).ino)
            elif op == 4:
                fs.unlink(d, name)
            elif op == 5:
                fs.rmdir(d, name)
            elif op == 6:
                fs.rename(d, name, pick_dir(), rng.choice(names), rng.choice([0, 0, 1, 2]))
            elif op == 7:
                attr = fs.lookup(d, name)
                fs.link(attr.ino, pick_dir(), rng.choice(names) + b"L")
            elif op == 8:
                fs.symlink(d, name, b"t" * rng.choice([5, 300]), 0, 0)
            elif op == 9:
                attr = fs.lookup(d, name)
                fs.setattr(attr.ino, SetAttr(size=rng.randrange(30000)))
            elif op == 10:
                attr = fs.lookup(d, name)
                fs.setxattr(attr.ino, b"user.x", os.urandom(rng.randrange(100)))
            else:
                # open, unlink while open, write, release: the orphan path
                a = fs.create(d, name + b"o", 0o644, 0, 0)
                fs.write(a.ino, 0, b"o" * rng.randrange(1, 20000))
                fs.unlink(d, name + b"o")
                fs.write(a.ino, 5, b"still")
                fs.release(a.ino)
        except FsError:
            pass
    # the kernel forgets everything at unmount
    for ino, n in list(fs._refs.items()):
        fs.forget(ino, n)


def test_fresh_filesystem_is_clean(vol_path):
    report = run_check(vol_path)
    assert report.clean, report.describe()
    assert report.inodes == 1 and report.dirs == 1
    assert "clean" in report.describe()[-1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clean_after_random_workload(vol_path, seed):
    with_fs(vol_path, lambda fs: random_workload(fs, seed))
    report = run_check(vol_path)
    assert report.clean, "\n".join(report.describe())
    assert report.inodes > 5 and report.dirs > 1


def test_pending_orphan_is_not_a_problem_and_repair_frees_it(vol_path):
    def crash_with_open_unlinked(fs: Filesystem) -> None:
        a = fs.create(R, b"f", 0o644, 0, 0)
        fs.write(a.ino, 0, b"x" * 50000)
        fs.unlink(R, b"f")
        fs.volume.commit()

    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    crash_with_open_unlinked(fs)
    vol.close()  # no release, no forget: as after a crash
    report = run_check(vol_path)
    assert report.clean and report.orphans == 1, report.describe()
    report = run_check(vol_path, repair=True)
    assert report.clean and report.orphans == 0, report.describe()
    assert any("freed" in r for r in report.repaired)
    assert run_check(vol_path).inodes == 1


def test_detects_and_repairs_leaked_block(vol_path):
    vol = Volume.open(vol_path)
    free = vol.allocator.free_count
    leaked = vol.allocator.allocate_one()
    vol.close()
    report = run_check(vol_path)
    assert not report.clean
    assert any(f"blocks {leaked}+1" in p for p in report.problems), report.problems
    report = run_check(vol_path, repair=True)
    assert report.clean, report.describe()
    vol = Volume.open(vol_path)
    assert vol.allocator.free_count == free
    vol.close()


def test_detects_and_repairs_wrong_nlink(vol_path):
    def damage(fs: Filesystem) -> None:
        a = fs.create(R, b"f", 0o644, 0, 0)
        fs.link(a.ino, R, b"g")
        d = fs.mkdir(R, b"d", 0o755, 0, 0)
        for ino, n in ((a.ino, 5), (d.ino, 7), (R, 9)):
            node = fs.inodes.get(ino)
            node.nlink = n
            fs.inodes.put(node)

    with_fs(vol_path, damage)
    report = run_check(vol_path)
    assert sum("nlink" in p for p in report.problems) == 3, report.problems
    report = run_check(vol_path, repair=True)
    assert report.clean, report.describe()

    def verify(fs: Filesystem) -> None:
        assert fs.lookup(R, b"f").nlink == 2
        assert fs.lookup(R, b"d").nlink == 2
        assert fs.getattr(R).nlink == 3

    with_fs(vol_path, verify)


def test_detects_block_referenced_twice_and_marked_free(vol_path):
    def damage(fs: Filesystem) -> None:
        a = fs.create(R, b"f", 0o644, 0, 0)
        fs.write(a.ino, 0, b"x" * 8192)
        b = fs.create(R, b"g", 0o644, 0, 0)
        fs.write(b.ino, 0, b"y" * 4096)
        (start, _), *_ = list(fs.data.runs(fs.inodes.get(a.ino)))
        fs.volume.allocator.free(start, 1)

    with_fs(vol_path, damage)
    report = run_check(vol_path)
    assert any("free in the block bitmap" in p for p in report.problems), report.problems
    report = run_check(vol_path, repair=True)
    assert report.clean, report.describe()


def test_detects_dangling_entry_and_bad_parent(vol_path):
    def damage(fs: Filesystem) -> None:
        d = fs.mkdir(R, b"d", 0o755, 0, 0)
        a = fs.create(R, b"f", 0o644, 0, 0)
        fs.inodes.release(fs.inodes.get(a.ino))  # behind the directory's back
        node = fs.inodes.get(d.ino)
        node.rdev = 77
        fs.inodes.put(node)

    with_fs(vol_path, damage)
    report = run_check(vol_path)
    assert any("free inode" in p for p in report.problems), report.problems
    assert any("parent is 77" in p for p in report.problems), report.problems
    report = run_check(vol_path, repair=True)
    assert not any("parent" in p for p in report.remaining), report.remaining


@pytest.mark.parametrize("target", ["dirblock", "table", "super", "extent"])
def test_garbage_is_reported_not_raised(vol_path, target):
    def damage(fs: Filesystem) -> None:
        d = fs.mkdir(R, b"d", 0o755, 0, 0)
        for i in range(50):
            a = fs.create(d.ino, b"f%d" % i, 0o644, 0, 0)
            fs.write(a.ino, 0, b"z" * 5000)
        rng = random.Random(target)
        junk = bytes(rng.randrange(256) for _ in range(fs.block_size))
        if target == "dirblock":
            (blk, _), *_ = list(fs.data.runs(fs.inodes.get(d.ino)))
        elif target == "table":
            blk = fs.sb.inode_table_start
        elif target == "super":
            blk = 1
        else:
            (blk, _), *_ = list(fs.data.runs(fs.inodes.get(a.ino)))
            node = fs.inodes.get(a.ino)
            node.extent_area = junk[: len(node.extent_area)]
            fs.inodes.put(node)
        fs.volume.write(blk, junk)

    with_fs(vol_path, damage)
    report = run_check(vol_path)
    assert not report.clean
    assert report.describe()
    report = run_check(vol_path, repair=True)  # must not raise either
    assert report.describe()


def test_read_only_volume_is_not_repaired(vol_path):
    vol = Volume.open(vol_path)
    vol.allocator.allocate_one()
    vol.close()
    vol = Volume.open(vol_path, read_only=True)
    try:
        report = fsck.check(vol, repair=True)
        assert not report.clean
    finally:
        vol.close()


def test_unlinked_file_errno_after_fsck_repair(vol_path):
    # a file freed by repair is really gone for the filesystem
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    a = fs.create(R, b"f", 0o644, 0, 0)
    fs.unlink(R, b"f")
    vol.commit()
    vol.close()
    run_check(vol_path, repair=True)

    def gone(fs: Filesystem) -> None:
        with pytest.raises(FsError) as ei:
            fs.getattr(a.ino)
        assert ei.value.errno == errno.ENOENT
        assert stat.S_ISDIR(fs.getattr(R).mode)

    with_fs(vol_path, gone)


# ------------------------------------------------------------- model-based comparison


def _snapshot(fs: Filesystem, ino: int = R) -> dict:
    """The tree under ``ino`` as nested dicts; files map to their content."""
    out: dict = {}
    for name, attr, _ in fs.readdir(ino, 0):
        if name in (b".", b".."):
            continue
        if stat.S_ISDIR(attr.mode):
            out[name] = _snapshot(fs, attr.ino)
        else:
            out[name] = fs.read(attr.ino, 0, attr.size)
    return out


def _dirs_of(tree: dict, path: tuple = ()) -> list[tuple]:
    out = [path]
    for name, node in tree.items():
        if isinstance(node, dict):
            out += _dirs_of(node, path + (name,))
    return out


def _node(tree: dict, path: tuple) -> dict:
    for name in path:
        tree = tree[name]
    return tree


def _resolve(fs: Filesystem, path: tuple) -> int:
    ino = R
    for name in path:
        ino = fs.lookup(ino, name).ino
        fs.forget(ino, 1)
    return ino


@pytest.mark.parametrize("seed", [11, 12])
def test_namespace_matches_a_model(vol_path, seed):
    """Random namespace operations give the same tree and errnos as a dict model."""
    rng = random.Random(seed)
    model: dict = {}
    pool = [b"a", b"b", b"c", b"d"]

    def run(fs: Filesystem) -> None:
        for step in range(1200):
            dirs = _dirs_of(model)
            dpath = rng.choice(dirs)
            d, name = _node(model, dpath), rng.choice(pool)
            op = rng.choice(["mkdir", "create", "unlink", "rmdir", "rename", "rename"])
            expect = 0
            if op in ("mkdir", "create"):
                expect = errno.EEXIST if name in d else 0
            elif op == "unlink":
                if name not in d:
                    expect = errno.ENOENT
                elif isinstance(d[name], dict):
                    expect = errno.EISDIR
            elif op == "rmdir":
                if name not in d:
                    expect = errno.ENOENT
                elif not isinstance(d[name], dict):
                    expect = errno.ENOTDIR
                elif d[name]:
                    expect = errno.ENOTEMPTY
            else:
                tpath, tname = rng.choice(dirs), rng.choice(pool)
                t = _node(model, tpath)
                src_is_dir = isinstance(d.get(name), dict)
                if name not in d:
                    expect = errno.ENOENT
                elif (tpath, tname) == (dpath, name):
                    expect = -1  # no-op
                elif src_is_dir and tpath[: len(dpath) + 1] == dpath + (name,):
                    expect = errno.EINVAL
                elif tname in t:
                    if src_is_dir and not isinstance(t[tname], dict):
                        expect = errno.ENOTDIR
                    elif not src_is_dir and isinstance(t[tname], dict):
                        expect = errno.EISDIR
                    elif isinstance(t[tname], dict) and t[tname]:
                        expect = errno.ENOTEMPTY
            parent = _resolve(fs, dpath)
            try:
                if op == "mkdir":
                    fs.forget(fs.mkdir(parent, name, 0o755, 0, 0).ino, 1)
                elif op == "create":
                    a = fs.create(parent, name, 0o644, 0, 0)
                    fs.write(a.ino, 0, b"%d" % step)
                    fs.release(a.ino)
                    fs.forget(a.ino, 1)
                elif op == "unlink":
                    fs.unlink(parent, name)
                elif op == "rmdir":
                    fs.rmdir(parent, name)
                else:
                    fs.rename(parent, name, _resolve(fs, tpath), tname)
                got = 0
            except FsError as exc:
                got = exc.errno
            assert got == max(expect, 0), (step, op, dpath, name, got, expect)
            if expect:
                continue
            if op == "mkdir":
                d[name] = {}
            elif op == "create":
                d[name] = b"%d" % step
            elif op in ("unlink", "rmdir"):
                del d[name]
            else:
                t[tname] = d.pop(name)
        assert _snapshot(fs) == model
        assert fs.getattr(R).nlink == 2 + sum(isinstance(v, dict) for v in model.values())

    with_fs(vol_path, run)
    report = run_check(vol_path)
    assert report.clean, report.describe()


def test_a_chain_of_xattr_blocks_is_clean_and_freed_with_its_inode(vol_path):
    def many(fs: Filesystem) -> None:
        a = fs.create(ROOT_INO, b"many", 0o644, 0, 0)
        for i in range(1000):
            fs.setxattr(a.ino, b"user.attr%04d" % i, b"value%04d" % i)
        fs.release(a.ino)

    with_fs(vol_path, many)
    report = run_check(vol_path)
    assert report.clean, report.describe()
    with_fs(vol_path, lambda fs: fs.unlink(ROOT_INO, b"many"))
    report = run_check(vol_path)
    assert report.clean, report.describe()


def _hashes(directory: str) -> dict[str, tuple[int, str]]:
    """(mode, sha256) of every file under ``directory``, by relative path."""
    import hashlib

    out = {}
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, directory)] = (os.stat(path).st_mode, digest)
    return out


def test_fsck_without_repair_writes_nothing(vol_path, capsys):
    """A check that is asked only to look replays the log in memory (e2fsck -n does not
    replay the journal at all) and leaves every file of the volume byte-identical: with
    unreplayed transactions and a torn tail in the log."""
    from mirrorfs.node import volume_commands
    from tests.test_inplace import crash

    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    a = fs.create(ROOT_INO, b"logged-only", 0o644, 0, 0)
    fs.write(a.ino, 0, os.urandom(200_000))
    fs.release(a.ino)
    vol.commit()  # in the log (fsync'd), not in the block file: deferred
    crash(vol)
    segs = sorted(os.listdir(os.path.join(vol_path, "log")))
    with open(os.path.join(vol_path, "log", segs[-1]), "ab") as f:
        f.write(b"torn record bytes")  # a write the crash cut short
    before = _hashes(vol_path)

    args = type("Args", (), {"dir": vol_path, "repair": False, "debug": False})()
    assert volume_commands.cmd_fsck(args) == 0
    out = capsys.readouterr().out
    assert "replayed 1 transaction(s)" in out and "in memory (read-only)" in out, out
    assert "found (and left) a torn tail of 17 bytes" in out, out
    assert _hashes(vol_path) == before  # nothing written, moved or retired

    # what it checked is what a mount sees: the file is there after the replay
    vol = Volume.open(vol_path)
    try:
        assert Filesystem(vol).lookup(ROOT_INO, b"logged-only").size == 200_000
    finally:
        vol.close()
