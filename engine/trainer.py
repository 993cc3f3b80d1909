"""The generic training loop: seeds, devices, torch.distributed, progress, checkpoints, evaluation.

Architectures supply data, batches, the step and the metric; this module owns everything that
is the same for all of them. Under ``torchrun`` each rank trains on its own data shard and
gradients are averaged with an all-reduce before every optimizer step (gloo on CPU, nccl on
CUDA); rank 0 evaluates and writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from engine import checkpoint
from engine.architecture import StepContext
from engine.configs import make_config
from engine.errors import EngineError
from engine.paths import cache_dir
from engine.progress import LineProgress, is_terminal


class DeviceError(EngineError):
    """Raised when the requested device does not exist on this machine."""


def resolve_device(name: str) -> Any:
    """Turn ``cpu|cuda|auto`` into a torch.device, failing clearly when CUDA is absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU "
                "here; use --device cpu or auto"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}; use cpu, cuda or auto")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a run is repeatable."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Distributed:
    """torch.distributed when launched by torchrun, a no-op otherwise."""

    def __init__(self, device: Any):
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world_size > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self._dist = dist

    def broadcast_params(self, model: Any) -> None:
        if self.active:
            for tensor in model.state_dict().values():
                self._dist.broadcast(tensor, src=0)

    def sync_grads(self, optimizer: Any) -> None:
        if not self.active:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._dist.all_reduce(p.grad, op=self._dist.ReduceOp.SUM)
                    p.grad.div_(self.world_size)

    def barrier(self) -> None:
        if self.active:
            self._dist.barrier()

    def close(self) -> None:
        if self.active and self._dist.is_initialized():
            self._dist.destroy_process_group()


