"""The dynamic batcher and the classify / sample_images engines built on it (fake graphs)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.repository import Manifest
from engine.runtime.backends import Backend
from engine.runtime.batched_engines import ClassifierEngine, ImageEngine, image_grid
from engine.runtime.batcher import BatcherConfig, DynamicBatcher
from engine.runtime.errors import InvalidSamplingParamsError, ModelSignatureError
from engine.runtime.loader import ModelVersion


class Recorder:
    """A fake graph: output row = 10 * input row; remembers each call's batch size."""

    def __init__(self, delay: float = 0.0):
        self.sizes: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, inputs):
        with self.lock:
            self.sizes.append(len(inputs["x"]))
        time.sleep(self.delay)
        return {"y": inputs["x"] * 10}


def submit_all(batcher, groups, stagger: float = 0.0):
    async def main():
        async def one(i, rows):
            await asyncio.sleep(stagger * i)
            return await batcher.submit({"x": np.array(rows, np.float32)})

        return await asyncio.gather(*(one(i, g) for i, g in enumerate(groups)))

    return asyncio.run(main())


def test_concurrent_callers_share_one_call_and_each_gets_its_own_rows():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch_size=16, max_queue_delay_ms=50))
    groups = [[1], [2, 3], [4], [5, 6, 7]]
    outs = submit_all(batcher, groups)
    assert run.sizes == [7]
    for g, o in zip(groups, outs):
        assert o["y"].tolist() == [10 * v for v in g]


def test_max_batch_size_splits_between_callers_never_inside_one():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch_size=4, max_queue_delay_ms=50))
    outs = submit_all(batcher, [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15]])
    assert run.sizes[:2] == [3, 3] and max(run.sizes) <= 4
    assert outs[3]["y"].tolist() == [10.0 * v for v in range(7, 16)]  # the big one in chunks


def test_a_preferred_size_is_dispatched_without_waiting_for_the_delay():
    run = Recorder()
    config = BatcherConfig(max_batch_size=32, max_queue_delay_ms=10_000, preferred_batch_sizes=(4,))
    batcher = DynamicBatcher(run, config)
    t0 = time.monotonic()
    submit_all(batcher, [[1, 2], [3, 4]])
    assert run.sizes == [4] and time.monotonic() - t0 < 5


def test_a_lone_request_waits_at_most_the_queue_delay():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch_size=32, max_queue_delay_ms=30))
    t0 = time.monotonic()
    submit_all(batcher, [[1]])
    assert run.sizes == [1] and time.monotonic() - t0 < 2


def test_a_failing_batch_fails_each_of_its_callers():
    def broken(inputs):
        raise RuntimeError("graph exploded")

    batcher = DynamicBatcher(broken, BatcherConfig(max_queue_delay_ms=20))
    with pytest.raises(RuntimeError, match="exploded"):
        submit_all(batcher, [[1], [2]])


class FakeBackend(Backend):
    """Stands in for onnxruntime; ``fn`` maps feeds to outputs."""

    name = "fake"

    def __init__(self, fn):
        self.fn, self.calls = fn, []
        self.input_names, self.output_names = [], []

    def run(self, feeds, out=None, binding_key=None):
        self.calls.append({k: v.copy() for k, v in feeds.items()})
        return self.fn(feeds)


def _version(tmp_path: Path, task: str, serving: dict) -> ModelVersion:
    manifest = Manifest("fake", 1, "onnx", task, "fake-arch", serving=serving)
    return ModelVersion(tmp_path, manifest, "fake", 1)


@pytest.fixture()
def classifier(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[CLS]": 1, "[UNK]": 2, "alpha": 3, "beta": 4, "gamma": 5}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    serving = {
        "labels": ["a", "b", "c"],
        "max_length": 4,
        "pad_token_id": 0,
        "cls_token_id": 1,
        "tokenizer": "tokenizer.json",
    }

    def logits(feeds):  # class = the last real token's id - 3, so rows are checkable
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        last = ids[np.arange(len(ids)), mask.sum(1) - 1]
        return {"logits": np.eye(3, dtype=np.float32)[(last - 3) % 3] * 5}

    backend = FakeBackend(logits)
    config = BatcherConfig(max_queue_delay_ms=50)
    return ClassifierEngine(_version(tmp_path, "classify", serving), backend, config), backend


def test_classify_pads_concurrent_texts_into_one_batch_and_returns_each_its_label(classifier):
    engine, backend = classifier

    async def main():
        return await asyncio.gather(
            engine.classify("alpha"),
            engine.classify(["beta gamma", "gamma alpha beta beta beta"]),
        )

    (one,), (two, three) = asyncio.run(main())
    assert (one.label, two.label, three.label) == ("a", "c", "b")  # last kept token decides
    assert one.score > 0.9 and [lab for lab, _ in one.top][:1] == ["a"]
    (feeds,) = backend.calls
    assert feeds["input_ids"].tolist() == [[1, 3, 0, 0], [1, 4, 5, 0], [1, 5, 3, 4]]
    assert feeds["attention_mask"].sum(1).tolist() == [2, 3, 4]


def test_images_come_back_per_label_and_seeded(tmp_path):
    serving = {"latent_dim": 4, "num_classes": 10, "image_shape": [1, 2, 2]}

    def images(feeds):
        z, labels = feeds["z"], feeds["labels"]
        return {"images": np.tanh(z[:, :, None].reshape(-1, 1, 2, 2) + labels[:, None, None, None])}

    engine = ImageEngine(_version(tmp_path, "sample_images", serving), FakeBackend(images))
    a = asyncio.run(engine.sample_images([3, 7], n=2, seed=5))
    b = asyncio.run(engine.sample_images([3, 7], n=2, seed=5))
    assert a.shape == (4, 1, 2, 2) and np.array_equal(a, b)
    with pytest.raises(InvalidSamplingParamsError, match="labels"):
        asyncio.run(engine.sample_images([12]))
    grid = image_grid(a, columns=2, scale=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 4 + 3 * 2, 2 * 4 + 3 * 2)


def test_an_engine_refuses_a_model_of_another_task(tmp_path):
    with pytest.raises(ModelSignatureError, match="generate"):
        ImageEngine(_version(tmp_path, "generate", {}), FakeBackend(dict))
