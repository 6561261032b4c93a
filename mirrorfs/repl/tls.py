"""TLS on the replication link: the standard library's ``ssl`` through ``trio.SSLStream``.

``--tls-cert FILE --tls-key FILE --tls-ca FILE`` (all three or none; ``tls_files``) give a
node its certificate, its private key and the CA that signs every node's certificate.
``load_tls`` checks the files (one-line ``TlsError`` at start-up) and builds two contexts:

- both: TLS 1.3 only, the node's certificate and key, the CA as the only trust anchor,
  ``CERT_REQUIRED``: **mutual** verification, the source (client) verifies the target's
  certificate and the target (server) requires and verifies the source's;
- hostname checking is **off** (``check_hostname = False``) while CA verification stays
  required. Peers are named by IP address, and by addresses that change on purpose: a
  switchover's successor connects to the address the old source listened on, a promoted
  replica to whatever ``--mirror`` says, behind NAT or a load balancer the address is not
  the host's. A node's identity is "holds a key certified by this mirror's own CA", so the
  CA must be dedicated to the mirror (not a public CA, not a company-wide one); the shared
  secret, where given, still proves knowledge of it inside TLS and binds the volume.

The source's side is a connect factory for ``Shipper`` (``connector``): TCP, the TLS
handshake with a deadline, then ``TlsStream``. The target's side is ``accept`` (called by
the replica's listener before ``Receiver.serve``): the TLS handshake with a deadline, or,
without TLS, a plain stream that refuses a peer starting a TLS handshake with a clear
reason (``_PlainStream``). Every refusal is one line on both sides, never a traceback:

- a certificate that fails verification (wrong CA, expired, none sent): the side that
  verifies logs why; the TLS alert it produced is flushed to the peer (trio.SSLStream
  drops it when the handshake raises), so the peer names the same cause;
- a plain mirrorfs source at a TLS target gets a REFUSE frame in clear text saying that TLS
  is required; a TLS source at a plain target gets an EOF during its handshake, which it
  reports as "is it listening without TLS?", and the target logs that the peer spoke TLS.

``TlsStream`` turns trio's ``BrokenResourceError`` (whose ``__cause__`` is the ``ssl``
error) into one with that one-line reason, which ``FramedStream`` reports as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mirrorfs.repl.wire import MAGIC, Refuse, RefuseReason, ReplError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # the same deadline as the replication handshake's
_ALERT_GRACE = 1.0  # how long we try to hand the peer our TLS alert or REFUSE
_TLS_RECORD_HANDSHAKE = 0x16  # first byte of every TLS ClientHello
_MAX_PEM = 1 << 20
_TRANSPORT_READ = 256 * 1024  # as FramedStream's reads

Connect = Callable[[], Awaitable[trio.abc.Stream]]


class TlsError(ReplError):
    """The TLS files are missing, unreadable, not PEM, or the key does not match (one line)."""


class TlsFailure(ConnectionError):
    """The TLS handshake with the target failed (the one-line reason is the message)."""


@dataclass(slots=True, frozen=True)
class TlsFiles:
    """Where a node's certificate, private key and CA certificate are (absolute paths)."""

    cert: str
    key: str
    ca: str

    def argv(self) -> list[str]:
        """The command-line options that name these files (for a successor process)."""
        return ["--tls-cert", self.cert, "--tls-key", self.key, "--tls-ca", self.ca]


@dataclass(slots=True, frozen=True)
class TlsConfig:
    """A node's loaded TLS setup: the files and the two contexts built from them."""

    files: TlsFiles
    client: ssl.SSLContext  # the source's, for connections it makes
    server: ssl.SSLContext  # the target's, for connections it accepts


