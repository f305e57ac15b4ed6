"""Read the records of a W&B run file (`run-<id>.wandb`).

wandb 0.31 ships no Python reader for this file, so this module decodes its
framing and parses each record with `wandb.proto.wandb_internal_pb2.Record`.
The file starts with a 7-byte header; the rest is 32 KiB blocks of chunks.
Each chunk has a 7-byte header: the CRC-32 of its type byte and data, its
length (little-endian uint16) and its type (1 a whole record, 2 the first,
3 a middle and 4 the last piece of a longer one). A block tail too short
for a chunk header is padding.

W&B closes the run file a moment after `run.finish()` returns, so
`wait_until_closed` polls for the exit record, which is the last one.
"""

from __future__ import annotations

import collections
import os
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

FILE_HEADER = b":W&B\xe1\xbe\x00"
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_SIZE = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_record_bytes(data: bytes) -> Iterator[bytes]:
    """Yield the serialized records in the bytes of a run file.

    Stops quietly at a truncated or corrupt tail (a file still being
    written), so every yielded record is complete.

    Raises:
        ValueError: If `data` does not start with the run file header.
    """
    if not data.startswith(FILE_HEADER):
        raise ValueError(
            f"not a W&B run file: expected the header {FILE_HEADER!r}, got "
            f"{data[: len(FILE_HEADER)]!r}."
        )
    offset, pieces = len(FILE_HEADER), []
    while offset + CHUNK_HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_SIZE:
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        start = offset + CHUNK_HEADER_SIZE
        if kind == 0 and length == 0:
            offset += left_in_block  # zero padding up to the next block
            continue
        chunk = data[start : start + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != checksum:
            return
        offset = start + length
        if kind in (_FULL, _FIRST):
            pieces = [chunk]
        else:
            pieces.append(chunk)
        if kind in (_FULL, _LAST):
            yield b"".join(pieces)


def iter_records(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Yield the `wandb_internal_pb2.Record` messages of a run file.

    Args:
        path: A `run-<id>.wandb` file.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as file:
        data = file.read()
    for payload in iter_record_bytes(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def is_closed(path: str | os.PathLike[str]) -> bool:
    """Whether the run file ends with its exit record."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < len(FILE_HEADER):
        return False
    tail = collections.deque(iter_record_bytes(data), maxlen=1)
    if not tail:
        return False
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.ParseFromString(tail[0])
    return record.WhichOneof("record_type") == "exit"


def wait_until_closed(path: str | os.PathLike[str], timeout: float) -> bool:
    """Poll until the run file ends with its exit record.

    Args:
        path: A `run-<id>.wandb` file.
        timeout: Seconds to wait at most.

    Returns:
        Whether the file was closed in time.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not is_closed(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    return True
