"""Read the files inside a compiled Qt resource file (``.rcc``), the way GCompris ships its images.

The format (Qt's ``rcc``, versions 1-3): a ``qres`` header with the offsets of three tables; a tree of nodes (a
directory lists its children, a file points at its data); names as UTF-16; data as a 4-byte size and the bytes,
zlib-compressed behind a 4-byte length when the node's flag says so. No Qt needed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_DIRECTORY, _ZLIB, _ZSTD = 0x02, 0x01, 0x04


def read_rcc(path: Path) -> dict[str, bytes]:
    """Every file in the resource file at ``path``: {"folder/name.webp": bytes}."""
    blob = Path(path).read_bytes()
    if blob[:4] != b"qres":
        raise ValueError(f"{path} is not a Qt resource file (no 'qres' header)")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 22 if version >= 2 else 14  # version 2 added an 8-byte modification time

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset:names + offset + 2])
        start = names + offset + 6  # length, then a 4-byte hash, then the characters
        return blob[start:start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", blob[at:at + 6])
        path_here = f"{prefix}{name(name_offset)}" if index else ""
        if flags & _DIRECTORY:
            count, first = struct.unpack(">II", blob[at + 6:at + 14])
            stack += [(child, f"{path_here}/" if index else "") for child in range(first, first + count)]
            continue
        (offset,) = struct.unpack(">I", blob[at + 10:at + 14])
        (size,) = struct.unpack(">I", blob[data + offset:data + offset + 4])
        raw = blob[data + offset + 4:data + offset + 4 + size]
        if flags & _ZSTD:
            raise ValueError(f"{path}: {path_here} is zstd-compressed, which this reader does not handle")
        files[path_here] = zlib.decompress(raw[4:]) if flags & _ZLIB else raw
    return files
