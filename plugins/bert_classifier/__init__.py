"""The built-in ``bert-classifier`` architecture and its Hugging Face families (BERT, DistilBERT).

Importing this package imports no torch: the hooks import the modules that need it.
"""

from engine import hookimpl


@hookimpl
def engine_register_architectures():
    """Register the BERT-family classifier."""
    from plugins.bert_classifier.arch import BertClassifierArch

    return [BertClassifierArch()]


@hookimpl
def engine_register_hf_families():
    """Register Hugging Face BERT and DistilBERT sequence classifiers (import and convert)."""
    from plugins.bert_classifier.hf import BertFamily, DistilBertFamily

    return [BertFamily(), DistilBertFamily()]
