"""Checkpoints (issue 10): create time with many files, overwrite throughput with a
checkpoint that holds the data vs none, read throughput of a checkpoint vs the live volume.

``create`` and ``io``: in process, through the filesystem layer (no FUSE): what
checkpoints cost in mirrorfs's own code, with the FUSE overhead left out (it is the same
for both sides of each ratio, so these ratios are the stricter ones). ``fuse``: reads
through a real live mount and a checkpoint mount. ``fusew``: overwrites through a real
mount, with a checkpoint holding the data vs none.

    python -m bench.bench_checkpoints [--files 100000] [--mib 64] [--rounds 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time

from mirrorfs.fs.filesystem import ROOT_INO, Filesystem
from mirrorfs.store.snapshots import CheckpointView
from mirrorfs.store.volume import Volume

MiB = 1 << 20


def _volume(root: str, size: int, files: int) -> tuple[Volume, Filesystem]:
    path = os.path.join(root, "vol")
    Volume.create(path, size, checkpoint_space=0.45)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=max(1000, files + 1000))
    return vol, Filesystem(vol)


def bench_create(root: str, files: int) -> dict[str, float]:
    vol, fs = _volume(root, 2048 * MiB, files)
    try:
        per_dir = 1000
        t0 = time.perf_counter()
        for d in range(0, files, per_dir):
            dino = fs.mkdir(ROOT_INO, b"d%d" % (d // per_dir), 0o755, 0, 0).ino
            for i in range(min(per_dir, files - d)):
                a = fs.create(dino, b"f%d" % i, 0o100644, 0, 0)
                fs.write(a.ino, 0, b"x" * 100)
                fs.release(a.ino)
                fs.forget(a.ino, 1)
            vol.commit()
        fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        vol.checkpoint_create("c")
        create = time.perf_counter() - t0
        return {"files": files, "fill_s": fill, "create_s": create}
    finally:
        fs.close()
        vol.close()


def _overwrite(vol: Volume, fs: Filesystem, ino: int, size: int, chunk: int, rnd: bool) -> float:
    n = size // chunk
    offsets = [i * chunk for i in range(n)]
    if rnd:
        random.Random(1).shuffle(offsets)
        offsets = offsets[: min(n, 8192)]
    data = os.urandom(chunk)
    t0 = time.perf_counter()
    pending = 0
    for off in offsets:
        fs.write(ino, off, data)
        pending += chunk
        if pending >= 8 * MiB:
            vol.commit()
            pending = 0
    vol.commit()
    vol.flush_in_place()
    return len(offsets) * chunk / (time.perf_counter() - t0) / MiB


def bench_io(root: str, mib: int, rounds: int = 5) -> dict[str, float]:
    size = mib * MiB
    vol, fs = _volume(root, max(512 * MiB, 8 * size), 100)
    out: dict[str, float] = {}
    try:
        ino = fs.create(ROOT_INO, b"f", 0o100644, 0, 0).ino
        fs.write(ino, 0, os.urandom(size))
        vol.commit()
        for label, chunk, rnd in (("seq_1m", MiB, False), ("rand_4k", 4096, True)):
            # Alternating rounds, medians: which pass happens to retire a log segment or
            # run a log checkpoint varies, and one pass each would read that as the cost.
            bases, helds = [], []
            for _ in range(rounds):
                bases.append(_overwrite(vol, fs, ino, size, chunk, rnd))
                vol.checkpoint_create(label)
                helds.append(_overwrite(vol, fs, ino, size, chunk, rnd))  # first overwrite
                vol.checkpoint_delete(label)
            base, held = statistics.median(bases), statistics.median(helds)
            out[f"{label}_MiBps"] = base
            out[f"{label}_ckpt_MiBps"] = held
            out[f"{label}_ratio"] = held / base
        vol.checkpoint_create("r")
        _overwrite(vol, fs, ino, size, MiB, False)  # every block of the file now saved
        vol.flush_in_place()

        def read_all(f: Filesystem, i: int) -> float:
            t0 = time.perf_counter()
            for off in range(0, size, MiB):
                f.read(i, off, MiB)
            return size / (time.perf_counter() - t0) / MiB

        live = read_all(fs, ino)
        view = CheckpointView(vol.device.read, vol.sb, "r")  # as another process reads it
        cfs = Filesystem(view, read_only=True)
        ck = read_all(cfs, cfs.lookup(ROOT_INO, b"f").ino)
        out.update(read_live_MiBps=live, read_ckpt_MiBps=ck, read_ratio=ck / live)
        return out
    finally:
        fs.close()
        vol.close()


def bench_fuse_read(root: str, mib: int) -> dict[str, float]:
    """Read throughput through FUSE: the live mount vs a checkpoint mount of the same file
    after every block of it was overwritten (so the checkpoint reads only saved copies).
    Cold both: each round mounts both afresh and reads each once (a FUSE mount starts with
    no pages of its own). Best of three rounds."""
    from bench.common import MirrorfsCli, MirrorfsMount, is_mounted, lazy_unmount

    os.makedirs(root)
    cli = MirrorfsCli(os.path.join(root, "cli.log"))
    vol, mnt, ck = (os.path.join(root, n) for n in ("vol", "mnt", "ck"))
    os.makedirs(ck)
    m = MirrorfsMount(cli, vol, mnt)
    m.mkfs(f"{max(512, 8 * mib)}M", "--checkpoint-space", "40")
    size = mib * MiB

    def read(p: str) -> float:
        with open(p, "rb", buffering=0) as f:
            t0 = time.perf_counter()
            while f.read(MiB):
                pass
            return size / (time.perf_counter() - t0) / MiB

    live = cko = 0.0
    try:
        m.mount()
        path = os.path.join(mnt, "f")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
            os.fsync(f.fileno())
        cli.run("checkpoint", "create", vol, "r", timeout=120)
        with open(path, "r+b") as f:
            f.write(os.urandom(size))
            os.fsync(f.fileno())
        m.unmount()
        for _ in range(3):
            m.mount()
            cli.run("checkpoint", "mount", vol, "r", ck, timeout=120)
            live = max(live, read(path))
            cko = max(cko, read(os.path.join(ck, "f")))
            cli.run("umount", ck, timeout=60)
            m.unmount()
        return {"fuse_read_live_MiBps": live, "fuse_read_ckpt_MiBps": cko, "ratio": cko / live}
    finally:
        if is_mounted(ck):
            cli.run("umount", ck, timeout=60)
        lazy_unmount(ck)
        m.unmount()


def _pwrite_pass(path: str, size: int, chunk: int, count: int, seed: int) -> float:
    """``count`` writes of ``chunk`` fresh random bytes over the existing file (in order
    for 1 MiB, at random aligned offsets otherwise), fsync at the end; MiB/s."""
    rnd = random.Random(seed)
    slots = size // chunk
    offsets = (
        [i * chunk for i in range(count)]
        if chunk >= MiB
        else [rnd.randrange(slots) * chunk for _ in range(count)]
    )
    pool = os.urandom(chunk * 64)
    fd = os.open(path, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        for i, off in enumerate(offsets):
            j = (i * 7919) % 64 * chunk
            os.pwrite(fd, pool[j : j + chunk], off)
        os.fsync(fd)
        return count * chunk / (time.perf_counter() - t0) / MiB
    finally:
        os.close(fd)


def bench_fuse_overwrite(root: str, mib: int, rounds: int) -> dict[str, float]:
    """Overwrite throughput through a real mount, with a checkpoint that holds the data vs
    none: what a user's writes see (FUSE included). Alternating rounds, medians; each held
    pass is the first overwrite since its checkpoint (random writes: at random offsets,
    so a few hit blocks an earlier write of the same pass already moved or saved)."""
    from bench.common import MirrorfsCli, MirrorfsMount

    os.makedirs(root)
    cli = MirrorfsCli(os.path.join(root, "cli.log"))
    vol, mnt = (os.path.join(root, n) for n in ("vol", "mnt"))
    m = MirrorfsMount(cli, vol, mnt)
    m.mkfs(f"{max(512, 8 * mib)}M", "--checkpoint-space", "40")
    size = mib * MiB
    out: dict[str, float] = {}
    try:
        m.mount()
        path = os.path.join(mnt, "f")
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        for label, chunk, count in (("seq_1m", MiB, mib), ("rand_4k", 4096, 4096)):
            bases, helds = [], []
            for r in range(rounds):
                bases.append(_pwrite_pass(path, size, chunk, count, 2 * r))
                cli.run("checkpoint", "create", vol, label, timeout=120)
                helds.append(_pwrite_pass(path, size, chunk, count, 2 * r + 1))
                cli.run("checkpoint", "delete", vol, label, timeout=120)
            base, held = statistics.median(bases), statistics.median(helds)
            out[f"{label}_MiBps"] = base
            out[f"{label}_ckpt_MiBps"] = held
            out[f"{label}_ratio"] = held / base
        return out
    finally:
        m.unmount()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians)")
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    try:
        for name, run in (
            ("create", lambda: bench_create(os.path.join(root, "a"), args.files)),
            ("io", lambda: bench_io(os.path.join(root, "b"), args.mib, args.rounds)),
            ("fuse", lambda: bench_fuse_read(os.path.join(root, "c"), args.mib)),
            (
                "fusew",
                lambda: bench_fuse_overwrite(os.path.join(root, "d"), args.mib, args.rounds),
            ),
        ):
            for k, v in run().items():
                print(f"{name:7} {k:22} {v:10.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
