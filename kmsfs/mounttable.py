"""Which kmsfs mounts exist: read from /proc/self/mounts (no FUSE needed)."""

from __future__ import annotations

from pathlib import Path


def is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def mounted_store_mountpoint(backing: Path) -> str | None:
    """Where the store is mounted (by this or another daemon), if anywhere."""
    fsname = f"kmsfs:{backing.resolve()}"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 1 and fields[0] == fsname:
                    return fields[1]
    except OSError:
        pass
    return None
