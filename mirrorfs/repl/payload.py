"""How message payloads are laid out: field codes, variable parts, and a checking reader.

A message class (mirrorfs.repl.messages) declares its payload as a layout string,
``"name:code ..."`` with struct codes for fixed fields (name ``-`` for a reserved field, 0 on
the wire) and ``_Part`` names for variable ones: ``str`` = u16 byte length + UTF-8 (node ids
<= 255 bytes, texts <= 1024 bytes); ``epochs`` = u32 count + count x (epoch u64, start_seq
u64), count <= 4096; ranges, digests, and the rest of the payload. ``_compile`` turns a
layout into struct runs and parts; ``_Reader`` reads a payload front to back and turns every
shortfall into a ProtocolError.
"""

from __future__ import annotations

import enum
import functools
import operator
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mirrorfs.repl.frames import MAX_FRAME, ProtocolError

UUID_SIZE = 16
NONCE_SIZE = 32
PROOF_SIZE = 32
DIGEST_SIZE = 32
ZERO_UUID = bytes(UUID_SIZE)
MAX_NODE_ID = 255
MAX_TEXT = 1024
MAX_EPOCHS = 4096
MAX_RANGES = 1 << 20
# Largest decompressed SYNC_BLOCKS data we agree to inflate (lz4 ratio is at most ~255).
MAX_SYNC_RAW = 256 * MAX_FRAME
# Largest SAM record a TXN frame can carry.
MAX_TXN_RECORD = MAX_FRAME - 8
#: A trailing REST field at least this large is decoded as a view of the frame's payload.
REST_VIEW_MIN = 64 << 10

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EPOCH = struct.Struct("<QQ")
_RANGE = struct.Struct("<QI")
_DIGEST = struct.Struct("<32s")


class _Reader:
    """Reads a payload front to back; every shortfall is a ProtocolError."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, buf: memoryview, what: str):
        self._buf = buf
        self._pos = 0
        self._what = what

    def fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._what} payload: {why}")

    def take(self, n: int) -> memoryview:
        if n > len(self._buf) - self._pos:
            raise self.fail(f"truncated at payload byte {self._pos}")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def count(self, item_size: int, limit: int) -> int:
        (n,) = self.unpack(_U32)
        # Checked before looping, so a huge count costs nothing.
        if n > limit or n * item_size > len(self._buf) - self._pos:
            raise self.fail(f"count {n} does not fit")
        return n

    def text(self, limit: int) -> str:
        (n,) = self.unpack(_U16)
        if n > limit:
            raise self.fail(f"string of {n} bytes exceeds {limit}")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8")

    def rest(self) -> bytes | memoryview:
        """The rest of the payload: a view when it is large and lies in immutable bytes
        (a TXN's record: no copy of megabytes), else bytes."""
        view = self._buf[self._pos :]
        self._pos = len(self._buf)
        if len(view) >= REST_VIEW_MIN and type(view.obj) is bytes:
            return view
        return bytes(view)

    def convert(self, cls: type[enum.IntEnum] | type[enum.IntFlag], value: int, name: str):
        if issubclass(cls, enum.IntFlag):
            known = functools.reduce(operator.or_, (m.value for m in cls), 0)
            if value & ~known:
                raise self.fail(f"unknown {name} bits {value & ~known:#x}")
            return cls(value)
        try:
            return cls(value)
        except ValueError:
            raise self.fail(f"unknown {name} {value}")

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise self.fail(f"{len(self._buf) - self._pos} trailing bytes")


def one_line(value: str) -> str:
    """``value`` as one line of at most MAX_TEXT UTF-8 bytes (cut at a character boundary).

    REFUSE and ERROR_STATE texts end up in logs and on terminals: one line, so that a peer
    cannot forge log lines.
    """
    raw = " ".join(value.split()).encode("utf-8")[:MAX_TEXT]
    return raw.decode("utf-8", "ignore")


def _write_text(value: str, limit: int) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"string of {len(raw)} bytes exceeds {limit}")
    return _U16.pack(len(raw)) + raw


