"""The architecture contract: what a plugin declares so the engine can train, export and serve it.

A plugin returns instances of :class:`Architecture` from the ``engine_register_architectures``
hook. The engine never imports a plugin by name; everything it needs to know about a model
(config, torch module, data, loss, metric, quality bar, export signature, serving metadata)
comes through these methods. The export and serving layers are generic over ``task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is only needed by training/export, never by the serving path
    import torch

Task = Literal["generate", "classify", "sample_images"]
TASKS: tuple[str, ...] = ("generate", "classify", "sample_images")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name and shape with named dynamic axes.

    ``shape`` holds ints for fixed sizes and strings for dynamic axes, e.g.
    ``("batch", "sequence")`` or ``("batch", 4, "past_sequence", 32)``.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        """Map axis index to axis name for every dynamic axis (the torch.onnx convention)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ExportSignature:
    """The inputs and outputs of an exported graph plus the tolerances its validation uses."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4  # fp32 graphs reproduce torch to rounding error
    rtol: float = 1e-3
    fp16_atol: float = 5e-2  # fp16 keeps ~3 significant digits
    fp16_rtol: float = 5e-2

    def input_names(self) -> list[str]:
        """Input names in positional order."""
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        """Output names in positional order."""
        return [t.name for t in self.outputs]


@dataclass
class DataBundle:
    """Train and held-out data plus artifacts saved beside the checkpoint (e.g. a tokenizer)."""

    train: Any
    eval: Any
    artifacts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # sizes, class names: goes to metrics.json


@dataclass
class QualityResult:
    """Whether evaluation metrics meet the quality bar, with a sentence saying why."""

    passed: bool
    summary: str


class StepContext:
    """What a training step gets from the trainer: backward/step with gradient sync across ranks.

    Architectures call ``ctx.step(loss, optimizer)`` once per optimizer they update in a step
    (a GAN updates two). The trainer owns zeroing, gradient clipping, the all-reduce of
    gradients under torch.distributed, and mixed device placement.
    """

    def __init__(
        self, device: torch.device, step: int, sync: Callable[[Any], None], clip: float | None
    ):
        self.device = device
        self.step_index = step
        self._sync = sync
        self._clip = clip

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backpropagate ``loss`` and apply one update of ``optimizer``."""
        import torch

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sync(optimizer)
        if self._clip:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self._clip)
        optimizer.step()


class Architecture(ABC):
    """Base class of every architecture a plugin registers. Subclasses set the class attributes."""

    name: str  # CLI name, e.g. "decoder-lm"
    task: Task  # how the runtime serves it
    description: str = ""
    config_class: type  # a dataclass whose defaults are the default training run

    # -- training ---------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, config: Any) -> torch.nn.Module:
        """Build the torch module for ``config`` (random init; the trainer seeds torch first)."""

    @abstractmethod
    def load_data(self, config: Any, cache_dir: Path, artifacts_dir: Path | None) -> DataBundle:
        """Load train/held-out data offline; reuse artifacts from ``artifacts_dir`` on resume."""

    def init_weights(  # noqa: B027 - optional
        self, model: torch.nn.Module, data: DataBundle, config: Any
    ) -> None:
        """Initialise weights from the training data before the first step (default: keep)."""

    @abstractmethod
    def configure_optimizers(self, model: torch.nn.Module, config: Any) -> list[Any]:
        """Return the optimizers ``training_step`` will step, in a fixed order."""

    @abstractmethod
    def train_batches(
        self, data: DataBundle, config: Any, seed: int, rank: int, world_size: int
    ) -> Iterator[Any]:
        """Yield training batches forever; each rank sees its own shard."""

    @abstractmethod
    def training_step(
        self, model: torch.nn.Module, batch: Any, optimizers: list[Any], ctx: StepContext
    ) -> dict[str, float]:
        """Run one update through ``ctx.step``; return scalars to log, with ``items`` for speed."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: DataBundle, config: Any) -> dict[str, Any]:
        """Compute held-out metrics (and their baselines) as a JSON-serialisable dict."""

    @abstractmethod
    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """Judge the metrics against this architecture's quality bar."""

    item_unit: str = "samples"  # what ``items`` counts in the progress bar: tokens, samples
    # Other names `engine train NAME --init SOURCE` trains this architecture under (it takes
    # over their data and quality bar from a pretrained model: bert-classifier as text-classifier)
    trains_as: tuple[str, ...] = ()

    def steps(self, config: Any) -> int:
        """Number of training steps of the run ``config`` describes."""
        return int(config.steps)

    def with_steps(self, config: Any, steps: int) -> Any:
        """Return ``config`` changed to train for ``steps`` steps (``--steps``)."""
        import dataclasses

        return dataclasses.replace(config, steps=steps)

    def save_artifacts(self, data: DataBundle, out_dir: Path) -> None:  # noqa: B027 - optional
        """Write artifacts such as a tokenizer into the checkpoint directory (default: none)."""

    # -- inspection ----------------------------------------------------------------------------
    @abstractmethod
    def sample(self, model: torch.nn.Module, ckpt_dir: Path, config: Any, options: dict) -> str:
        """Run the trained model once for a person to look at; return what to print."""

    # -- export and serving ------------------------------------------------------------------
    def export_variants(self, config: Any) -> tuple[str, ...]:
        """Names of the graphs one export writes; the first is the main one (``model.onnx``).

        The decoder LM adds ``kv_inplace``: a graph that reads the runtime's paged KV pool in
        place through block tables and returns only the new tokens' keys/values, so the
        runtime never copies the cache.
        """
        return ("default",)

    @abstractmethod
    def export_signature(self, config: Any, variant: str = "default") -> ExportSignature:
        """Declare the exported graph's inputs/outputs (names, dtypes, dynamic axes)."""

    @abstractmethod
    def export_module(
        self, model: torch.nn.Module, config: Any, variant: str = "default"
    ) -> torch.nn.Module:
        """Wrap the model so ``forward(*inputs)`` takes and returns the signature's tensors."""

    @abstractmethod
    def example_inputs(
        self, config: Any, batch: int, seq: int, past: int, seed: int = 0, variant: str = "default"
    ) -> dict[str, Any]:
        """Make numpy inputs matching the signature for the given sizes (for tracing/validation).

        ``past`` is the cached length (decoder only; ignored elsewhere). Rows may be made of
        uneven lengths (left padding / masks) so validation covers what the runtime batches.
        """

    @abstractmethod
    def serving_metadata(self, config: Any, ckpt_dir: Path) -> dict[str, Any]:
        """What the runtime needs besides the graph (context length, eos id, labels, latents)."""

    def artifact_files(self, ckpt_dir: Path) -> list[Path]:
        """Files besides the weights that the export copies into the model repository."""
        return []

    def heldout_examples(self, config: Any, ckpt_dir: Path) -> tuple[dict[str, Any], Any] | None:
        """Held-out inputs of the main graph and their targets, for a quantized export's check.

        ``generate``: ``input_ids`` and ``attention_mask`` (N, T) with targets (N, T), the next
        ids; ``classify``: the graph's inputs with the labels (N,). None (the default): no
        held-out data, so ``engine export --int8`` cannot be validated.
        """
        return None
