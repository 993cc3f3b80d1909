"""Fake models with the runtime's shape, so server tests run without training anything.

``FakeLM`` keeps a KV-block pool that only ``abort`` and normal completion free: a server that
forgets to abort a cancelled request leaves blocks behind, which the tests check.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator

import numpy as np

from engine.repository import Manifest
from engine.runtime.errors import RequestTooLongError
from engine.runtime.outputs import TokenLogprob
from engine.server.models import Chunk, ModelCard, ModelStats


def _manifest(name: str, task: str, architecture: str) -> Manifest:
    return Manifest(name=name, version=1, format="fake", task=task, architecture=architecture)


ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


class FakeLM:
    """A character-level 'model': one token per character, output cycles through the alphabet."""

    def __init__(
        self,
        name: str = "lm",
        delay: float = 0.0,
        context_length: int = 64,
        block_size: int = 4,
        num_blocks: int = 4096,
    ):
        self.card = ModelCard(
            name=name,
            version=1,
            task="generate",
            architecture="fake-lm",
            manifest=_manifest(name, "generate", "fake-lm"),
            context_length=context_length,
            vocab_size=len(ALPHABET) + 4,
        )
        self.delay = delay
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks: dict[str, int] = {}  # request id -> blocks held
        self.started = 0
        self.steps = 0
        self.aborted: list[str] = []

    def tokenize(self, text: str) -> list[int]:
        return [ALPHABET.find(c) + 4 if c in ALPHABET else 3 for c in text]

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [ALPHABET[t - 4] if t >= 4 else "?" for t in token_ids]

    async def generate(self, request_id: str, prompt: str, params) -> AsyncIterator[Chunk]:
        ids = self.tokenize(prompt)
        if len(ids) >= self.card.context_length:
            raise RequestTooLongError(
                f"the prompt has {len(ids)} tokens; the model's context is "
                f"{self.card.context_length} tokens"
            )
        if request_id in self.blocks:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.started += 1
        self.blocks[request_id] = math.ceil(len(ids) / self.block_size)
        limit = min(params.max_tokens, self.card.context_length - len(ids))
        rng = np.random.default_rng(params.seed or 0)
        start = sum(ids) % len(ALPHABET)
        for i in range(limit):
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
            if request_id not in self.blocks:
                return  # aborted
            self.steps += 1
            step = i if params.temperature == 0 else int(rng.integers(0, len(ALPHABET)))
            token = (start + step) % len(ALPHABET) + 4
            self.blocks[request_id] = math.ceil((len(ids) + i + 1) / self.block_size)
            done = i + 1 == limit
            logprobs = None
            if params.logprobs is not None:
                logprobs = [TokenLogprob(token, -0.5, [(token, -0.5)] * params.logprobs)]
            if done:
                del self.blocks[request_id]
            yield Chunk(
                text=ALPHABET[token - 4],
                token_ids=[token],
                finish_reason="length" if done else None,
                logprobs=logprobs,
                prompt_tokens=len(ids),
                completion_tokens=i + 1,
            )

    def abort(self, request_id: str) -> None:
        if self.blocks.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def kv_blocks_used(self) -> int:
        return sum(self.blocks.values())

    def stats(self) -> ModelStats:
        used = self.kv_blocks_used()
        return ModelStats(
            kv_blocks_used=used, kv_blocks_free=self.num_blocks - used, num_running=len(self.blocks)
        )

    async def close(self) -> None:
        pass


class FakeClassifier:
    """Probabilities from the text's length and vowels: deterministic and cheap."""

    def __init__(self, name: str = "clf", delay: float = 0.0):
        self.card = ModelCard(
            name=name,
            version=2,
            task="classify",
            architecture="fake-clf",
            manifest=_manifest(name, "classify", "fake-clf"),
            labels=("neg", "neu", "pos"),
        )
        self.delay = delay
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [str(t) for t in token_ids]

    async def classify(self, texts: list[str]) -> np.ndarray:
        await asyncio.sleep(self.delay)
        self.batch_sizes[len(texts)] += 1
        logits = np.array(
            [[len(t) % 3, sum(c in "aeiou" for c in t) % 3, 1.0] for t in texts], dtype=np.float32
        )
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def stats(self) -> ModelStats:
        return ModelStats(batch_sizes=dict(self.batch_sizes))

    async def close(self) -> None:
        pass


class FakeGan:
    """Images from a seeded generator; the digit shifts the mean so images differ per digit."""

    def __init__(self, name: str = "gan"):
        self.card = ModelCard(
            name=name,
            version=1,
            task="sample_images",
            architecture="fake-gan",
            manifest=_manifest(name, "sample_images", "fake-gan"),
            image_shape=(1, 8, 8),
            num_classes=10,
            pixel_range=(-1.0, 1.0),
        )

    async def sample_images(self, digits: list[int], seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((len(digits), *self.card.image_shape))
        shift = (np.asarray(digits, dtype=np.float64) / 10.0)[:, None, None, None]
        return np.tanh(noise + shift).astype(np.float32)

    def stats(self) -> ModelStats:
        return ModelStats()

    async def close(self) -> None:
        pass


def fake_models(delay: float = 0.0) -> list:
    """One fake model of each task."""
    return [FakeLM(delay=delay), FakeClassifier(), FakeGan()]
