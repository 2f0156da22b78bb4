"""MLLP framing (engine.mllp.framing): FrameDecoder events byte by byte, oversize frames with
bounded memory, and hypothesis properties over arbitrary chunking of the byte stream."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.mllp.framing import TRAILER, Discarded, Event, Frame, FrameDecoder, Oversize, frame

MSG_A = b"MSH|^~\\&|SND|SF|RCV|RF|20240101120000||ADT^A01|A1|P|2.5\rPID|1||123\r"
MSG_B = b"MSH|^~\\&|SND|SF|RCV|RF|20240101120001||ORU^R01|B2|P|2.5.1\rOBX|1|ST|X||v\r"
MSG_C = b"MSH|^~\\&|SND|SF|RCV|RF|20240101120002||ACK|C3|P|2.3\rMSA|AA|X\r"


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def frames_of(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped, sorted, duplicates allowed: empty reads)."""
    offsets = sorted(min(max(p, 0), len(data)) for p in points)
    out, prev = [], 0
    for p in offsets:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


# -- frame() ----------------------------------------------------------------------------------------

def test_frame_wraps_payload_in_vt_fs_cr() -> None:
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\x0d"
    assert frame(b"") == b"\x0b\x1c\r"
    assert TRAILER == b"\x1c\r"


# -- single frames ------------------------------------------------------------------------------------

def test_single_frame_in_one_read() -> None:
    d = FrameDecoder(1024)
    assert d.feed(frame(MSG_A)) == [Frame(MSG_A)]
    assert d.buffered == 0
    assert not d.in_frame


def test_empty_frame() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0b\x1c\r") == [Frame(b"")]


def test_frame_without_trailing_cr_is_still_a_frame() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bABC\x1c") == [Frame(b"ABC")]
    # the CR that should have followed arrives with the next frame: it is not garbage
    assert d.feed(b"\r\x0bDEF\x1c\r") == [Frame(b"DEF")]


def test_frame_followed_directly_by_next_frame_without_cr() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bAB\x1c\x0bCD\x1c\r") == [Frame(b"AB"), Frame(b"CD")]


@pytest.mark.parametrize("split", range(1, len(frame(MSG_A))))
def test_frame_split_in_two_at_every_point(split: int) -> None:
    data = frame(MSG_A)
    d = FrameDecoder(1024)
    first = d.feed(data[:split])
    second = d.feed(data[split:])
    # nothing is reported before the end block; the CR alone in the second read is not garbage
    assert first == ([Frame(MSG_A)] if split >= len(data) - 1 else [])
    assert first + second == [Frame(MSG_A)]
    assert d.buffered == 0
    assert not d.in_frame


def test_frame_fed_one_byte_at_a_time() -> None:
    data = frame(MSG_A) + frame(MSG_B)
    d = FrameDecoder(1024)
    events = feed_all(d, [data[i:i + 1] for i in range(len(data))])
    assert events == [Frame(MSG_A), Frame(MSG_B)]


def test_in_frame_and_buffered_while_frame_is_open() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bMSH|12345") == []
    assert d.in_frame
    assert d.buffered == len(b"MSH|12345")
    assert d.feed(b"6\x1c\r") == [Frame(b"MSH|123456")]
    assert not d.in_frame
    assert d.buffered == 0


def test_several_frames_in_one_read() -> None:
    d = FrameDecoder(1024)
    assert d.feed(frame(MSG_A) + frame(MSG_B) + frame(MSG_C)) == [Frame(MSG_A), Frame(MSG_B), Frame(MSG_C)]


# -- bytes outside frames ------------------------------------------------------------------------------

def test_whitespace_between_frames_is_not_reported() -> None:
    d = FrameDecoder(1024)
    data = b"\r\n" + frame(MSG_A) + b"\r\n \t\x00\n" + frame(MSG_B) + b"\n\n"
    assert d.feed(data) == [Frame(MSG_A), Frame(MSG_B)]


def test_garbage_before_frame_is_discarded_first() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"HELLO" + frame(MSG_A)) == [Discarded(5, "bytes outside an MLLP frame"), Frame(MSG_A)]


def test_garbage_after_and_between_frames() -> None:
    d = FrameDecoder(1024)
    events = d.feed(frame(MSG_A) + b"xyz" + frame(MSG_B) + b"TAIL!")
    assert events == [
        Frame(MSG_A),
        Discarded(3, "bytes outside an MLLP frame"),
        Frame(MSG_B),
        Discarded(5, "bytes outside an MLLP frame"),
    ]


def test_stray_end_block_outside_a_frame_is_garbage() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x1c\x1c") == [Discarded(2, "bytes outside an MLLP frame")]
    assert d.feed(frame(MSG_A)) == [Frame(MSG_A)]


