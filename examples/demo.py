"""The mirrorfs demo: a volume made, mounted, filled with a real tree, remounted and checked.

Run it through ``bash examples/bootstrap.sh demo`` (which installs what it needs), as root.
Everything happens under a temporary directory that is removed at the end; every mount the
demo makes is unmounted, also when a step fails.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

MIRRORFS = [sys.executable, "-m", "mirrorfs"]


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(*args: str) -> str:
    print("$ mirrorfs " + " ".join(args), flush=True)
    res = subprocess.run([*MIRRORFS, *args], capture_output=True, text=True)
    out = (res.stdout + res.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if res.returncode != 0:
        raise SystemExit(f"demo: 'mirrorfs {' '.join(args)}' failed (exit {res.returncode})")
    return out


def tree_digest(root: str) -> tuple[int, int, str]:
    """(files, bytes, sha256 over relative paths and contents) of a tree."""
    h = hashlib.sha256()
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                data = f.read()
            h.update(data)
            files += 1
            size += len(data)
    return files, size, h.hexdigest()


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (FUSE mounts with allow_other)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="mirrorfs-demo-")
    vol = os.path.join(work, "vol")
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    mounted = False
    src = os.path.join(os.path.dirname(os.__file__), "json")
    src_email = os.path.join(os.path.dirname(os.__file__), "email")
    try:
        step("make a 1 GiB volume (sparse block file, SAM log, node state)")
        run("mkfs", vol, "--size", "1G")
        print("  volume directory:", sorted(os.listdir(vol)))

        step("mount it read-write")
        run("mount", vol, mnt)
        mounted = True

        step("write a real tree: two packages of Python's standard library and 64 MiB")
        t0 = time.monotonic()
        shutil.copytree(src, os.path.join(mnt, "json"), symlinks=True)
        shutil.copytree(src_email, os.path.join(mnt, "email"), symlinks=True)
        with open(os.path.join(mnt, "big.bin"), "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(64):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.symlink("json/__init__.py", os.path.join(mnt, "link-to-json"))
        os.link(os.path.join(mnt, "big.bin"), os.path.join(mnt, "big-hardlink.bin"))
        print(f"  copied in {time.monotonic() - t0:.2f}s")
        before = tree_digest(mnt)
        print(f"  {before[0]} files, {before[1]} bytes, sha256 {before[2][:16]}...")
        st = os.statvfs(mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        print(f"  statfs: {used / 2**20:.1f} MiB used, {st.f_files - st.f_ffree} inodes used")

        step("unmount (waits until everything is committed)")
        run("umount", mnt)
        mounted = False
        print("  SAM log segments:", sorted(os.listdir(os.path.join(vol, "log"))))

        step("check the volume offline")
        run("fsck", vol)

        step("remount and compare with the originals")
        run("mount", vol, mnt)
        mounted = True
        after = tree_digest(mnt)
        if after != before:
            raise SystemExit("demo: the tree differs after remount")
        cmp = filecmp.dircmp(src, os.path.join(mnt, "json"), ignore=["__pycache__"])
        if cmp.diff_files or cmp.left_only or cmp.right_only:
            raise SystemExit("demo: json/ differs from the original")
        print(f"  identical: {after[0]} files, sha256 {after[2][:16]}...")
        print("  symlink ->", os.readlink(os.path.join(mnt, "link-to-json")))
        print("  hard link count of big.bin:", os.stat(os.path.join(mnt, "big.bin")).st_nlink)
        run("umount", mnt)
        mounted = False
        run("fsck", vol)
        step("done: the volume survived unmount, remount and fsck")
        return 0
    finally:
        if mounted:
            subprocess.run([*MIRRORFS, "umount", mnt], capture_output=True)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
