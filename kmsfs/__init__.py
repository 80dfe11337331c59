"""kmsfs: a FUSE filesystem with per-file envelope encryption under HSM-held keys."""

__version__ = "0.1.0"
