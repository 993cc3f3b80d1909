"""The built-in ``decoder-lm`` architecture: a GPT-2-shaped decoder on the stdlib's source."""

from engine import hookimpl


@hookimpl
def engine_register_architectures():
    """Register the decoder LM (torch is imported only when the architecture is built)."""
    from plugins.decoder_lm.arch import DecoderLM

    return [DecoderLM()]


@hookimpl
def engine_register_hf_families():
    """Register Hugging Face GPT2LMHeadModel as a decoder LM (import and convert)."""
    from plugins.decoder_lm.hf import GPT2Family

    return [GPT2Family()]
