"""One execution, without gRPC: the relay between a guest and the application's tools.

:func:`.execution.run_execution` takes a guest from a sandbox backend, sends it the program,
answers its tool calls through a ``call_tool`` coroutine, reads its output and returns a plain
:class:`.outcome.RunOutcome`. May import the standard library, :mod:`codemode.config`, the
sandbox interface and the guest's protocol; never gRPC, the wire or the SDK.
"""
