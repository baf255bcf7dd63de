"""Tiny LoRA adapters for the tiny Wan models, in every layout users have, and diffusers' outputs with them.

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1 + peft), after
make_fixtures.py and make_image_fixtures.py (it reads `wan21-tiny-a/`, `wan22-t2v-a14b-tiny/` and their references);
writes next to this file:

  loras/wan21-peft.safetensors       diffusers/PEFT layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`), rank 4,
                                     no alphas, f32, written by `WanPipeline.save_lora_weights`
  loras/wan21-official.safetensors   official Wan / lightx2v / ComfyUI layout (`diffusion_model.blocks.0.self_attn.q.
                                     lora_down.weight`, `.lora_up.weight`, `.alpha`, `.diff`, `.diff_b`), rank 8, f32
  loras/wan21-musubi.safetensors     kohya / musubi-tuner layout (`lora_unet_blocks_0_self_attn_q.lora_down.weight`,
                                     `.lora_up.weight`, `.alpha`), rank 4, f16
  loras/wan22-a14b-high.safetensors  official layout, bf16, for wan22-t2v-a14b-tiny's `transformer` (high noise)
  loras/wan22-a14b-low.safetensors   official layout, bf16, for its `transformer_2` (low noise), with a `head.head.diff`
  loras/wan21-unmatched.safetensors  the PEFT file plus a LoRA on a module Wan does not have (error test; no reference)

and `reference/lora/` (forward.safetensors, pipeline.safetensors, a14b.safetensors, few_step.safetensors, ref.json;
see the "LoRA adapters" section of FIXTURES.md).

Every forward reference (and each A14B expert with its adapter) is also recomputed from the adapter files by
`merge_adapters` below, an implementation of the rules FIXTURES.md documents written without diffusers' converter (key
mapping, alpha / rank, `diff`, `diff_b`, the keys diffusers drops), and checked against diffusers' unfused LoRA layers
to f32 rounding; `check_converted` checks the converter's output against the same rules module by module.

All pipeline runs use UniPC with `benches/gpu/bench.py`'s `pin_unipc_schedule` (the official Wan grid, as every
tiny reference), except the few-step run, which uses FlowMatchEulerDiscreteScheduler with explicit timesteps.
Everything is seeded, CPU and f32, so a rerun reproduces the files byte for byte.
"""

import hashlib
import json
import logging
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_fixtures  # noqa: E402  (wan21-tiny-a's run settings and the shared helpers)
import make_image_fixtures  # noqa: E402  (wan22-t2v-a14b-tiny's run settings, its loader and the UniPC pin)
from make_fixtures import pipeline_kwargs, save  # noqa: E402
from make_image_fixtures import ExpertRecorder, load_pipeline, pin_unipc_schedule  # noqa: E402

BASE = "wan21-tiny-a"
A14B = "wan22-t2v-a14b-tiny"
LORAS = ROOT / "loras"
OUT = ROOT / "reference" / "lora"

# diffusers 0.42.1's default (low_cpu_mem_usage=True) builds the LoRA layers on the meta device and only fills what
# the file holds: once one module has a `diff_b` (PEFT `lora_bias`), every LoRA layer gets a bias, and those of the
# modules without one stay on meta, so the forward fails ("Tensor on device meta is not on the expected device
# cpu"). With False they are zero-initialized, which is what the file means.
LOAD = dict(low_cpu_mem_usage=False)

# A Wan block's linear layers: official / ComfyUI name -> diffusers name. (kohya/musubi: the official name with
# `_` for `.`.) `k_img` / `v_img` (image cross-attention, I2V only) are not in these text-to-video models.
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Outside the blocks, what diffusers' converter maps (official name -> diffusers name).
TOP_LINEARS = {
    "head.head": "proj_out",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
}

