"""The samples npz (`arr_0`, uint8 NHWC, index order), written by all ranks at once.

np.savez stores `arr_0.npy` uncompressed in a zip file, so its rows lie at fixed byte offsets:
the zip entry's header, the .npy header, then N·H·W·3 bytes. Rank 0 creates the file with both
headers; every rank writes its own contiguous block of rows at their offset and returns the
block's CRC-32; rank 0 combines the W CRCs (zlib's crc32_combine, in GF(2)), writes the CRC into
the header and appends the zip's central directory. No rank reads all N samples: each reads
N/W PNGs, and rank 0's own serial part is O(W) arithmetic and a few hundred bytes. The result
is the file np.savez writes (one zip64 entry) and loads with np.load.
"""
from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEMBER = b"arr_0.npy"
CRC_OFFSET = 14  # of the CRC-32 field in a zip local file header
ZIP64_VERSION = 45
UNKNOWN32 = 0xFFFFFFFF  # a 32-bit zip field whose value is in the zip64 extra field
DOS_DATE_1980 = (0, 1 << 5 | 1)  # (time, date) fields: 1980-01-01 00:00, np.savez's own is "now"


def _zip64_extra(size: int) -> bytes:
    return struct.pack("<HHQQ", 1, 16, size, size)  # uncompressed and compressed size


def local_header(crc: int, size: int) -> bytes:
    """The zip local file header of a stored (uncompressed) zip64 member of `size` bytes."""
    return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", ZIP64_VERSION, 0, 0, 0, *DOS_DATE_1980, crc,
                       UNKNOWN32, UNKNOWN32, len(MEMBER), 20) + MEMBER + _zip64_extra(size)


def central_directory(crc: int, size: int, cd_offset: int) -> bytes:
    """Central directory entry, zip64 end record and locator, end record: the file's tail."""
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", ZIP64_VERSION, 3, ZIP64_VERSION, 0, 0, 0,
                        *DOS_DATE_1980, crc, UNKNOWN32, UNKNOWN32, len(MEMBER), 20, 0, 0, 0,
                        0o100644 << 16, 0) + MEMBER + _zip64_extra(size)
    end64_offset = cd_offset + len(entry)
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, ZIP64_VERSION, ZIP64_VERSION, 0, 0, 1, 1,
                        len(entry), cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end64_offset, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(entry), UNKNOWN32, 0)
    return entry + end64 + locator + end


def npy_header(n: int, h: int, w: int) -> bytes:
    import io
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, h, w, 3)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


@dataclass(frozen=True)
class NpzLayout:
    """Where each part of the npz of N samples of H×W lies."""
    n: int
    h: int
    w: int

    @property
    def row_bytes(self) -> int:
        return self.h * self.w * 3

    @property
    def member_size(self) -> int:
        return len(npy_header(self.n, self.h, self.w)) + self.n * self.row_bytes

    @property
    def rows_offset(self) -> int:
        """Offset of row 0: after the local header and the .npy header."""
        return len(local_header(0, self.member_size)) + len(npy_header(self.n, self.h, self.w))

    @property
    def end_of_rows(self) -> int:
        return self.rows_offset + self.n * self.row_bytes


# ---- CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine) ------------

def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return total


def _gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator 'b, then a'."""
    return tuple(_gf2_times(a, column) for column in b)


@functools.lru_cache(maxsize=16)
def _zero_bytes_operator(length: int) -> tuple[int, ...]:
    """The linear map that moves a CRC register over `length` zero bytes. Blocks come in at most
    two lengths (shares differ by one row), so each is built once."""
    one_bit = (0xEDB88320, *(1 << k for k in range(31)))  # the reflected CRC-32 polynomial
    power = _gf2_compose(one_bit, one_bit)
    power = _gf2_compose(power, power)
    power = _gf2_compose(power, power)  # one zero byte
    result = tuple(1 << k for k in range(32))
    while length:
        if length & 1:
            result = _gf2_compose(power, result)
        power, length = _gf2_compose(power, power), length >> 1
    return result


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _gf2_times(_zero_bytes_operator(length_b), crc_a) ^ crc_b


def combined_crc(parts: Iterable[tuple[int, int]]) -> int:
    """CRC-32 of the concatenation of parts given as (crc, length), in order."""
    crc = 0
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
    return crc


# ---- the three steps -------------------------------------------------------------------------

def create(path: Path, layout: NpzLayout) -> None:
    """Rank 0, before any rank writes rows: both headers (CRC to come), the file at full size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, local_header(0, layout.member_size) + npy_header(layout.n, layout.h, layout.w), 0)
        os.ftruncate(fd, layout.end_of_rows)
    finally:
        os.close(fd)


def write_rows(path: Path, layout: NpzLayout, rows: range, read_row: Callable[[int], bytes]) -> tuple[int, int]:
    """Write rows `rows` (one rank's contiguous block) in place, fsynced; returns (crc, length)
    of its bytes. The .npy header's bytes count as part of rank 0's block."""
    import zlib
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # never truncates: rank 0's `create` came first
    try:
        crc, length = 0, 0
        if rows.start == 0:
            head = npy_header(layout.n, layout.h, layout.w)
            crc, length = zlib.crc32(head), len(head)
        for i in rows:
            data = read_row(i)
            if len(data) != layout.row_bytes:
                raise ValueError(f"sample {i}: {len(data)} bytes, expected {layout.row_bytes}")
            os.pwrite(fd, data, layout.rows_offset + i * layout.row_bytes)
            crc, length = zlib.crc32(data, crc), length + len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return crc, length


def finish(path: Path, layout: NpzLayout, parts: Iterable[tuple[int, int]]) -> None:
    """Rank 0, after every rank's rows: the member's CRC into its header, the central directory
    after the rows, fsynced."""
    crc = combined_crc(parts)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack("<L", crc), CRC_OFFSET)
        os.pwrite(fd, central_directory(crc, layout.member_size, layout.end_of_rows), layout.end_of_rows)
        os.fsync(fd)
    finally:
        os.close(fd)
