"""The committed gRPC stubs are what the .proto generates (regenerate with
`python tools/gen_proto.py`)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[2]
STUBS = ["mtckpt_pb2.py", "mtckpt_pb2.pyi", "mtckpt_pb2_grpc.py"]


def test_generated_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    for name in STUBS:
        fresh = (tmp_path / "mtckpt" / "proto" / name).read_text()
        committed = (ROOT / "src" / "mtckpt" / "proto" / name).read_text()
        assert fresh == committed, f"src/mtckpt/proto/{name} is stale: run tools/gen_proto.py"
