import json
import math

import pytest

from mtckpt import ChecksumMismatchError, CorruptCheckpointError, FormatVersionError
from mtckpt.format.encoding import StoredFile
from mtckpt.format.manifest import FORMAT_VERSION, LeafRecord, RankManifest, _self_crc
from mtckpt.format.structure import Node


def make_manifest(**changes):
    fields = dict(
        run="exp",
        step=12,
        rank=1,
        world_size=2,
        framework="numpy",
        tree=Node("dict", (Node("leaf", name="w"), Node("leaf", name="f")), keys=("w", "f")),
        leaves=(
            LeafRecord("w", "ndarray", dtype="F32", shape=(2, 3), offset=0, nbytes=24),
            LeafRecord("f", "float", value=float("nan")),
        ),
        data_file="rank-00001.safetensors",
        file_size=4096 + 24,
        data_start=4096,
        chunk_size=4096,
        chunk_crc32c=(1, 2),
    )
    fields.update(changes)
    return RankManifest(**fields)


def rewrite(raw: bytes, edit) -> bytes:
    """Change a manifest's JSON and re-seal its self-checksum, as a newer writer would."""
    body = json.loads(raw)
    body.pop("manifest_crc32c")
    edit(body)
    body["manifest_crc32c"] = _self_crc(body)
    return json.dumps(body).encode()


def test_roundtrip_is_exact():
    manifest = make_manifest()
    parsed = RankManifest.from_json(manifest.to_json(), "m")
    assert parsed.leaves[0] == manifest.leaves[0]
    assert math.isnan(parsed.leaves[1].value)
    assert parsed.tree == manifest.tree
    assert (parsed.run, parsed.step, parsed.rank, parsed.world_size) == ("exp", 12, 1, 2)
    assert parsed.chunk_crc32c == (1, 2) and parsed.format_version == FORMAT_VERSION


@pytest.mark.parametrize(
    "value", [0.1, -0.0, float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308]
)
def test_floats_are_bit_exact(value):
    manifest = make_manifest(
        leaves=(make_manifest().leaves[0], LeafRecord("f", "float", value=value))
    )
    parsed = RankManifest.from_json(manifest.to_json(), "m")
    assert parsed.leaves[1].value.hex() == value.hex()


def test_newer_format_version_is_refused_with_advice():
    raw = rewrite(make_manifest().to_json(), lambda b: b.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(
        FormatVersionError, match=r"somewhere: written in format version 2 .*upgrade"
    ):
        RankManifest.from_json(raw, "somewhere")


def test_unknown_leaf_kind_is_refused():
    def edit(body):
        body["leaves"][0]["kind"] = "hologram"

    with pytest.raises(FormatVersionError, match="key 'w' has leaf kind 'hologram'"):
        RankManifest.from_json(rewrite(make_manifest().to_json(), edit), "m")


def test_altered_manifest_fails_its_own_checksum():
    raw = make_manifest().to_json().replace(b'"step": 12', b'"step": 13')
    with pytest.raises(ChecksumMismatchError, match="manifest crc32c"):
        RankManifest.from_json(raw, "m")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b["leaves"][0].update(nbytes=999), "do not fit"),
        (lambda b: b["leaves"][0].update(offset=20), "do not fit"),
        (lambda b: b["data_file"].update(crc32c=[1]), "do not agree"),
        (lambda b: b["leaves"].pop(), "tree structure and leaf list do not match"),
        (lambda b: b["leaves"][1].update(value=1.5), "expected a JSON float"),
        (lambda b: b.pop("run"), "malformed manifest"),
        (
            lambda b: b["leaves"][0].update(global_shape=[2, 3], global_offset=[1, 0]),
            "does not fit",
        ),
    ],
)
def test_inconsistent_manifests_are_corrupt(edit, message):
    with pytest.raises(CorruptCheckpointError, match=message):
        RankManifest.from_json(rewrite(make_manifest().to_json(), edit), "m")


