"""The executor service (``codemode serve``), in four parts, each a folder.

- :mod:`.service`: the gRPC face (server, servicer, auth, admission);
- :mod:`.run`: one execution without gRPC (relay, output, outcome);
- :mod:`.sandbox`: the backends that isolate a guest, and what they rest on;
- :mod:`.guest`: the only code that runs inside the sandbox (standard library only).

Each imports only the parts below it in this list (``tests/unit/test_import_graph.py``
checks it); none imports the SDK.
"""