# The adapters. `amp`: the size of each LoRA delta relative to the base weight it is added to (B @ A has entries
# about amp / sqrt(in_features) before the alpha / rank scale, the weights about 1 / sqrt(in_features)); chosen so
# that each adapter alone at scale 0.8 moves the transformer output by 5-30% (checked).
PEFT = dict(rank=4, amp=0.45, seed=21)
OFFICIAL = dict(
    rank=8,
    # alpha per group of linear layers (alpha / rank: 0.75 for attention, 2.0 for the feed-forward)
    alpha={"attn": 6.0, "ffn": 16.0},
    amp=0.28,
    # bias deltas on modules that also have a LoRA
    diff_b=["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2"],
    # a bias delta on a module with no LoRA pair (its lora_down / lora_up are left out of the file)
    diff_b_only=["blocks.1.cross_attn.v"],
    # norm deltas as distill LoRAs carry them: zeros (diffusers drops every `norm` diff, see FIXTURES.md)
    zero_norm_diffs=[
        "blocks.0.norm3.diff",
        "blocks.0.norm3.diff_b",
        "blocks.0.self_attn.norm_q.diff",
        "blocks.0.self_attn.norm_k.diff",
        "blocks.1.cross_attn.norm_q.diff",
    ],
    # a full weight delta on the output head (diffusers maps `head.head.diff` only together with `head.head.diff_b`)
    head_diff=0.1,
    # LoRA pairs outside the blocks, without alpha (diffusers' converter refuses an alpha there)
    top_lora=["time_projection.1", "text_embedding.0", "time_embedding.2"],
    top_diff_b=["time_projection.1", "text_embedding.0"],
    dtype=torch.float32,
    seed=22,
)
MUSUBI = dict(rank=4, alpha=1.0, amp=1.2, dtype=torch.float16, seed=23)  # alpha / rank 0.25, kohya's usual alpha 1
HIGH = dict(
    rank=4,
    alpha={"attn": 8.0, "ffn": 8.0},  # alpha / rank 2
    amp=0.12,
    diff_b=["blocks.0.self_attn.o", "blocks.1.ffn.0"],
    diff_b_only=[],
    zero_norm_diffs=["blocks.0.norm3.diff"],
    head_diff=None,
    top_lora=[],
    top_diff_b=[],
    dtype=torch.bfloat16,
    seed=24,
)
LOW = dict(
    rank=4,
    alpha={"attn": 2.0, "ffn": 2.0},  # alpha / rank 0.5
    amp=0.45,
    diff_b=["blocks.0.cross_attn.q", "blocks.0.ffn.0"],
    diff_b_only=[],
    zero_norm_diffs=[],
    head_diff=0.1,  # proj_out of transformer_2 is 64 × 32: not square, so a transposed delta cannot load
    top_lora=[],
    top_diff_b=[],
    dtype=torch.bfloat16,
    seed=25,
)
UNMATCHED = "transformer.blocks.0.attn1.to_qkv"  # Wan has no fused QKV projection

ADAPTERS = {
    # adapter name -> file; the names are the `adapter_name`s given to load_lora_weights
    "peft": "wan21-peft.safetensors",
    "official": "wan21-official.safetensors",
    "musubi": "wan21-musubi.safetensors",
    "high": "wan22-a14b-high.safetensors",
    "low": "wan22-a14b-low.safetensors",
}
FORWARD_CASES = {
    # tensor name in forward.safetensors -> [(adapter, scale)]
    "peft": [("peft", 0.8)],
    "official": [("official", 0.8)],
    "musubi": [("musubi", 0.8)],
    "peft_official": [("peft", 0.7), ("official", 0.5)],
}
FUSED_CASE = "peft_official"
PIPELINE_ADAPTERS = [("peft", 0.7), ("official", 0.5)]
A14B_ADAPTERS = [("high", 1.0, "transformer"), ("low", 1.0, "transformer_2")]

# The few-step run: lightx2v's step-distill settings on wan21-tiny-a, through WanPipeline.
FEW_STEP = dict(timesteps=[1000.0, 750.0, 500.0, 250.0], shift=5.0, guidance_scale=1.0)
FEW_STEP_LORA = [("peft", 1.0)]


def linear_shapes(model):
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_pair(gen, shape, rank, amp):
    out_f, in_f = shape
    down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
    up = amp * torch.randn(out_f, rank, generator=gen) / math.sqrt(rank)
    return down, up


