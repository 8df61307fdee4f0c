"""Regenerate the wire modules from ``src/codemode/wire/codemode.proto``.

Run ``python scripts/gen_proto.py``; ``--check`` exits non-zero when the committed modules
differ from what the ``.proto`` produces (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

WIRE = Path(__file__).resolve().parent.parent / "src" / "codemode" / "wire"
OUTPUTS = ("codemode_pb2.py", "codemode_pb2.pyi", "codemode_pb2_grpc.py", "codemode_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    """Run protoc on the .proto and write the four modules into ``out_dir``."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "protoc",
        f"-I{WIRE}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(WIRE / "codemode.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc emits absolute imports that only work with the wire dir on sys.path.
    for name in ("codemode_pb2_grpc.py", "codemode_pb2_grpc.pyi"):
        module = out_dir / name
        text = re.sub(
            r"^import codemode_pb2( as|$)",
            r"from . import codemode_pb2\1",
            module.read_text(),
            flags=re.M,
        )
        module.write_text(text)
    for name in OUTPUTS:
        path = out_dir / name
        path.write_text(_strip_version_noise(path.read_text()))


def _strip_version_noise(text: str) -> str:
    """Drop generator version stamps so a protoc upgrade alone does not make modules stale."""
    lines = [
        line
        for line in text.splitlines()
        if not re.match(r"^# (Protobuf Python Version|isort:skip_file)", line)
        and "GRPC_GENERATED_VERSION" not in line
        and "_version_not_supported" not in line
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed modules are stale")
    opts = parser.parse_args()
    if not opts.check:
        generate(WIRE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in OUTPUTS if (Path(tmp) / n).read_text() != (WIRE / n).read_text()]
    if stale:
        print(f"stale generated modules: {', '.join(stale)}; run python scripts/gen_proto.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
