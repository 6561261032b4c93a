"""TCP addresses as the user writes them: ``HOST:PORT``, ``[v6addr]:PORT``.

Two readings, one place:

- a peer to connect to (``--mirror``, ``--to``, ``mirror --add``, a switchover's
  ``mirror_to``): ``parse_address``; a host is required, the port is 1..65535, and the
  brackets of an IPv6 address are optional (``::1:7000`` is host ``::1``, port 7000);
- where to listen (``replica --listen``, ``switchover --listen``): ``parse_listen``; an
  empty host means every interface (``:7000``), port 0 asks for any free port, and an IPv6
  address must be bracketed (``::1:7000`` is ambiguous, so refused).

The error messages are the command line's (``AddressError``, a ValueError). A port that
``str.isdigit`` accepts but ``int`` does not (``²``) fails with int's own ValueError.
"""

from __future__ import annotations


class AddressError(ValueError):
    """A malformed address; the message says what form is expected."""


def parse_address(text: str) -> tuple[str, int]:
    """A peer's ``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"bad address {text!r}: expected HOST:PORT")
    return host, int(port)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6addr]:PORT`` or ``:PORT`` (every interface) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise AddressError(f"invalid listen address {text!r} (expected HOST:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"invalid listen address {text!r} (write IPv6 as [ADDR]:PORT)")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets (what both parsers read back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