def make_peft(model, spec):
    """diffusers' own layout, as `save_lora_weights` writes it (the keys without `transformer.`)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    shapes = linear_shapes(model)
    layers = {}
    for i in range(model.config.num_layers):
        for target in BLOCK_LINEARS.values():
            name = f"blocks.{i}.{target}"
            down, up = lora_pair(gen, shapes[name], spec["rank"], spec["amp"])
            layers[f"{name}.lora_A.weight"] = down
            layers[f"{name}.lora_B.weight"] = up
    return layers


def make_official(model, spec):
    """The official Wan / ComfyUI layout (`diffusion_model.` + the original module names)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    shapes = linear_shapes(model)
    sd = {}
    for i in range(model.config.num_layers):
        for original, target in BLOCK_LINEARS.items():
            name = f"blocks.{i}.{original}"
            shape = shapes[f"blocks.{i}.{target}"]
            if name not in spec["diff_b_only"]:
                down, up = lora_pair(gen, shape, spec["rank"], spec["amp"])
                sd[f"{name}.lora_down.weight"] = down
                sd[f"{name}.lora_up.weight"] = up
                sd[f"{name}.alpha"] = torch.tensor(spec["alpha"]["ffn" if original.startswith("ffn") else "attn"])
            if name in spec["diff_b"] or name in spec["diff_b_only"]:
                sd[f"{name}.diff_b"] = 0.05 * torch.randn(shape[0], generator=gen)
    for key in spec["zero_norm_diffs"]:
        module = key.rsplit(".", 1)[0]
        sd[key] = torch.zeros(model.config.num_attention_heads * model.config.attention_head_dim)
        assert "norm" in module
    for original in spec["top_lora"]:
        shape = shapes[TOP_LINEARS[original]]
        down, up = lora_pair(gen, shape, spec["rank"], spec["amp"])
        sd[f"{original}.lora_down.weight"] = down
        sd[f"{original}.lora_up.weight"] = up
    for original in spec["top_diff_b"]:
        sd[f"{original}.diff_b"] = 0.05 * torch.randn(shapes[TOP_LINEARS[original]][0], generator=gen)
    if spec["head_diff"] is not None:
        out_f, in_f = shapes["proj_out"]
        sd["head.head.diff"] = spec["head_diff"] * torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
        sd["head.head.diff_b"] = 0.05 * torch.randn(out_f, generator=gen)
    return {f"diffusion_model.{k}": v.to(spec["dtype"]).contiguous() for k, v in sd.items()}


def make_musubi(model, spec):
    """kohya / musubi-tuner (`lora_unet_` + the official names with `_` for `.`); every linear layer of every block
    (diffusers' converter requires all ten per block) with an alpha."""
    gen = torch.Generator().manual_seed(spec["seed"])
    shapes = linear_shapes(model)
    sd = {}
    for i in range(model.config.num_layers):
        for original, target in BLOCK_LINEARS.items():
            name = "lora_unet_" + f"blocks.{i}.{original}".replace(".", "_")
            down, up = lora_pair(gen, shapes[f"blocks.{i}.{target}"], spec["rank"], spec["amp"])
            sd[f"{name}.lora_down.weight"] = down
            sd[f"{name}.lora_up.weight"] = up
            sd[f"{name}.alpha"] = torch.tensor(spec["alpha"])
    return {k: v.to(spec["dtype"]).contiguous() for k, v in sd.items()}


# ---- the rules, written out (what FIXTURES.md documents and the Rust loader must do) ----

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha", ".diff_b", ".diff")
PART = {
    ".lora_down.weight": "down",
    ".lora_A.weight": "down",
    ".lora_up.weight": "up",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
}


def adapter_format(keys):
    if any(k.startswith("diffusion_model.") for k in keys):
        return "official"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if all(k.startswith("transformer.") for k in keys):
        return "peft"
    raise ValueError("unknown LoRA layout")


def diffusers_module(fmt, name):
    """The diffusers module a file's module name (prefix stripped) lands on."""
    if fmt == "peft":
        return name
    if fmt == "musubi":
        m = re.fullmatch(r"blocks_(\d+)_(self_attn|cross_attn)_([qkvo])|blocks_(\d+)_ffn_([02])", name)
        assert m, name
        name = f"blocks.{m[1]}.{m[2]}.{m[3]}" if m[1] is not None else f"blocks.{m[4]}.ffn.{m[5]}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        return f"blocks.{m[1]}.{BLOCK_LINEARS[m[2]]}"
    return TOP_LINEARS[name]


def parse_adapter(path):
    """The file as {module (file's name, prefix stripped): {down, up, alpha, diff, diff_b}}."""
    sd = load_file(str(path))
    fmt = adapter_format(sd)
    prefix = {"official": "diffusion_model.", "musubi": "lora_unet_", "peft": "transformer."}[fmt]
    modules = {}
    for key, value in sd.items():
        assert key.startswith(prefix), key
        key = key[len(prefix) :]
        suffix = next(s for s in SUFFIXES if key.endswith(s))
        modules.setdefault(key[: -len(suffix)], {})[PART[suffix]] = value
    return fmt, modules