def _progress(enabled: bool):
    """rich's bar on a terminal; a plain line every few seconds on a pipe or a file."""
    if not is_terminal():
        return LineProgress("loss {loss:.4f}  {speed:,.0f} {unit}/s", enabled=enabled)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:,.0f} {task.fields[unit]}/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    arch_name: str,
    out_dir: Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int | None = None,
    init: Any = None,
) -> Path:
    """Train ``arch_name`` and write a checkpoint to ``out_dir``; return the checkpoint path.

    ``init`` (a loaded model: ``arch``, ``config``, ``model``, ``artifacts_dir``,
    ``provenance``, as ``exporters.source.open_source`` gives) starts from its weights, config
    and tokenizer instead of a random init: continued pretraining, or fine-tuning when its
    architecture trains as ``arch_name`` (``Architecture.trains_as``). ``overrides`` apply on
    top of its config; tensors whose shape they change (a classifier head for other labels)
    start fresh and are listed in ``config.json``'s ``init``.
    """
    import torch

    from engine.plugins import get_architecture

    out_dir = Path(out_dir)
    arch, plugin = get_architecture(arch_name)
    dev = resolve_device(device)
    start_step, state = 0, None
    if init is not None:
        if resume:
            raise EngineError("--init starts a new run; --resume continues one: pick one")
        arch, plugin = _init_architecture(arch_name, init)
        config = make_config(
            arch.config_class, {**dataclasses.asdict(init.config), **(overrides or {})}
        )
    elif resume:
        meta = checkpoint.read_meta(out_dir)
        if meta.architecture != arch_name:
            raise checkpoint.CheckpointError(
                f"{out_dir} holds a {meta.architecture} checkpoint, not {arch_name}"
            )
        config = make_config(arch.config_class, {**meta.config, **(overrides or {})})
        seed, start_step = meta.seed, meta.step
        state_path = out_dir / checkpoint.TRAINER_STATE
        if not state_path.exists():
            raise checkpoint.CheckpointError(f"{out_dir} has no {state_path.name} to resume from")
        state = torch.load(state_path, weights_only=True)
    else:
        config = make_config(arch.config_class, dict(overrides or {}))
    if steps is not None:
        config = arch.with_steps(config, steps)
    total = arch.steps(config)

    dist = _Distributed(dev)
    is_main = dist.rank == 0
    say = _say if progress and is_main else lambda message: None
    seed_everything(seed)
    artifacts = init.artifacts_dir if init is not None else (out_dir if resume else None)
    say(f"{arch_name}: preparing data (cached after the first run)")
    data = arch.load_data(config, cache_dir(), artifacts)
    model = arch.build_model(config)
    if state is None:  # a resumed run loads its weights below instead
        arch.init_weights(model, data, config)
    init_record = _load_init(model, init) if init is not None else None  # overrides both
    model = model.to(dev)
    optimizers = arch.configure_optimizers(model, config)
    if state is not None:
        _, _, loaded = checkpoint.load(out_dir, device=str(dev))
        model.load_state_dict(loaded.state_dict())
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
    dist.broadcast_params(model)
    model.train()
    # a resumed run draws fresh batches instead of replaying the ones it already saw
    batches = arch.train_batches(data, config, seed + start_step, dist.rank, dist.world_size)

    def save(step: int, metrics: dict[str, Any] | None) -> None:
        trainer_state = {"optimizers": [o.state_dict() for o in optimizers], "step": step}
        checkpoint.write(
            out_dir,
            arch=arch,
            plugin=plugin,
            config=config,
            model=model,
            data=data,
            step=step,
            seed=seed,
            metrics=metrics,
            trainer_state=trainer_state,
            extra={
                "world_size": dist.world_size,
                "device": dev.type,
                **({"init": init_record} if init_record else {}),
            },
        )

    unit = getattr(arch, "item_unit", "items")
    t0, items, last = time.perf_counter(), 0.0, {}
    try:
        with _progress(progress and is_main) as bar:
            task = bar.add_task(
                arch.name,
                total=total,
                completed=start_step,
                loss=float("nan"),
                speed=0.0,
                unit=unit,
            )
            for step in range(start_step, total):
                ctx = StepContext(dev, step, dist.sync_grads, getattr(config, "grad_clip", None))
                last = arch.training_step(model, next(batches), optimizers, ctx)
                items += float(last.get("items", 0)) * dist.world_size
                speed = items / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, loss=float(last.get("loss", float("nan"))), speed=speed)
                done = step + 1
                if checkpoint_every and is_main and done % checkpoint_every == 0 and done < total:
                    save(done, None)  # a periodic checkpoint that --resume continues from
        train_time = time.perf_counter() - t0
        dist.barrier()
        if is_main:
            say(f"{arch_name}: evaluating on held-out data")
            model.eval()
            with torch.no_grad():
                metrics = arch.evaluate(model, data, config)
            quality = arch.quality_bar(metrics)
            metrics = {
                **metrics,
                "quality": dataclasses.asdict(quality),
                "train": {
                    "steps": total,
                    "resumed_from": start_step,
                    "seconds": round(train_time, 2),
                    f"{unit}_per_s": round(items / max(train_time, 1e-9), 1),
                    "final_loss": last.get("loss"),
                    "world_size": dist.world_size,
                    "device": dev.type,
                    "seed": seed,
                },
                "data": data.info,
            }
            save(total, metrics)
        dist.barrier()
    finally:
        dist.close()
    return out_dir


def _init_architecture(arch_name: str, init: Any) -> tuple[Any, Any]:
    """The architecture that trains from ``init``: its own, if it is or trains as ``arch_name``."""
    from engine.plugins import get_architecture

    source = init.arch
    if source.name != arch_name and arch_name not in getattr(source, "trains_as", ()):
        names = " or ".join([source.name, *getattr(source, "trains_as", ())])
        raise EngineError(
            f"--init holds a {source.name} model, which `engine train {arch_name}` cannot start "
            f"from; train it as {names}"
        )
    return get_architecture(source.name)


def _load_init(model: Any, init: Any) -> dict[str, Any]:
    """Copy ``init``'s weights into ``model`` where names and shapes agree; say what did not."""
    theirs = init.model.state_dict()
    ours = model.state_dict()
    fresh = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape)
    model.load_state_dict({k: v for k, v in theirs.items() if k not in fresh}, strict=False)
    return {
        "from": init.provenance.get("path"),
        "source": init.provenance.get("source", "checkpoint"),
        "architecture": init.arch.name,
        "fresh_tensors": fresh,  # not taken from the source (their shape changed)
    }
