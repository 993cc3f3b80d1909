"""The built-in ``text-classifier`` architecture (registered like any third-party plugin)."""

from engine import hookimpl


@hookimpl
def engine_register_architectures():
    """Register the text classifier; torch is imported only when the plugin is used."""
    from plugins.text_classifier.arch import TextClassifierArch

    return [TextClassifierArch()]
