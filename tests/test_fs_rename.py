"""The filesystem API on a real volume (no FUSE): the rename matrix (files, directories,
replace, noreplace, exchange, errors, hints)."""

from __future__ import annotations

import errno
import stat

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.filesystem import (
    Filesystem,
)
from mirrorfs.store.txn import HintKind
from tests.fs_util import R, mkfile, names, new_volume, open_filesystem, raises

vol_path = pytest.fixture(new_volume, name="vol_path")
fs = pytest.fixture(open_filesystem, name="fs")

# ---------------------------------------------------------------------- rename matrix


def _tree(fs):
    """root/{a/{f, sub/{x}}, b/{g, empty/}, file}"""
    a = fs.mkdir(R, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(R, b"b", 0o755, 0, 0).ino
    sub = fs.mkdir(a, b"sub", 0o755, 0, 0).ino
    empty = fs.mkdir(b, b"empty", 0o755, 0, 0).ino
    ids = dict(
        a=a,
        b=b,
        sub=sub,
        empty=empty,
        f=mkfile(fs, a, b"f", b"F"),
        x=mkfile(fs, sub, b"x", b"X"),
        g=mkfile(fs, b, b"g", b"G"),
        file=mkfile(fs, R, b"file"),
    )
    return ids


def test_rename_file_same_dir_and_across(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"f", t["a"], b"f2")
    assert names(fs, t["a"]) == [b"f2", b"sub"]
    fs.rename(t["a"], b"f2", t["b"], b"f3")
    assert names(fs, t["a"]) == [b"sub"]
    assert names(fs, t["b"]) == [b"empty", b"f3", b"g"]
    assert fs.lookup(t["b"], b"f3").ino == t["f"]


def test_rename_file_over_file(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"f", t["b"], b"g")
    assert fs.lookup(t["b"], b"g").ino == t["f"]
    raises(errno.ENOENT, fs.getattr, t["g"])  # no references left: freed at once
    assert fs.read(t["f"], 0, 9) == b"F"


def test_rename_dir_across_updates_dotdot_and_nlink(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"sub", t["b"], b"moved")
    assert fs.lookup(t["sub"], b"..").ino == t["b"]
    assert fs.getattr(t["a"]).nlink == 2
    assert fs.getattr(t["b"]).nlink == 4
    # persisted: ".." survives a fresh Filesystem on the same volume
    fs2 = Filesystem(fs.volume)
    assert fs2.lookup(t["sub"], b"..").ino == t["b"]


def test_rename_dir_over_empty_dir(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"sub", t["b"], b"empty")
    assert fs.lookup(t["b"], b"empty").ino == t["sub"]
    assert fs.getattr(t["a"]).nlink == 2 and fs.getattr(t["b"]).nlink == 3
    assert fs.lookup(t["sub"], b"..").ino == t["b"]


@pytest.mark.parametrize(
    "src,dst,code",
    [
        (("a", b"sub"), ("b", b"g"), errno.ENOTDIR),  # dir over file
        (("a", b"f"), ("b", b"empty"), errno.EISDIR),  # file over dir
        (("b", b"empty"), ("R", b"a"), errno.ENOTEMPTY),  # dir over non-empty dir
        (("R", b"a"), ("sub", b"inside"), errno.EINVAL),  # into its own subtree
        (("R", b"a"), ("a", b"self"), errno.EINVAL),  # into itself
        (("a", b"."), ("b", b"x"), errno.EINVAL),
        (("a", b"f"), ("b", b".."), errno.EINVAL),
        (("a", b"nope"), ("b", b"x"), errno.ENOENT),
        (("a", b"f"), ("f", b"x"), errno.ENOTDIR),
    ],
)
def test_rename_errors(fs, src, dst, code):
    t = _tree(fs)
    t["R"] = R
    raises(code, fs.rename, t[src[0]], src[1], t[dst[0]], dst[1])
    # nothing changed
    assert names(fs, t["a"]) == [b"f", b"sub"]
    assert names(fs, t["b"]) == [b"empty", b"g"]


def test_rename_noreplace_and_exchange(fs):
    t = _tree(fs)
    raises(errno.EEXIST, fs.rename, t["a"], b"f", t["b"], b"g", 1)
    fs.rename(t["a"], b"f", t["b"], b"new", 1)
    assert fs.lookup(t["b"], b"new").ino == t["f"]
    raises(errno.ENOENT, fs.rename, t["b"], b"new", t["a"], b"missing", 2)
    raises(errno.EINVAL, fs.rename, t["b"], b"new", t["a"], b"sub", 3)
    # exchange a file with a directory across directories
    fs.rename(t["b"], b"new", t["a"], b"sub", 2)
    assert fs.lookup(t["b"], b"new").ino == t["sub"]
    assert fs.lookup(t["a"], b"sub").ino == t["f"]
    assert fs.lookup(t["sub"], b"..").ino == t["b"]
    assert fs.getattr(t["a"]).nlink == 2 and fs.getattr(t["b"]).nlink == 4
    # exchange a directory with its own descendant's parent: EINVAL
    raises(errno.EINVAL, fs.rename, R, b"b", t["b"], b"new", 2)


def test_rename_same_inode_is_noop(fs):
    t = _tree(fs)
    fs.link(t["f"], t["b"], b"hard")
    fs.rename(t["a"], b"f", t["b"], b"hard")
    assert names(fs, t["a"]) == [b"f", b"sub"]  # both names stay (POSIX)
    assert fs.getattr(t["f"]).nlink == 2
    fs.rename(t["a"], b"f", t["a"], b"f")


def test_rename_hints(fs):
    t = _tree(fs)
    fs.volume.commit()
    fs.rename(t["a"], b"f", t["b"], b"g")
    hints = fs.volume._hints
    kinds = [(h.kind, h.parent, h.name) for h in hints if h.parent]
    assert (HintKind.ENTRY_REMOVED, t["a"], b"f") in kinds
    assert (HintKind.ENTRY_REMOVED, t["b"], b"g") in kinds
    assert (HintKind.ENTRY_ADDED, t["b"], b"g") in kinds
    assert any(h.kind == HintKind.INODE_DELETED and h.ino == t["g"] for h in hints)


# ------------------------------------------------------------------- RENAME_WHITEOUT

WHITEOUT = 4


def _is_whiteout(fs, parent, name) -> bool:
    a = fs.lookup(parent, name)
    fs.forget(a.ino, 1)
    return a.mode == stat.S_IFCHR and a.rdev == 0 and a.nlink == 1


def test_whiteout_rename_leaves_a_char_device_0_0(fs):
    t = _tree(fs)
    free = fs.statfs().files_free
    fs.rename(t["a"], b"f", t["b"], b"moved", WHITEOUT, 1234, 5678)
    assert fs.lookup(t["b"], b"moved").ino == t["f"]
    assert fs.read(t["f"], 0, 9) == b"F"
    assert _is_whiteout(fs, t["a"], b"f")
    wh = fs.lookup(t["a"], b"f")
    assert (wh.uid, wh.gid) == (1234, 5678)
    assert fs.statfs().files_free == free - 1
    listing = {n: a.mode for n, a, _ in fs.readdir(t["a"], 0)}
    assert stat.S_ISCHR(listing[b"f"])
    fs.forget(wh.ino, 1)
    fs.volume.commit()
    report = fsck.check(fs.volume)
    assert report.clean, report.describe()


def test_whiteout_over_a_target_and_with_noreplace(fs):
    t = _tree(fs)
    raises(errno.EEXIST, fs.rename, t["a"], b"f", t["b"], b"g", WHITEOUT | 1)
    assert fs.lookup(t["a"], b"f").ino == t["f"]  # nothing changed
    fs.rename(t["a"], b"f", t["b"], b"g", WHITEOUT)  # replaces g, as a plain rename
    assert fs.lookup(t["b"], b"g").ino == t["f"]
    raises(errno.ENOENT, fs.getattr, t["g"])
    assert _is_whiteout(fs, t["a"], b"f")
    fs.rename(t["b"], b"g", t["b"], b"g2", WHITEOUT | 1)  # noreplace + whiteout is valid
    assert _is_whiteout(fs, t["b"], b"g")


def test_whiteout_of_a_directory_moves_its_link(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"sub", t["b"], b"sub", WHITEOUT)
    assert fs.lookup(t["sub"], b"..").ino == t["b"]
    assert fs.getattr(t["a"]).nlink == 2 and fs.getattr(t["b"]).nlink == 4
    assert _is_whiteout(fs, t["a"], b"sub")


def test_whiteout_in_a_setgid_directory_takes_its_group(fs):
    d = fs.mkdir(R, b"sg", 0o2775, 0, 777).ino
    mkfile(fs, d, b"f")
    fs.rename(d, b"f", d, b"g", WHITEOUT, 10, 20)
    wh = fs.lookup(d, b"f")
    assert (wh.uid, wh.gid) == (10, 777)


@pytest.mark.parametrize(
    "flags,code",
    [
        (WHITEOUT | 2, errno.EINVAL),  # with RENAME_EXCHANGE
        (WHITEOUT | 2 | 1, errno.EINVAL),
        (8, errno.EINVAL),  # unknown flag
        (WHITEOUT | 8, errno.EINVAL),
    ],
)
def test_whiteout_flag_errors(fs, flags, code):
    t = _tree(fs)
    raises(code, fs.rename, t["a"], b"f", t["b"], b"g", flags)
    assert names(fs, t["a"]) == [b"f", b"sub"]
    assert names(fs, t["b"]) == [b"empty", b"g"]


def test_whiteout_needs_a_free_inode(vol_path):
    from mirrorfs.store.volume import Volume

    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    try:
        mkfile(fs, R, b"f")
        n = 0
        while fs.statfs().files_free:
            mkfile(fs, R, b"x%d" % n)
            n += 1
        raises(errno.ENOSPC, fs.rename, R, b"f", R, b"g", WHITEOUT)
        assert fs.lookup(R, b"f").ino  # still there, not renamed
        raises(errno.ENOENT, fs.lookup, R, b"g")
        fs.rename(R, b"f", R, b"g")  # a plain rename needs no inode
    finally:
        fs.close()
        vol.close()


def test_whiteout_hints_name_the_new_entry(fs):
    t = _tree(fs)
    fs.volume.commit()
    fs.rename(t["a"], b"f", t["b"], b"h", WHITEOUT)
    wh = fs.lookup(t["a"], b"f").ino
    kinds = [(h.kind, h.ino, h.parent, h.name) for h in fs.volume._hints if h.parent]
    assert (HintKind.ENTRY_REMOVED, t["f"], t["a"], b"f") in kinds
    assert (HintKind.ENTRY_ADDED, wh, t["a"], b"f") in kinds
    assert (HintKind.ENTRY_ADDED, t["f"], t["b"], b"h") in kinds
