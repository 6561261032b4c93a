"""fsck: check (and repair) the filesystem on a volume.

What is checked, from the root down:
- superblock, inode bitmap and inode table readable; the root is an allocated directory;
- every allocated inode: a known file type, its block runs (extent tree, data, xattr block)
  inside the volume and out of the metadata, ``blocks`` equal to what it references;
- directories: blocks parse, no name twice, every entry points at an allocated inode of the
  type the entry says, every directory reachable exactly once, its parent pointer right;
- link counts against references (2 + subdirectories for a directory);
- no block referenced twice; the block bitmap equals metadata + referenced blocks exactly;
- free inode slots are empty, allocated ones are not;
- the orphan list: well formed, only nlink-0 inodes (those are legitimately pending: the
  next mount frees them); allocated inodes that nothing references.

Repair (``repair=True``) fixes: wrong link counts, parent pointers and ``blocks`` counts;
pending orphans and unreachable inodes with nlink 0 (freed); orphan-list entries that
should not be there; leaked blocks (freed) and referenced blocks marked free (marked used);
inode-bitmap bits of empty slots; slots that are not empty but free in the bitmap (cleared,
or marked used when a name points at them: a log that lost transactions leaves the table and
the bitmap at different points). It then commits and checks again; ``clean`` describes the
final state. Anything else is reported, not touched. Damage is a reported problem, never a
traceback: every inode and directory is checked under its own ``try``.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from mirrorfs.fs import filedata, inodes, xattrs
from mirrorfs.fs.directories import DirCorrupt, parse_block
from mirrorfs.fs.fsck_snapshots import check_checkpoints
from mirrorfs.fs.layout import FLAG_ORPHAN, INODE_SIZE, ROOT_INO, Inode
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.volume import BITMAP_START, CLIENT_SUPER

log = logging.getLogger(__name__)

# Report at most this many problems of one kind in full; the rest are counted.
MAX_PER_KIND = 20
TABLE_CHUNK_BLOCKS = 256
#: ``progress(phase, done, total)``: how far a check is (for a bar; called now and then).
Progress = Callable[[str, int, int], None]
PROGRESS_EVERY = 1024  # inodes between two progress calls of a phase


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


_TYPES = (
    stat.S_IFREG,
    stat.S_IFDIR,
    stat.S_IFLNK,
    stat.S_IFIFO,
    stat.S_IFCHR,
    stat.S_IFBLK,
    stat.S_IFSOCK,
)


@dataclass(slots=True)
class FsckReport:
    """The result of ``check``: problems found, repairs made, counts of what was seen."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)  # after repair (repair=True only)
    inodes: int = 0
    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    others: int = 0
    orphans: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    repair: bool = False

    @property
    def clean(self) -> bool:
        """No problem left (after the repair, when one was asked for)."""
        return not (self.remaining if self.repair else self.problems)

    def describe(self) -> list[str]:
        """Readable lines: the counts, each problem, each repair, the verdict."""
        lines = [
            f"{self.inodes} inodes: {self.dirs} directories, {self.files} files, "
            f"{self.symlinks} symlinks, {self.others} others; {self.orphans} pending orphans",
            f"{self.blocks_used} of {self.blocks_total} blocks in use",
        ]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"repaired: {r}" for r in self.repaired]
        if self.repair:
            lines += [f"still wrong: {p}" for p in self.remaining]
        lines.append("clean" if self.clean else "NOT clean")
        return lines


