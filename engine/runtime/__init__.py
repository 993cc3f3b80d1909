"""The serving runtime: scheduler, KV-cache manager, sampler, backends and engines (torch-free).

from engine.runtime import Engine, SamplingParams

engine = Engine.from_repository("repo", model="decoder-lm")
async for out in engine.generate("def fib(n):", SamplingParams(max_tokens=64)):
    print(out.delta_text, end="")
"""

from engine.runtime.api import AnyEngine, Engine
from engine.runtime.batched_engines import Classification, ClassifierEngine, ImageEngine, image_grid
from engine.runtime.batcher import BatcherConfig, DynamicBatcher
from engine.runtime.llm_engine import EngineConfig, LLMEngine
from engine.runtime.outputs import RequestOutput, TokenLogprob, Usage
from engine.runtime.sampling_params import SamplingParams

__all__ = [
    "AnyEngine",
    "BatcherConfig",
    "Classification",
    "ClassifierEngine",
    "DynamicBatcher",
    "Engine",
    "EngineConfig",
    "ImageEngine",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
    "image_grid",
]
