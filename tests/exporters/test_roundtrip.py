"""Round trips of the three built-in architectures (fp32 and fp16) and the task-level checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import checkpoint
from engine.graph_decoder import GraphDecoder, UnknownGraphLayout
from engine.plugins import architectures, export_formats
from engine.repository import verify_files
from exporters.base import (
    AgreementTooLow,
    ExportOptions,
    GreedyMismatch,
    LabelMismatch,
    PixelErrorTooLarge,
)
from exporters.onnx_graph import EXPORTER_ENV
from exporters.validate import (
    check_classify,
    check_generate,
    check_images,
    ort_runner,
    ort_session,
    torch_runner,
)

# Tiny configs that train in seconds yet give peaked enough outputs for fp16 top-1 agreement.
TINY = {
    "decoder-lm": {
        "n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 128, "batch_size": 8,
        "steps": 50, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "eval_windows": 16,
    },
    "text-classifier": {
        "d_model": 32, "n_layer": 1, "n_head": 2, "pretrain_steps": 20, "finetune_steps": 80,
        "finetune_lr": 1e-3,
    },
    "gan-generator": {"steps": 60, "g_channels": 16, "d_channels": 16, "eval_per_class": 10},
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Train each built-in architecture's tiny config once (lazily, on first use)."""
    from engine.trainer import train

    made = {}

    def get(name: str):
        if name not in architectures():
            pytest.skip(f"architecture {name!r} is not registered yet")
        if name not in made:
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp(name) / "ckpt"
            made[name] = train(name, out, overrides=TINY[name], progress=False)
        return made[name]

    return get


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """Export (architecture, precision) once each into one repository; return version dirs."""
    repo = tmp_path_factory.mktemp("repo")
    done = {}

    def get(name: str, fp16: bool):
        if (name, fp16) not in done:
            # fp32 takes the default path (dynamo); fp16 the TorchScript fallback, so both
            # exporters are proven on every architecture without tracing each twice
            with pytest.MonkeyPatch.context() as mp:
                if fp16:
                    mp.setenv(EXPORTER_ENV, "torchscript")
                fmt = export_formats()["onnx"]
                done[name, fp16] = fmt.export(
                    checkpoints(name), repo, ExportOptions(fp16=fp16, progress=False)
                )
        return done[name, fp16]

    return get


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip(exports, name, fp16):
    vdir = exports(name, fp16)
    manifest = verify_files(vdir).to_dict()
    arch, config, _ = checkpoint.load(manifest["checkpoint"]["path"])
    assert manifest["architecture"] == name and manifest["task"] == arch.task
    assert manifest["precision"] == ("fp16" if fp16 else "fp32")
    assert ("GPU" in manifest["precision_note"]) if fp16 else manifest["precision_note"] is None
    for variant, graph in manifest["graphs"].items():
        signature = arch.export_signature(config, variant)
        assert [t["name"] for t in graph["inputs"]] == signature.input_names()
        assert [t["name"] for t in graph["outputs"]] == signature.output_names()
        for spec, got in zip(signature.inputs, graph["inputs"]):
            assert tuple(got["shape"]) == spec.shape and got["dtype"] == spec.dtype
        assert graph["exporter"] == ("torchscript" if fp16 else "dynamo"), graph["failed_attempts"]
        if fp16:  # smaller file, same float32 interface for the runtime
            assert graph["fp16"]["bytes_fp16"] < 0.75 * graph["fp16"]["bytes_fp32"]  # tiny graphs
    validation = manifest["validation"]
    assert validation["validated"] and validation["task"]["task"] == arch.task
    for path in arch.artifact_files(checkpoint_dir := manifest["checkpoint"]["path"]):
        assert (vdir / path.name).exists(), checkpoint_dir
    task = validation["task"]["graphs"]
    if arch.task == "generate":
        assert set(manifest["graphs"]) == {"default", "kv_inplace"}
        assert validation["task"]["new_tokens"] == 64 and validation["task"]["prompts"] >= 8
        for entry in task.values():
            if fp16:
                assert entry["top1_agreement"] >= 0.99 and entry["logprob_abs_error_max"] < 0.5
            else:
                assert entry["identical_prompts"] == validation["task"]["prompts"]
        assert manifest["serving"]["eos_token_id"] == 0
    elif arch.task == "classify":
        assert task["default"]["label_agreement"] >= (0.995 if fp16 else 1.0)
        assert manifest["serving"]["labels"]
    else:
        assert task["default"]["max_abs_pixel_error"] < (5e-2 if fp16 else 1e-4)


# -- task checks fail loudly (a graph is made wrong by perturbing what it returns) ----------
@pytest.fixture(scope="module")
def lm(exports, checkpoints):
    """The fp32 decoder-lm export with runners for both of its graphs."""
    vdir = exports("decoder-lm", False)
    ckpt = checkpoints("decoder-lm")
    arch, config, model = checkpoint.load(ckpt)
    graphs = {}
    for variant in arch.export_variants(config):
        signature = arch.export_signature(config, variant)
        file = "model.onnx" if variant == "default" else f"{variant}.onnx"
        graphs[variant] = {
            "signature": signature,
            "onnx": ort_runner(ort_session(vdir / file)),
            "torch": torch_runner(arch.export_module(model, config, variant).eval(), signature),
        }
    return arch, config, ckpt, graphs