@dataclass(slots=True)
class _Scan:
    """Everything one pass learned; the repairs use it."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    inodes: dict[int, Inode] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)  # names pointing at an inode
    subdirs: dict[int, int] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)  # directory -> where it was found
    orphan_list: list[int] = field(default_factory=list)
    bad_nlink: list[tuple[int, int]] = field(default_factory=list)  # (ino, expected)
    bad_parent: list[tuple[int, int]] = field(default_factory=list)
    bad_blocks: list[tuple[int, int]] = field(default_factory=list)
    to_free: list[int] = field(default_factory=list)  # nlink 0, unreferenced
    unlist: list[int] = field(default_factory=list)  # on the orphan list but linked
    leaked: list[tuple[int, int]] = field(default_factory=list)
    unmarked: list[tuple[int, int]] = field(default_factory=list)
    empty_slots: list[int] = field(default_factory=list)
    stale_slots: list[int] = field(default_factory=list)  # free in the bitmap, not empty
    dangling: set[int] = field(default_factory=set)  # free inodes that entries point at
    blocks_used: int = 0
    unreadable: bool = False  # some inode's blocks are unknown: "leaks" may be its blocks
    fatal: bool = False
    _kinds: dict[str, int] = field(default_factory=dict)

    def problem(self, kind: str, text: str) -> None:
        n = self._kinds.get(kind, 0) + 1
        self._kinds[kind] = n
        if n <= MAX_PER_KIND:
            self.problems.append(text)
        elif n == MAX_PER_KIND + 1:
            self.problems.append(f"(more problems of kind {kind!r} not listed)")


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) intervals from (start, length) runs."""
    out: list[list[int]] = []
    for s, n in sorted(runs):
        if n <= 0:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n)
        else:
            out.append([s, s + n])
    return [(a, b) for a, b in out]


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs (start, length) covered by intervals ``a`` and not by ``b`` (both merged)."""
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while cur < e and k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0] - cur))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e - cur))
    return out


class _Checker:
    def __init__(self, volume: BlockStore, progress: Progress = _no_progress) -> None:
        self.volume = volume
        self.progress = progress
        self.bs = volume.block_size
        self.sb = inodes.read_super(volume)
        self.table = inodes.InodeTable(volume, self.sb)
        self.data = filedata.FileData(volume, self.table)
        self.xattrs = xattrs.XattrStore(volume, self.data)

    # ------------------------------------------------------------------------------ scan

    def scan(self) -> _Scan:
        s = _Scan()
        self._load_inodes(s)
        if ROOT_INO not in s.inodes or not stat.S_ISDIR(s.inodes[ROOT_INO].mode):
            s.problem("root", "the root directory (inode 1) is missing or not a directory")
            s.fatal = True
            return s
        runs = self._check_runs(s)
        self.progress("directories", 0, 1)
        self._walk(s)
        self.progress("links", 0, 1)
        self._check_orphans(s)
        self._check_links(s)
        self.progress("block bitmap", 0, 1)
        self._check_bitmap(s, runs)
        self.progress("block bitmap", 1, 1)
        return s

    def _load_inodes(self, s: _Scan) -> None:
        """Read the whole table in runs; sort slots into allocated/free."""
        sb, bs = self.sb, self.bs
        per_block = bs // INODE_SIZE
        bitmap = self.table.bitmap
        zero = bytes(INODE_SIZE)
        for first in range(0, sb.inode_table_blocks, TABLE_CHUNK_BLOCKS):
            self.progress("inode table", first, sb.inode_table_blocks)
            n = min(TABLE_CHUNK_BLOCKS, sb.inode_table_blocks - first)
            buf = self.volume.read(sb.inode_table_start + first, n)
            for slot in range(n * per_block):
                ino = first * per_block + slot
                if ino == 0 or ino >= sb.inode_count:
                    continue
                off = slot * INODE_SIZE
                raw = buf[off : off + INODE_SIZE]
                used = bitmap.is_used(ino)
                if not used:
                    if raw != zero:
                        s.problem("slot", f"inode {ino}: free in the bitmap, slot not empty")
                        s.stale_slots.append(ino)
                    continue
                if raw == zero:
                    s.problem("slot", f"inode {ino}: allocated in the bitmap, slot empty")
                    s.empty_slots.append(ino)
                    continue
                inode = Inode.unpack(ino, buf, off)
                if stat.S_IFMT(inode.mode) not in _TYPES:
                    s.problem("type", f"inode {ino}: unknown file type in mode {inode.mode:#o}")
                s.inodes[ino] = inode

    def _check_runs(self, s: _Scan) -> list[tuple[int, int, int]]:
        """Every inode's block runs: inside the volume, counted right. Returns (start, n, ino)."""
        out: list[tuple[int, int, int]] = []
        nblocks = self.volume.block_count
        for i, (ino, inode) in enumerate(s.inodes.items()):
            if i % PROGRESS_EVERY == 0:
                self.progress("block runs", i, len(s.inodes))
            kind = stat.S_IFMT(inode.mode)
            key = {stat.S_IFDIR: "dirs", stat.S_IFREG: "files", stat.S_IFLNK: "symlinks"}
            s.counts[key.get(kind, "others")] = s.counts.get(key.get(kind, "others"), 0) + 1
            try:
                runs = list(self.data.runs(inode))
            except Exception as exc:  # a damaged extent tree: report, go on
                s.problem("extents", f"inode {ino}: extent tree unreadable: {exc}")
                s.unreadable = True
                continue
            total = 0
            for start, n in runs:
                if n <= 0 or start < 0 or start + n > nblocks:
                    s.problem("range", f"inode {ino}: blocks {start}+{n} outside the volume")
                    continue
                out.append((start, n, ino))
                total += n
            if total != inode.blocks:
                s.problem("count", f"inode {ino}: blocks is {inode.blocks}, references {total}")
                s.bad_blocks.append((ino, total))
            if inode.xattr_block:
                try:
                    self.xattrs.items(inode)
                except Exception as exc:
                    s.problem("xattr", f"inode {ino}: xattr block unreadable: {exc}")
        return out

    def _walk(self, s: _Scan) -> None:
        """Breadth-first from the root: entries, types, parents, reachability."""
        s.parent[ROOT_INO] = ROOT_INO
        queue = [ROOT_INO]
        bs = self.bs
        while queue:
            d = queue.pop()
            dinode = s.inodes[d]
            if dinode.rdev != s.parent[d]:
                s.problem(
                    "parent", f"directory {d}: parent is {dinode.rdev}, found in {s.parent[d]}"
                )
                s.bad_parent.append((d, s.parent[d]))
            if dinode.size % bs:
                s.problem("dir", f"directory {d}: size {dinode.size} not a multiple of {bs}")
                continue
            try:
                data = self.data.read(dinode, 0, dinode.size)
            except Exception as exc:
                s.problem("dir", f"directory {d}: unreadable: {exc}")
                continue
            names: set[bytes] = set()
            for b in range(dinode.size // bs):
                try:
                    records = parse_block(data[b * bs : (b + 1) * bs], f"directory {d} block {b}")
                except DirCorrupt as exc:
                    s.problem("dir", str(exc))
                    continue
                for r in records:
                    if not r.ino:
                        continue
                    where = f"directory {d}: entry {r.name!r}"
                    if r.name in names:
                        s.problem("dir", f"{where} appears twice")
                    names.add(r.name)
                    child = s.inodes.get(r.ino)
                    if child is None:
                        s.problem("dangling", f"{where} points at free inode {r.ino}")
                        s.dangling.add(r.ino)
                        continue
                    if (child.mode >> 12) & 0xF != r.dtype:
                        s.problem(
                            "dtype", f"{where}: type {r.dtype} but inode {r.ino} is {child.mode:#o}"
                        )
                    s.refs[r.ino] = s.refs.get(r.ino, 0) + 1
                    if stat.S_ISDIR(child.mode):
                        s.subdirs[d] = s.subdirs.get(d, 0) + 1
                        if r.ino in s.parent:
                            s.problem("loop", f"{where}: directory {r.ino} reachable twice")
                            continue
                        s.parent[r.ino] = d
                        queue.append(r.ino)

    def _check_orphans(self, s: _Scan) -> None:
        seen: set[int] = set()
        cur = self.sb.orphan_head
        while cur:
            if cur in seen:
                s.problem("orphans", f"orphan list loops at inode {cur}")
                break
            inode = s.inodes.get(cur)
            if inode is None:
                s.problem("orphans", f"orphan list holds free inode {cur}")
                break
            seen.add(cur)
            s.orphan_list.append(cur)
            cur = inode.orphan_next
        for ino, inode in s.inodes.items():
            if inode.flags & FLAG_ORPHAN and ino not in seen:
                s.problem("orphans", f"inode {ino}: flagged orphan, not on the orphan list")

    def _check_links(self, s: _Scan) -> None:
        on_list = set(s.orphan_list)
        for ino, inode in s.inodes.items():
            refs = s.refs.get(ino, 0)
            is_dir = stat.S_ISDIR(inode.mode)
            if ino != ROOT_INO and refs == 0:
                if inode.nlink == 0 and ino in on_list:
                    continue  # pending orphan: the next mount frees it
                if inode.nlink == 0:
                    s.problem("unreachable", f"inode {ino}: nlink 0, not on the orphan list")
                    s.to_free.append(ino)
                else:
                    s.problem(
                        "unreachable",
                        f"inode {ino}: allocated, nlink {inode.nlink}, "
                        "but no directory entry names it",
                    )
                continue
            expect = 2 + s.subdirs.get(ino, 0) if is_dir else refs
            if inode.nlink != expect:
                s.problem("nlink", f"inode {ino}: nlink {inode.nlink}, expected {expect}")
                s.bad_nlink.append((ino, expect))
            if ino in on_list:
                s.problem("orphans", f"inode {ino}: on the orphan list but linked")
                s.unlist.append(ino)

    def _metadata_runs(self) -> list[tuple[int, int]]:
        vsb = self.volume.sb
        runs = [(0, 1), (CLIENT_SUPER, 1), (BITMAP_START, vsb.bitmap_blocks)]
        runs.append((self.sb.inode_bitmap_start, self.sb.inode_bitmap_blocks))
        runs.append((self.sb.inode_table_start, self.sb.inode_table_blocks))
        if vsb.save_area_blocks:
            runs.append((vsb.save_area_start, vsb.save_area_blocks))
        return runs

    def _check_bitmap(self, s: _Scan, runs: list[tuple[int, int, int]]) -> None:
        meta = _merge(self._metadata_runs())
        # Double references (between inodes, or an inode and the metadata).
        owned = sorted(runs)
        end, owner = -1, 0
        for start, n, ino in owned:
            if start < end:
                s.problem("shared", f"blocks from {start} referenced by inodes {owner} and {ino}")
            if start + n > end:
                end, owner = start + n, ino
        data = _merge([(a, n) for a, n, _ in runs])
        for a, n in _intersect(data, meta):
            s.problem("shared", f"blocks {a}+{n} are metadata and referenced by an inode")
        expected = _merge([(a, b - a) for a, b in meta] + [(a, b - a) for a, b in data])
        alloc = self.volume.allocator
        actual = _merge(list(alloc.used_runs()))
        # Bits past the volume's last block are "used" padding, not leaks.
        nblocks = self.volume.block_count
        actual = [(a, min(b, nblocks)) for a, b in actual if a < nblocks]
        s.blocks_used = sum(b - a for a, b in actual)
        for a, n in _subtract(actual, expected):
            s.problem("leak", f"blocks {a}+{n} marked used but referenced by nothing")
            s.leaked.append((a, n))
        for a, n in _subtract(expected, actual):
            s.problem("unmarked", f"blocks {a}+{n} in use but free in the block bitmap")
            s.unmarked.append((a, n))

    # ---------------------------------------------------------------------------- repair

    def repair_inodes(self, s: _Scan) -> list[str]:
        done: list[str] = []
        table = self.table
        for ino, expect in s.bad_nlink:
            inode = table.get(ino)
            done.append(f"inode {ino}: nlink {inode.nlink} -> {expect}")
            inode.nlink = expect
            table.put(inode)
        for ino, parent in s.bad_parent:
            inode = table.get(ino)
            done.append(f"directory {ino}: parent {inode.rdev} -> {parent}")
            inode.rdev = parent
            table.put(inode)
        for ino, total in s.bad_blocks:
            if ino in s.to_free:
                continue
            inode = table.get(ino)
            done.append(f"inode {ino}: blocks {inode.blocks} -> {total}")
            inode.blocks = total
            table.put(inode)
        for ino in s.unlist:
            table.remove_orphan(table.get(ino))
            done.append(f"inode {ino}: taken off the orphan list")
        pending = [i for i in s.orphan_list if s.inodes[i].nlink == 0 and not s.refs.get(i)]
        for ino in s.to_free + pending:
            inode = table.get(ino)
            try:
                self.xattrs.free(inode)
                self.data.free_all(inode)
            except Exception as exc:  # blocks already free or shared: the bitmap pass fixes it
                log.warning("fsck: freeing the blocks of inode %d: %s", ino, exc)
                inode.blocks = 0
                inode.xattr_block = 0
            inode.blocks = 0
            table.release(inode)
            done.append(f"inode {ino}: unreferenced with nlink 0, freed")
        for ino in s.empty_slots:
            table.bitmap.free(ino, 1)
            done.append(f"inode {ino}: empty slot marked free")
        for ino in s.stale_slots:
            # (a log that lost transactions leaves the table ahead of the bitmap, or behind)
            if ino in s.dangling:  # a name still points at it: keep the file
                table.bitmap.mark_used(ino, 1)
                done.append(f"inode {ino}: in use by a name but free in the bitmap, marked used")
            else:
                table.clear_slot(ino)
                done.append(f"inode {ino}: free in the bitmap, stale slot cleared")
        return done

    def repair_bitmap(self, s: _Scan) -> list[str]:
        done: list[str] = []
        alloc = self.volume.allocator
        if s.unreadable and s.leaked:
            # Some "leaked" blocks may belong to the inode whose tree is unreadable.
            done.append("leaked blocks kept: an inode's extent tree is unreadable")
        else:
            for a, n in s.leaked:
                alloc.free(a, n)
                done.append(f"blocks {a}+{n}: leaked, marked free")
        for a, n in s.unmarked:
            for blk in range(a, a + n):  # parts of the run may be used already
                if not alloc.is_used(blk):
                    alloc.mark_used(blk, 1)
            done.append(f"blocks {a}+{n}: in use, marked used")
        return done


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs (start, length) covered by both ``a`` and ``b`` (merged intervals)."""
    a_minus_b = [(s, s + n) for s, n in _subtract(a, b)]
    return _subtract(a, a_minus_b)


def _fill(report: FsckReport, s: _Scan) -> None:
    report.inodes = len(s.inodes)
    report.dirs = s.counts.get("dirs", 0)
    report.files = s.counts.get("files", 0)
    report.symlinks = s.counts.get("symlinks", 0)
    report.others = s.counts.get("others", 0)
    report.orphans = sum(1 for i in s.orphan_list if s.inodes[i].nlink == 0)
    report.blocks_used = s.blocks_used


def _scan(volume: BlockStore, progress: Progress = _no_progress) -> tuple[_Checker | None, _Scan]:
    try:
        checker = _Checker(volume, progress)
        return checker, checker.scan()
    except Exception as exc:  # superblock or bitmap geometry unreadable
        s = _Scan()
        s.problem("fatal", f"cannot check the filesystem: {exc}")
        s.fatal = True
        return None, s


def check(
    volume: BlockStore, *, repair: bool = False, progress: Progress = _no_progress
) -> FsckReport:
    """Check the filesystem on an opened Volume; with ``repair``, fix what can be and commit.
    ``progress`` hears how far each pass is (a bar on a terminal)."""
    report = FsckReport(repair=repair, blocks_total=volume.block_count)
    checker, s = _scan(volume, progress)
    report.problems = list(s.problems)
    _fill(report, s)
    # Checkpoints are reported, never repaired (fs/fsck_snapshots.py).
    progress("checkpoints", 0, 1)
    held = check_checkpoints(volume, lambda view: check(view).problems)
    report.problems += held
    if not repair:
        return report
    if volume.read_only:
        report.remaining = list(s.problems) + held
        report.repaired.append("nothing: the volume is open read-only")
        return report
    pending = any(s.inodes[i].nlink == 0 for i in s.orphan_list)
    if checker is not None and not s.fatal and (s.problems or pending):
        try:
            adopted = any(ino in s.dangling for ino in s.stale_slots)
            report.repaired += checker.repair_inodes(s)
            volume.commit()
            checker, s = _scan(volume, progress)  # block accounting after the frees
            if adopted and checker is not None and not s.fatal:  # check what was kept
                report.repaired += checker.repair_inodes(s)
                volume.commit()
                checker, s = _scan(volume, progress)
            if checker is not None and not s.fatal:
                report.repaired += checker.repair_bitmap(s)
                volume.commit()
            checker, s = _scan(volume, progress)
        except Exception as exc:
            log.exception("fsck: repair failed")
            report.repaired.append(f"repair stopped: {exc}")
            checker, s = _scan(volume, progress)
    report.remaining = list(s.problems) + held
    _fill(report, s)
    return report