def test_garbage_alone_is_reported_per_read() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"abc") == [Discarded(3, "bytes outside an MLLP frame")]
    assert d.feed(b"\r\n") == []
    assert d.feed(b"de") == [Discarded(2, "bytes outside an MLLP frame")]
    assert d.buffered == 0


def test_start_byte_inside_unfinished_frame_restarts() -> None:
    d = FrameDecoder(1024)
    events = d.feed(b"\x0bPARTIAL" + frame(MSG_A))
    assert events == [Discarded(7, "frame restarted before its end block"), Frame(MSG_A)]


def test_start_byte_in_a_later_read_restarts_the_frame() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bPART") == []
    assert d.feed(b"IAL") == []
    events = d.feed(b"\x0b" + MSG_B + b"\x1c\r")
    assert len(events) == 2
    assert isinstance(events[0], Discarded)
    assert events[0].size == len(b"PARTIAL")
    assert "restarted" in events[0].reason
    assert events[1] == Frame(MSG_B)


def test_cr_of_trailer_in_next_read_is_not_garbage() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0b" + MSG_A + b"\x1c") == [Frame(MSG_A)]
    # the CR belongs to the trailer; only the 3 bytes after it are outside a frame
    assert d.feed(b"\rXYZ") == [Discarded(3, "bytes outside an MLLP frame")]


def test_cr_of_trailer_in_next_read_then_next_frame() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0b" + MSG_A + b"\x1c") == [Frame(MSG_A)]
    assert d.feed(b"\r" + frame(MSG_B)) == [Frame(MSG_B)]


def test_cr_of_trailer_after_an_empty_read() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bAB\x1c") == [Frame(b"AB")]
    assert d.feed(b"") == []
    assert d.feed(b"\rQ") == [Discarded(1, "bytes outside an MLLP frame")]


# -- oversize --------------------------------------------------------------------------------------------

def test_oversize_frame_in_one_read() -> None:
    payload = b"MSH|" + b"x" * 996  # 1000 bytes
    d = FrameDecoder(max_size=100, head_size=40)
    events = d.feed(frame(payload))
    assert events == [Oversize(payload[:40], 1000)]
    assert d.buffered == 0


def test_frame_of_exactly_max_size_is_accepted() -> None:
    payload = b"y" * 100
    assert FrameDecoder(max_size=100).feed(frame(payload)) == [Frame(payload)]
    assert FrameDecoder(max_size=99).feed(frame(payload)) == [Oversize(payload[:99], 100)]


def test_oversize_head_limited_by_max_size_when_head_size_is_larger() -> None:
    payload = bytes(range(256)).replace(b"\x0b", b"").replace(b"\x1c", b"") * 4
    d = FrameDecoder(max_size=50, head_size=65536)
    events = d.feed(frame(payload))
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, Oversize)
    assert ev.size == len(payload)
    assert len(ev.head) <= 50
    assert ev.head == payload[:50]


@pytest.mark.parametrize("chunk", [1, 7, 33, 100, 101, 999])
def test_oversize_frame_across_reads(chunk: int) -> None:
    payload = bytes((i % 200) + 32 for i in range(3000)).replace(b"\x0b", b"a").replace(b"\x1c", b"b")
    data = frame(payload)
    d = FrameDecoder(max_size=500, head_size=64)
    events = feed_all(d, [data[i:i + chunk] for i in range(0, len(data), chunk)])
    assert events == [Oversize(payload[:64], 3000)]
    assert d.buffered == 0


def test_decoder_recovers_after_oversize() -> None:
    d = FrameDecoder(max_size=10, head_size=4)
    events = d.feed(frame(b"A" * 20) + frame(b"short"))
    assert events == [Oversize(b"AAAA", 20), Frame(b"short")]


def test_oversize_frame_restarted_by_start_byte() -> None:
    d = FrameDecoder(max_size=10, head_size=4)
    events = d.feed(b"\x0b" + b"Z" * 30 + frame(b"ok"))
    assert events == [Discarded(30, "frame restarted before its end block"), Frame(b"ok")]


