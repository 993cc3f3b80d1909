"""A label-conditioned DCGAN for 8x8 digits: generator, discriminator, and a module holding both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@dataclass
class GanConfig:
    """Hyperparameters of the default run: ~2 minutes on 2 CPU cores, meets the quality bar."""

    latent_dim: int = 32  # 64 pixels of 17 grey levels need far less than DCGAN's 100
    embed_dim: int = 16  # label embedding fed to the generator next to z
    g_channels: int = 64  # width of the generator's 4x4 stage (the 2x2 stage has twice that)
    d_channels: int = 64  # width of the discriminator's 4x4 stage (the 2x2 stage has twice that)
    batch_size: int = 128  # 64 needs more steps to reach the same diversity
    lr_g: float = 2e-4  # DCGAN's Adam settings
    lr_d: float = 2e-4
    beta1: float = 0.5  # beta1=0.9 makes the two-player game oscillate
    beta2: float = 0.999
    real_label: float = 0.9  # one-sided label smoothing keeps D from saturating early
    grad_clip: float = 1.0  # the trainer clips each player's gradient norm; 0 turns it off
    steps: int = 2500
    holdout: float = 0.2  # stratified share of load_digits() kept for the judge
    split_seed: int = 0  # fixed so every run is judged on the same held-out digits
    eval_per_class: int = 100  # generated samples per digit for the judge
    eval_seed: int = 1234  # fixed noise for evaluation so runs are comparable


class Generator(nn.Module):
    """Map noise z (B, latent) and labels (B,) to images (B, 1, 8, 8) in [-1, 1]."""

    def __init__(self, cfg: GanConfig):
        super().__init__()
        c = cfg.g_channels
        self.embed = nn.Embedding(NUM_CLASSES, cfg.embed_dim)
        # DCGAN's first layer is a transposed conv on a 1x1 "image": z must be (B, C, 1, 1)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.latent_dim + cfg.embed_dim, 2 * c, 2, 1, 0, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(True),  # (B, 2c, 2, 2)
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),  # (B, c, 4, 4)
            nn.ConvTranspose2d(c, 1, 4, 2, 1),
            nn.Tanh(),  # (B, 1, 8, 8), the data's [-1, 1] scale
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(labels)], dim=1)  # (B, latent + embed)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    """Score (image, label) pairs: one real/fake logit per row, shape (B,).

    The label enters twice: as an extra input channel (so the convolutions see it) and as a
    projection term on the features (Miyato & Koyama 2018), which makes conditioning sharper.
    """

    def __init__(self, cfg: GanConfig):
        super().__init__()
        c = cfg.d_channels
        self.label_plane = nn.Embedding(NUM_CLASSES, 64)  # one learned 8x8 plane per digit
        self.features = nn.Sequential(
            nn.Conv2d(2, c, 4, 2, 1),
            nn.LeakyReLU(0.2, True),  # (B, c, 4, 4)
            nn.Conv2d(c, 2 * c, 4, 2, 1),
            nn.LeakyReLU(0.2, True),  # (B, 2c, 2, 2)
            nn.Flatten(),  # (B, 8c)
        )
        self.head = nn.Linear(8 * c, 1)
        self.project = nn.Embedding(NUM_CLASSES, 8 * c)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        plane = self.label_plane(labels).view(-1, *IMAGE_SHAPE)  # (B, 1, 8, 8)
        h = self.features(torch.cat([images, plane], dim=1))  # (B, 8c)
        return self.head(h).squeeze(1) + (self.project(labels) * h).sum(dim=1)


class ConditionalGan(nn.Module):
    """Both players in one module so one state_dict checkpoints the pair."""

    def __init__(self, cfg: GanConfig):
        super().__init__()
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        # training_step gets no config; these plain attributes carry what it needs
        self.latent_dim = cfg.latent_dim
        self.real_label = cfg.real_label


class GeneratorExport(nn.Module):
    """The exported graph: ``forward(z, labels) -> images``; the discriminator stays behind."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(z, labels)
