"""Walking the backing tree by directory descriptors (no PATH_MAX limit)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .store import STORE_DIR_NAME

log = logging.getLogger(__name__)


def iter_regular_files(backing: Path) -> Iterator[tuple[int, str, str]]:
    """(directory fd, name, display path) of every regular file below ``backing``."""
    root_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, str]] = [(root_fd, "")]
    try:
        while stack:
            dir_fd, prefix = stack.pop()
            try:
                with os.scandir(dir_fd) as entries:
                    items = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                             for e in entries]
                for name, is_dir, is_file in items:
                    if not prefix and name == STORE_DIR_NAME:
                        continue
                    if is_dir:
                        try:
                            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                            dir_fd=dir_fd)
                        except OSError as exc:
                            log.warning("cannot enter %s%s: %s", prefix, name, exc)
                            continue
                        stack.append((child, f"{prefix}{name}/"))
                    elif is_file:
                        yield dir_fd, name, prefix + name
            finally:
                if dir_fd != root_fd:
                    os.close(dir_fd)
    finally:
        os.close(root_fd)
        for fd, _ in stack:
            os.close(fd)
