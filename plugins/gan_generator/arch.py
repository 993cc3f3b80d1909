"""The ``gan-generator`` architecture: a conditional DCGAN that draws a requested digit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.architecture import (
    Architecture,
    DataBundle,
    ExportSignature,
    QualityResult,
    StepContext,
    TensorSpec,
)
from plugins.gan_generator.data import load_digit_split, random_batches
from plugins.gan_generator.judge import judge_predict, train_judge, within_class_distance
from plugins.gan_generator.model import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    ConditionalGan,
    GanConfig,
    GeneratorExport,
)

# The bar: the judge must read real digits well, recognise the requested digit in generated
# ones, and the generator must not draw the same image every time.
MIN_JUDGE_ACCURACY = 0.97
MIN_CONDITIONAL_ACCURACY = 0.95
MIN_DIVERSITY_RATIO = 0.8

_bce = F.binary_cross_entropy_with_logits  # on logits: stabler than sigmoid + BCELoss


@torch.no_grad()
def generate(model: ConditionalGan, labels: np.ndarray, latent_dim: int, seed: int) -> np.ndarray:
    """Draw one image per label with seeded noise; returns (N, 1, 8, 8) float32 in [-1, 1]."""
    gen = model.generator
    device = next(gen.parameters()).device
    was_training = gen.training
    gen.eval()  # batch-norm running statistics, as in the exported graph
    try:
        z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(seed))
        y = torch.as_tensor(labels, dtype=torch.long)
        return gen(z.to(device), y.to(device)).cpu().numpy()
    finally:
        gen.train(was_training)


class GanGenerator(Architecture):
    """Conditional DCGAN on sklearn's 8x8 digits; serves ``(z, labels) -> images``."""

    name = "gan-generator"
    task = "sample_images"
    description = "label-conditioned DCGAN on sklearn's 8x8 digits (z + digit -> image)"
    config_class = GanConfig

    # -- training -------------------------------------------------------------------------------
    def build_model(self, config: GanConfig) -> ConditionalGan:
        """Build generator and discriminator with DCGAN's N(0, 0.02) weight init."""
        model = ConditionalGan(config)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
        return model

    def load_data(
        self, config: GanConfig, cache_dir: Path, artifacts_dir: Path | None
    ) -> DataBundle:
        """Load the stratified digits split (it ships with sklearn: nothing to cache or save)."""
        train, held_out = load_digit_split(config.holdout, config.split_seed)
        info = {"train_images": len(train), "eval_images": len(held_out), "classes": NUM_CLASSES}
        return DataBundle(train=train, eval=held_out, info=info)

    def configure_optimizers(self, model: ConditionalGan, config: GanConfig) -> list[Any]:
        """Return ``[opt_d, opt_g]``: one Adam per player, so neither step moves the other."""
        betas = (config.beta1, config.beta2)
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=config.lr_d, betas=betas)
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=config.lr_g, betas=betas)
        return [opt_d, opt_g]

    def train_batches(
        self, data: DataBundle, config: GanConfig, seed: int, rank: int, world_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (B, 1, 8, 8), labels (B,)) random minibatches of real digits forever."""
        for images, labels in random_batches(data.train, config.batch_size, seed, rank, world_size):
            yield torch.from_numpy(images), torch.from_numpy(labels)

    def training_step(
        self, model: ConditionalGan, batch: Any, optimizers: list[Any], ctx: StepContext
    ) -> dict[str, float]:
        """Update D on real vs. detached fakes, then G to make D call fresh fakes real."""
        opt_d, opt_g = optimizers
        real, real_labels = (t.to(ctx.device) for t in batch)
        n = real.shape[0]
        z = torch.randn(n, model.latent_dim, device=ctx.device)
        fake_labels = torch.randint(0, NUM_CLASSES, (n,), device=ctx.device)
        fake = model.generator(z, fake_labels)  # (B, 1, 8, 8)
        real_target = torch.full((n,), model.real_label, device=ctx.device)

        # D step: detach so the D loss does not backpropagate into (or waste time on) G
        d_real = model.discriminator(real, real_labels)
        d_fake = model.discriminator(fake.detach(), fake_labels)
        loss_d = _bce(d_real, real_target) + _bce(d_fake, torch.zeros_like(d_fake))
        ctx.step(loss_d, opt_d)

        # G step: non-saturating loss against the just-updated D; only opt_g moves
        d_fake = model.discriminator(fake, fake_labels)
        loss_g = _bce(d_fake, torch.ones_like(d_fake))
        ctx.step(loss_g, opt_g)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "loss": loss_g.item(), "items": n}

    def evaluate(
        self, model: ConditionalGan, data: DataBundle, config: GanConfig
    ) -> dict[str, Any]:
        """Judge 100 generated samples per digit with a classifier trained on real digits only."""
        train, held_out = data.train, data.eval
        judge = train_judge(train)
        judge_acc = float((judge_predict(judge, held_out.images) == held_out.labels).mean())

        labels = np.repeat(np.arange(NUM_CLASSES), config.eval_per_class)
        fakes = generate(model, labels, config.latent_dim, config.eval_seed)
        hits = judge_predict(judge, fakes) == labels
        per_digit = {str(d): float(hits[labels == d].mean()) for d in range(NUM_CLASSES)}
        real_spread = within_class_distance(held_out.images, held_out.labels)
        fake_spread = within_class_distance(fakes, labels)
        return {
            "judge_accuracy_real": judge_acc,
            "conditional_accuracy": float(hits.mean()),
            "chance_accuracy": 1.0 / NUM_CLASSES,
            "per_digit_accuracy": per_digit,
            "diversity_ratio": fake_spread / real_spread,
            "within_class_distance_fake": fake_spread,
            "within_class_distance_real": real_spread,
            "samples_judged": int(len(labels)),
        }

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """Pass when the judge is trustworthy, fakes read as their digit and are not collapsed."""
        checks = [
            ("judge accuracy on real digits", metrics["judge_accuracy_real"], MIN_JUDGE_ACCURACY),
            ("conditional accuracy", metrics["conditional_accuracy"], MIN_CONDITIONAL_ACCURACY),
            ("diversity ratio", metrics["diversity_ratio"], MIN_DIVERSITY_RATIO),
        ]
        failed = [f"{name} {value:.3f} < {bar}" for name, value, bar in checks if value < bar]
        said = ", ".join(f"{name} {value:.3f} (>= {bar})" for name, value, bar in checks)
        if failed:
            return QualityResult(False, "below the bar: " + "; ".join(failed))
        return QualityResult(True, said)

    # -- inspection -----------------------------------------------------------------------------
    def sample(
        self, model: ConditionalGan, ckpt_dir: Path, config: GanConfig, options: dict
    ) -> str:
        """Write a 10x10 PNG grid (row = digit) to ``options["out"]`` [CKPT/samples.png]."""
        from PIL import Image

        out = Path(options.get("out") or Path(ckpt_dir) / "samples.png")
        scale = int(options.get("scale", 8))  # 8x8 pixels are too small to see unscaled
        seed = int(options.get("seed", 0))
        labels = np.repeat(np.arange(NUM_CLASSES), NUM_CLASSES)
        fakes = generate(model, labels, config.latent_dim, seed)[:, 0]  # (100, 8, 8)
        tiles = ((fakes + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        cell, pad = 8 * scale, scale
        grid = np.zeros((NUM_CLASSES * (cell + pad) + pad,) * 2, dtype=np.uint8)
        for i, tile in enumerate(tiles):
            row, col = divmod(i, NUM_CLASSES)
            y, x = pad + row * (cell + pad), pad + col * (cell + pad)
            grid[y : y + cell, x : x + cell] = np.kron(tile, np.ones((scale, scale), np.uint8))
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid, mode="L").save(out)
        return f"wrote a 10x10 grid of generated digits (row = digit 0..9) to {out}"

    # -- export and serving ---------------------------------------------------------------------
    def export_signature(self, config: GanConfig, variant: str = "default") -> ExportSignature:
        """Inputs ``z`` (batch, latent), ``labels`` (batch,); output ``images`` (batch, 1, 8, 8)."""
        return ExportSignature(
            inputs=(
                TensorSpec("z", "float32", ("batch", config.latent_dim)),
                TensorSpec("labels", "int64", ("batch",)),
            ),
            outputs=(TensorSpec("images", "float32", ("batch", *IMAGE_SHAPE)),),
        )

    def export_module(
        self, model: ConditionalGan, config: GanConfig, variant: str = "default"
    ) -> GeneratorExport:
        """Wrap the generator alone; the discriminator is only needed for training."""
        return GeneratorExport(model.generator)

    def example_inputs(
        self,
        config: GanConfig,
        batch: int,
        seq: int,
        past: int,
        seed: int = 0,
        variant: str = "default",
    ) -> dict[str, Any]:
        """Standard-normal noise and random digits for ``batch`` rows (``seq``/``past`` unused)."""
        rng = np.random.default_rng(seed)
        return {
            "z": rng.standard_normal((batch, config.latent_dim)).astype(np.float32),
            "labels": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64),
        }

    def serving_metadata(self, config: GanConfig, ckpt_dir: Path) -> dict[str, Any]:
        """Latent size, number of digits and the image shape/range a client must know."""
        return {
            "latent_dim": config.latent_dim,
            "num_classes": NUM_CLASSES,
            "image_shape": list(IMAGE_SHAPE),
            "pixel_range": [-1.0, 1.0],
        }
