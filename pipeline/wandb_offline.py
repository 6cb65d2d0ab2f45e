"""Read an offline W&B run's records back from its own `run-*.wandb` file, without the network or the W&B server.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version) followed by 32 KiB blocks of
LevelDB-log-style chunks (crc32 u32, length u16, type u8: full/first/middle/last), each record a protobuf `Record`.
wandb 0.31 no longer ships a Python reader, so this is a small one; the format version is checked.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {ident!r} {magic:#x} v{version})")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pos += CHUNK.size
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left - CHUNK.size
            continue
        if pos + length > len(data):  # a chunk still being written: the log ends before it
            return
        payload = data[pos:pos + length]
        pos += length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def read_history(path: str | Path) -> list[dict]:
    """Every `history` row logged to the run, as {key: value} dicts (values JSON-decoded)."""
    from wandb.proto import wandb_internal_pb2 as pb
    rows = []
    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def has_exit_record(path: str | Path) -> bool:
    """Whether the run's log holds its final `exit` record (written when the run finishes)."""
    from wandb.proto import wandb_internal_pb2 as pb
    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def find_run_file(run_dir: str | Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {Path(run_dir) / 'wandb'}")
    return files[-1]
