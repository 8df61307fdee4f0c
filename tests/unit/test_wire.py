"""The generated wire modules match the .proto they come from."""

from __future__ import annotations

import subprocess
import sys

from codemode.config import LimitsConfig
from codemode.wire import codemode_pb2 as pb
from tests.helpers import REPO_ROOT


def test_generated_modules_are_current() -> None:
    """`scripts/gen_proto.py --check` finds the committed modules identical to fresh output."""
    proc = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_execute_is_one_bidirectional_stream() -> None:
    """Executor.Execute streams ClientFrame in and ServerFrame out."""
    method = pb.DESCRIPTOR.services_by_name["Executor"].methods_by_name["Execute"]
    assert method.client_streaming
    assert method.server_streaming
    assert method.input_type.name == "ClientFrame"
    assert method.output_type.name == "ServerFrame"


def test_frames_round_trip_with_json_values() -> None:
    """A start frame survives serialisation with its JSON bytes (ints stay ints)."""
    frame = pb.ClientFrame(
        start=pb.StartExecution(code="result = 1", config_json=b'{"n":1}', timeout_seconds=2.5)
    )
    parsed = pb.ClientFrame.FromString(frame.SerializeToString())
    assert parsed.WhichOneof("frame") == "start"
    assert parsed.start.config_json == b'{"n":1}'
    assert parsed.start.timeout_seconds == 2.5


def test_limits_message_has_the_fields_of_limits_config() -> None:
    """`Limits` on the wire has exactly `LimitsConfig`'s fields, in order, doubles for floats."""
    fields = pb.Limits.DESCRIPTOR.fields
    assert [f.name for f in fields] == list(LimitsConfig.model_fields)
    for f in fields:
        is_float = LimitsConfig.model_fields[f.name].annotation is float
        assert (f.cpp_type == f.CPPTYPE_DOUBLE) == is_float, f.name
