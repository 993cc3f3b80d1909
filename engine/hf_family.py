"""Hugging Face model families: how a ``transformers`` model directory maps onto an architecture.

A plugin returns :class:`HFFamily` objects from the ``engine_register_hf_families`` hook, so a
new family (its architecture plugin and this mapping) is one installable package. ``engine
export HF_DIR`` picks the family whose :attr:`HFFamily.hf_architecture` is the first entry of
the directory's ``config.json`` ``architectures``, asks it which options of that config the
architecture cannot reproduce, builds the architecture's config and renames the weights;
``engine convert CHECKPOINT --to hf`` runs the mapping the other way. The directory reading,
the checks every family shares (weights present, shapes, vocabulary) and the validation against
``transformers`` live in ``exporters/hf/``. Torch-free at import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

if TYPE_CHECKING:  # only the mapping methods touch tensors
    import torch


class HFConvertUnsupported(EngineError):
    """The architecture's config has no counterpart in the family's ``transformers`` class."""


@dataclass
class HFTokenizer:
    """A Hugging Face fast tokenizer: ``tokenizer.json`` and its ``tokenizer_config.json``."""

    path: Path  # tokenizer.json
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json, if present

    def token_id(self, token: str | None) -> int | None:
        """The id of ``token`` (a special token's text), or None if it has none."""
        return None if token is None else self.tokenizer.token_to_id(token)

    def special(self, role: str) -> str | None:
        """The text of a special token named in tokenizer_config.json (``eos_token``, ...)."""
        value = self.config.get(role)
        if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
            value = value.get("content")
        return value if isinstance(value, str) else None


class HFFamily(ABC):
    """One Hugging Face model class mapped onto one engine architecture, in both directions."""

    hf_architecture: str  # config.json "architectures"[0], also the transformers class name
    model_type: str  # config.json "model_type"
    architecture: str  # the engine architecture the family maps onto
    auto_class: str  # the transformers Auto class that loads it (validation, convert)

    @abstractmethod
    def unsupported(self, hf_config: dict[str, Any]) -> list[str]:
        """Options of ``hf_config`` the architecture does not reproduce (empty: none), one each."""

    @abstractmethod
    def config_from_hf(self, hf_config: dict[str, Any], tokenizer: HFTokenizer) -> Any:
        """The architecture's config dataclass for this model (shape, special ids, length)."""

    @abstractmethod
    def weights_from_hf(
        self, tensors: Mapping[str, torch.Tensor], config: Any
    ) -> dict[str, torch.Tensor]:
        """Rename (and transpose) the Hugging Face tensors into the architecture's state dict.

        Buffers Hugging Face saves but the architecture recomputes are dropped; every other
        unknown or missing name is left for the caller to report.
        """

    @abstractmethod
    def write_artifacts(
        self, hf_config: dict[str, Any], tokenizer: HFTokenizer, out_dir: Path
    ) -> None:
        """Write the files the architecture's ``artifact_files`` names (tokenizer, labels)."""

    # -- the other way: engine convert CHECKPOINT --to hf ---------------------------------------
    def converts(self, config: Any) -> bool:
        """Whether this family is the one ``config`` converts to (several may share an arch)."""
        return True

    def config_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """``config.json`` fields of the transformers model equivalent to ``config``."""
        raise HFConvertUnsupported(f"{self.architecture} does not convert to {self.model_type}")

    def weights_to_hf(
        self, state_dict: Mapping[str, torch.Tensor], config: Any
    ) -> dict[str, torch.Tensor]:
        """The state dict renamed (and transposed) into the transformers class's names."""
        raise HFConvertUnsupported(f"{self.architecture} does not convert to {self.model_type}")

    def tokenizer_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """Special tokens and ``model_max_length`` for the written ``tokenizer_config.json``."""
        return {}