@torch.no_grad()
def merge_adapters(base, adapters):
    """The base state dict with the adapters [(path, scale)] merged in, computed in f64:

    W += scale · (alpha / rank) · up @ down   (alpha / rank = 1 where the file has no alpha; rank = down.shape[0])
    W += scale · diff                         (full weight delta: `head.head.diff` → proj_out)
    b += scale · diff_b                       (bias delta: not multiplied by alpha / rank)
    official `…norm….diff` / `.diff_b`: dropped (diffusers does; here they are zeros anyway)."""
    sd = {k: v.to(torch.float64) for k, v in base.items()}
    for path, scale in adapters:
        fmt, modules = parse_adapter(path)
        for name, parts in modules.items():
            if fmt == "official" and "norm" in name:
                assert all(not v.any() for v in parts.values()), name
                continue
            target = diffusers_module(fmt, name)
            w, b = sd[f"{target}.weight"], sd[f"{target}.bias"]
            if "down" in parts:
                down, up = parts["down"].to(torch.float64), parts["up"].to(torch.float64)
                rank = down.shape[0]
                factor = parts["alpha"].item() / rank if "alpha" in parts else 1.0
                w += scale * factor * (up @ down)
            if "diff" in parts:
                w += scale * parts["diff"].to(torch.float64)
            if "diff_b" in parts:
                b += scale * parts["diff_b"].to(torch.float64)
    return {k: v.to(torch.float32) for k, v in sd.items()}


# ---- diffusers ----


def wan21_pipeline():
    pipe = WanPipeline.from_pretrained(ROOT / BASE, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pin_unipc_schedule(pipe.scheduler)
    return pipe


def load_adapters(pipe, adapters, set_weights=True):
    """load_lora_weights for each (name, scale[, component]), then set_adapters with the scales."""
    for name, *rest in adapters:
        into_2 = len(rest) > 1 and rest[1] == "transformer_2"
        kwargs = dict(load_into_transformer_2=True) if into_2 else {}
        pipe.load_lora_weights(str(LORAS / ADAPTERS[name]), adapter_name=name, **LOAD, **kwargs)
    if set_weights:
        pipe.set_adapters([a[0] for a in adapters], [a[1] for a in adapters])
    return pipe


def rel(a, b):
    return float((a - b).norm() / b.norm())


def max_abs(a, b):
    return float((a - b).abs().max())


def check_close(name, got, want, tol):
    err = max_abs(got, want)
    assert err <= tol, f"{name}: max |diff| {err:.3g} > {tol}"
    return err


def write_adapters(model21, high_model, low_model):
    if LORAS.exists():
        shutil.rmtree(LORAS)
    LORAS.mkdir()
    # the PEFT file through diffusers' own writer (keys prefixed `transformer.`, metadata {"format": "pt"})
    peft_layers = make_peft(model21, PEFT)
    WanPipeline.save_lora_weights(LORAS, transformer_lora_layers=peft_layers, weight_name=ADAPTERS["peft"])
    save_file(make_official(model21, OFFICIAL), str(LORAS / ADAPTERS["official"]))
    save_file(make_musubi(model21, MUSUBI), str(LORAS / ADAPTERS["musubi"]))
    save_file(make_official(high_model, HIGH), str(LORAS / ADAPTERS["high"]))
    save_file(make_official(low_model, LOW), str(LORAS / ADAPTERS["low"]))
    # the unmatched one: the PEFT file plus a LoRA pair on a module Wan lacks (shapes of a fused QKV)
    unmatched = load_file(str(LORAS / ADAPTERS["peft"]))
    gen = torch.Generator().manual_seed(26)
    down, up = lora_pair(gen, (3 * 64, 64), PEFT["rank"], PEFT["amp"])
    unmatched[f"{UNMATCHED}.lora_A.weight"] = down
    unmatched[f"{UNMATCHED}.lora_B.weight"] = up
    save_file(unmatched, str(LORAS / "wan21-unmatched.safetensors"), metadata={"format": "pt"})


def check_converted(pipe):
    """What diffusers' converter makes of each file, against the rules: the same modules, and per module
    lora_B @ lora_A = (alpha / rank) · up @ down, lora_B.bias = diff_b."""
    report = {}
    for name in ("peft", "official", "musubi", "high", "low"):
        path = LORAS / ADAPTERS[name]
        fmt, modules = parse_adapter(path)
        converted = pipe.lora_state_dict(str(path))
        conv = {}
        for key, value in converted.items():
            assert key.startswith("transformer."), key
            pattern = r"transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)"
            module, part = re.fullmatch(pattern, key).groups()
            conv.setdefault(module, {})[part] = value
        expected = {}
        dropped = []
        for mod, parts in modules.items():
            if fmt == "official" and "norm" in mod:
                dropped.append(mod)
                continue
            target = diffusers_module(fmt, mod)
            if "down" in parts:
                factor = parts["alpha"].item() / parts["down"].shape[0] if "alpha" in parts else 1.0
                up, down = parts["up"].to(torch.float64), parts["down"].to(torch.float64)
                expected.setdefault(target, {})["delta"] = factor * (up @ down)
            if "diff" in parts:
                expected.setdefault(target, {})["delta"] = parts["diff"].to(torch.float64)
            if "diff_b" in parts:
                expected.setdefault(target, {})["bias"] = parts["diff_b"]
        assert set(conv) == set(expected), (name, set(conv) ^ set(expected))
        for module, want in expected.items():
            got = conv[module]
            if "delta" in want:
                # to f32 rounding: the converter scales by alpha / rank (split by powers of two) in the file's dtype
                delta = got["lora_B.weight"].to(torch.float64) @ got["lora_A.weight"].to(torch.float64)
                torch.testing.assert_close(delta, want["delta"], rtol=1e-6, atol=1e-7)
            else:
                assert "lora_A.weight" not in got and "lora_B.weight" not in got, (name, module)
            if "bias" in want:
                assert torch.equal(got["lora_B.bias"], want["bias"]), (name, module)
            else:
                assert "lora_B.bias" not in got, (name, module)
        report[name] = dict(modules=len(expected), dropped=dropped)
    return report


def check_unmatched():
    """What diffusers does with a LoRA on a module the model lacks: it loads the rest and only warns."""
    pipe = wan21_pipeline()
    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(LORAS / "wan21-unmatched.safetensors"), adapter_name="unmatched", **LOAD)
        outcome = "loaded"
    except Exception as e:  # noqa: BLE001 (recorded, whatever it is)
        outcome = f"{type(e).__name__}: {e}"
    finally:
        logger.removeHandler(handler)
    warned = [r for r in records if "to_qkv" in r]
    return dict(outcome=outcome, warnings=warned)


