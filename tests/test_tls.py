"""TLS on the replication link (mirrorfs.repl.tls): certificates from ``trustme``.

- the files: missing, not PEM, a key that does not match, an encrypted key, options given
  in part: one-line errors, also from the command line before anything starts;
- the loopback rules count TLS as authentication;
- a Shipper and a Receiver (behind the listener's ``accept``) over real TCP on 127.0.0.1,
  through the fault proxy of tests/netproxy.py, which records every byte: a marker written
  into the source volume is on the wire without TLS and nowhere in it with TLS;
- a wrong CA (either side), an expired certificate, a plain source at a TLS target and a
  TLS source at a plain target are refused with a clear one-line reason on both sides (the
  source's status, the target's log), nothing applied, no traceback.

The end-to-end test with the daemons and mounts is ``test_tls_daemons_and_mounts`` (mount).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import random

import pytest
import trio

from mirrorfs import cli
from mirrorfs.repl.admission import HandshakeLimiter
from mirrorfs.repl.auth import check_listen_policy, check_peer_policy
from mirrorfs.repl.receiver import Receiver, ReceiverState
from mirrorfs.repl.shipper import Shipper, ShipperState
from mirrorfs.repl.tls import (
    TlsConfig,
    TlsError,
    TlsFiles,
    TlsStream,
    accept,
    connector,
    load_tls,
    tls_files,
)
from mirrorfs.store.volume import Volume
from tests.netproxy import FaultProxy

trustme = pytest.importorskip("trustme")

MiB = 1 << 20
BS = 4096
SECRET = b"a shared secret of the two nodes, 32+ bytes"


# ---------------------------------------------------------------------------- certificates


class Pki:
    """A CA and certificates written as PEM files under ``root``."""

    def __init__(self, root) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_file = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes, mode: int = 0o644) -> str:
        path = os.path.join(self.root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def node(self, name: str, *, ca=None, ca_file: str | None = None, **issue) -> TlsFiles:
        """A node's files: its certificate (issued by ``ca``), key, and the CA it trusts."""
        leaf = (ca or self.ca).issue_cert("127.0.0.1", "localhost", **issue)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        cert = self._write(f"{name}.pem", chain)
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes(), 0o600)
        return TlsFiles(cert, key, ca_file or self.ca_file)

    def expired(self, name: str) -> TlsFiles:
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        return self.node(name, not_before=past, not_after=past + datetime.timedelta(days=30))