def tls_files(cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
    """The three ``--tls-*`` options as ``TlsFiles`` (None when none is given); TlsError
    when only some are given."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise TlsError(
            f"{', '.join(missing)} missing: --tls-cert, --tls-key and --tls-ca go together"
        )
    assert cert and key and ca
    return TlsFiles(os.path.abspath(cert), os.path.abspath(key), os.path.abspath(ca))


def tls_from_args(args: object) -> TlsFiles | None:
    """``tls_files`` of a parsed command line (its ``tls_cert``, ``tls_key``, ``tls_ca``)."""
    return tls_files(
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_ca", None),
    )


# ---------------------------------------------------------------------------- loading


def _read_pem(path: str, what: str, marker: str) -> None:
    """Refuse a file that cannot be read or holds no PEM block of ``marker`` (one line)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise TlsError(f"{path}: cannot read TLS {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise TlsError(f"{path}: TLS {what} is not a regular file")
    text = data.decode("ascii", errors="replace")
    if len(data) > _MAX_PEM or "-----BEGIN " not in text or marker not in text:
        raise TlsError(f"{path}: not a PEM {what} (expected a '-----BEGIN ...{marker}' block)")
    if what == "private key" and mode & 0o077:
        log.warning(
            "%s: TLS private key is accessible by group or others (mode %04o); run chmod 600 on it",
            path,
            stat.S_IMODE(mode),
        )


def _no_passphrase() -> bytes:
    raise TlsError("encrypted")


def _context(files: TlsFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False  # (see the module docstring: CA verification only)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0  # no resumption: every connection shows its certificate
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"{files.ca}: cannot load the TLS CA certificate: {_ssl_text(exc)}"
        ) from None
    try:
        ctx.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except TlsError:
        raise TlsError(
            f"{files.key}: the TLS private key is encrypted with a passphrase; mirrorfs needs "
            "an unencrypted key (readable by its user only)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", "") or ""
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{files.key}: the TLS private key does not match the certificate {files.cert}"
            ) from None
        raise TlsError(
            f"cannot load the TLS certificate {files.cert} with key {files.key}: {_ssl_text(exc)}"
        ) from None
    return ctx


def load_tls(files: TlsFiles) -> TlsConfig:
    """Check the files and build the client and server contexts (TlsError, one line)."""
    _read_pem(files.cert, "certificate", "CERTIFICATE-----")
    _read_pem(files.key, "private key", "PRIVATE KEY-----")
    _read_pem(files.ca, "CA certificate", "CERTIFICATE-----")
    return TlsConfig(files, _context(files, server=False), _context(files, server=True))


def _ssl_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------- reasons

# TLS alerts that a verifying peer sends about the certificate we showed it.
_CERT_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "not signed by its CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired or not yet valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate (its key usage?)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no certificate was sent",
}
# What OpenSSL says when the bytes it got are not TLS at all.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"}
_NO_TLS13 = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"}
_CA_HINTS = {
    "unable to get local issuer certificate",
    "self-signed certificate in certificate chain",
    "self signed certificate in certificate chain",
    "self-signed certificate",
    "self signed certificate",
}


