"""Mutual authentication of replication peers, and the policy for listening without it.

Both sides hold the same secret (a file, ``load_secret``). Each sends a fresh 32-byte nonce
(HELLO, HELLO_REPLY) and proves knowledge of the secret over the *other* side's nonce::

    proof = HMAC-SHA256(secret, label(role) || role || own nonce || peer nonce
                                || volume uuid || own node id || peer node id)

with every variable-length field prefixed by its u16 length. The label and the role byte
differ between the source's proof (AUTH) and the target's (HELLO_REPLY), and the own/peer
order differs too, so a proof can neither be reflected back to its sender nor replayed in
another session (the peer's nonce is fresh). ``volume uuid`` is the one the source announced
in HELLO (a target that is still empty has none of its own).

Without a secret (allowed on loopback only, see ``check_listen_policy``) the proof is 32 zero
bytes; a side with a secret refuses it, and a side without one refuses a real proof, so a
configuration where only one side has a secret fails the handshake with a clear reason.

What this does not give: confidentiality or integrity of the frames after the handshake (a
man in the middle could hijack the authenticated stream). TLS (``--tls-cert``, ``--tls-key``,
``--tls-ca``: mirrorfs.repl.tls) gives both; the proof then runs inside it. For the loopback
rules below, TLS counts as authentication (its certificates are verified both ways).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import stat
import struct

from mirrorfs.repl.wire import NONCE_SIZE, PROOF_SIZE, UUID_SIZE, ReplError

log = logging.getLogger(__name__)

NO_PROOF = bytes(PROOF_SIZE)
MAX_SECRET = 4096
# Secrets shorter than this are accepted with a warning: an HMAC key this short is guessable.
WEAK_SECRET = 16
_LABELS = {
    "source": b"mirrorfs/repl/auth/v1 source proof",
    "target": b"mirrorfs/repl/auth/v1 target proof",
}


class AuthRole(enum.Enum):
    """Who computes a proof (its role byte is part of the MAC'd data)."""

    SOURCE = "source"
    TARGET = "target"


class SecretError(ReplError):
    """The secret file is missing, empty, too open or unreadable (one-line message)."""


class ListenPolicyError(ReplError):
    """Listening on a non-loopback address without a secret and without --insecure."""


class PeerPolicyError(ReplError):
    """Shipping to a non-loopback address without a secret and without --insecure."""


def _field(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


def compute_proof(
    secret: bytes | None,
    role: AuthRole,
    *,
    own_nonce: bytes,
    peer_nonce: bytes,
    volume_uuid: bytes,
    own_node_id: str,
    peer_node_id: str,
) -> bytes:
    """The 32-byte proof that ``role`` sends (NO_PROOF when there is no secret)."""
    if len(own_nonce) != NONCE_SIZE or len(peer_nonce) != NONCE_SIZE:
        raise ValueError(f"nonces must be {NONCE_SIZE} bytes")
    if len(volume_uuid) != UUID_SIZE:
        raise ValueError(f"volume uuid must be {UUID_SIZE} bytes")
    if secret is None:
        return NO_PROOF
    msg = b"".join(
        (
            _field(_LABELS[role.value]),
            bytes([1 if role is AuthRole.SOURCE else 2]),
            own_nonce,
            peer_nonce,
            volume_uuid,
            _field(own_node_id.encode("utf-8")),
            _field(peer_node_id.encode("utf-8")),
        )
    )
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify_proof(
    secret: bytes | None,
    proof: bytes,
    role: AuthRole,
    *,
    own_nonce: bytes,
    peer_nonce: bytes,
    volume_uuid: bytes,
    own_node_id: str,
    peer_node_id: str,
) -> bool:
    """Whether ``proof`` is what ``role`` must send; the arguments are from ITS point of view.

    (The verifier passes the prover's nonce as ``own_nonce`` and its own as ``peer_nonce``.)
    Constant-time comparison.
    """
    expected = compute_proof(
        secret,
        role,
        own_nonce=own_nonce,
        peer_nonce=peer_nonce,
        volume_uuid=volume_uuid,
        own_node_id=own_node_id,
        peer_node_id=peer_node_id,
    )
    return hmac.compare_digest(expected, proof)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The shared secret in file ``path`` (trailing newline and spaces stripped).

    Refuses (SecretError, one line) a missing or unreadable file, an empty one, one larger
    than MAX_SECRET, and one that group or others may read: the secret is as good as the
    file's protection.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"{path}: cannot open secret file: {exc.strerror}")
    try:
        # fstat the open file, not the path, so the check is about what we read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path}: secret file is not a regular file")
        if st.st_mode & 0o077:
            raise SecretError(
                f"{path}: secret file is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it"
            )
        data = os.read(fd, MAX_SECRET + 1)
    except OSError as exc:
        raise SecretError(f"{path}: cannot read secret file: {exc.strerror}")
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise SecretError(f"{path}: secret file is larger than {MAX_SECRET} bytes")
    secret = data.rstrip(b" \t\r\n")
    if not secret:
        raise SecretError(f"{path}: secret file is empty")
    if len(secret) < WEAK_SECRET:
        log.warning("%s: secret is only %d bytes; use at least %d", path, len(secret), WEAK_SECRET)
    return secret


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: 127.0.0.0/8, ::1 or localhost.

    Other names are not resolved: a name could point anywhere, so it counts as not loopback.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if name in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        addr = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_listen_policy(
    host: str, secret: bytes | None, insecure: bool, *, tls: bool = False
) -> None:
    """Refuse to listen on a reachable address without authentication.

    Without a secret or TLS (``tls``: mutual certificate verification, mirrorfs.repl.tls),
    only loopback addresses are allowed, unless ``insecure`` says the operator wants it
    anyway (then a warning is logged). An empty host or 0.0.0.0 / :: means every interface
    and is not loopback.
    """
    if secret is not None or tls or is_loopback(host):
        return
    where = host or "all interfaces"
    if insecure:
        log.warning("listening on %s without authentication (--insecure)", where)
        return
    raise ListenPolicyError(
        f"refusing to listen on {where} without a shared secret: give a secret file, "
        "listen on 127.0.0.1, or pass --insecure"
    )


def check_peer_policy(
    host: str, port: int, secret: bytes | None, insecure: bool, *, tls: bool = False
) -> None:
    """Refuse to ship a volume to a reachable address without authentication: the same
    rule as ``check_listen_policy`` (a secret or TLS), on the source's side, checked before
    any connection."""
    if secret is not None or tls or is_loopback(host):
        return
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if insecure:
        log.warning("mirroring to %s without authentication (--insecure)", where)
        return
    raise PeerPolicyError(
        f"refusing to mirror to {where} without a shared secret: give --secret-file, "
        "use a loopback address, or pass --insecure"
    )