def test_memory_bounded_for_5mb_frame_in_64kb_chunks() -> None:
    max_size, head_size = 1 << 20, 8192
    size = 5 * 1024 * 1024
    payload = b"MSH|^~\\&|" + b"0123456789ABCDEF" * ((size - 9) // 16)
    payload += b"z" * (size - len(payload))
    assert len(payload) == size
    data = frame(payload)
    d = FrameDecoder(max_size=max_size, head_size=head_size)
    events: list[Event] = []
    peak = 0
    step = 64 * 1024
    for i in range(0, len(data), step):
        events.extend(d.feed(data[i:i + step]))
        peak = max(peak, d.buffered)
        assert d.buffered <= max_size + 16
    assert peak > head_size  # the buffer really did fill before the frame was known to be too large
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, Oversize)
    assert ev.size == size
    assert len(ev.head) <= head_size
    assert len(ev.head) <= max_size
    assert ev.head == payload[:head_size]
    assert d.buffered == 0
    # and the decoder goes on normally
    assert d.feed(frame(MSG_A)) == [Frame(MSG_A)]


# -- fast path against slow path -------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [MSG_A, MSG_B, b"x", b"A" * 100, b"B" * 101, b"\r\n\x00 ", b"MSH|\xe9\xff\x1d\r"])
def test_fast_path_equals_slow_path(payload: bytes) -> None:
    data = frame(payload)
    fast = FrameDecoder(100).feed(data)
    slow_decoder = FrameDecoder(100)
    slow = slow_decoder.feed(data[:1]) + slow_decoder.feed(data[1:])
    assert fast == slow
    if len(payload) <= 100:
        assert fast == [Frame(payload)]
    else:
        assert fast == [Oversize(payload[:100], len(payload))]


def test_fast_path_not_taken_with_second_start_byte() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bAB\x0bCD\x1c\r") == [Discarded(2, "frame restarted before its end block"), Frame(b"CD")]


def test_fast_path_not_taken_with_end_byte_inside() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bAB\x1cXY\x1c\r") == [Frame(b"AB"), Discarded(4, "bytes outside an MLLP frame")]


def test_fast_path_not_taken_while_a_frame_is_open() -> None:
    d = FrameDecoder(1024)
    assert d.feed(b"\x0bOPEN") == []
    assert d.feed(frame(b"NEXT")) == [Discarded(4, "frame restarted before its end block"), Frame(b"NEXT")]


# -- properties ------------------------------------------------------------------------------------------

payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@settings(max_examples=200, deadline=None)
@given(st.lists(payloads, max_size=8), st.lists(st.integers(0, 3000), max_size=20))
def test_property_any_chunking_yields_payloads_in_order(msgs: list[bytes], points: list[int]) -> None:
    data = b"".join(frame(m) for m in msgs)
    d = FrameDecoder(max_size=1000)
    events = feed_all(d, cut(data, points))
    assert events == [Frame(m) for m in msgs]
    assert not d.in_frame
    assert d.buffered == 0


garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\x0b", b""))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(garbage, payloads), max_size=6),
    garbage,
    st.lists(st.integers(0, 3000), max_size=20),
)
def test_property_garbage_between_frames(pairs: list[tuple[bytes, bytes]], tail: bytes, points: list[int]) -> None:
    data = b"".join(g + frame(m) for g, m in pairs) + tail
    d = FrameDecoder(max_size=1000)
    events = feed_all(d, cut(data, points))
    assert frames_of(events) == [m for _, m in pairs]
    assert not [e for e in events if isinstance(e, Oversize)]
    for e in events:
        if isinstance(e, Discarded):
            assert e.reason == "bytes outside an MLLP frame"
            assert e.size > 0
    # no byte is counted twice: at most the garbage bytes are reported as discarded
    assert sum(e.size for e in events if isinstance(e, Discarded)) <= sum(len(g) for g, _ in pairs) + len(tail)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=80), st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r", b"\r"])), max_size=30),
    st.integers(1, 64),
    st.integers(1, 100),
)
def test_property_never_raises_and_memory_bounded(chunks: list[bytes], max_size: int, head_size: int) -> None:
    d = FrameDecoder(max_size=max_size, head_size=head_size)
    for chunk in chunks:
        for ev in d.feed(chunk):
            assert isinstance(ev, Frame | Oversize | Discarded)
            if isinstance(ev, Frame):
                assert len(ev.payload) <= max_size
            elif isinstance(ev, Oversize):
                assert ev.size > max_size
                assert len(ev.head) <= min(max_size, head_size)
        assert d.buffered <= max_size


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\n", b"A", b"BB", b" "]), max_size=60).map(b"".join),
    st.lists(st.integers(0, 60), max_size=8),
    st.integers(1, 8),
)
def test_property_frames_do_not_depend_on_read_boundaries(data: bytes, points: list[int], max_size: int) -> None:
    def kept(events: list[Event]) -> list[Event]:
        return [e for e in events if not isinstance(e, Discarded)]

    whole = FrameDecoder(max_size, head_size=3).feed(data)
    parts = feed_all(FrameDecoder(max_size, head_size=3), cut(data, points))
    assert kept(parts) == kept(whole)