def test_one_wrong_decode_step_fails_the_greedy_check(lm):
    arch, config, ckpt, graphs = lm
    good = graphs["kv_inplace"]["onnx"]
    calls = []

    def wrong_on_step_20(feeds):
        out = good(feeds)
        calls.append(1)
        if len(calls) == 20:  # row 2 picks another token once, mid-generation
            out["logits"][2, -1] = np.roll(out["logits"][2, -1], 1)
        return out

    graph = {**graphs["kv_inplace"], "onnx": wrong_on_step_20}
    with pytest.raises(GreedyMismatch, match="'kv_inplace'.*1 of .* prompts; prompt 2 first"):
        check_generate(arch, config, ckpt, {"kv_inplace": graph}, fp16=False)


def test_a_kv_inplace_graph_that_is_another_model_fails_even_if_self_consistent(lm):
    arch, config, ckpt, graphs = lm

    def swap_top_two(run):
        def run_swapped(feeds):  # the same wrong model in both ONNX and its torch wrapper
            out = run(feeds)
            logits = out["logits"]
            top2 = np.argsort(logits, axis=-1)[..., -2:]
            best = np.take_along_axis(logits, top2[..., 1:], -1)
            np.put_along_axis(
                logits, top2[..., 1:], np.take_along_axis(logits, top2[..., :1], -1), -1
            )
            np.put_along_axis(logits, top2[..., :1], best, -1)
            return out

        return run_swapped

    inplace = graphs["kv_inplace"]
    other = {
        **inplace,
        "onnx": swap_top_two(inplace["onnx"]),
        "torch": swap_top_two(inplace["torch"]),
    }
    with pytest.raises(
        GreedyMismatch, match="'kv_inplace'.*other greedy tokens than through graph 'default'"
    ):
        check_generate(
            arch, config, ckpt, {"default": graphs["default"], "kv_inplace": other}, False
        )


def test_noisy_logits_fail_fp16_top1_agreement(lm):
    arch, config, ckpt, graphs = lm
    good, rng = graphs["default"]["onnx"], np.random.default_rng(0)

    def noisy(feeds):
        out = good(feeds)
        out["logits"] = out["logits"] + rng.normal(0, 3.0, out["logits"].shape).astype(np.float32)
        return out

    graph = {**graphs["default"], "onnx": noisy}
    with pytest.raises(AgreementTooLow, match="teacher-forced top-1 agreement"):
        check_generate(arch, config, ckpt, {"default": graph}, fp16=True)


def test_a_graph_without_the_kv_naming_convention_is_refused(lm):
    arch, config, _, graphs = lm
    signature = graphs["default"]["signature"]
    renamed = type(signature)(
        tuple(
            type(t)("kv_" + t.name.replace(".", "_"), t.dtype, t.shape) if "." in t.name else t
            for t in signature.inputs
        ),
        signature.outputs,
    )
    with pytest.raises(UnknownGraphLayout, match="role of generate input"):
        GraphDecoder(renamed, {})


def _flip_rows(run, name: str, rows: int):
    calls = []

    def flipped(feeds):
        out = run(feeds)
        if not calls:  # first batch only: ``rows`` wrong labels in all
            out[name] = out[name].copy()
            out[name][:rows] = -out[name][:rows]  # reverses the ranking: another label wins
        calls.append(1)
        return out

    return flipped


@pytest.mark.parametrize(
    "rows, fp16, error",
    [(1, False, LabelMismatch), (1, True, None), (2, True, AgreementTooLow)],
    ids=["fp32-one-row", "fp16-one-row-of-256-tolerated", "fp16-two-rows"],
)
def test_classify_label_checks(train_tiny, rows, fp16, error):
    ckpt = train_tiny()
    arch, config, model = checkpoint.load(ckpt)
    signature = arch.export_signature(config)
    run = torch_runner(model, signature)
    graph = {"signature": signature, "onnx": _flip_rows(run, "logits", rows), "torch": run}
    if error is None:
        assert check_classify(arch, config, ckpt, {"default": graph}, fp16)["graphs"]["default"][
            "label_agreement"
        ] == pytest.approx(1 - 1 / 256)
    else:
        with pytest.raises(error):
            check_classify(arch, config, ckpt, {"default": graph}, fp16)


def test_pixels_off_by_a_grey_level_fail_the_image_check(checkpoints):
    ckpt = checkpoints("gan-generator")
    arch, config, model = checkpoint.load(ckpt)
    signature = arch.export_signature(config)
    run = torch_runner(arch.export_module(model, config).eval(), signature)

    def brighter(feeds):
        return {"images": run(feeds)["images"] + 1 / 8}

    graph = {"signature": signature, "onnx": brighter, "torch": run}
    with pytest.raises(PixelErrorTooLarge, match="max abs pixel error 0.125"):
        check_images(arch, config, ckpt, {"default": graph}, fp16=False)