@torch.no_grad()
def forward_references(shared):
    """wan21-tiny-a's transformer reference inputs through the transformer with the adapters."""
    inputs = load_file(str(ROOT / "reference" / BASE / "transformer.safetensors"))
    call = dict(
        hidden_states=inputs["hidden_states"],
        # the pipeline hands the transformer the scheduler's int64 timestep (the reference's was made so)
        timestep=inputs["timestep"].to(torch.int64),
        encoder_hidden_states=inputs["encoder_hidden_states"],
        return_dict=False,
    )
    pipe = wan21_pipeline()
    base_sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = pipe.transformer(**call)[0]
    base_err = check_close("base vs reference output", base, inputs["output"], 2e-5)
    out = {"base": base}
    checks = {"base_vs_reference_output": base_err}
    for case, adapters in FORWARD_CASES.items():
        pipe = load_adapters(wan21_pipeline(), adapters)
        out[case] = pipe.transformer(**call)[0]
        # the documented rules, merged by hand into a plain transformer, give the same output
        merged = WanTransformer3DModel.from_pretrained(ROOT / BASE / "transformer", torch_dtype=torch.float32).eval()
        merged.load_state_dict(merge_adapters(base_sd, [(LORAS / ADAPTERS[a], s) for a, s in adapters]))
        checks[f"{case}_vs_rules"] = check_close(f"{case} rules", merged(**call)[0], out[case], 1e-5)
        checks[f"{case}_relative_change"] = rel(out[case], base)
        if case == FUSED_CASE:
            pipe.fuse_lora(components=["transformer"], adapter_names=[a for a, _ in adapters])
            out[f"{case}_fused"] = pipe.transformer(**call)[0]
            checks[f"{case}_fused_vs_unfused"] = check_close("fused", out[f"{case}_fused"], out[case], 1e-5)
    for name in ("peft", "official", "musubi"):
        change = checks[f"{name}_relative_change"]
        assert 0.05 <= change <= 0.30, f"{name} at 0.8 moves the output by {change:.1%}"
    # all three loaded, one active: the inactive adapters (and their lora_bias) do nothing
    pipe = load_adapters(wan21_pipeline(), [("peft", 1.0), ("official", 1.0), ("musubi", 1.0)])
    for case in ("peft", "official", "musubi"):
        pipe.set_adapters([case], [FORWARD_CASES[case][0][1]])
        got = pipe.transformer(**call)[0]
        checks[f"{case}_with_others_loaded"] = check_close(f"{case} among others", got, out[case], 1e-6)
    save(OUT / "forward.safetensors", out)
    shared["forward_checks"] = checks
    return dict(
        inputs=f"reference/{BASE}/transformer.safetensors (hidden_states, timestep, encoder_hidden_states)",
        timestep=int(call["timestep"]),
        cases={case: [dict(adapter=a, scale=s) for a, s in adapters] for case, adapters in FORWARD_CASES.items()},
        fused_case=f"{FUSED_CASE}_fused",
        tensors=["base", *FORWARD_CASES, f"{FUSED_CASE}_fused"],
    )


