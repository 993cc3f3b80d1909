"""A plugin-based engine: train small models in PyTorch, export to ONNX/TensorRT, serve over gRPC.

Importing ``engine`` imports neither torch nor any plugin; the serving path stays torch-free.
"""

from engine.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
