"""Readers for the original event-camera recordings: jAER AEDAT 2.0, AEDAT 3.1, the ATIS ``.bin``
of N-MNIST and N-Caltech101, and ``.npy`` event arrays as tonic writes them.

Both return a structured array with fields ``t`` (int64 microseconds, unwrapped but not rebased),
``x`` (int16 column), ``y`` (int16 row) and ``p`` (int8, 0 = OFF, 1 = ON), in file order. Whole
bodies and whole packets are decoded with numpy; nothing loops over events in Python.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

__all__ = ["EVENT_DTYPE", "read_aedat2", "read_aedat31", "read_atis_bin", "read_npy", "read_gesture_labels",
           "READERS"]

# Aligned (16 bytes a record): numpy's loops over unaligned int64 fields are several times slower.
EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")], align=True)

_AEDAT2_RECORD = np.dtype([("address", ">u4"), ("timestamp", ">u4")])
_AEDAT31_PACKET = struct.Struct("<hhiiiiii")  # type, source, size, tsOffset, tsOverflow, capacity, number, valid
_AEDAT31_POLARITY = np.dtype([("data", "<u4"), ("timestamp", "<i4")])
_POLARITY_EVENT = 1


def _split_header(data, path, version: str, end_line: bytes | None = None) -> int:
    """Check the ``#!AER-DAT<version>`` header and return the offset where the body starts.

    The header is the run of lines starting with ``#``. With ``end_line`` the header must end
    with that line (AEDAT 3.1's ``#!END-HEADER``) and the body starts right after it.
    """
    magic = b"#!AER-DAT"
    if data[:len(magic)] != magic:
        raise ValueError(f"{path}: missing '#!AER-DAT' header; not an AEDAT file")
    pos = 0
    while data[pos:pos + 1] == b"#":
        newline = data.find(b"\n", pos)
        if newline < 0:
            raise ValueError(f"{path}: header line at byte {pos} has no line end (truncated header)")
        line, pos = bytes(data[pos:newline]).strip(), newline + 1
        if line.startswith(magic) and line[len(magic):].decode("ascii", "replace") != version:
            raise ValueError(f"{path}: AEDAT version {line[len(magic):].decode('ascii', 'replace')!r} "
                             f"is not supported here (expected {version})")
        if end_line is not None and line == end_line:
            return pos
    if end_line is not None:
        raise ValueError(f"{path}: header has no {end_line.decode()!r} line")
    return pos


def _read(path):
    """The file's bytes, memory-mapped: no copy of the body is made."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def unwrap_timestamps(t: np.ndarray) -> None:
    """In place: add 2**32 after each backwards jump larger than 2**31 (int64 copies of uint32 times)."""
    back = np.flatnonzero(t[1:] < t[:-1])  # usually empty: one cheap pass
    wraps = back[t[back] - t[back + 1] > 2**31]
    if len(wraps):
        step = np.zeros(len(t), dtype=np.int64)
        step[wraps + 1] = 2**32
        t += np.cumsum(step)


def read_aedat2(path) -> np.ndarray:
    """Decode a jAER AEDAT 2.0 DVS128 recording (CIFAR10-DVS) in tetsnn's orientation.

    Records are big-endian ``uint32 address, uint32 timestamp``; ``x = 127 - ((a >> 1) & 0x7F)``,
    ``y = (a >> 8) & 0x7F`` and ``p = 1 - (a & 1)``.
    """
    data = _read(path)
    start = _split_header(data, path, "2.0")
    size = len(data) - start
    if size % _AEDAT2_RECORD.itemsize:
        raise ValueError(f"{path}: body of {size} bytes is not a multiple of the "
                         f"{_AEDAT2_RECORD.itemsize}-byte record (truncated or corrupt file)")
    if size == 0:
        raise ValueError(f"{path}: empty recording (no events)")
    records = np.frombuffer(data, _AEDAT2_RECORD, offset=start)
    # The address is big-endian: byte 3 of a record holds bits 0-7, byte 2 bits 8-15. Working on
    # those bytes skips a byte swap and keeps the arithmetic in uint8.
    address = np.frombuffer(data, np.uint8, offset=start).reshape(-1, _AEDAT2_RECORD.itemsize)
    bits0_7, bits8_15 = address[:, 3], address[:, 2]
    events = np.empty(len(records), dtype=EVENT_DTYPE)
    events["t"] = records["timestamp"]
    unwrap_timestamps(events["t"])
    events["x"] = 127 - (bits0_7 >> 1)  # bits 1-7: the shift already clears bit 7
    events["y"] = bits8_15 & 0x7F
    events["p"] = 1 - (bits0_7 & 1)
    return events


def _polarity_packets(data: bytes, start: int, path):
    """Yield ``(offset, count, overflow)`` for each polarity packet after the header."""
    pos = start
    while pos < len(data):
        if len(data) - pos < _AEDAT31_PACKET.size:
            raise ValueError(f"{path}: truncated packet header at byte {pos} "
                             f"({len(data) - pos} of {_AEDAT31_PACKET.size} bytes)")
        kind, _, size, _, overflow, capacity, number, _ = _AEDAT31_PACKET.unpack_from(data, pos)
        body = pos + _AEDAT31_PACKET.size
        if size <= 0 or capacity < 0 or not 0 <= number <= capacity:
            raise ValueError(f"{path}: corrupt packet header at byte {pos} "
                             f"(eventSize {size}, eventCapacity {capacity}, eventNumber {number})")
        if body + size * capacity > len(data):
            raise ValueError(f"{path}: packet at byte {pos} needs {size * capacity} body bytes, "
                             f"{len(data) - body} left (truncated or corrupt file)")
        if kind == _POLARITY_EVENT:
            if size != _AEDAT31_POLARITY.itemsize:
                raise ValueError(f"{path}: polarity packet at byte {pos} has eventSize {size}, expected 8")
            yield body, number, overflow
        pos = body + size * capacity


def read_aedat31(path) -> np.ndarray:
    """Decode the polarity events of an AEDAT 3.1 recording (DVS128 Gesture).

    Packets of other types are skipped; events whose valid bit is clear are dropped.
    ``x = (d >> 17) & 0x7FFF``, ``y = (d >> 2) & 0x7FFF``, ``p = (d >> 1) & 1`` and
    ``t = timestamp | (eventTSOverflow << 31)``.
    """
    data = _read(path)
    packets = list(_polarity_packets(data, _split_header(data, path, "3.1", b"#!END-HEADER"), path))
    records = [np.frombuffer(data, _AEDAT31_POLARITY, count=n, offset=o) for o, n, _ in packets]
    records = np.concatenate(records) if records else np.empty(0, _AEDAT31_POLARITY)
    overflow = np.repeat(np.array([v for _, _, v in packets], dtype=np.int64),
                         [n for _, n, _ in packets])
    valid = (records["data"] & 1).astype(bool)
    if not valid.any():
        raise ValueError(f"{path}: empty recording (no valid polarity events)")
    d = records["data"][valid]
    events = np.empty(len(d), dtype=EVENT_DTYPE)
    events["t"] = records["timestamp"][valid]
    events["t"] |= overflow[valid] << 31
    events["x"] = (d >> 17) & 0x7FFF
    events["y"] = (d >> 2) & 0x7FFF
    events["p"] = (d >> 1) & 1
    return events


def read_gesture_labels(path) -> np.ndarray:
    """Read a DVS128 Gesture ``*_labels.csv``: one ``(label, start, end)`` row per sample.

    Labels are the file's classes 1..11 minus one; a sample is the events with
    ``start <= t < end`` (microseconds of device time).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: labels file not found")
    rows = []
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip().lower().startswith("class"):
        raise ValueError(f"{path}, line 1: expected the header 'class,startTime_usec,endTime_usec'")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [s.strip() for s in line.split(",")]
        try:
            label, start, end = (int(s) for s in fields)
        except ValueError:
            raise ValueError(f"{path}, line {number}: malformed row {line!r} "
                             f"(expected three integers: class,startTime_usec,endTime_usec)") from None
        if not 1 <= label <= 11 or end <= start:
            raise ValueError(f"{path}, line {number}: bad row {line!r} "
                             f"(class must be 1..11 and endTime after startTime)")
        rows.append((label - 1, start, end, number))
    if not rows:
        raise ValueError(f"{path}: no label rows")
    return np.array(rows, dtype=np.int64)


def _empty(path):
    return ValueError(f"{path}: empty recording (no events)")


_ATIS_RECORD = 5
_ATIS_OVERFLOW_Y = 240
_ATIS_OVERFLOW_STEP = 2**13


def read_atis_bin(path) -> np.ndarray:
    """Decode an ATIS ``.bin`` recording (N-MNIST, N-Caltech101).

    No header; 5 bytes per record, big-endian bit order: byte 0 = x, byte 1 = y, bit 7 of byte 2 =
    polarity (1 ON), ``t = ((b2 & 0x7F) << 16) | (b3 << 8) | b4`` (23 bits, microseconds). A record
    whose y byte is 240 is a timestamp-overflow marker, not an event: every later record's ``t``
    gains 2**13 (the rule of the datasets' own reader), and the marker is dropped.
    """
    data = _read(path)
    if len(data) % _ATIS_RECORD:
        raise ValueError(f"{path}: {len(data)} bytes is not a multiple of the {_ATIS_RECORD}-byte "
                         f"ATIS record (truncated or corrupt file)")
    n = len(data) // _ATIS_RECORD
    if n == 0:
        raise _empty(path)
    raw = np.frombuffer(data, np.uint8).reshape(n, _ATIS_RECORD)
    # Bytes 1-4 of each record as one big-endian word (a strided view, no copy): t = bits 0-22.
    word = np.ndarray((n,), ">u4", data, offset=1, strides=(_ATIS_RECORD,))
    markers = np.flatnonzero(raw[:, 1] == _ATIS_OVERFLOW_Y)
    if len(markers) == n:
        raise _empty(path)
    events = np.empty(n - len(markers), dtype=EVENT_DTYPE)
    # The records between marker k-1 and marker k (k = 0, 1, ...) are events whose t gains
    # k * 2**13. A marker stands for 2**13 us of recording, so there are few runs: decoding run
    # by run copies nothing and skips the markers.
    starts, ends = np.append(0, markers + 1).tolist(), np.append(markers, n).tolist()
    out = 0
    for k, (a, b) in enumerate(zip(starts, ends)):
        run = events[out:out + b - a]
        np.bitwise_and(word[a:b], 0x7FFFFF, out=run["t"], casting="unsafe")
        if k:
            run["t"] += k * _ATIS_OVERFLOW_STEP
        run["x"] = raw[a:b, 0]
        run["y"] = raw[a:b, 1]
        np.right_shift(raw[a:b, 2], 7, out=run["p"].view(np.uint8))
        out += b - a
    return events


_NPY_FIELDS = ("t", "x", "y", "p")


def read_npy(path) -> np.ndarray:
    """Read a ``.npy`` structured array with integer fields t, x, y, p (tonic's layout; ``p`` 0/1
    or bool) into tetsnn's event dtype. Values that do not fit (negative or over 32,767 pixels, a
    polarity other than 0/1) are an error naming the file, never wrapped around."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as error:   # a damaged header can fail inside numpy's header parser (TokenError, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: not a readable .npy array ({reason})") from None
    names = array.dtype.names or ()
    missing = [f for f in _NPY_FIELDS if f not in names]
    if missing or array.ndim != 1:
        raise ValueError(f"{path}: expected a 1-d structured array with fields t, x, y, p, got "
                         f"dtype {array.dtype} and shape {array.shape}")
    if len(array) == 0:
        raise _empty(path)
    limits = {"t": (None, None), "x": (0, 2**15 - 1), "y": (0, 2**15 - 1), "p": (0, 1)}
    events = np.empty(len(array), dtype=EVENT_DTYPE)
    for name, (low, high) in limits.items():
        field = array[name]
        if field.dtype.kind not in "iub":
            raise ValueError(f"{path}: field {name!r} must be an integer or bool type, got {field.dtype}")
        if low is not None:
            lo, hi = int(field.min()), int(field.max())
            if lo < low or hi > high:
                raise ValueError(f"{path}: field {name!r} spans [{lo}, {hi}], outside [{low}, {high}]")
        events[name] = field
    return events


# reader name -> (function, file suffix of its recordings)
READERS = {"aedat2": (read_aedat2, ".aedat"), "aedat31": (read_aedat31, ".aedat"),
           "atis": (read_atis_bin, ".bin"), "npy": (read_npy, ".npy")}
