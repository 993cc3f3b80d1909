"""Export formats (ONNX, TensorRT) and the versioned model repository they write.

``exporters.repository`` is torch-free: the runtime reads manifests and checks hashes with it.
The format modules (``onnx_format``, ``tensorrt_format``) register through the same hook as a
third-party plugin and import torch only when an export actually runs.
"""
