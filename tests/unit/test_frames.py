"""Frames encoded by hand are the protobuf messages the .proto describes, both ways."""

import pytest

pytest.importorskip("grpc")

from mtckpt import ChecksumMismatchError, checksum  # noqa: E402
from mtckpt.daemon import frames  # noqa: E402
from mtckpt.proto import mtckpt_pb2 as pb  # noqa: E402

CASES = [(0, b"", 0), (1, b"x", 1), (2**40 + 3, bytes(range(256)) * 300, 0xFFFFFFFF)]


@pytest.mark.parametrize(("offset", "data", "crc"), CASES)
def test_data_chunks_match_protobuf(offset, data, crc):
    encoded = frames.data_chunk(offset, memoryview(data), crc)
    assert pb.DataChunk.FromString(encoded) == pb.DataChunk(offset=offset, data=data, crc32c=crc)
    generated = pb.DataChunk(offset=offset, data=data, crc32c=crc).SerializeToString()
    got_offset, got_data, got_crc = frames.read_data_chunk(generated)
    assert (got_offset, bytes(got_data), got_crc) == (offset, data, crc)


@pytest.mark.parametrize(("offset", "data", "crc"), CASES)
def test_push_messages_match_protobuf(offset, data, crc):
    chunk = pb.DataChunk(offset=offset, data=data, crc32c=crc)
    encoded = frames.push_chunk(offset, data, crc)
    assert pb.PushMessage.FromString(encoded) == pb.PushMessage(chunk=chunk)
    got_offset, got_data, got_crc = frames.read_push(
        pb.PushMessage(chunk=chunk).SerializeToString()
    )
    assert (got_offset, bytes(got_data), got_crc) == (offset, data, crc)
    header = pb.PushHeader(shard=pb.ShardId(run="r", step=5, rank=2, origin="n"), data_size=9)
    assert frames.read_push(frames.push_header(header)) == header


@pytest.mark.parametrize("frame", [b"\x12", b"\x12\x05ab", b"\x0a\x01", b"\x2a\x00"])
def test_malformed_frames_raise(frame):
    with pytest.raises(ValueError):
        frames.read_push(frame)


def test_chunks_are_checked_against_the_crc32c_sent_with_them():
    good = [(0, b"abc", checksum.crc32c(b"abc")), (3, b"def", checksum.crc32c(b"def"))]
    assert list(frames.verified(good, "here")) == [(0, b"abc"), (3, b"def")]
    bad = [*good, (6, b"ghi", checksum.crc32c(b"ghX"))]
    with pytest.raises(ChecksumMismatchError, match="here: a chunk at offset 6 arrived damaged"):
        list(frames.verified(bad, "here"))