def run_pipeline(pipe, kwargs, noise):
    final_latents = pipe(**kwargs, latents=noise.clone(), output_type="latent").frames
    frames = pipe(**kwargs, latents=noise.clone(), output_type="np").frames[0]
    return final_latents, torch.from_numpy(np.ascontiguousarray(frames))


@torch.no_grad()
def pipeline_references(shared):
    run = make_fixtures.CONFIGS[BASE]["run"]
    kwargs = pipeline_kwargs(run, run["max_sequence_length"])
    noise = load_file(str(ROOT / "reference" / BASE / "pipeline.safetensors"))["latents"]
    base_final, _ = run_pipeline(wan21_pipeline(), kwargs, noise)
    pipe = load_adapters(wan21_pipeline(), PIPELINE_ADAPTERS)
    final_latents, frames = run_pipeline(pipe, kwargs, noise)
    timesteps = pipe.scheduler.timesteps.tolist()
    save(OUT / "pipeline.safetensors", {"latents": noise, "final_latents": final_latents, "frames": frames})
    shared["pipeline_checks"] = dict(
        # the same run without adapters against the committed reference (diffusers 0.35.2, transformers 4.57.1)
        base_vs_reference_final_latents=max_abs(
            base_final, load_file(str(ROOT / "reference" / BASE / "pipeline.safetensors"))["final_latents"]
        ),
        relative_change=rel(final_latents, base_final),
    )
    return dict(
        model=BASE,
        adapters=[dict(adapter=a, scale=s) for a, s in PIPELINE_ADAPTERS],
        noise=f"reference/{BASE}/pipeline.safetensors latents (copied here as latents)",
        scheduler="UniPC flow (wan21-tiny-a/scheduler), pinned grid",
        timesteps=[float(t) for t in timesteps],
        **kwargs,
    )


