"""The gRPC server: the engine.v1 API and the KServe v2 inference protocol over ``grpc.aio``.

One process serves every model of a model repository. The serving path imports no torch: it
reads manifests, runs the ONNX runtime through ``engine.runtime`` and speaks protobuf at the
edge only. Entry points: :func:`engine.server.cli_commands.serve` (blocking, for the CLI) and
:class:`engine.server.app.EngineServer` (async, for tests and embedding).

Modules: ``app`` (assembly, TLS, health, reflection, shutdown), ``serving`` (admission,
cancellation, statuses, metrics per call), ``engine_service`` and ``kserve_service`` (the two
protocols), ``loader`` (runtime engines as :class:`~engine.server.models.ServedModel`),
``auth``, ``metrics``, ``logs``, ``params``, ``tensors``, ``png``, ``cli_commands``.
"""