def describe_failure(exc: BaseException, who: str, *, handshake: bool = False) -> str:
    """One line for a TLS failure with the peer ``who`` ("the target", "the source at X").

    ``exc`` is trio's BrokenResourceError (its ``__cause__`` the ssl error) or the ssl
    error itself; ``handshake``: it happened before the handshake completed.
    """
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if cause is None:
        return str(exc) or f"connection to {who} lost"
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or _ssl_text(cause)
        hint = " (not signed by this node's --tls-ca)" if why in _CA_HINTS else ""
        return f"TLS: the certificate of {who} failed verification: {why}{hint}"
    if isinstance(cause, ssl.SSLError):
        reason = str(cause.reason or "")
        if reason in _CERT_ALERTS:
            return f"TLS: {who} refused this node's certificate: {_CERT_ALERTS[reason]}"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return f"TLS: {who} sent no certificate"
        if reason in _NOT_TLS:
            return f"TLS: {who} does not speak TLS (is it running without --tls-cert?)"
        if reason in _NO_TLS13:
            return f"TLS: {who} does not speak TLS 1.3"
        if "ALERT" in reason:
            alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
            return f"TLS: {who} ended the connection with alert '{alert}'"
        if isinstance(cause, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            if handshake:
                return (
                    f"TLS: {who} closed the connection during the TLS handshake "
                    "(is it listening without TLS?)"
                )
            return f"TLS: {who} closed the connection without a TLS close_notify"
        return f"TLS error with {who}: {_ssl_text(cause)}"
    if isinstance(cause, OSError):
        text = cause.strerror or str(cause) or type(cause).__name__
        if handshake:
            return f"TLS handshake with {who} failed: {text}"
        return text  # (FramedStream says "connection lost: ...", as without TLS)
    return str(cause) or type(cause).__name__


async def _flush_alert(ssl_stream: trio.SSLStream) -> None:
    """Send the TLS alert that OpenSSL wrote when the handshake failed, best effort.

    trio.SSLStream raises before it sends what the failed step produced, so without this the
    peer would only see the connection close and could not say why. ``_outgoing`` is the
    stream's MemoryBIO (not public API; if trio renames it, the peer just sees the close).
    """
    bio = getattr(ssl_stream, "_outgoing", None)
    if not isinstance(bio, ssl.MemoryBIO) or not bio.pending:
        return
    with trio.move_on_after(_ALERT_GRACE):
        try:
            await ssl_stream.transport_stream.send_all(bio.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(_ALERT_GRACE):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass


# ---------------------------------------------------------------------------- streams


class TlsStream(trio.abc.Stream):
    """A ``trio.SSLStream`` whose failures carry a one-line reason (``describe_failure``)."""

    def __init__(self, ssl_stream: trio.SSLStream, who: str) -> None:
        self.ssl_stream = ssl_stream
        self.who = who
        self._pending_error: ssl.SSLError | None = None

    @property
    def socket(self) -> object:
        """The TCP socket underneath (for the peer's address)."""
        return getattr(self.ssl_stream.transport_stream, "socket", None)

    @property
    def cipher(self) -> str:
        got = self.ssl_stream.cipher()
        return f"{self.ssl_stream.version()} {got[0]}" if got else ""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ssl_stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise trio.BrokenResourceError(describe_failure(exc, self.who)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise trio.BrokenResourceError(describe_failure(exc, self.who)) from exc
        try:
            data = await self.ssl_stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise trio.BrokenResourceError(describe_failure(exc, self.who)) from exc
        if data and max_bytes is not None and len(data) < max_bytes:
            return self._drain(data, max_bytes)
        return data

    def _drain(self, data: bytes | bytearray, max_bytes: int) -> bytes | bytearray:
        """``data`` and the records already received behind it, up to ``max_bytes``.

        SSLStream.receive_some returns one TLS record (16 KiB) per call, each call a trip
        through the scheduler: a 1 MiB frame took 64 of them. The records that are already
        in the stream's incoming buffer are decrypted here in one synchronous step, the way
        SSLStream itself calls its SSLObject (no await while touching it). ``_ssl_object``
        is not public API: without it, this returns ``data`` as it is. An error is kept for
        the next call, so that the bytes before it are delivered first.
        """
        obj = getattr(self.ssl_stream, "_ssl_object", None)
        if not isinstance(obj, ssl.SSLObject):
            return data
        parts = [data]
        size = len(data)
        while size < max_bytes:
            try:
                more = obj.read(max_bytes - size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._pending_error = exc
                break
            if not more:
                break  # close_notify: the next receive_some returns b""
            parts.append(more)
            size += len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        # close_notify first (a clean end the peer can tell from a cut), never raising, and
        # bounded: callers close under a shield, and a peer that reads nothing more (full
        # socket buffers) would block the close_notify forever.
        with trio.move_on_after(_ALERT_GRACE) as scope:
            try:
                await self.ssl_stream.aclose()
            except (trio.BrokenResourceError, ssl.SSLError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.ssl_stream.transport_stream)


class _PlainStream(trio.abc.Stream):
    """A plain TCP stream of a listener without TLS that refuses a peer whose first bytes
    start a TLS handshake (BrokenResourceError with the reason, where the receiver's
    handshake reads them); otherwise a pass-through."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._checked = False

    @property
    def socket(self) -> object:
        return self.stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        if not self._checked and data:
            self._checked = True
            if data[0] == _TLS_RECORD_HANDSHAKE:
                raise trio.BrokenResourceError(
                    "the peer started a TLS handshake, and this replica listens without TLS "
                    "(give it --tls-cert, --tls-key and --tls-ca)"
                )
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Transport(trio.abc.Stream):
    """The TCP stream under an SSLStream: reads in large chunks (SSLStream asks for "some",
    which a SocketStream answers with at most 64 KiB: fewer trips for the bulk of the data,
    which flows to the target), and remembers the first bytes (to tell a plain mirrorfs peer
    from garbage when the server's handshake fails)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.first = b""

    @property
    def socket(self) -> object:
        return getattr(self.stream, "socket", None)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes or _TRANSPORT_READ)
        if len(self.first) < len(MAGIC):
            self.first += bytes(data[: len(MAGIC) - len(self.first)])
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


# ---------------------------------------------------------------------------- both sides


async def open_tls_stream(
    address: tuple[str, int], tls: TlsConfig, *, timeout: float = HANDSHAKE_TIMEOUT
) -> TlsStream:
    """Connect to the target at ``address`` and complete the TLS handshake.

    OSError when the connection fails; ``TlsFailure`` (an OSError) with the one-line reason
    when the handshake does, e.g. the target's certificate fails verification. A target
    that refuses *our* certificate does so after our side of the TLS 1.3 handshake is done:
    the first read then fails with that reason (``TlsStream``).
    """
    who = "the target"
    tcp = await trio.open_tcp_stream(*address)
    ssl_stream = trio.SSLStream(_Transport(tcp), tls.client, server_side=False)
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        await _close_quietly(tcp)
        raise TlsFailure(f"TLS handshake with {who} timed out after {timeout:g} s") from None
    except trio.BrokenResourceError as exc:
        await _flush_alert(ssl_stream)
        await _close_quietly(tcp)
        raise TlsFailure(describe_failure(exc, who, handshake=True)) from None
    except BaseException:
        await _close_quietly(tcp)
        raise
    return TlsStream(ssl_stream, who)


def connector(address: tuple[str, int], tls: TlsConfig | None) -> Connect | None:
    """The ``Shipper``'s connect factory for ``address``: TLS with ``tls``, else None (the
    shipper's own default, plain TCP)."""
    if tls is None:
        return None
    return functools.partial(open_tls_stream, address, tls)


def peer_address(stream: object) -> str:
    """``host:port`` of a socket stream's peer ("" when it has none)."""
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("", 0)  # type: ignore[attr-defined]
    except (OSError, ValueError, TypeError):
        return ""
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def accept(
    stream: trio.SocketStream,
    tls: TlsConfig | None,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> trio.abc.Stream | None:
    """The target's side of a new connection, before ``Receiver.serve``: the stream to
    serve, or None when the peer was refused (logged, one line; ``stream`` closed).

    Without ``tls`` the stream is served as it is, except that a peer starting a TLS
    handshake is refused at its first bytes. With ``tls``, the TLS handshake must complete
    within ``timeout``: a peer whose certificate fails verification, that sends none, or
    that is not TLS at all is refused here, before the receiver sees it.
    """
    if tls is None:
        return _PlainStream(stream)
    address = peer_address(stream) or "?"
    who = "the source"
    first = _Transport(stream)
    ssl_stream = trio.SSLStream(first, tls.server, server_side=True)
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        log.info("refusing peer at %s: no TLS handshake within %g s", address, timeout)
    except trio.BrokenResourceError as exc:
        if first.first.startswith(MAGIC):
            await _refuse_plain(stream, address)
        else:
            await _flush_alert(ssl_stream)
            log.warning(
                "refusing peer at %s: %s", address, describe_failure(exc, who, handshake=True)
            )
    except BaseException:  # cancelled (the listener stops): the socket goes too
        await _close_quietly(stream)
        raise
    else:
        log.debug("TLS from %s: %s %s", address, ssl_stream.version(), ssl_stream.cipher())
        return TlsStream(ssl_stream, who)
    await _close_quietly(stream)
    return None


async def _refuse_plain(stream: trio.abc.Stream, address: str) -> None:
    """A mirrorfs source without TLS: tell it, in its own clear-text frames, why."""
    text = "this target requires TLS: start the source with --tls-cert, --tls-key and --tls-ca"
    log.warning("refusing source at %s: it connected without TLS (%s)", address, text)
    with trio.move_on_after(_ALERT_GRACE):
        try:
            await stream.send_all(Refuse(RefuseReason.AUTH, text).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "TlsConfig",
    "TlsError",
    "TlsFailure",
    "TlsFiles",
    "TlsStream",
    "accept",
    "connector",
    "describe_failure",
    "load_tls",
    "open_tls_stream",
    "peer_address",
    "tls_files",
    "tls_from_args",
]
