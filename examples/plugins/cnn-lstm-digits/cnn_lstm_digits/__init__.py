"""Example out-of-tree engine plugin: the ``cnn-lstm-digits`` architecture.

Installed, it is found through the ``engine.plugins`` entry point group; the engine is never
edited. Only the public API (``engine.hookimpl`` and ``engine.architecture``) is used.
"""

from engine import hookimpl

__version__ = "0.1.0"


@hookimpl
def engine_register_architectures():
    """Register the CNN+LSTM digits classifier (torch is imported only when the hook runs)."""
    from cnn_lstm_digits.arch import CnnLstmDigits

    return [CnnLstmDigits()]