def test_truncated_or_non_json_manifest_is_corrupt():
    raw = make_manifest().to_json()
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        RankManifest.from_json(raw[: len(raw) // 2], "m")
    with pytest.raises(CorruptCheckpointError, match="not a JSON object"):
        RankManifest.from_json(b"[1, 2]", "m")


def test_how_a_tier_stores_the_data_file_round_trips():
    zstd = StoredFile("zstd", 30, 0xABCDEF, level=-3, frame_size=4096, frames=(20, 10))
    for stored in (StoredFile("identity", 4096 + 24, 7), zstd):
        parsed = RankManifest.from_json(make_manifest(stored=stored).to_json(), "m")
        assert parsed.stored == stored
    assert RankManifest.from_json(make_manifest().to_json(), "m").stored is None


@pytest.mark.parametrize(
    "stored, error, message",
    [
        ({"encoding": "lz4", "size": 9, "crc32c": 1}, FormatVersionError,
         r"m: the data file is stored with encoding 'lz4', unknown to this mtckpt"),
        ({"encoding": "identity", "size": 9, "crc32c": 1}, CorruptCheckpointError,
         r"m: 9 bytes stored as they are, the data file has 4120"),
        ({"encoding": "zstd", "size": 30, "crc32c": 1, "level": 3, "frame_size": 4096,
          "frames": [30]}, CorruptCheckpointError,
         r"m: 1 zstd frames of 4096 bytes stored in 30 bytes do not fit a data file of 4120"),
        ({"encoding": "zstd", "size": 31, "crc32c": 1, "level": 3, "frame_size": 4096,
          "frames": [20, 10]}, CorruptCheckpointError, r"do not fit"),
        ({"encoding": "zstd", "size": 30, "crc32c": 1, "level": 3, "frame_size": 1000,
          "frames": [20, 10]}, CorruptCheckpointError, r"do not fit"),
        ({"encoding": "zstd", "size": -1, "crc32c": 1}, CorruptCheckpointError,
         r"stored.size must be an int >= 0"),
    ],
)  # fmt: skip
def test_a_bad_stored_record_is_named(stored, error, message):
    def edit(body):
        body["data_file"]["stored"] = stored

    with pytest.raises(error, match=message):
        RankManifest.from_json(rewrite(make_manifest().to_json(), edit), "m")


def parted_manifest():
    """w (4 x 3) held as two row shards, the second stored by rank 0."""
    parts = (
        LeafRecord("w~shard@0,0", "jax", dtype="F32", shape=(2, 3), offset=0, nbytes=24,
                   global_shape=(4, 3), global_offset=(0, 0)),
        LeafRecord("w~shard@2,0", "jax", dtype="F32", shape=(2, 3), global_shape=(4, 3),
                   global_offset=(2, 0), stored_by=0),
    )  # fmt: skip
    w = LeafRecord("w", "jax", dtype="F32", shape=(4, 3), global_shape=(4, 3),
                   global_offset=(0, 0), parts=parts)  # fmt: skip
    return make_manifest(leaves=(w, LeafRecord("f", "float", value=1.0)))


def test_a_leaf_in_parts_round_trips_and_lists_its_parts_as_data():
    manifest = parted_manifest()
    parsed = RankManifest.from_json(manifest.to_json(), "m")
    assert parsed.leaves == manifest.leaves
    assert [r.key for r in parsed.data_records()] == ["w~shard@0,0"]  # the other: rank 0's
    assert parsed.data_records(parts=False) == []
    assert set(parsed.records_by_key()) == {"w", "f", "w~shard@0,0", "w~shard@2,0"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b["leaves"][0]["parts"][1].update(dtype="F16"), "is not a jax F32 shard"),
        (lambda b: b["leaves"][0]["parts"][1].update(global_shape=[4, 4]), "global shape"),
        (lambda b: b["leaves"][0]["parts"][1].update(key="w~shard@0,0"), "share a data file"),
        (lambda b: b["leaves"][0]["parts"][1].update(key="f"), "share a data file"),
        (lambda b: b["leaves"][0].update(parts=[]), "non-empty list"),
        (lambda b: b["leaves"][0]["parts"][0].update(nbytes=48), "do not fit"),
    ],
)
def test_inconsistent_parts_are_corrupt(edit, message):
    with pytest.raises(CorruptCheckpointError, match=message):
        RankManifest.from_json(rewrite(parted_manifest().to_json(), edit), "m")
