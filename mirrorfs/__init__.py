"""mirrorfs: a mirrored filesystem volume for Linux (block-level SAM log mirroring on FUSE)."""

__version__ = "0.1.0"
