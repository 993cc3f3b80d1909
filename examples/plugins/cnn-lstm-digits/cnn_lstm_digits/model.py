"""A CNN reads each row of an 8x8 digit, an LSTM reads the rows top to bottom, a head classifies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

NUM_CLASSES = 10


@dataclass
class CnnLstmConfig:
    """Hyperparameters of the default run: well under a minute on 2 CPU cores, ~98% accuracy."""

    channels: int = 16  # conv feature maps per pixel; 8 rows x 16 maps x 8 columns per row
    hidden: int = 64  # LSTM state; the digit is decided from its last step
    dropout: float = 0.1
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    steps: int = 400  # ~18 epochs of the 1,437 training digits
    grad_clip: float = 1.0  # LSTMs occasionally spike early on
    holdout: float = 0.2  # stratified share of load_digits() kept for evaluation
    split_seed: int = 0  # fixed so every run is judged on the same digits


class CnnLstm(nn.Module):
    """Map pixels (B, 1, 8, 8) in [0, 1] to digit logits (B, 10)."""

    def __init__(self, cfg: CnnLstmConfig):
        super().__init__()
        c = cfg.channels
        # 3x3 convolutions see the rows above and below, so each row's feature carries strokes
        self.cnn = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),  # (B, c, 8, 8)
        )
        self.lstm = nn.LSTM(input_size=8 * c, hidden_size=cfg.hidden, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, NUM_CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.cnn(pixels)  # (B, c, 8, 8)
        rows = h.permute(0, 2, 1, 3).flatten(2)  # (B, 8 rows, c * 8 columns): one step per row
        seq, _ = self.lstm(rows)  # (B, 8, hidden)
        return self.head(self.dropout(seq[:, -1]))  # (B, 10)
