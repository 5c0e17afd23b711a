"""Tar member offsets: where each sample's files lie inside an uncompressed tar shard.

Scanning reads only the 512-byte member headers (``tarfile`` seeks over the data of a regular
file), plus the small label members when asked, so indexing a 1 GB shard reads a few hundred KB.
Members group into samples exactly as WebDataset groups them (key = the name up to the first dot
of its base name, consecutive members with the same key form one sample; ``__*__`` names skipped).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_SKIP = re.compile(r"__[^/]*__($|/)")


@dataclass
class TarSample:
    """One sample of a shard: its key and, per lower-case extension, (data offset, size) in bytes."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def open_shard(path: str) -> BinaryIO:
    """Open a local shard for reading (the one place shards are opened by offset; tests count calls)."""
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def scan(path: str, handle: BinaryIO | None = None) -> Iterator[TarSample]:
    """Samples of an uncompressed tar in member order; ValueError naming ``path`` when it is not one."""
    own = handle is None
    handle = open_shard(path) if own else handle
    try:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as exc:
            raise ValueError(f"{path}: not an uncompressed tar file ({exc})") from None
        current: TarSample | None = None
        try:
            for info in tar:
                match = _KEY_EXT.match(info.name)
                if not info.isreg() or match is None or _SKIP.match(info.name):
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(key)
                if ext in current.members:
                    raise ValueError(f"{path}: duplicate member {info.name}")
                current.members[ext] = (info.offset_data, info.size)
        except tarfile.TarError as exc:
            raise ValueError(f"{path}: broken tar ({exc})") from None
        if current is not None:
            yield current
    finally:
        if own:
            handle.close()


def read_member(handle: BinaryIO, offset: int, size: int, where: str = "") -> bytes:
    """``size`` bytes at ``offset``; ValueError naming ``where`` when the file ends first."""
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"{where}: ends at byte {offset + len(data)}, the index expects {offset + size}")
    return data

