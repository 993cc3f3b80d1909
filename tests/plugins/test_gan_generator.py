"""The gan-generator architecture: it draws the requested digit and each player updates alone."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine.architecture import StepContext
from plugins.gan_generator.arch import GanGenerator
from plugins.gan_generator.model import GanConfig

# A few hundred steps of a narrow GAN: enough to draw recognisable digits, not enough for variety.
TINY = {"g_channels": 32, "d_channels": 32, "batch_size": 64, "steps": 300, "eval_per_class": 30}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run on one intra-op thread: these models are tiny, and on a busy 2-core machine a second
    spinning thread made the tiny run 10x slower (162 s vs 15 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def arch() -> GanGenerator:
    return GanGenerator()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train the tiny config once through the engine's trainer; return (dir, metrics, loaded)."""
    from engine import checkpoint
    from engine.trainer import train

    out = train(
        "gan-generator", tmp_path_factory.mktemp("gan") / "ckpt", overrides=TINY, progress=False
    )
    metrics = json.loads((out / "metrics.json").read_text())
    return out, metrics, checkpoint.load(out)


def test_judge_reads_real_held_out_digits(tiny_run):
    _, metrics, _ = tiny_run
    assert metrics["judge_accuracy_real"] >= 0.97


def test_short_run_draws_the_requested_digit(tiny_run):
    _, metrics, _ = tiny_run
    assert metrics["conditional_accuracy"] > 0.5  # chance is 0.1
    assert sorted(metrics["per_digit_accuracy"]) == [str(d) for d in range(10)]
    assert metrics["samples_judged"] == 10 * TINY["eval_per_class"]
    assert metrics["diversity_ratio"] > 0.0


def test_exported_generator_shape_range_and_conditioning(tiny_run):
    out, _, (arch, config, model) = tiny_run
    signature = arch.export_signature(config)
    inputs = arch.example_inputs(config, batch=6, seq=0, past=0, seed=1)
    assert signature.input_names() == ["z", "labels"] and signature.output_names() == ["images"]
    assert inputs["z"].dtype == np.float32 and inputs["z"].shape == (6, config.latent_dim)
    assert inputs["labels"].dtype == np.int64 and inputs["labels"].shape == (6,)

    module = arch.export_module(model, config).eval()
    with torch.no_grad():
        images = module(*(torch.from_numpy(inputs[n]) for n in signature.input_names()))
        other = module(torch.from_numpy(inputs["z"]), (torch.from_numpy(inputs["labels"]) + 1) % 10)
    assert images.dtype == torch.float32 and images.shape == (6, 1, 8, 8)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert not torch.allclose(images, other)  # the label changes the picture
    assert arch.serving_metadata(config, out) == {
        "latent_dim": config.latent_dim,
        "num_classes": 10,
        "image_shape": [1, 8, 8],
        "pixel_range": [-1.0, 1.0],
    }


def test_sample_writes_a_visible_png_grid(tiny_run, tmp_path):
    from PIL import Image

    out, _, (arch, config, model) = tiny_run
    target = tmp_path / "grid.png"
    said = arch.sample(model, out, config, {"out": target, "seed": "3"})
    assert str(target) in said
    with Image.open(target) as grid:
        assert grid.size[0] == grid.size[1] >= 10 * 8 * 4  # 10x10 digits, each upscaled


class RecordingContext(StepContext):
    """A StepContext that records which parameters got gradients and moved in each update."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(torch.device("cpu"), 0, sync=lambda opt: None, clip=None)
        self.model = model
        self.updates: list[tuple[object, set[str], set[str]]] = []

    def step(self, loss, optimizer) -> None:
        self.model.zero_grad(set_to_none=True)  # gradients seen below come from this loss only
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        super().step(loss, optimizer)
        params = dict(self.model.named_parameters())
        with_grad = {n for n, p in params.items() if p.grad is not None}
        moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
        self.updates.append((optimizer, with_grad, moved))


def test_discriminator_and_generator_steps_update_only_their_own_player(arch):
    config = GanConfig(**{**TINY, "steps": 1})
    torch.manual_seed(0)
    model = arch.build_model(config)
    opt_d, opt_g = arch.configure_optimizers(model, config)
    batch = next(arch.train_batches(arch.load_data(config, None, None), config, 0, 0, 1))
    ctx = RecordingContext(model)
    logged = arch.training_step(model, batch, [opt_d, opt_g], ctx)

    names = dict(model.named_parameters())
    gen = {n for n in names if n.startswith("generator.")}
    disc = {n for n in names if n.startswith("discriminator.")}
    (first_opt, d_grads, d_moved), (second_opt, _, g_moved) = ctx.updates
    assert (first_opt, second_opt) == (opt_d, opt_g)  # D step, then G step
    assert d_grads <= disc  # fakes are detached: the D loss puts no gradient on G
    assert d_moved <= disc and d_moved
    assert g_moved <= gen and g_moved
    assert logged["loss"] == logged["loss_g"] and logged["items"] == config.batch_size
    assert np.isfinite([logged["loss_d"], logged["loss_g"]]).all()


def test_batches_are_seeded_per_rank(arch):
    config = GanConfig(batch_size=16)
    data = arch.load_data(config, None, None)

    def first(seed: int, rank: int):
        return next(arch.train_batches(data, config, seed, rank, 2))

    images, labels = first(0, 0)
    assert images.shape == (16, 1, 8, 8) and labels.shape == (16,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images, first(0, 0)[0])
    assert not torch.equal(images, first(0, 1)[0])
    assert data.info["eval_images"] == len(data.eval) and set(data.eval.labels) == set(range(10))


@pytest.mark.slow
def test_default_run_meets_the_quality_bar(arch, tmp_path):
    from engine.trainer import train

    defaults = dataclasses.asdict(GanConfig())
    out = train("gan-generator", tmp_path / "ckpt", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == defaults["steps"]
    assert arch.quality_bar(metrics).passed, metrics["quality"]["summary"]
    assert metrics["quality"]["passed"]
