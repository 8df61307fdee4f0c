"""The executor's gRPC face: the server, the servicer, authentication and admission.

:mod:`.server` starts and stops the ``grpc.aio`` server and its health service;
:mod:`.servicer` implements ``Execute`` and ``Info`` on top of :mod:`codemode.executor.run`,
:mod:`.sessions` the ``Session`` RPC, :mod:`.stream` one stream's frames for both;
:mod:`.auth` checks the API key; :mod:`.admission` bounds concurrency. May import grpc, the
wire, :mod:`codemode.config`, the run part and the sandbox (its interface, and the backend
factory's names); never the SDK.
"""
