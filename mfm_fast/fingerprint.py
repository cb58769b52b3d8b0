"""Cheap content fingerprints of input files and directories (checkpoints, VAE folders, reward weights), recorded
by resumable runs so that a resume with other inputs behind the same paths is refused (`parallel_sample`).

A file's fingerprint hashes, with sha256: its size, its mtime_ns, and the bytes of its first and last MiB and of
`BLOCKS` evenly spaced 64 KiB blocks in between (the whole file when it is at most 2 MiB). A directory's hashes the
relative path and fingerprint of every regular file under it (symlinks to files followed, symlinked directories
not), sorted by relative path. It reads at most ~2.5 MiB per file whatever its size, so it is not a proof of
identity: it catches a replaced, re-downloaded, truncated or rewritten file, and also a copy or a `touch` (the
mtime is part of it), but not an in-place edit that keeps size and mtime and misses every sampled byte.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

VERSION = "fp1"
EDGE = 1 << 20  # the first and last MiB
BLOCK = 1 << 16  # 64 KiB
BLOCKS = 8  # evenly spaced blocks between the edges


def _file_digest(path: Path) -> str:
    st = path.stat()
    size = st.st_size
    h = hashlib.sha256(f"{size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        if size <= 2 * EDGE:
            h.update(f.read())
        else:
            spans = [(0, EDGE)]
            inner = size - 2 * EDGE - BLOCK  # block starts lie in [EDGE, size - EDGE - BLOCK]
            if inner >= 0:
                spans += [(EDGE + inner * (k + 1) // (BLOCKS + 1), BLOCK) for k in range(BLOCKS)]
            spans.append((size - EDGE, EDGE))
            for offset, length in spans:
                f.seek(offset)
                data = f.read(length)
                h.update(f"{offset}:{len(data)}:".encode())
                h.update(data)
    return h.hexdigest()


def fingerprint(path) -> str:
    """"fp1:<sha256 hex>" of a file or directory (module docstring); FileNotFoundError naming a missing path."""
    path = Path(path)
    if path.is_file():
        return f"{VERSION}:{_file_digest(path)}"
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {str(path)!r}: no such file or directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():  # regular files and symlinks to them (sockets, broken links: skipped)
                files.append(p.relative_to(path).as_posix())
    h = hashlib.sha256(b"dir")
    for rel in sorted(files):
        h.update(f"\n{rel}\0{_file_digest(path / rel)}".encode())
    return f"{VERSION}:{h.hexdigest()}"
