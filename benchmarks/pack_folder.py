"""Pack a folder of many small files into one file, and back; for carrying an image-folder dataset to a machine
that receives a size-limited copy of the checkout (a tar's 512-byte headers and padding would double CIFAR-10's
60,000 JPEGs of ~900 bytes each).

Format: ``PACKDIR1``, the length of the index (8 bytes, little-endian), the index (zlib-compressed JSON:
``[[relative path, size, mtime in seconds], ...]`` in sorted order), then every file's bytes, concatenated in index
order.
Regular files only: links and empty folders are not stored.

    python benchmarks/pack_folder.py pack ../shared/data/cifar10-jpeg .gpu/cifar10-jpeg.pack
    python benchmarks/pack_folder.py unpack .gpu/cifar10-jpeg.pack /tmp/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
import zlib
from pathlib import Path

MAGIC = b"PACKDIR1"


def pack(source: Path, target: Path) -> tuple[int, int]:
    """Write every regular file below ``source`` into ``target``; returns (files, bytes of file content)."""
    if not source.is_dir():
        raise SystemExit(f"error: {source} is not a folder")
    entries = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            stat = path.stat()
            entries.append((path, path.relative_to(source).as_posix(), stat.st_size, int(stat.st_mtime)))
    index = zlib.compress(json.dumps([[rel, size, mtime] for _, rel, size, mtime in entries]).encode(), 9)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        out.write(MAGIC + struct.pack("<Q", len(index)) + index)
        for path, _, size, _ in entries:
            data = path.read_bytes()
            if len(data) != size:
                raise SystemExit(f"error: {path} changed while packing")
            out.write(data)
    partial.replace(target)
    return len(entries), sum(size for _, _, size, _ in entries)


def unpack(source: Path, target: Path) -> tuple[int, int]:
    """Recreate the packed tree under ``target`` (created; existing files of the same names are replaced)."""
    with open(source, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SystemExit(f"error: {source} is not a pack written by pack_folder.py")
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(zlib.decompress(f.read(length)))
        data = memoryview(f.read())
    if sum(size for _, size, _ in entries) != len(data):
        raise SystemExit(f"error: {source} is truncated or corrupt (content size differs from its index)")
    for folder in sorted({os.path.dirname(rel) for rel, _, _ in entries}):
        (target / folder).mkdir(parents=True, exist_ok=True)
    offset = 0
    for rel, size, mtime in entries:
        path = target / rel
        with open(path, "wb") as out:
            out.write(data[offset : offset + size])
        os.utime(path, (mtime, mtime))
        offset += size
    return len(entries), offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="pack folder SRC into FILE")
    packing.add_argument("src", type=Path)
    packing.add_argument("file", type=Path)
    unpacking = commands.add_parser("unpack", help="unpack FILE into folder DEST")
    unpacking.add_argument("file", type=Path)
    unpacking.add_argument("dest", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.command == "pack":
        files, size = pack(args.src, args.file)
        written = args.file.stat().st_size
        done = f"packed {files} files ({size / 2**20:.1f} MiB) into {args.file} ({written / 2**20:.1f} MiB)"
    else:
        files, size = unpack(args.file, args.dest)
        done = f"unpacked {files} files ({size / 2**20:.1f} MiB) into {args.dest}"
    print(f"{done} in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