@torch.no_grad()
def a14b_references(shared):
    cfg = make_image_fixtures.CONFIGS[A14B]
    run = cfg["run"]
    reference = json.loads((ROOT / "reference" / A14B / "ref.json").read_text())
    committed = load_file(str(ROOT / "reference" / A14B / "pipeline.safetensors"))
    noise = committed["noise"]
    kwargs = dict(pipeline_kwargs(run, run["max_sequence_length"]), guidance_scale_2=run["guidance_scale_2"])
    base_final, _ = run_pipeline(load_pipeline(ROOT / A14B, cfg), kwargs, noise)
    base_err = check_close("a14b base vs reference", base_final, committed["final_latents"], 1e-6)

    pipe = load_adapters(load_pipeline(ROOT / A14B, cfg), A14B_ADAPTERS, set_weights=False)
    assert pipe.transformer.peft_config.keys() == {"high"} and pipe.transformer_2.peft_config.keys() == {"low"}
    recorder = ExpertRecorder(pipe)
    final_latents = pipe(**kwargs, latents=noise.clone(), output_type="latent").frames
    steps = recorder.per_step(run["num_inference_steps"], True)
    recorder.remove()
    frames = pipe(**kwargs, latents=noise.clone(), output_type="np").frames[0]
    frames = torch.from_numpy(np.ascontiguousarray(frames))
    assert steps == reference["experts"], steps
    # set_adapters with both names at 1.0 (each expert keeps the one it has) is the same as the load's default 1.0
    pipe.set_adapters([a for a, _, _ in A14B_ADAPTERS], [s for _, s, _ in A14B_ADAPTERS])
    again, _ = run_pipeline(pipe, kwargs, noise)
    assert torch.equal(again, final_latents)
    tensors = {"noise": noise, "final_latents": final_latents, "frames": frames}

    # each expert with its adapter on its reference inputs (`{expert}_out`); merged by the rules, the same
    inputs = {}
    for expert, name in (("transformer", "high"), ("transformer_2", "low")):
        ref = load_file(str(ROOT / "reference" / A14B / f"{expert}.safetensors"))
        call = dict(
            hidden_states=ref["hidden_states"],
            timestep=ref["timestep"].to(torch.int64),
            encoder_hidden_states=ref["encoder_hidden_states"],
            return_dict=False,
        )
        model = getattr(pipe, expert)
        got = model(**call)[0]
        tensors[f"{expert}_out"] = got
        plain = WanTransformer3DModel.from_pretrained(ROOT / A14B / expert, torch_dtype=torch.float32).eval()
        base_sd = {k: v.clone() for k, v in plain.state_dict().items()}
        plain.load_state_dict(merge_adapters(base_sd, [(LORAS / ADAPTERS[name], 1.0)]))
        inputs[f"{expert}_vs_rules"] = check_close(f"{expert} rules", plain(**call)[0], got, 1e-5)
        inputs[f"{expert}_relative_change"] = rel(got, ref["out"])
    save(OUT / "a14b.safetensors", tensors)
    shared["a14b_checks"] = dict(
        base_vs_reference_final_latents=base_err, relative_change=rel(final_latents, base_final), **inputs
    )
    return dict(
        model=A14B,
        adapters=[dict(adapter=a, scale=s, component=c) for a, s, c in A14B_ADAPTERS],
        how="load_lora_weights(high, adapter_name='high'); load_lora_weights(low, adapter_name='low', "
        "load_into_transformer_2=True); no set_adapters (scale 1.0 is the default)",
        noise=f"reference/{A14B}/pipeline.safetensors noise (copied here as noise)",
        timesteps=reference["timesteps"],
        experts=steps,
        boundary_ratio=cfg["boundary_ratio"],
        **kwargs,
    )


def explicit_schedule(pipe, **schedule):
    """WanPipeline calls `scheduler.set_timesteps(num_inference_steps, device=...)` and has no `timesteps=` /
    `sigmas=` argument: give it a FlowMatchEulerDiscreteScheduler whose set_timesteps passes the schedule."""
    sched = FlowMatchEulerDiscreteScheduler(shift=FEW_STEP["shift"])
    set_timesteps = sched.set_timesteps

    def explicit(num_inference_steps=None, device=None, **_):
        return set_timesteps(num_inference_steps, device=device, **schedule)

    sched.set_timesteps = explicit
    pipe.scheduler = sched
    return pipe


def model_timesteps(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True
    )
    return seen, handle


