"""Failover benchmark: promote (RTO), failback (bytes per diverged byte), switchover pause.

Three scenarios in one run, each on fresh volumes in one work directory, one table. Every
node runs on 127.0.0.1 (same machine, same disk), driven through the command line.

  a. RTO        a --size source (1 GiB) mirrors to a replica daemon with a read-only mount;
                --files small files are created on the source and the replica catches up;
                then --txns small fsync'd files (one transaction each) are written, the
                source is SIGKILLed at once (no wait for the replica), and
                ``mirrorfs promote REPLICA`` runs. Timed: from the start of the promote
                command to the first successful create + write + fsync on the promoted
                mount (the same mountpoint as the read-only one).
  b. failback   source A mirrors to B through tests/netproxy.FaultProxy; the link is paused,
                --diverged MiB are written on A (never reach B), A is SIGKILLed, B promoted,
                --diverged MiB written on B; A is demoted, started as a replica daemon, added
                with ``mirror B --add``; once caught up, the resync figures of B's target
                entry: wire bytes / (bytes written on A + bytes written on B after the fork).
  c. switchover a writer thread creates small numbered fsync'd files on the source mount;
                ``mirrorfs switchover A --to B --listen ...``; on EROFS the writer goes on at
                B's mount once B answers as a source. The longest gap between two successful
                writes, and the command's "writes held" figure.

Usage: python bench/bench_failover.py [--quick]      (as root: FUSE mounts)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import (
    MB,
    REPO_DIR,
    BenchError,
    MiB,
    MirrorfsCli,
    MirrorfsMount,
    ReplicaDaemon,
    describe_environment,
    format_rows,
    human_size,
    log_tail,
    parse_size,
    pid_alive,
    work_directory,
)
from nodes import (
    adopt_mount,
    adopt_replica,
    commit_volume,
    free_port,
    fsync_file,
    kill_source,
    listen_port,
    node_status,
    run_output,
    stop_all,
    target_position,
    wait_applied,
    wait_streaming,
    write_big,
)

log = logging.getLogger(__name__)

CATCHUP_TIMEOUT = 900.0
SMALL_FILE = 100  # bytes in each of the --files files
TXN_FILE = 512  # bytes in each of the --txns files
WRITER_FILE = 4096  # bytes in each switchover writer file
WRITES_BEFORE = 30  # switchover writer: successful writes on each side


@dataclass
class Results:
    # a. RTO
    files_s: float | None = None
    txns_s: float | None = None
    pending_txns: int | None = None  # committed on the source, not applied, at the kill
    source_seq: int | None = None
    rto_s: float | None = None
    promote_cmd_s: float | None = None
    promote_mounted_s: float | None = None  # the command's "(N s after promote)"
    first_write_s: float | None = None
    applied_from_log: int | None = None
    promote_output: str = ""
    # b. failback
    diverged_a: int = 0
    diverged_b: int = 0
    resync: dict[str, Any] | None = None
    failback_catchup_s: float | None = None
    # c. switchover
    max_pause_s: float | None = None
    held_s: float | None = None
    held_requests: int | None = None
    switchover_cmd_s: float | None = None
    refused: int | None = None
    switchover_output: str = ""
    errors: list[str] = field(default_factory=list)


# ---- a. RTO ---------------------------------------------------------------------------------


def phase_rto(workdir: str, res: Results, size: int, nfiles: int, ntxns: int) -> None:
    cli = MirrorfsCli(os.path.join(workdir, "rto.log"))
    rep = ReplicaDaemon(cli, os.path.join(workdir, "rto-b"), os.path.join(workdir, "rto-b-mnt"))
    src = MirrorfsMount(cli, os.path.join(workdir, "rto-a"), os.path.join(workdir, "rto-a-mnt"))
    mounts, daemons = [src], [rep]
    try:
        rep.start()
        port = listen_port(rep.volume)
        src.mkfs(f"{max(1, size // MiB)}M")
        src.mount("--mirror", f"127.0.0.1:{port}")
        wait_streaming(src.volume, rep.mountpoint)

        log.info("rto: %d files", nfiles)
        files = os.path.join(src.mountpoint, "files")
        os.mkdir(files)
        payload = b"x" * SMALL_FILE
        t0 = time.monotonic()
        for i in range(nfiles):
            fd = os.open(os.path.join(files, f"f{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        commit_volume(files)
        res.files_s = time.monotonic() - t0
        wait_applied(src.volume, CATCHUP_TIMEOUT, "10,000 files")

        log.info("rto: %d fsync'd transactions, then SIGKILL", ntxns)
        txns = os.path.join(src.mountpoint, "txns")
        os.mkdir(txns)
        data = os.urandom(TXN_FILE)
        t0 = time.monotonic()
        for i in range(ntxns):
            fsync_file(os.path.join(txns, f"t{i:05d}"), data)
        res.txns_s = time.monotonic() - t0
        committed, entry = target_position(src.volume)
        res.source_seq = committed
        res.pending_txns = committed - (entry.get("applied_seq") or 0)
        kill_source(src)

        mounts.remove(src)
        promote_start = time.monotonic()
        out, res.promote_cmd_s = run_output(cli, "promote", rep.volume, "--force", timeout=600)
        assert rep.mountpoint is not None
        probe = os.path.join(rep.mountpoint, "first-write")
        t_write = time.monotonic()
        while True:
            try:
                fsync_file(probe, b"written after promote\n")
                break
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.ENOTCONN, errno.EACCES):
                    raise
                if time.monotonic() - t_write > 60:
                    raise BenchError(f"no write on the promoted mount after 60 s: {exc}")
                time.sleep(0.005)
        done = time.monotonic()
        res.rto_s = done - promote_start
        res.first_write_s = done - t_write
        res.promote_output = out
        m = re.search(r"\(([\d.]+)s after promote\)", out)
        res.promote_mounted_s = float(m.group(1)) if m else None
        m = re.search(r"\((\d+) applied from the log during promotion\)", out)
        res.applied_from_log = int(m.group(1)) if m else None
        # The daemon exited; the volume is now mounted read-write by a new process.
        rep.pid = None
        mounts.append(adopt_mount(cli, rep.volume, rep.mountpoint))
    finally:
        stop_all(mounts, daemons)


# ---- b. failback ----------------------------------------------------------------------------


def phase_failback(workdir: str, res: Results, diverged: int) -> None:
    sys.path.insert(0, os.path.join(REPO_DIR, "tests"))
    import netproxy
    from netproxy import FaultProxy

    netproxy.CHUNK = 256 * 1024
    cli = MirrorfsCli(os.path.join(workdir, "failback.log"))
    b = ReplicaDaemon(cli, os.path.join(workdir, "fb-b"), os.path.join(workdir, "fb-b-mnt"))
    a = MirrorfsMount(cli, os.path.join(workdir, "fb-a"), os.path.join(workdir, "fb-a-mnt"))
    mounts: list[MirrorfsMount] = [a]
    daemons: list[ReplicaDaemon] = [b]
    proxy: FaultProxy | None = None
    try:
        b.start()
        proxy = FaultProxy(listen_port=0, target=("127.0.0.1", listen_port(b.volume)))
        proxy_port = proxy.start()
        a.mkfs("1G")
        a.mount("--mirror", f"127.0.0.1:{proxy_port}")
        write_big(os.path.join(a.mountpoint, "base.bin"), 8 * MiB)
        wait_streaming(a.volume, b.mountpoint)

        proxy.paused = True  # a partition: A's next writes never reach B
        write_big(os.path.join(a.mountpoint, "diverged-a.bin"), diverged)
        res.diverged_a = diverged
        kill_source(a)
        mounts.remove(a)
        proxy.stop()
        proxy = None

        run_output(cli, "promote", b.volume, "--force", timeout=600)
        b.pid = None
        assert b.mountpoint is not None
        b_src = adopt_mount(cli, b.volume, b.mountpoint)
        mounts.append(b_src)
        write_big(os.path.join(b.mountpoint, "diverged-b.bin"), diverged)
        res.diverged_b = diverged

        run_output(cli, "demote", a.volume, timeout=600)
        ra = ReplicaDaemon(cli, a.volume, None)
        daemons.append(ra)
        ra.start()
        t0 = time.monotonic()
        run_output(
            cli, "mirror", b.volume, "--add", f"127.0.0.1:{listen_port(a.volume)}", timeout=600
        )
        wait_applied(b.volume, CATCHUP_TIMEOUT, "failback")
        res.failback_catchup_s = time.monotonic() - t0
        _, entry = target_position(b.volume)
        res.resync = entry.get("resync")
        if not res.resync:
            raise BenchError(f"no resync in B's target entry: {entry}")
    finally:
        try:
            stop_all(mounts, daemons)
        finally:
            if proxy is not None:
                proxy.stop()


# ---- c. switchover --------------------------------------------------------------------------


class SwitchingWriter(threading.Thread):
    """Creates numbered fsync'd files on *mnt*; on a refusal, goes on at *next_mnt* once
    *next_dir* answers as a source. A write counts if it returned success on a mirrorfs
    mount (the device of the file is the mount's)."""

    def __init__(self, mnt: str, next_dir: str, next_mnt: str) -> None:
        super().__init__(name="switching-writer", daemon=True)
        self.mnt, self.next_dir, self.next_mnt = mnt, next_dir, next_mnt
        self.ok = 0
        self.ok_on_next = 0
        self.refused = 0
        self.max_pause = 0.0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _run(self) -> None:
        mnt, dev = self.mnt, os.stat(self.mnt).st_dev
        data = os.urandom(WRITER_FILE)
        last_ok = time.monotonic()
        i = 0
        while not self.halt.is_set():
            path = os.path.join(mnt, f"w{i:06d}")
            i += 1
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                    same = os.fstat(fd).st_dev == dev
                finally:
                    os.close(fd)
            except OSError:
                self.refused += 1
                same = False
            if same:
                now = time.monotonic()
                self.max_pause = max(self.max_pause, now - last_ok)
                last_ok = now
                self.ok += 1
                self.ok_on_next += mnt == self.next_mnt
                continue
            if mnt == self.next_mnt:
                time.sleep(0.01)
                continue
            deadline = time.monotonic() + 60
            while not self.halt.is_set():
                with contextlib.suppress(BenchError):
                    if node_status(self.next_dir).get("role") == "source":
                        break
                if time.monotonic() > deadline:
                    raise BenchError("the new source never answered as a source")
                time.sleep(0.01)
            mnt, dev = self.next_mnt, os.stat(self.next_mnt).st_dev

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        if self.error is not None:
            raise BenchError(f"the switchover writer failed: {self.error!r}")


def wait_count(fn: Callable[[], bool], writer: SwitchingWriter, what: str) -> None:
    deadline = time.monotonic() + 60
    while not fn():
        if writer.error is not None or not writer.is_alive():
            writer.stop()
            raise BenchError(f"the writer stopped before {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} after 60 s")
        time.sleep(0.01)


def phase_switchover(workdir: str, res: Results) -> None:
    cli = MirrorfsCli(os.path.join(workdir, "switchover.log"))
    b = ReplicaDaemon(cli, os.path.join(workdir, "so-b"), os.path.join(workdir, "so-b-mnt"))
    a = MirrorfsMount(cli, os.path.join(workdir, "so-a"), os.path.join(workdir, "so-a-mnt"))
    mounts: list[MirrorfsMount] = [a]
    daemons: list[ReplicaDaemon] = [b]
    writer: SwitchingWriter | None = None
    try:
        b.start()
        b_addr = f"127.0.0.1:{listen_port(b.volume)}"
        a.mkfs("1G")
        a.mount("--mirror", b_addr)
        write_big(os.path.join(a.mountpoint, "base.bin"), 4 * MiB)
        wait_streaming(a.volume, b.mountpoint)
        assert b.mountpoint is not None

        writer = SwitchingWriter(a.mountpoint, b.volume, b.mountpoint)
        writer.start()
        wait_count(lambda: writer.ok >= WRITES_BEFORE, writer, f"{WRITES_BEFORE} writes on A")
        listen = f"127.0.0.1:{free_port()}"
        old_pid = a.pid
        out, res.switchover_cmd_s = run_output(
            cli, "switchover", a.volume, "--to", b_addr, "--listen", listen, timeout=600
        )
        res.switchover_output = out
        # The old source's mount process exits; B's daemon became a mount, A a replica.
        b.pid = None
        mounts.remove(a)
        deadline = time.monotonic() + 30
        while old_pid is not None and pid_alive(old_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        a.pid = None
        mounts.append(adopt_mount(cli, b.volume, b.mountpoint))
        daemons.append(adopt_replica(cli, a.volume, a.mountpoint))
        wait_count(lambda: writer.ok_on_next >= WRITES_BEFORE, writer, "writes on B")
        writer.stop()
        res.max_pause_s = writer.max_pause
        res.refused = writer.refused
        writer = None
        m = re.search(r"writes held on the old source for ([\d.]+) s \((\d+) request", out)
        if m:
            res.held_s, res.held_requests = float(m.group(1)), int(m.group(2))
    finally:
        if writer is not None:
            writer.halt.set()
            writer.join(timeout=60)
        stop_all(mounts, daemons)


# ---- the report -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render_table(res: Results, size: int, nfiles: int, ntxns: int) -> str:
    rows: list[tuple[str, str, str]] = []

    def add(label: str, unit: str, value: str) -> None:
        rows.append((label, unit, value))

    add(f"RTO: promote -> first write ({human_size(size)}, {nfiles:,} files)", "s", _fmt(res.rto_s))
    add("  promote command (CLI start, promote, mount rw)", "s", _fmt(res.promote_cmd_s))
    add("  of which: promote -> mounted, as the command prints", "s", _fmt(res.promote_mounted_s))
    add("  then first create+write+fsync on the new mount", "s", _fmt(res.first_write_s, 3))
    add(f"  {ntxns:,} fsync'd txns on the source took", "s", _fmt(res.txns_s))
    add(
        "  txns committed, not applied on the replica at SIGKILL", "txns", _fmt(res.pending_txns, 0)
    )
    add("  applied from the log during promotion", "txns", _fmt(res.applied_from_log, 0))
    rs = res.resync or {}
    written = res.diverged_a + res.diverged_b
    wire = rs.get("wire_bytes")
    add(
        f"failback: wire bytes / byte diverged ({human_size(res.diverged_a)} on A + "
        f"{human_size(res.diverged_b)} on B)",
        "B/B",
        "n/a" if wire is None or not written else f"{wire / written:.3f}",
    )
    add(
        "  blocks differing / sent",
        "blocks",
        f"{rs.get('blocks_differing', 'n/a')} / {rs.get('blocks_sent', 'n/a')}",
    )
    add(
        "  block data sent",
        "MB",
        _fmt(None if rs.get("bytes_sent") is None else rs["bytes_sent"] / MB, 1),
    )
    add("  wire bytes", "MB", _fmt(None if wire is None else wire / MB, 1))
    add(
        "  resync seconds (its figure) / mirror --add -> caught up",
        "s",
        f"{rs.get('seconds', 'n/a')} / {_fmt(res.failback_catchup_s)}",
    )
    add("switchover: longest gap between successful writes", "s", _fmt(res.max_pause_s, 3))
    add("  writes held on the old source (command's report)", "s", _fmt(res.held_s, 3))
    add(
        "  requests held / writes refused (EROFS)",
        "count",
        f"{_fmt(res.held_requests, 0)} / {_fmt(res.refused, 0)}",
    )
    add("  switchover command", "s", _fmt(res.switchover_cmd_s))

    header = ("measurement", "unit", "value")
    lines = [header, *rows]
    return format_rows(lines, right=range(2, 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark mirrorfs failover and failback.")
    parser.add_argument("--size", default=None, help="volume size for the RTO (default 1G)")
    parser.add_argument("--files", type=int, default=None, help="small files (default 10000)")
    parser.add_argument("--txns", type=int, default=None, help="fsync'd txns (default 1000)")
    parser.add_argument("--diverged", default=None, help="MiB written on each side (32M)")
    parser.add_argument("--workdir", default=None, help="parent of the run's temp directory")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 256M, 1,000 files, 100 txns, 4M diverged"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s: %(message)s",
    )
    size = parse_size(args.size or ("256M" if args.quick else "1G"))
    nfiles = args.files if args.files is not None else (1000 if args.quick else 10000)
    ntxns = args.txns if args.txns is not None else (100 if args.quick else 1000)
    diverged = parse_size(args.diverged or ("4M" if args.quick else "32M"))
    res = Results()
    load_start = os.getloadavg()[0]
    with work_directory(args.workdir, args.keep) as workdir:
        env_lines = describe_environment(workdir)

        def run(name: str, fn: Callable[[], None]) -> None:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                fn()
            except (BenchError, OSError) as exc:
                res.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  {name}: {exc}", file=sys.stderr)
                print(log_tail(os.path.join(workdir, name + ".log")), file=sys.stderr)

        run("rto", lambda: phase_rto(workdir, res, size, nfiles, ntxns))
        run("failback", lambda: phase_failback(workdir, res, diverged))
        run("switchover", lambda: phase_switchover(workdir, res))

    print()
    print("mirrorfs failover benchmark" + (" (--quick)" if args.quick else ""))
    for line in env_lines:
        print(line)
    print(
        f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"on {os.cpu_count()} CPUs; all nodes on 127.0.0.1, one disk; MB = 10^6 bytes"
    )
    print(
        f"RTO: source of {human_size(size)} -> replica daemon (read-only mount); {nfiles:,} "
        f"files of {SMALL_FILE} B, caught up; then {ntxns:,} files of {TXN_FILE} B, each "
        "fsync'd (one txn each), SIGKILL of the source right after the last fsync (the "
        "replica applies on receipt: what it had not applied then is below), then "
        "`mirrorfs promote REPLICA`; RTO = start of that command -> first successful "
        "create+write+fsync on the promoted mount"
    )
    print(
        "failback: A -> B through a paused FaultProxy; data written on A (lost to B), A "
        "SIGKILLed, B promoted, data written on B; demote A, replica A, mirror B --add A; "
        "figures from B's target entry 'resync' (wire_bytes = all bytes B sent A for it)"
    )
    print(
        f"switchover: a writer thread creating {WRITER_FILE} B fsync'd files on A's mount; "
        "`mirrorfs switchover A --to B --listen ...`; on EROFS it goes on at B's mount"
    )
    print()
    print(render_table(res, size, nfiles, ntxns))
    if res.promote_output:
        print()
        print("promote printed:")
        print("\n".join("  " + line for line in res.promote_output.rstrip().splitlines()))
    if res.switchover_output:
        print("switchover printed:")
        print("\n".join("  " + line for line in res.switchover_output.rstrip().splitlines()))
    for err in res.errors:
        print(f"error: {err}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_failover: interrupted", file=sys.stderr)
        sys.exit(130)
