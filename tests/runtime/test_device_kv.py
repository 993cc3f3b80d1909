"""The KV cache of a GPU backend stays on the device: checked through a fake device on CPU.

The tiny LM runs through onnxruntime's CPU provider with :class:`FakeDevice` as its device
layer: the pool, the new keys/values and the prefill's cached blocks are fake-device arrays
bound by pointer, so the runner takes the GPU path for real while every host<->device copy is
logged. A GPU run must make the host path's tokens and copy no cache between steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import Engine, EngineConfig, SamplingParams
from engine.runtime.backends import OnnxRuntimeBackend
from tests.runtime.conftest import MODEL
from tests.runtime.fake_device import FakeDevice

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    prefix = rng.integers(4, 8000, 40).tolist()  # shared: the prefix cache copies its blocks
    return [prefix + rng.integers(4, 8000, n).tolist() for n in (3, 17, 9)] + [[5, 6, 7]]


def _engine(repo, device: FakeDevice | None, monkeypatch) -> Engine:
    monkeypatch.setattr(OnnxRuntimeBackend, "_device_layer", staticmethod(lambda p: device))
    return Engine.from_repository(repo, MODEL, threads=1, config=EngineConfig(max_num_seqs=4))


def test_the_pool_lives_on_the_device_and_the_tokens_do_not_change(lm_repo, prompts, monkeypatch):
    host = _engine(lm_repo, None, monkeypatch)
    try:
        expected = [o.token_ids for o in host.generate_all(prompts[:1], GREEDY)]
        expected += [o.token_ids for o in host.generate_all(prompts[1:], GREEDY)]
        host_bytes = host.runner.kv_bytes
    finally:
        host.close()
    device = FakeDevice()
    engine = _engine(lm_repo, device, monkeypatch)
    try:
        runner = engine.runner
        assert device.is_device(runner.pool.blocks) and runner.kv_bytes == host_bytes
        got = [o.token_ids for o in engine.generate_all(prompts[:1], GREEDY)]  # caches the prefix
        got += [o.token_ids for o in engine.generate_all(prompts[1:], GREEDY)]
        assert engine.kv_stats().prefix_hits > 0  # the shared prefix came from the cache
    finally:
        engine.close()
    assert got == expected and len({t for ids in got for t in ids}) > 20
    assert device.copied("d2h") == 0  # logits are the backend's host outputs; nothing else


def test_a_decode_step_copies_no_cache_between_host_and_device(lm_repo, prompts, monkeypatch):
    device = FakeDevice()
    engine = _engine(lm_repo, device, monkeypatch)
    try:
        for p in prompts:
            engine.add_request(p, GREEDY)
        engine.step()  # the prefill
        block = engine.runner.pool.blocks[0, 0].nbytes  # one block of one K or V tensor
        for _ in range(8):  # decode steps of 4 rows
            device.copies.clear()
            syncs = device.syncs
            engine.step()
            # per step: the scatter's block ids and offsets, one int64 per row each
            assert device.copies == [("h2d", 32, (4,)), ("h2d", 32, (4,))]
            assert all(n < block for _, n, _ in device.copies)
            assert device.syncs == syncs + 1  # the previous scatter is done before the graph reads
    finally:
        engine.close()


@pytest.mark.gpu
def test_the_device_pool_on_a_real_gpu_does_what_the_host_pool_does():
    """cupy on the GPU host: writes, block copies and gathers equal numpy's, all on the device."""
    cupy = pytest.importorskip("cupy", reason="needs cupy and a CUDA GPU")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA GPU")
    from engine.runtime.device import CupyDevice
    from engine.runtime.kv_cache import BlockCopy
    from engine.runtime.kv_pool import DeviceKVPool, HostKVPool

    dev = CupyDevice(0)
    shape = (4, 10, 2, 16, 8)  # K/V tensors, blocks, heads, block size, head dim
    host, gpu = HostKVPool(*shape, np.float16), DeviceKVPool(dev, *shape, np.float16)
    rng = np.random.default_rng(0)
    blocks, offsets = np.array([3, 3, 7, 1, 9]), np.array([0, 1, 15, 4, 2])
    new = rng.standard_normal((5, 4, 2, 8)).astype(np.float16)
    host.write(blocks, offsets, new)
    gpu.write(blocks, offsets, dev.to_device(new))
    copies = [BlockCopy(src=3, dst=5), BlockCopy(src=5, dst=6)]
    host.copy(copies)
    gpu.copy(copies)
    np.testing.assert_array_equal(dev.to_host(gpu.blocks), host.blocks)
    ids = np.array([6, 1, 9])
    gathered = gpu.gather(ids)
    assert dev.is_device(gathered) and gathered.flags.c_contiguous
    np.testing.assert_array_equal(dev.to_host(gathered), host.gather(ids))
    step = 10 * 2 * 16 * 8 * 2  # bytes of one tensor's pool
    assert dev.pointer(gpu.view(1, 4)) == dev.pointer(gpu.blocks) + step
    with pytest.raises(TypeError, match="must be on the device"):
        gpu.write(blocks, offsets, new)  # host keys/values are refused, not copied in
