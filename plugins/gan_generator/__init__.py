"""Built-in ``gan-generator`` plugin: a label-conditioned DCGAN on sklearn's 8x8 digits."""

from engine import hookimpl


@hookimpl
def engine_register_architectures():
    """Register the conditional digits GAN (torch is imported only when the hook runs)."""
    from plugins.gan_generator.arch import GanGenerator

    return [GanGenerator()]
