"""AEDAT 2.0 / 3.1 readers and the Gesture labels CSV, on recordings built byte by byte.

The writers here (``aedat2_bytes``, ``aedat31_bytes``, ...) pack one event at a time with
``struct`` and are shared by the other event tests.
"""
import struct

import numpy as np
import pytest

from tetsnn.data.events import EVENT_DTYPE, read_aedat2, read_aedat31, read_gesture_labels

AEDAT2_HEADER = b"#!AER-DAT2.0\r\n# This is a raw AE data file\r\n# Timestamps tick is 1 us\r\n"
AEDAT31_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def dvs128_address(x, y, p):
    """The AEDAT 2.0 address of an event given in tetsnn's orientation (x flipped, bit 0 clear = ON)."""
    return (y << 8) | ((127 - x) << 1) | (1 - p)


def aedat2_bytes(events, header=AEDAT2_HEADER):
    """events: (x, y, p, timestamp) in tetsnn's orientation; timestamps are written modulo 2**32."""
    body = b"".join(struct.pack(">II", dvs128_address(x, y, p), t % 2**32) for x, y, p, t in events)
    return header + body


def polarity_data(x, y, p, valid=1):
    return (x << 17) | (y << 2) | (p << 1) | valid


def aedat31_packet(events, kind=1, overflow=0, capacity=None, size=8):
    """events: polarity (data, timestamp) pairs, or raw ``size``-byte records as bytes."""
    capacity = len(events) if capacity is None else capacity
    header = struct.pack("<hhiiiiii", kind, 1, size, 4, overflow, capacity, len(events), len(events))
    body = b"".join(e if isinstance(e, bytes) else struct.pack("<Ii", *e) for e in events)
    return header + body + bytes(size * (capacity - len(events)))


def aedat31_bytes(packets, header=AEDAT31_HEADER):
    return header + b"".join(packets)


def write(path, data):
    path.write_bytes(data)
    return path


def as_tuples(events):
    return [tuple(int(v) for v in e) for e in events[["t", "x", "y", "p"]]]


# --- AEDAT 2.0 ------------------------------------------------------------------------------------

def test_aedat2_decodes_orientation_and_fields(tmp_path):
    events = [(0, 0, 1, 5), (127, 127, 0, 6), (3, 100, 1, 6), (64, 2, 0, 1000)]
    path = write(tmp_path / "a.aedat", aedat2_bytes(events))
    out = read_aedat2(path)
    assert out.dtype == EVENT_DTYPE
    assert out.dtype["t"] == np.int64 and out.dtype["x"] == np.int16 and out.dtype["p"] == np.int8
    assert as_tuples(out) == [(t, x, y, p) for x, y, p, t in events]


def test_aedat2_matches_per_event_decoder_on_random_addresses(tmp_path):
    rng = np.random.default_rng(0)
    addresses = rng.integers(0, 2**32, 300, dtype=np.uint64)   # high bits set too: ignored
    stamps = np.sort(rng.integers(0, 2**31, 300))
    body = b"".join(struct.pack(">II", int(a), int(t)) for a, t in zip(addresses, stamps))
    out = read_aedat2(write(tmp_path / "r.aedat", AEDAT2_HEADER + body))
    expected = []
    for i in range(300):
        a, t = struct.unpack_from(">II", body, 8 * i)
        expected.append((t, 127 - ((a >> 1) & 0x7F), (a >> 8) & 0x7F, 1 - (a & 1)))
    assert as_tuples(out) == expected


def test_aedat2_unwraps_timestamps(tmp_path):
    # 2**32 - 10 -> wraps to 5 (+2**32) -> small backwards jitter (kept) -> wraps again
    stamps = [2**32 - 10, 2**32 - 1, 2**32 + 5, 2**32 + 3, 2**32 + 2**31 + 7, 2 * 2**32 + 1]
    path = write(tmp_path / "w.aedat", aedat2_bytes([(1, 1, 1, t) for t in stamps]))
    assert read_aedat2(path)["t"].tolist() == stamps


@pytest.mark.parametrize("data, message", [
    (aedat2_bytes([(1, 2, 1, 3)]) + b"\x00\x01\x02", "not a multiple of the 8-byte record"),
    (struct.pack(">II", 1, 2), "missing '#!AER-DAT' header"),
    (b"#!AER-DAT3.1\r\n" + struct.pack(">II", 1, 2), "version '3.1'"),
    (b"#!AER-DAT9.9\r\n", "version '9.9'"),
    (AEDAT2_HEADER, "empty recording"),
    (b"#!AER-DAT2.0", "truncated header"),
])
def test_aedat2_bad_input_names_the_file(tmp_path, data, message):
    path = write(tmp_path / "bad_file.aedat", data)
    with pytest.raises(ValueError, match=message) as info:
        read_aedat2(path)
    assert "bad_file.aedat" in str(info.value)


# --- AEDAT 3.1 ------------------------------------------------------------------------------------

