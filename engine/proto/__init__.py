"""Generated gRPC/protobuf code for the engine's two protocols (regenerate: proto/generate.py).

- ``engine_pb2`` / ``engine_pb2_grpc``: the engine's own API, ``engine.v1.EngineService``.
- ``grpc_predict_v2_pb2`` / ``grpc_predict_v2_pb2_grpc``: the KServe v2 / Open Inference
  Protocol, ``inference.GRPCInferenceService``.

The generated modules register their descriptors in :data:`POOL`, a private descriptor pool,
not protobuf's default one: tritonclient ships its own copy of the ``inference`` package, and
two copies of one message name in the default pool make the second import fail. With a private
pool, a process can use this package and tritonclient side by side (the wire format is the same).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
