"""Hugging Face ``GPT2LMHeadModel`` <-> ``decoder-lm``: the two are the same network.

GPT-2 is pre-LayerNorm with learned positions, a fused qkv projection, tanh GELU and a head tied
to the token embedding, which is what :class:`plugins.decoder_lm.model.GPT` is; any size maps
(gpt2, distilgpt2, gpt2-medium shapes). Options that change the numerics and that the module
does not implement are refused by :meth:`GPT2Family.unsupported`, one line each.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.hf_family import HFFamily, HFTokenizer
from plugins.stdlib_text import EOT, PAD

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh approximation of GELU
LAYER_NORM_EPS = 1e-5  # fixed in the module, as in GPT-2


class EndOfTextMissing(EngineError):
    """The tokenizer has no ``<|endoftext|>`` token, which GPT-2 ends text and pads with."""


class GPT2Family(HFFamily):
    """``GPT2LMHeadModel`` onto the ``decoder-lm`` architecture (and back)."""

    hf_architecture = "GPT2LMHeadModel"
    model_type = "gpt2"
    architecture = "decoder-lm"
    auto_class = "AutoModelForCausalLM"

    def unsupported(self, hf_config: dict[str, Any]) -> list[str]:
        """GPT-2 options that change the numerics and that the decoder does not implement."""
        c, problems = hf_config, []
        flags = {  # option: the value the decoder implements
            "add_cross_attention": False,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
        }
        for key, want in flags.items():
            if key in c and bool(c[key]) != want:
                problems.append(f"{key}={c[key]} (decoder-lm implements {want})")
        act = c.get("activation_function", "gelu_new")
        if act not in TANH_GELU:
            problems.append(f"activation_function={act!r} (decoder-lm implements {TANH_GELU[0]!r})")
        n_embd, inner = int(c.get("n_embd", 768)), c.get("n_inner")
        if inner is not None and int(inner) != 4 * n_embd:
            problems.append(f"n_inner={inner} (decoder-lm implements 4 * n_embd = {4 * n_embd})")
        eps = float(c.get("layer_norm_epsilon", LAYER_NORM_EPS))
        if eps != LAYER_NORM_EPS:
            problems.append(
                f"layer_norm_epsilon={eps:g} (decoder-lm implements {LAYER_NORM_EPS:g})"
            )
        if n_embd % int(c.get("n_head", 12)):
            problems.append(f"n_embd={n_embd} is not a multiple of n_head={c.get('n_head')}")
        return problems

    def config_from_hf(self, hf_config: dict[str, Any], tokenizer: HFTokenizer) -> Any:
        """The model's shape; end-of-text must be ``<|endoftext|>``, as serving expects."""
        from plugins.decoder_lm.arch import DecoderLMConfig

        eot = tokenizer.token_id(EOT)
        if eot is None:
            raise EndOfTextMissing(
                f"{tokenizer.path} has no {EOT} token: decoder-lm ends and pads text with it"
            )
        eos = hf_config.get("eos_token_id")
        if isinstance(eos, int) and eos != eot:
            raise EndOfTextMissing(
                f"config.json's eos_token_id {eos} is {tokenizer.tokenizer.id_to_token(eos)!r} "
                f"in {tokenizer.path.name}, not {EOT} (id {eot})"
            )
        return DecoderLMConfig(
            block_size=int(hf_config.get("n_positions", hf_config.get("n_ctx", 1024))),
            vocab_size=int(hf_config["vocab_size"]),
            n_layer=int(hf_config.get("n_layer", 12)),
            n_head=int(hf_config.get("n_head", 12)),
            n_embd=int(hf_config.get("n_embd", 768)),
            dropout=0.0,  # inference; fine-tuning from it (--init) sets its own with --config
        )

    def weights_from_hf(self, tensors: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """GPT-2's own names; Conv1D weights transposed, mask buffers dropped, head tied."""
        from plugins.decoder_lm.model import from_gpt2_state_dict

        return from_gpt2_state_dict(dict(tensors))

    def write_artifacts(
        self, hf_config: dict[str, Any], tokenizer: HFTokenizer, out_dir: Path
    ) -> None:
        """The tokenizer, as it is (decoder-lm reads ``tokenizer.json``)."""
        from plugins.decoder_lm.data import TOKENIZER_FILE

        shutil.copyfile(tokenizer.path, Path(out_dir) / TOKENIZER_FILE)

    # -- decoder-lm -> GPT2LMHeadModel --------------------------------------------------------
    def config_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """GPT-2's config for the decoder's shape; end-of-text is bos and eos, as in GPT-2."""
        tokenizer = _tokenizer(artifacts_dir)
        eot, pad = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": None,
            "activation_function": TANH_GELU[0],
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "tie_word_embeddings": True,
            "bos_token_id": eot,
            "eos_token_id": eot,
            "pad_token_id": pad,
        }

    def weights_to_hf(self, state_dict: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """:func:`plugins.decoder_lm.model.to_gpt2_state_dict`."""
        from plugins.decoder_lm.model import to_gpt2_state_dict

        return to_gpt2_state_dict(dict(state_dict))

    def tokenizer_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """End-of-text as bos/eos/unk (GPT-2's convention), the pad token where there is one."""
        tokenizer = _tokenizer(artifacts_dir)
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        if tokenizer.token_to_id(PAD) is not None:
            special["pad_token"] = PAD
        return {**special, "model_max_length": config.block_size}


def _tokenizer(artifacts_dir: Path):
    from plugins.decoder_lm.data import TOKENIZER_FILE, load_tokenizer

    return load_tokenizer(Path(artifacts_dir) / TOKENIZER_FILE)