@pytest.fixture
def pki(tmp_path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(str(d))


# ---------------------------------------------------------------------------- the files


def test_tls_files_go_together(tmp_path):
    assert tls_files(None, None, None) is None
    with pytest.raises(TlsError, match="--tls-key, --tls-ca missing"):
        tls_files("c.pem", None, None)
    files = tls_files("c.pem", "k.pem", "ca.pem")
    assert files is not None and all(os.path.isabs(p) for p in (files.cert, files.key, files.ca))
    assert files.argv()[::2] == ["--tls-cert", "--tls-key", "--tls-ca"]


def test_load_tls_refuses_bad_files(pki):
    good = pki.node("a")
    other = pki.node("b")
    garbage = pki._write("garbage.pem", b"this is not PEM\n")
    missing = os.path.join(pki.root, "missing.pem")
    cases = [
        (TlsFiles(missing, good.key, good.ca), "missing.pem: cannot read TLS certificate: No such"),
        (TlsFiles(pki.root, good.key, good.ca), "cannot read TLS certificate: Is a directory"),
        (TlsFiles(garbage, good.key, good.ca), "garbage.pem: not a PEM certificate"),
        (TlsFiles(good.cert, garbage, good.ca), "garbage.pem: not a PEM private key"),
        (TlsFiles(good.cert, good.key, garbage), "garbage.pem: not a PEM CA certificate"),
        (TlsFiles(good.cert, other.key, good.ca), "does not match the certificate"),
        # The key where the CA should be: PEM, but no certificate in it.
        (TlsFiles(good.cert, good.key, good.key), "not a PEM CA certificate"),
    ]
    for files, expected in cases:
        with pytest.raises(TlsError) as info:
            load_tls(files)
        text = str(info.value)
        assert expected in text, (files, text)
        assert "\n" not in text
    config = load_tls(good)
    assert isinstance(config, TlsConfig)
    assert config.client.check_hostname is False
    import ssl

    for ctx in (config.client, config.server):
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3


def test_load_tls_refuses_an_encrypted_key(pki):
    from cryptography.hazmat.primitives import serialization

    good = pki.node("a")
    with open(good.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path = pki._write("encrypted.key", encrypted, 0o600)
    with pytest.raises(TlsError, match="encrypted with a passphrase"):
        load_tls(TlsFiles(good.cert, path, good.ca))


def test_cli_bad_tls_files_are_one_line_errors(tmp_path, pki, capsys):
    from tests.util import mkfs

    good = pki.node("a")
    other = pki.node("b")
    vol = str(tmp_path / "vol")
    mkfs(vol)
    rep = str(tmp_path / "rep")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "nope.pem")
    runs = [
        (
            ["replica", rep, "--listen", "127.0.0.1:0", "--tls-cert", missing],
            "--tls-key, --tls-ca missing: --tls-cert, --tls-key and --tls-ca go together",
        ),
        (
            [
                "replica",
                rep,
                "--listen",
                "127.0.0.1:0",
                *TlsFiles(missing, good.key, good.ca).argv(),
            ],
            "nope.pem: cannot read TLS certificate: No such file or directory",
        ),
        (
            # The mountpoint does not exist: the TLS files are checked before that matters.
            [
                "mount",
                vol,
                str(tmp_path / "nomnt"),
                *TlsFiles(good.cert, other.key, good.ca).argv(),
            ],
            "does not match the certificate",
        ),
        (
            [
                "promote",
                str(empty),
                "--mirror",
                "127.0.0.1:7",
                *TlsFiles(good.cert, good.key, missing).argv(),
            ],
            "cannot read TLS CA certificate",
        ),
    ]
    for argv, expected in runs:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("mirrorfs: error: ") and expected in err, err
        assert "\n" not in err
    assert not os.path.exists(rep) and list(empty.iterdir()) == []  # nothing made or promoted


def test_tls_counts_as_authentication_for_the_loopback_rules():
    from mirrorfs.repl.auth import ListenPolicyError, PeerPolicyError

    for host in ("192.0.2.10", "", "0.0.0.0"):
        check_listen_policy(host, None, False, tls=True)
        with pytest.raises(ListenPolicyError):
            check_listen_policy(host, None, False)
    check_peer_policy("192.0.2.10", 7400, None, False, tls=True)
    with pytest.raises(PeerPolicyError):
        check_peer_policy("192.0.2.10", 7400, None, False)


# ---------------------------------------------------------------------------- sessions


class RecordingProxy(FaultProxy):
    """The fault proxy, keeping a copy of every byte it forwards (both directions)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorded = bytearray()

    async def _forward(self, stats, direction, data, dst) -> None:
        self.recorded += data
        await super()._forward(stats, direction, data, dst)


def make_source(tmp_path) -> Volume:
    path = str(tmp_path / "src")
    Volume.create(path, 8 * MiB)
    return Volume.open(path)


def write_marked(vol: Volume, rng: random.Random, marker: bytes, block: int) -> None:
    """One transaction: a random block with ``marker`` in the middle (lz4 keeps random
    data, and the marker in it, as literals: without TLS the marker is on the wire)."""
    data = bytearray(rng.randbytes(BS))
    data[1000 : 1000 + len(marker)] = marker
    vol.write(block, bytes(data))
    assert vol.commit() is not None


async def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def listen(nursery: trio.Nursery, receiver: Receiver, tls: TlsConfig | None) -> int:
    """``receiver`` behind a TCP listener on 127.0.0.1 that does what the replica daemon's
    does (node/replica.py ``_serve_one``); its port."""

    async def handler(stream: trio.SocketStream) -> None:
        await receiver.serve(stream, prepare=functools.partial(accept, tls=tls, timeout=5.0))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handler, listeners)
    return listeners[0].socket.getsockname()[1]


def no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_replication_through_a_recording_proxy(tmp_path, pki, nursery, caplog, use_tls):
    """Initial sync and streaming through the proxy; the marker is on the wire only without
    TLS. With TLS the shared-secret handshake runs inside it."""
    caplog.set_level(logging.INFO)
    rng = random.Random(9)
    marker = b"MIRRORFS-MARKER-" + os.urandom(8).hex().encode()
    src = make_source(tmp_path)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    target_tls = load_tls(pki.node("target")) if use_tls else None
    source_tls = load_tls(pki.node("source")) if use_tls else None
    secret = SECRET if use_tls else None
    receiver = Receiver(rdir, None, secret=secret, node_id="tgt")
    try:
        write_marked(src, rng, marker, 100)  # shipped by the initial sync
        port = await listen(nursery, receiver, target_tls)
        proxy = RecordingProxy(target=("127.0.0.1", port))
        pport = await nursery.start(proxy.run)
        streams: list[trio.abc.Stream] = []
        base = connector(("127.0.0.1", pport), source_tls)

        async def connect() -> trio.abc.Stream:
            stream = await (base() if base else trio.open_tcp_stream("127.0.0.1", pport))
            streams.append(stream)
            return stream

        shipper = Shipper(src, ("127.0.0.1", pport), secret=secret, node_id="src", connect=connect)
        await nursery.start(shipper.run)

        def caught_up() -> bool:
            v = receiver.volume
            return v is not None and v.consistent and v.last_seq == src.last_seq

        await wait_until(caught_up, what="the initial sync")
        for i in range(5):  # shipped as TXN frames
            write_marked(src, rng, marker, 200 + i)
        await wait_until(caught_up, what="streaming")
        await wait_until(lambda: shipper.status()["lag_txns"] == 0, what="the last ack")
        assert src.device.read(0, src.block_count) == receiver.volume.device.read(
            0, src.block_count
        )
        assert shipper.state is ShipperState.STREAMING and shipper.connections == 1
        assert len(proxy.recorded) > 6 * BS
        if use_tls:
            assert isinstance(streams[0], TlsStream)
            assert streams[0].ssl_stream.version() == "TLSv1.3"
            assert marker not in proxy.recorded
            assert b"MFSW" not in proxy.recorded  # not even a frame header in the clear
        else:
            assert proxy.recorded.count(marker) >= 6
        no_tracebacks(caplog)
    finally:
        src.close()
        if receiver.volume is not None:
            receiver.volume.close()


# Each case: (source files, target files, what the source's status says, what the target
# logs). None: that side has no TLS.
REFUSALS = {
    "wrong CA on both sides": (
        lambda p: p.node("s", ca=p.other_ca, ca_file=p.other_ca_file),
        lambda p: p.node("t"),
        "TLS: the certificate of the target failed verification",
        "refused this node's certificate: not signed by its CA",
    ),
    "source cert from another CA": (
        lambda p: p.node("s", ca=p.other_ca),
        lambda p: p.node("t"),
        "TLS: the target refused this node's certificate: not signed by its CA",
        "failed verification: unable to get local issuer certificate",
    ),
    "expired source cert": (
        lambda p: p.expired("s"),
        lambda p: p.node("t"),
        "TLS: the target refused this node's certificate: expired",
        "failed verification: certificate has expired",
    ),
    "expired target cert": (
        lambda p: p.node("s"),
        lambda p: p.expired("t"),
        "TLS: the certificate of the target failed verification: certificate has expired",
        "refused this node's certificate: expired",
    ),
    "plain source, TLS target": (
        lambda p: None,
        lambda p: p.node("t"),
        "refused by target: this target requires TLS: start the source with --tls-cert",
        "it connected without TLS",
    ),
    "TLS source, plain target": (
        lambda p: p.node("s"),
        lambda p: None,
        "closed the connection during the TLS handshake (is it listening without TLS?)",
        "the peer started a TLS handshake, and this replica listens without TLS",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_with_a_clear_reason_on_both_sides(tmp_path, pki, nursery, caplog, case):
    caplog.set_level(logging.INFO)
    source_files, target_files, source_says, target_logs = REFUSALS[case]
    sf, tf = source_files(pki), target_files(pki)
    src = make_source(tmp_path)
    write_marked(src, random.Random(1), b"not for that target", 100)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = Receiver(rdir, None, secret=None, node_id="tgt")
    try:
        port = await listen(nursery, receiver, load_tls(tf) if tf else None)
        base = connector(("127.0.0.1", port), load_tls(sf) if sf else None)
        attempts = []

        async def connect() -> trio.abc.Stream:
            attempts.append(trio.current_time())
            return await (base() if base else trio.open_tcp_stream("127.0.0.1", port))

        shipper = Shipper(src, ("127.0.0.1", port), secret=None, node_id="src", connect=connect)
        await nursery.start(shipper.run)
        await wait_until(lambda: len(attempts) >= 3, what="retries")
        st = shipper.status()
        assert st["state"] in ("error", "connecting"), st
        assert source_says in st["reason"], st["reason"]
        assert "\n" not in st["reason"]
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("mirrorfs.repl")]
        assert any(target_logs in m for m in logged), logged
        assert receiver.volume is None and receiver.status()["sessions"] == 0
        assert not os.path.exists(os.path.join(rdir, "blocks"))
        no_tracebacks(caplog)
    finally:
        src.close()


# ---------------------------------------------------------------------------- daemons


@pytest.mark.mount
def test_tls_daemons_and_mounts(tmp_path, pki):
    """``replica`` and ``mount --mirror`` with TLS through the recording proxy: the tree and
    the marker reach the replica mount, the marker never crosses the wire in the clear;
    ``mirror --add`` uses the mount's TLS options too; status says TLS."""
    from tests.repl_util import (
        Cluster,
        assert_blocks_identical,
        log_text,
        status,
        stopped_status,
        target,
        wait_caught_up,
    )
    from tests.util import run_cli, umount, wait_for

    cluster = Cluster(str(tmp_path))
    try:
        rep = cluster.replica("rep", start=False)
        rep_tls = pki.node("rep").argv()
        proc = run_cli(
            "replica", rep.dir, "--listen", rep.address, "--mount", rep.mountpoint, *rep_tls
        )
        assert proc.returncode == 0, proc.stderr
        with open(os.path.join(rep.dir, "replica.pid")) as f:
            rep.pid = int(f.read())
        assert rep.alive()
        proxy = RecordingProxy(target=("127.0.0.1", rep.port))
        cluster.proxies.append(proxy)
        proxy.start()
        address = f"127.0.0.1:{proxy.port}"
        vol = cluster.mkfs("src")
        marker = b"MIRRORFS-MARKER-" + os.urandom(8).hex().encode()
        src = cluster.mount_source(vol, [address], extra=tuple(pki.node("src").argv()))
        with open(os.path.join(src.mountpoint, "secret.txt"), "wb") as f:
            f.write(marker * 100)
            os.fsync(f.fileno())
        wait_caught_up(vol)
        wait_for(rep.mounted, 30, "the replica mount")
        with open(os.path.join(rep.mountpoint, "secret.txt"), "rb") as f:
            assert f.read() == marker * 100
        assert status(vol)["tls"] is True and rep.status()["tls"] is True

        # mirror --add at run time: the mount's TLS options.
        assert run_cli("mirror", vol, "--remove", address).returncode == 0
        assert run_cli("mirror", vol, "--add", address).returncode == 0
        with open(os.path.join(src.mountpoint, "later.txt"), "wb") as f:
            f.write(marker[::-1] * 50)
            os.fsync(f.fileno())
        wait_caught_up(vol)
        assert target(status(vol), address)["state"] == "streaming"
        wait_for(lambda: os.path.exists(os.path.join(rep.mountpoint, "later.txt")), 30, "later")
        assert len(proxy.recorded) > 100 * len(marker)
        assert marker not in proxy.recorded and marker[::-1] not in proxy.recorded

        umount(src)
        seq = stopped_status(vol)["checkpointed_seq"]
        wait_for(lambda: rep.status()["applied_seq"] == seq, 30, f"seq {seq} on the replica")
        assert_blocks_identical(vol, rep.dir)
        for text in (log_text(vol), log_text(rep.dir)):
            assert "Traceback" not in text
    finally:
        cluster.close()


def test_successor_argv_carries_the_tls_options(pki):
    """The promoted replica's successor mount gets the replica's TLS files (the old
    source's replica daemon gets the source's: node/switchover.py switch_source)."""
    from mirrorfs.node.replica import ReplicaConfig
    from mirrorfs.node.switchover import successor_argv

    files = pki.node("rep")
    cfg = ReplicaConfig("/srv/rep", tls=load_tls(files))
    report = {"mountpoint": "/mnt/rep", "mirror_to": "127.0.0.1:7401"}
    argv = successor_argv("/srv/rep", report, cfg)
    assert argv[-6:] == files.argv()
    assert successor_argv("/srv/rep", report, ReplicaConfig("/srv/rep"))[-2:] == [
        "--mirror",
        "127.0.0.1:7401",
    ]


@pytest.mark.mount
def test_switchover_with_tls(tmp_path, pki):
    """A source and its replica with TLS switch roles: the successors the handover starts
    get the TLS options too (a TLS replica refuses a plain source, and the reverse), so the
    new source streams to the old one and status says TLS on both."""
    from tests.repl_util import (
        Cluster,
        assert_blocks_identical,
        free_port,
        status,
        target,
        wait_caught_up,
    )
    from tests.test_switchover import _retire, _successors, _switchover
    from tests.util import run_cli

    c = Cluster(str(tmp_path))
    try:
        b = c.replica("b", start=False)
        proc = run_cli(
            "replica", b.dir, "--listen", b.address, "--mount", b.mountpoint,
            *pki.node("b").argv(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with open(os.path.join(b.dir, "replica.pid")) as f:
            b.pid = int(f.read())
        a = c.mkfs("a")
        a_src = c.mount_source(a, [b.address], extra=tuple(pki.node("a").argv()))
        with open(os.path.join(a_src.mountpoint, "before"), "wb") as f:
            f.write(os.urandom(100_000))
            os.fsync(f.fileno())
        wait_caught_up(a)

        a_port = free_port()
        _switchover(a, b.address, f"127.0.0.1:{a_port}")
        _retire(c, a_src)
        b_source, ra = _successors(
            c, source=b.dir, source_mnt=b.mountpoint, replica=a, port=a_port,
            replica_mnt=a_src.mountpoint,
        )  # fmt: skip
        with open(os.path.join(b.mountpoint, "after"), "wb") as f:
            f.write(os.urandom(100_000))
            os.fsync(f.fileno())
        wait_caught_up(b.dir)
        assert status(b.dir)["tls"] is True and ra.status()["tls"] is True
        assert target(status(b.dir), ra.address)["state"] == "streaming"
        assert_blocks_identical(b.dir, a)
    finally:
        c.close()


async def test_tls_flipped_byte_and_cut_are_one_line_drops(tmp_path, pki, nursery, caplog):
    """A byte flipped on the wire fails TLS's record check (not the frame CRC): the target
    drops the connection with a one-line reason, the source reconnects and resumes; a cut
    connection too. Frames larger than a TLS record arrive whole (the receive drain)."""
    from tests.netproxy import Direction

    caplog.set_level(logging.INFO)
    rng = random.Random(5)
    src = make_source(tmp_path)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = Receiver(rdir, None, secret=SECRET, node_id="tgt")
    try:
        src.write(300, rng.randbytes(BS * 200))  # one 800 KiB transaction: many TLS records
        src.commit()
        port = await listen(nursery, receiver, load_tls(pki.node("t")))
        proxy = RecordingProxy(target=("127.0.0.1", port))
        pport = await nursery.start(proxy.run)
        address = ("127.0.0.1", pport)
        shipper = Shipper(
            src,
            address,
            secret=SECRET,
            node_id="src",
            connect=connector(address, load_tls(pki.node("s"))),
        )
        await nursery.start(shipper.run)

        def caught_up() -> bool:
            v = receiver.volume
            return v is not None and v.consistent and v.last_seq == src.last_seq

        await wait_until(caught_up, what="the initial sync")
        proxy.flip_after(40_000, Direction.UP)
        for _ in range(3):
            src.write(rng.randrange(64, 1000), rng.randbytes(BS * 16))
            src.commit()
        await wait_until(lambda: shipper.connections >= 2, what="the reconnect after the flip")
        await wait_until(caught_up, what="resume after the flip")
        proxy.cut_after(30_000, Direction.UP)
        src.write(1200, rng.randbytes(BS * 30))
        src.commit()
        await wait_until(lambda: shipper.connections >= 3, what="the reconnect after the cut")
        await wait_until(caught_up, what="resume after the cut")
        assert src.device.read(0, src.block_count) == receiver.volume.device.read(
            0, src.block_count
        )
        dropped = [r.getMessage() for r in caplog.records if "dropped source" in r.getMessage()]
        assert any("TLS error with the source" in m for m in dropped), dropped
        no_tracebacks(caplog)
    finally:
        src.close()
        if receiver.volume is not None:
            receiver.volume.close()


async def test_close_is_bounded_when_the_peer_reads_nothing(pki, nursery, autojump_clock):
    """The close_notify of a closing TlsStream waits for socket space at most a second: a
    peer that reads nothing more cannot hang a close that runs under a shield."""
    import trio.testing

    from mirrorfs.repl.tls import _Transport

    client_end, server_end = trio.testing.lockstep_stream_pair()  # a send waits for a read
    server = trio.SSLStream(server_end, load_tls(pki.node("t")).server, server_side=True)
    client_ssl = trio.SSLStream(
        _Transport(client_end), load_tls(pki.node("s")).client, server_side=False
    )
    nursery.start_soon(server.do_handshake)
    await client_ssl.do_handshake()
    client = TlsStream(client_ssl, "the target")
    start = trio.current_time()
    with trio.CancelScope(shield=True):
        await client.aclose()  # the server never reads the close_notify
    assert trio.current_time() - start <= 1.5


async def test_tls_handshakes_count_against_the_caps(tmp_path, pki, nursery, caplog):
    """Connections that never start their TLS handshake hold a place under the receiver's
    caps on unauthenticated connections like any other: beyond the total cap the oldest
    are dropped at once, not after the TLS deadline, and a TLS source still gets in."""
    caplog.set_level(logging.INFO)
    src = make_source(tmp_path)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    limiter = HandshakeLimiter(per_host=8, total=16)
    receiver = Receiver(rdir, None, secret=SECRET, node_id="tgt", limiter=limiter)
    idle: list[trio.SocketStream] = []
    try:
        src.write(10, os.urandom(BS * 4))
        src.commit()
        port = await listen(nursery, receiver, load_tls(pki.node("t")))
        for _ in range(40):  # silent: not even a ClientHello
            idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        await wait_until(lambda: limiter.evictions >= 24, 10, "the oldest to be dropped")
        assert limiter.pending == 16
        for stream in idle[:24]:
            with trio.fail_after(2):  # closed by the target (a reset counts as a close)
                try:
                    assert await stream.receive_some(100) == b""
                except trio.BrokenResourceError:
                    pass
        address = ("127.0.0.1", port)
        shipper = Shipper(
            src,
            address,
            secret=SECRET,
            node_id="src",
            connect=connector(address, load_tls(pki.node("s"))),
        )
        began = trio.current_time()
        await nursery.start(shipper.run)
        await wait_until(lambda: receiver.state is ReceiverState.STREAMING, 5, "streaming")
        assert trio.current_time() - began < 5
        assert receiver.status()["sessions"] == 1
        no_tracebacks(caplog)
    finally:
        for stream in idle:
            await stream.aclose()
        src.close()
        if receiver.volume is not None:
            receiver.volume.close()
