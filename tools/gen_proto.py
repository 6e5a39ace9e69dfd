"""Regenerate the committed gRPC stubs from src/mtckpt/proto/mtckpt.proto.

Needs grpcio-tools (`pip install grpcio-tools`). With ``--out DIR`` the stubs are written
there instead (the test that checks the committed stubs are current uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PROTO = "mtckpt/proto/mtckpt.proto"


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{SRC}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(SRC / PROTO)]  # fmt: skip
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SRC, help="root to write mtckpt/proto/ under")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
