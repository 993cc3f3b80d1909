"""Export formats (ONNX, TensorRT, torch): checkpoint -> validated files in a model repository.

They write versions through ``engine.repository``, the repository format the runtime reads.
The format modules (``onnx_format``, ``tensorrt_format``) register through the same hook as a
third-party plugin and import torch only when an export actually runs.
"""
