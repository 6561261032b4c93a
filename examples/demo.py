"""The mirrorfs demo: a day in the life of an operator, with the real commands and what they
print.

1. A source volume is mounted and mirrored to a replica; a real tree is copied in; the
   operator reads ``status`` on both ends, watches the lag, sees a rename arrive on the
   replica's read-only mount and runs ``verify``.
2. A checkpoint of the source is mounted on the replica and backed up with tar while writes
   go on at the source: the backup holds the checkpoint's state, not the later writes.
3. The bad day: the source is killed, the replica is promoted in place and written to, and
   the old source rejoins as the new source's target; ``status`` and ``verify`` are clean.

Run it through ``bash examples/bootstrap.sh demo`` (which installs what it needs), as root.
Everything happens under a temporary directory that is removed at the end. The demo stops
only the processes it started, by their pids, and unmounts its mounts, also when a step
fails or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time

MIRRORFS = [sys.executable, "-m", "mirrorfs"]
TREE_BUDGET = 24 << 20  # bytes of /usr/share/doc copied onto the source
MiB = 1 << 20


class DemoError(Exception):
    """A step did not go as it should; the message says which."""


def say(text: str) -> None:
    """Narration: what the operator does next and why."""
    for para in textwrap.dedent(text).strip().split("\n\n"):
        print(
            textwrap.fill(
                " ".join(para.split()), width=92, initial_indent="  ", subsequent_indent="  "
            ),
            flush=True,
        )


def step(number: str, title: str) -> None:
    print(
        f"\n\033[1m[{number}] {title}\033[0m" if sys.stdout.isatty() else f"\n[{number}] {title}",
        flush=True,
    )


def show(out: str) -> None:
    if out:
        print("    " + out.rstrip().replace("\n", "\n    "), flush=True)


def sh(*argv: str, expect: int | None = 0, quiet: bool = False) -> str:
    """Run a command, print it as the operator would type it and what it printed."""
    shown = (
        ["mirrorfs", *argv[len(MIRRORFS) :]]
        if list(argv[: len(MIRRORFS)]) == MIRRORFS
        else list(argv)
    )
    print("  $ " + shlex.join(shown), flush=True)
    env = dict(os.environ, COLUMNS="100")
    res = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=180)
    out = (res.stdout + res.stderr).strip()
    if not quiet:
        show(out)
    if expect is not None and res.returncode != expect:
        raise DemoError(f"'{shlex.join(shown)}' exited with status {res.returncode}: {out}")
    return out


def mfs(*args: str, expect: int | None = 0, quiet: bool = False) -> str:
    return sh(*MIRRORFS, *args, expect=expect, quiet=quiet)


def status(volume: str) -> dict:
    import json

    res = subprocess.run([*MIRRORFS, "status", volume, "--json"], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def wait_until(what: str, cond, timeout: float = 90.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def caught_up(source: str) -> bool:
    st = status(source)
    seq = st.get("committed_seq")
    targets = st.get("targets") or []
    return bool(targets) and all(
        t.get("state") == "streaming" and t.get("applied_seq") == seq for t in targets
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def synced_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def tree_digest(root: str) -> tuple[int, int, str]:
    """(files, bytes, sha256 over relative paths, link targets and contents) of a tree."""
    h = hashlib.sha256()
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            if os.path.islink(p):
                h.update(b"-> " + os.readlink(p).encode())
                continue
            with open(p, "rb") as f:
                data = f.read()
            h.update(data)
            files += 1
            size += len(data)
    return files, size, h.hexdigest()


def describe(d: tuple[int, int, str]) -> str:
    return f"{d[0]} files, {d[1] / MiB:.1f} MiB, sha256 {d[2][:12]}"


def copy_real_tree(dest: str) -> str:
    """Copy package directories of /usr/share/doc (up to TREE_BUDGET bytes) to ``dest``;
    where the docs are stripped (minimal images), Python's own standard library instead."""
    base = "/usr/share/doc"
    picked, total = [], 0
    if os.path.isdir(base):
        for name in sorted(os.listdir(base)):
            p = os.path.join(base, name)
            if os.path.islink(p) or not os.path.isdir(p):
                continue
            size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(p) for f in fs)
            if total + size > TREE_BUDGET:
                continue
            picked.append(p)
            total += size
    if total < 2 * MiB:  # docs stripped: use the standard library instead
        base = os.path.dirname(os.__file__)
        picked = [os.path.join(base, n) for n in ("json", "email", "asyncio", "unittest")]
    os.mkdir(dest)
    for p in picked:
        shutil.copytree(
            p,
            os.path.join(dest, os.path.basename(p)),
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return f"{len(picked)} directories of {base}"


class Demo:
    def __init__(self, work: str) -> None:
        self.work = work
        # Names relative to the work directory (the demo runs there), so that the commands
        # read as an operator would type them.
        self.a = "a"  # the first source's volume directory
        self.b = "b"  # its replica's
        self.a_mnt, self.b_mnt, self.ck_mnt = "a-mnt", "b-mnt", "checkpoint-mnt"
        for d in (self.a_mnt, self.b_mnt, self.ck_mnt):
            os.mkdir(d)
        self.pids: dict[str, int] = {}  # what this demo started: name -> pid
        self.stop_writer = threading.Event()

    # -- 1. mirroring

    def mirroring(self) -> None:
        step("1/4", "A source mirrored to a replica")
        say("""Make a volume: a sparse block file, an empty SAM log (every change is a
            numbered transaction, written there first) and the node's state.""")
        mfs("mkfs", self.a, "--size", "512M")
        port = free_port()
        self.b_addr = f"127.0.0.1:{port}"
        say("""Start a replica daemon: it listens for a source, keeps its own log and block
            file, and mounts its copy read-only so that it can be read as it follows.""")
        mfs("replica", self.b, "--listen", self.b_addr, "--mount", self.b_mnt)
        self.pids["replica b"] = read_pid(os.path.join(self.b, "replica.pid"))
        say("Mount the source read-write, then add the replica as its target.")
        mfs("mount", self.a, self.a_mnt)
        self.pids["mount a"] = read_pid(os.path.join(self.a, "mount.pid"))
        mfs("mirror", self.a, "--add", self.b_addr)
        took = wait_until("the initial sync", lambda: caught_up(self.a))
        print(f"    (initial sync done in {took:.1f} s; the replica is streaming)")

        say("""Copy a real tree onto the source. While the copy runs, the source's status
            shows, per target, the positions and three lags as pg_stat_replication has
            them (sent but not received, received but not flushed, flushed but not
            applied), the last contact and the throughput.""")
        result: list = []

        def copy() -> None:
            try:
                result.append(copy_real_tree(os.path.join(self.a_mnt, "doc")))
            except BaseException as exc:  # reported below, in the demo's own words
                result.append(exc)

        t0 = time.monotonic()
        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        copier.join(timeout=4.0)
        mfs("status", self.a)
        say("""(Both ends on one machine: the replica keeps up, so the lags stay near zero;
            over a slow link or with a busy replica they grow, in all three units.)""")
        copier.join()
        if isinstance(result[0], BaseException):
            raise DemoError(f"copying the tree failed: {result[0]}")
        os.sync()
        d = tree_digest(os.path.join(self.a_mnt, "doc"))
        print(f"    copied {result[0]}: {describe(d)} in {time.monotonic() - t0:.1f} s")
        wait_until("the replica to catch up", lambda: caught_up(self.a))
        say("""The replica's status: the same link seen from the other end (its source,
            what it received, flushed and applied, and the lag it knows).""")
        mfs("status", self.b)
        there = tree_digest(os.path.join(self.b_mnt, "doc"))
        print(f"    on the replica's read-only mount: {describe(there)}")
        if there != d:
            raise DemoError("the replica's tree differs from the source's")
        try:
            open(os.path.join(self.b_mnt, "nope"), "w").close()
        except OSError as exc:
            print(f"    writing there: {exc.strerror} (it is read-only, as it should be)")

        say("A rename on the source arrives on the replica within the lag:")
        first = sorted(os.listdir(os.path.join(self.a_mnt, "doc")))[0]
        old = os.path.join("doc", first)
        new = os.path.join("doc", f"{first}.renamed")
        t0 = time.monotonic()
        os.rename(os.path.join(self.a_mnt, old), os.path.join(self.a_mnt, new))
        took = wait_until(
            "the rename on the replica", lambda: os.path.isdir(os.path.join(self.b_mnt, new))
        )
        print(
            f"    mv {old} {new} on the source: on the replica {took:.2f} s later"
            f" ({old} gone there: {not os.path.exists(os.path.join(self.b_mnt, old))})"
        )
        say("""verify: checksums of every block range of source and target, taken at the
            same sequence number.""")
        mfs("verify", self.a)

    # -- 2. a backup from a checkpoint on the replica

    def backup(self) -> None:
        step("2/4", "A backup from a checkpoint, taken on the replica")
        say("""A checkpoint is a point-in-time read-only view of the volume. Made on the
            source, it is a transaction like any other, so the replica has it too; the
            backup reads it there and costs the source nothing.""")
        doc = os.path.join(self.a_mnt, "doc")
        before = tree_digest(doc)
        mfs("checkpoint", "create", self.a, "nightly")
        wait_until("the checkpoint on the replica", lambda: caught_up(self.a))
        mfs("checkpoint", "list", self.b)
        mfs("checkpoint", "mount", self.b, "nightly", self.ck_mnt)
        with contextlib.suppress(Exception):
            from mirrorfs.node.checkpoint_commands import mounted_names

            self.pids["checkpoint mount"] = mounted_names(self.b)["nightly"]

        say("""Writes go on at the source while tar reads the checkpoint: a file of the
            tree is overwritten, another deleted, and a writer adds files all along.""")
        victim = sorted(os.listdir(doc))[1]
        victim_dir = os.path.join(doc, victim)
        files = sorted(
            f
            for f in os.listdir(victim_dir)
            if os.path.isfile(os.path.join(victim_dir, f))
            and not os.path.islink(os.path.join(victim_dir, f))
        )
        if files:
            synced_write(os.path.join(victim_dir, files[0]), b"overwritten after the checkpoint\n")
        if len(files) > 1:
            os.unlink(os.path.join(victim_dir, files[1]))
        written = [0]

        def writer() -> None:
            live = os.path.join(self.a_mnt, "live")
            os.makedirs(live, exist_ok=True)
            while not self.stop_writer.is_set():
                synced_write(os.path.join(live, f"w{written[0]:04d}"), os.urandom(64 * 1024))
                written[0] += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        tarball = "nightly.tar.gz"
        try:
            sh("tar", "-C", self.ck_mnt, "-czf", tarball, "doc")
        finally:
            self.stop_writer.set()
            t.join(timeout=30)
        wait_until("the replica to catch up", lambda: caught_up(self.a))
        print(
            f"    {os.path.getsize(tarball) / MiB:.1f} MiB written to {tarball}; meanwhile "
            f"the source wrote {written[0]} files of 64 KiB"
        )
        restore = "restore"
        os.mkdir(restore)
        with tarfile.open(tarball) as tf:
            # extraction filters exist from Python 3.11.4 (Debian 12 has 3.11.2)
            kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            tf.extractall(restore, **kw)  # our own archive, just written
        got, now = tree_digest(os.path.join(restore, "doc")), tree_digest(doc)
        print(f"    the tree at the checkpoint: {describe(before)}")
        print(f"    extracted from the backup:  {describe(got)}")
        print(f"    the live tree now:          {describe(now)}")
        if got != before or got == now:
            raise DemoError("the backup does not hold the checkpoint's state")
        print("    the backup holds the checkpoint's state, none of the later writes")
        mfs("umount", self.ck_mnt)
        self.gone("checkpoint mount")

    # -- 3. the bad day

    def bad_day(self) -> None:
        step("3/4", "The bad day: the source dies")
        pid = self.pids["mount a"]
        say(f"""The source's mount daemon (pid {pid}) is killed without warning, as a
            power cut would; its dead FUSE mount is detached.""")
        sh("kill", "-KILL", str(pid))
        wait_until("the source to die", lambda: not pid_alive(pid), 30)
        self.gone("mount a")
        sh("fusermount3", "-u", "-z", self.a_mnt)
        say("""Promote the replica in place. promote refuses while the source was heard
            from in the last 10 s: a source behind a cut link may still be alive, and two
            sources is a split brain. Right after the kill it says so:""")
        mfs("promote", self.b, expect=1)
        took = wait_until(
            "10 s without contact",
            lambda: (
                ((status(self.b).get("source") or {}).get("last_contact_age_seconds") or 0) > 10.5
            ),
            60,
        )
        say(f"""{took:.0f} s later the source has been silent long enough (here we know it
            is dead, so --force would have done as well): promote goes through. The
            replica's read-only mount becomes the read-write source of epoch 2.""")
        mfs("promote", self.b)
        self.gone("replica b")  # it handed over to a read-write mount and exits
        self.pids["mount b"] = read_pid(os.path.join(self.b, "mount.pid"))
        synced_write(
            os.path.join(self.b_mnt, "after-failover.txt"), b"written on the promoted replica\n"
        )
        shutil.rmtree(os.path.join(self.b_mnt, "live"))
        print(f"    wrote after-failover.txt and removed live/ on {self.b_mnt}")

        step("4/4", "Failback: the old source rejoins as a target")
        say("""The old source is demoted: it becomes a target, keeping its log from the
            fork on so that only what differs is sent again (what it committed that the
            replica never got is archived, not lost).""")
        mfs("demote", self.a)
        a_addr = f"127.0.0.1:{free_port()}"
        mfs("replica", self.a, "--listen", a_addr, "--mount", self.a_mnt)
        self.pids["replica a"] = read_pid(os.path.join(self.a, "replica.pid"))
        mfs("mirror", self.b, "--add", a_addr)
        took = wait_until("the old source to catch up", lambda: caught_up(self.b), 120)
        print(f"    (resync done in {took:.1f} s)")
        mfs("status", self.b)
        mfs("status", self.a)
        seen = os.path.exists(os.path.join(self.a_mnt, "after-failover.txt"))
        print(
            f"    after-failover.txt on the old source's read-only mount: "
            f"{'there' if seen else 'MISSING'}"
        )
        if not seen:
            raise DemoError("the old source did not get the new source's writes")
        mfs("verify", self.b)

    # -- the end

    def finish(self) -> None:
        step("end", "Clean stop")
        say("Unmount the new source (waits for the last commit) and stop the replica.")
        mfs("umount", self.b_mnt)
        self.gone("mount b")
        mfs("stop", self.a)
        self.gone("replica a")

    def gone(self, name: str, timeout: float = 30.0) -> None:
        """Wait until the process ``name`` has exited (it was told to), then forget it."""
        pid = self.pids.get(name)
        if pid is None:
            return
        wait_until(f"the {name} (pid {pid}) to exit", lambda: not pid_alive(pid), timeout)
        del self.pids[name]

    def cleanup(self) -> None:
        """Stop what is still running (our pids only), detach our mounts."""
        self.stop_writer.set()
        for name, pid in list(self.pids.items()):
            if pid_alive(pid):
                print(f"  stopping the {name} (pid {pid})", flush=True)
                stop_process(pid)
        for m in (self.ck_mnt, self.a_mnt, self.b_mnt):
            if os.path.ismount(m):
                subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)


def stop_process(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM a process this demo started, then SIGKILL it if it does not exit."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it makes FUSE mounts)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="mirrorfs-demo-")
    print(f"mirrorfs demo, in {work} (removed at the end)")
    t0 = time.monotonic()
    here = os.getcwd()
    os.chdir(work)
    demo = Demo(work)
    try:
        demo.mirroring()
        demo.backup()
        demo.bad_day()
        demo.finish()
        print(f"\ndone in {time.monotonic() - t0:.0f} s", flush=True)
        return 0
    except DemoError as exc:
        print(f"\ndemo: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        demo.cleanup()
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
