"""The block file: fixed-size blocks moved by runs with os.pread/os.pwrite."""

from __future__ import annotations

import errno
import logging
import os

from mirrorfs.store.errors import VolumeError

log = logging.getLogger(__name__)


class BlockFile:
    """A file of ``block_count`` blocks of ``block_size`` bytes.

    Only ``store/inplace.py`` (``InPlaceBlocks``, the volume's ``device``) writes through
    it: this class has no notion of transactions, it just moves runs of blocks.
    """

    def __init__(self, path: str, block_size: int, block_count: int, *, read_only: bool = False):
        self.path = path
        self.block_size = block_size
        self.block_count = block_count
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except FileNotFoundError:
            raise VolumeError(f"{path}: block file is missing")
        except OSError as exc:
            raise VolumeError(f"{path}: cannot open block file: {exc.strerror}")
        size = os.fstat(self.fd).st_size
        if size != block_size * block_count:
            os.close(self.fd)
            raise VolumeError(
                f"{path}: block file is {size} bytes, expected {block_size * block_count}"
            )

    @staticmethod
    def create(path: str, size: int) -> None:
        """Create a sparse block file of ``size`` bytes (refuses to overwrite)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.block_count:
            raise ValueError(f"blocks {block}+{count} outside the volume ({self.block_count})")

    def read(self, block: int, count: int) -> bytes:
        self._check(block, count)
        want = count * self.block_size
        data = os.pread(self.fd, want, block * self.block_size)
        if len(data) != want:
            raise OSError(errno.EIO, f"short read of blocks {block}+{count} in {self.path}")
        return data

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        count = len(data) // self.block_size
        self._check(block, count)
        view = memoryview(data)
        pos = block * self.block_size
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