def _write_list(items: Sequence, item: struct.Struct, limit: int, what: str) -> bytes:
    if len(items) > limit:
        raise ValueError(f"{len(items)} {what} exceed {limit}")
    return _U32.pack(len(items)) + b"".join(item.pack(*x) for x in items)


def _write_digests(items: Sequence[bytes]) -> bytes:
    if any(len(d) != DIGEST_SIZE for d in items):
        raise ValueError(f"digests must be {DIGEST_SIZE} bytes")
    return _write_list([(d,) for d in items], _DIGEST, MAX_RANGES, "digests")


def _write_rest(value: bytes) -> bytes:
    if not value:
        raise ValueError("empty data")
    return value


def _read_rest(r: _Reader) -> bytes | memoryview:
    value = r.rest()
    if not value:
        raise r.fail("empty data")
    return value


class _Part(enum.Enum):
    """Variable-length payload parts (module docstring); fixed parts are struct codes."""

    NODE_ID = "node_id"
    TEXT = "text"
    EPOCHS = "epochs"
    RANGES = "ranges"
    DIGESTS = "digests"
    REST = "rest"


_WRITERS: dict[_Part, Callable[[Any], bytes]] = {
    _Part.NODE_ID: lambda v: _write_text(v, MAX_NODE_ID),
    _Part.TEXT: lambda v: _write_text(v, MAX_TEXT),
    _Part.EPOCHS: lambda v: _write_list(v, _EPOCH, MAX_EPOCHS, "epochs"),
    _Part.RANGES: lambda v: _write_list(v, _RANGE, MAX_RANGES, "ranges"),
    _Part.DIGESTS: _write_digests,
    _Part.REST: _write_rest,
}
_READERS: dict[_Part, Callable[[_Reader], Any]] = {
    _Part.NODE_ID: lambda r: r.text(MAX_NODE_ID),
    _Part.TEXT: lambda r: r.text(MAX_TEXT),
    _Part.EPOCHS: lambda r: [r.unpack(_EPOCH) for _ in range(r.count(_EPOCH.size, MAX_EPOCHS))],
    _Part.RANGES: lambda r: [r.unpack(_RANGE) for _ in range(r.count(_RANGE.size, MAX_RANGES))],
    _Part.DIGESTS: lambda r: [
        bytes(r.take(DIGEST_SIZE)) for _ in range(r.count(DIGEST_SIZE, MAX_RANGES))
    ],
    _Part.REST: _read_rest,
}


@dataclass(slots=True, frozen=True)
class _Fixed:
    """Consecutive fixed-size fields, packed with one struct."""

    st: struct.Struct
    names: tuple[str | None, ...]  # None: a reserved field, 0 on the wire
    convs: tuple[type | None, ...]  # the enum a value converts to
    sizes: tuple[int | None, ...]  # byte length of "Ns" fields, checked on encode


_Segment = _Fixed | tuple[str, _Part]


def _compile(layout: str, enums: dict[str, type]) -> tuple[_Segment, ...]:
    """Parse a layout ("name:code ...", name "-" for reserved) into struct runs and parts."""
    segments: list[_Segment] = []
    run: list[tuple[str | None, str]] = []

    def flush() -> None:
        if run:
            st = struct.Struct("<" + "".join(code for _, code in run))
            names = tuple(name for name, _ in run)
            convs = tuple(enums.get(name) if name else None for name in names)
            sizes = tuple(int(code[:-1]) if code.endswith("s") else None for _, code in run)
            segments.append(_Fixed(st, names, convs, sizes))
            run.clear()

    for token in layout.split():
        name, code = token.split(":")
        if code in _Part.__members__:
            flush()
            segments.append((name, _Part[code]))
        else:
            run.append((None if name == "-" else name, code))
    flush()
    return tuple(segments)