def test_aedat31_polarity_packets_overflow_and_skipping(tmp_path):
    special = [struct.pack("<Ii", 7, 9)] * 2                             # a type-0 (special) packet
    imu = [bytes(range(36))]                                             # a type-2 packet, 36-byte events
    packets = [
        aedat31_packet([(polarity_data(3, 4, 1), 10), (polarity_data(5, 6, 0), 11)]),
        aedat31_packet(special, kind=0),
        aedat31_packet([], capacity=3),                                  # an empty polarity packet
        aedat31_packet([(polarity_data(127, 0, 1), 2**31 - 1),
                        (polarity_data(9, 9, 1, valid=0), 12),           # valid bit clear: dropped
                        (polarity_data(0, 127, 0), 3)], overflow=2, capacity=5),  # 2 unused slots
        aedat31_packet(imu, kind=2, size=36),
        aedat31_packet([(polarity_data(1, 2, 1), 0)], overflow=3),
    ]
    out = read_aedat31(write(tmp_path / "g.aedat", aedat31_bytes(packets)))
    assert out.dtype == EVENT_DTYPE
    assert as_tuples(out) == [(10, 3, 4, 1), (11, 5, 6, 0), ((2 << 31) | (2**31 - 1), 127, 0, 1),
                              ((2 << 31) | 3, 0, 127, 0), (3 << 31, 1, 2, 1)]


def test_aedat31_matches_per_event_decoder_on_random_data(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 2**32, 200, dtype=np.uint64).tolist()
    stamps = rng.integers(0, 2**31, 200).tolist()
    events = list(zip(data, stamps))
    packets = [aedat31_packet(events[:120], overflow=1), aedat31_packet(events[120:], overflow=4, capacity=90)]
    out = read_aedat31(write(tmp_path / "r.aedat", aedat31_bytes(packets)))
    expected = [(t | (ov << 31), (d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, (d >> 1) & 1)
                for (d, t), ov in zip(events, [1] * 120 + [4] * 80) if d & 1]
    assert as_tuples(out) == expected


GOOD_PACKET = aedat31_packet([(polarity_data(1, 1, 1), 5)])


@pytest.mark.parametrize("data, message", [
    (aedat31_bytes([GOOD_PACKET])[:-3], "truncated or corrupt"),
    (aedat31_bytes([GOOD_PACKET]) + GOOD_PACKET[:20], "truncated packet header"),
    (AEDAT31_HEADER.replace(b"#!END-HEADER\r\n", b"") + GOOD_PACKET, "no '#!END-HEADER' line"),
    (AEDAT31_HEADER.replace(b"3.1", b"3.0") + GOOD_PACKET, "version '3.0'"),
    (GOOD_PACKET, "missing '#!AER-DAT' header"),
    (AEDAT31_HEADER, "empty recording"),
    (aedat31_bytes([aedat31_packet([bytes(8)], kind=0)]), "empty recording"),
    (aedat31_bytes([aedat31_packet([(polarity_data(1, 1, 1, valid=0), 5)])]), "empty recording"),
    (aedat31_bytes([aedat31_packet([bytes(12)], kind=1, size=12)]), "eventSize 12, expected 8"),
])
def test_aedat31_bad_input_names_the_file(tmp_path, data, message):
    path = write(tmp_path / "bad_file.aedat", data)
    with pytest.raises(ValueError, match=message) as info:
        read_aedat31(path)
    assert "bad_file.aedat" in str(info.value)


# --- Gesture labels CSV ---------------------------------------------------------------------------

def test_gesture_labels_rows(tmp_path):
    path = write(tmp_path / "user01_lab_labels.csv",
                 b"class,startTime_usec,endTime_usec\r\n1,100,200\r\n11,150,400\r\n\r\n")
    assert read_gesture_labels(path).tolist() == [[0, 100, 200, 2], [10, 150, 400, 3]]


@pytest.mark.parametrize("body, line", [
    (b"class,startTime_usec,endTime_usec\n1,100,200\n2,300\n", 3),
    (b"class,startTime_usec,endTime_usec\n1,100,abc\n", 2),
    (b"class,startTime_usec,endTime_usec\n1,100,200\n12,300,400\n", 3),
    (b"class,startTime_usec,endTime_usec\n0,300,400\n", 2),
    (b"class,startTime_usec,endTime_usec\n3,400,400\n", 2),
    (b"1,100,200\n", 1),
])
def test_gesture_labels_malformed_row_names_file_and_line(tmp_path, body, line):
    path = write(tmp_path / "user02_led_labels.csv", body)
    with pytest.raises(ValueError, match=rf"user02_led_labels\.csv, line {line}:"):
        read_gesture_labels(path)


def test_gesture_labels_without_rows(tmp_path):
    path = write(tmp_path / "user03_led_labels.csv", b"class,startTime_usec,endTime_usec\n")
    with pytest.raises(ValueError, match="user03_led_labels.csv: no label rows"):
        read_gesture_labels(path)