@torch.no_grad()
def few_step_references(shared):
    run = make_fixtures.CONFIGS[BASE]["run"]
    n = len(FEW_STEP["timesteps"])
    kwargs = dict(
        pipeline_kwargs(run, run["max_sequence_length"]),
        num_inference_steps=n,
        guidance_scale=FEW_STEP["guidance_scale"],
    )
    noise = load_file(str(ROOT / "reference" / BASE / "pipeline.safetensors"))["latents"]
    out = {"latents": noise}
    settings = {}
    # "": timesteps= as asked (the model gets them as given, the sigmas are shift(t / 1000));
    # "warped_": sigmas= the unshifted t / 1000, which the scheduler shifts and turns into the model's timesteps
    # (sigma · 1000), as lightx2v's step-distill scheduler does with denoising_step_list [1000, 750, 500, 250]
    variants = {
        "": dict(timesteps=FEW_STEP["timesteps"]),
        "warped_": dict(sigmas=[t / 1000 for t in FEW_STEP["timesteps"]]),
    }
    for prefix, schedule in variants.items():
        pipe = explicit_schedule(wan21_pipeline(), **schedule)
        seen, handle = model_timesteps(pipe)
        final_latents, frames = run_pipeline(pipe, kwargs, noise)
        handle.remove()
        sched = pipe.scheduler
        assert len(seen) == 2 * n, "classifier-free guidance ran"  # two pipeline calls, one model call per step
        assert all(torch.equal(a, b) for a, b in zip(seen[:n], seen[n:]))
        assert torch.equal(torch.cat(seen[:n]), sched.timesteps), (seen, sched.timesteps)
        out[f"{prefix}final_latents"] = final_latents
        if not prefix:  # the decode is the same code for both; one set of frames is enough
            out["frames"] = frames
        out[f"{prefix}sigmas"] = sched.sigmas.clone()
        out[f"{prefix}timesteps"] = sched.timesteps.clone()
        lora = load_adapters(explicit_schedule(wan21_pipeline(), **schedule), FEW_STEP_LORA)
        out[f"{prefix}lora_final_latents"] = lora(**kwargs, latents=noise.clone(), output_type="latent").frames
        assert torch.equal(lora.scheduler.timesteps, sched.timesteps)
        settings[prefix or "default"] = dict(
            set_timesteps={k: v for k, v in schedule.items()},
            sigmas=[float(s) for s in sched.sigmas.tolist()],
            timesteps=[float(t) for t in sched.timesteps.tolist()],
        )
        shared.setdefault("few_step_checks", {})[f"{prefix}lora_relative_change"] = rel(
            out[f"{prefix}lora_final_latents"], final_latents
        )
    # diffusers' shift: sigma = shift · s / (1 + (shift − 1) · s), s = t / 1000
    shift = FEW_STEP["shift"]
    s = np.array(FEW_STEP["timesteps"]) / 1000
    shifted = np.append(shift * s / (1 + (shift - 1) * s), 0.0).astype(np.float32)
    assert np.allclose(out["sigmas"].numpy(), shifted, rtol=0, atol=1e-7), out["sigmas"]
    assert np.allclose(out["warped_sigmas"].numpy(), shifted, rtol=0, atol=1e-7), out["warped_sigmas"]
    assert out["timesteps"].tolist() == FEW_STEP["timesteps"]
    save(OUT / "few_step.safetensors", out)
    return dict(
        model=BASE,
        scheduler=f"FlowMatchEulerDiscreteScheduler(shift={shift}) (everything else default)",
        guidance_scale=FEW_STEP["guidance_scale"],
        lora=[dict(adapter=a, scale=sc) for a, sc in FEW_STEP_LORA],
        noise=f"reference/{BASE}/pipeline.safetensors latents (copied here as latents)",
        variants=settings,
        **{k: v for k, v in kwargs.items() if k not in ("guidance_scale",)},
    )


def adapter_description():
    desc = {}
    for name, file in ADAPTERS.items():
        path = LORAS / file
        fmt, modules = parse_adapter(path)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            keys = sorted(f.keys())
        ranks = sorted({p["down"].shape[0] for p in modules.values() if "down" in p})
        alphas = sorted({float(p["alpha"]) for p in modules.values() if "alpha" in p})
        desc[name] = dict(
            file=f"loras/{file}",
            format=fmt,
            keys=len(keys),
            dtype=str(next(iter(load_file(str(path)).values())).dtype).removeprefix("torch."),
            metadata=metadata,
            ranks=ranks,
            alphas=alphas,
            lora_modules=sorted(diffusers_module(fmt, m) for m, p in modules.items() if "down" in p),
            diff=sorted(m for m, p in modules.items() if "diff" in p),
            diff_b=sorted(m for m, p in modules.items() if "diff_b" in p),
            example_keys=keys[:3],
        )
    return desc


def main():
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    make_image_fixtures.check_pin()
    model21 = WanTransformer3DModel.from_pretrained(ROOT / BASE / "transformer", torch_dtype=torch.float32)
    high = WanTransformer3DModel.from_pretrained(ROOT / A14B / "transformer", torch_dtype=torch.float32)
    low = WanTransformer3DModel.from_pretrained(ROOT / A14B / "transformer_2", torch_dtype=torch.float32)
    write_adapters(model21, high, low)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    shared = {}
    converted = check_converted(wan21_pipeline())
    ref = dict(
        diffusers_load="pipe.load_lora_weights(path, adapter_name=name, low_cpu_mem_usage=False), then "
        "pipe.set_adapters(names, scales)",
        adapters=adapter_description(),
        converted=converted,
        unmatched=dict(file="loras/wan21-unmatched.safetensors", module=UNMATCHED, **check_unmatched()),
        forward=forward_references(shared),
        pipeline=pipeline_references(shared),
        a14b=a14b_references(shared),
        few_step=few_step_references(shared),
    )
    ref["checks"] = shared
    (OUT / "ref.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    for path in sorted([*LORAS.iterdir(), *OUT.iterdir()]):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size:>7}  {digest}")
    print(json.dumps(shared, indent=1))


if __name__ == "__main__":
    main()
