"""The mirrorfs demo: a source mirrored to a replica that is mounted read-only as it follows,
then promoted to the read-write source when the source is gone.

Run it through ``bash examples/bootstrap.sh demo`` (which installs what it needs), as root.
Everything happens under a temporary directory that is removed at the end; every mount the
demo makes is unmounted, also when a step fails.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MIRRORFS = [sys.executable, "-m", "mirrorfs"]


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(*args: str, expect: int = 0) -> str:
    """Run ``mirrorfs ARGS`` and show what it printed; stop the demo unless it exits with
    ``expect``."""
    print("$ mirrorfs " + " ".join(args), flush=True)
    res = subprocess.run([*MIRRORFS, *args], capture_output=True, text=True)
    out = (res.stdout + res.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if res.returncode != expect:
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def status(volume: str) -> dict:
    res = subprocess.run([*MIRRORFS, "status", volume, "--json"], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (FUSE mounts)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="mirrorfs-demo-")
    src, rep = os.path.join(work, "source"), os.path.join(work, "replica")
    mnt, rmnt = os.path.join(work, "mnt"), os.path.join(work, "replica-mnt")
    os.mkdir(mnt)
    os.mkdir(rmnt)
    port = free_port()
    mounted = promoted = False
    replica_pid = 0
    stdlib = os.path.dirname(os.__file__)
    try:
        step("make a 1 GiB source volume (sparse block file, SAM log, node state)")
        run("mkfs", src, "--size", "1G")
        print("  volume directory:", sorted(os.listdir(src)))

        step("start a replica (target) that will mount its copy read-only")
        run("replica", rep, "--listen", f"127.0.0.1:{port}", "--mount", rmnt)
        with open(os.path.join(rep, "replica.pid")) as f:
            replica_pid = int(f.read())

        step("mount the source read-write, mirroring to the replica")
        run("mount", src, mnt, "--mirror", f"127.0.0.1:{port}")
        mounted = True
        wait_until("the initial sync", lambda: os.path.ismount(rmnt))
        print(f"  replica mounted read-only at {rmnt}")

        step("write a real tree on the source: two stdlib packages, 64 MiB, links")
        t0 = time.monotonic()
        shutil.copytree(os.path.join(stdlib, "json"), os.path.join(mnt, "json"), symlinks=True)
        shutil.copytree(os.path.join(stdlib, "email"), os.path.join(mnt, "email"), symlinks=True)
        with open(os.path.join(mnt, "big.bin"), "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(64):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.symlink("json/__init__.py", os.path.join(mnt, "link-to-json"))
        os.link(os.path.join(mnt, "big.bin"), os.path.join(mnt, "big-hardlink.bin"))
        print(f"  written in {time.monotonic() - t0:.2f}s")

        step("status of the source right after the writes: lag per target")
        run("status", src)
        wait_until(
            "the replica to catch up",
            lambda: all(t.get("lag_txns") == 0 for t in status(src).get("targets", [{}])),
        )
        step("status once the replica has caught up")
        run("status", src)

        step("read the same files on the replica's read-only mount")
        here, there = tree_digest(mnt), tree_digest(rmnt)
        print(f"  source : {here[0]} files, {here[1]} bytes, sha256 {here[2][:16]}...")
        print(f"  replica: {there[0]} files, {there[1]} bytes, sha256 {there[2][:16]}...")
        if here != there:
            raise SystemExit("demo: the replica's tree differs from the source's")
        print("  symlink on the replica ->", os.readlink(os.path.join(rmnt, "link-to-json")))
        try:
            open(os.path.join(rmnt, "nope"), "w").close()
        except OSError as exc:
            print(f"  writing on the replica: {exc.strerror} (read-only, as it should be)")

        step("a change on the source shows up on the replica within the lag")
        t0 = time.monotonic()
        os.rename(os.path.join(mnt, "json"), os.path.join(mnt, "json-renamed"))
        with open(os.path.join(mnt, "hello.txt"), "w") as f:
            f.write("hello from the source\n")
            f.flush()
            os.fsync(f.fileno())
        wait_until(
            "the rename on the replica",
            lambda: (
                os.path.exists(os.path.join(rmnt, "json-renamed"))
                and os.path.exists(os.path.join(rmnt, "hello.txt"))
            ),
        )
        print(
            f"  visible on the replica after {time.monotonic() - t0:.3f}s:",
            sorted(os.listdir(rmnt)),
        )

        step("verify: block-range checksums of source and replica at one sequence number")
        run("verify", src)

        step("unmount the source; the replica's block file is byte-identical")
        run("umount", mnt)
        mounted = False
        committed = status(src).get("checkpointed_seq")
        wait_until(
            "the replica to apply everything", lambda: status(rep).get("applied_seq") == committed
        )
        same = filecmp.cmp(os.path.join(src, "blocks"), os.path.join(rep, "blocks"), shallow=False)
        print(
            f"  source and replica block files at seq {committed}: "
            f"{'byte-identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise SystemExit("demo: block files differ")
        run("fsck", src)

        step("failover: promote the replica (it refuses while the source may still be alive)")
        run("promote", rep, expect=1)
        step("the source is unmounted, so we know it is down: promote --force")
        # The replica daemon unmounts its read-only mount, starts epoch 2 and remounts the
        # same mountpoint read-write: it is the source now.
        run("promote", rep, "--force")
        replica_pid = 0  # the daemon has exited; the promoted mount is a new process
        promoted = True
        with open(os.path.join(rmnt, "after-failover.txt"), "w") as f:
            f.write("written on the promoted replica\n")
            f.flush()
            os.fsync(f.fileno())
        print("  wrote after-failover.txt on", rmnt, "->", sorted(os.listdir(rmnt))[:6], "...")
        run("status", rep)
        run("umount", rmnt)
        promoted = False
        step("done")
        return 0
    finally:
        if mounted:
            subprocess.run([*MIRRORFS, "umount", mnt], capture_output=True)
        if promoted:
            subprocess.run([*MIRRORFS, "umount", rmnt], capture_output=True)
        if replica_pid:
            stop_process(replica_pid)
        for m in (mnt, rmnt):
            if os.path.ismount(m):
                subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def stop_process(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the daemon this demo started, then SIGKILL it if it does not exit."""
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
