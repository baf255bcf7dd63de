"""A tiny Wan 2.1 transformer and wan21-tiny-a's umT5 text encoder as quantized single files (GGUF and FP8
safetensors), and diffusers' / transformers' outputs on the weights each file really holds.

Run from anywhere with the environment pinned in requirements-quantized.txt (requirements-image.txt plus the `gguf`
package), after make_fixtures.py and make_image_fixtures.py (it reads `wan21-tiny-a/` and
`reference/wan21-tiny-a/pipeline.safetensors` and `text.safetensors`):

    python3 -m venv /tmp/kt-quant && /tmp/kt-quant/bin/pip install -r models/tiny/requirements-quantized.txt
    /tmp/kt-quant/bin/python models/tiny/make_quantized_fixtures.py

It writes next to this file, the transformer's files in the official Wan layout
(`make_single_file_fixtures.to_official`'s names, no prefix):

  quantized/config.json                    the diffusers config of the transformer (wan21-tiny-a's, but 2 heads x
                                           128, ffn 512, freq_dim 256, so that 256, the K-quant block, divides the
                                           width, and 1 layer, to keep the files small); a loader reads it beside a
                                           single file
  quantized/wan21-tiny-q.safetensors       the base weights, f32
  quantized/wan21-tiny-q-fp8.safetensors   every 2-D linear weight as F8_E4M3 (a plain cast), the rest bf16
                                           (ComfyUI / Kijai "fp8_e4m3fn")
  quantized/wan21-tiny-q-fp8-scaled.safetensors
                                           ComfyUI's "scaled fp8": fp8(weight / s) with `<layer>.scale_weight` = s
                                           (f32, 0-d, absmax / 448) and the marker `scaled_fp8` (empty F8_E4M3)
  quantized/wan21-tiny-q-Q8_0.gguf         every 2-D linear weight Q8_0
  quantized/wan21-tiny-q-Q4_K_M.gguf       Q4_K, each block's `self_attn.v` and `ffn.2` Q6_K, `text_embedding.0`
                                           (input width 32) Q8_0
  quantized/wan21-tiny-q-mixed.gguf        the 2-D linear weights round-robin (in name order) over Q4_0, Q4_1, Q5_0,
                                           Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F16, BF16 (every type at least
                                           once; `head.head` gets F16); its five K-quant tensors (one per K-type, in
                                           the block) are random bytes with sensible f16 scales (every bit of the
                                           format used)
  quantized/wan21-tiny-q-Q4_K_S-5d.gguf    the layout of city96's released Wan GGUFs: the 5-D patch embedding as a
                                           5-D F32 tensor (no orig_shape key, after `patch_embedding.bias`), the
                                           embeddings and the head F16, the blocks' linear weights Q4_K

and, for the text encoder (`wan21-tiny-a/text_encoder/`, transformers' UMT5EncoderModel: d_model 32, 3 blocks,
4 heads x 8, d_ff 48, vocabulary 267):

  quantized/umt5-tiny-Q8_0.gguf            llama.cpp's T5 encoder layout, as city96's umT5 GGUFs:
                                           general.architecture "t5encoder", the t5encoder.* hyperparameter keys
                                           llama.cpp's convert_hf_to_gguf writes (no tokenizer keys), llama.cpp's
                                           names (token_embd, enc.blk.{i}.attn_{q,k,v,o,rel_b,norm},
                                           enc.blk.{i}.ffn_{gate,up,down,norm}, enc.output_norm; the gguf package's
                                           T5ENCODER name map) in the folder file's order; the 2-D weights whose rows
                                           32 divides Q8_0 (token_embd, q, k, v, o, ffn_gate, ffn_up), the rest F32
                                           (norms, attn_rel_b, ffn_down: rows of 48)
  quantized/umt5-tiny-fp8-scaled.safetensors
                                           transformers' names; the blocks' 2-D linear weights (q, k, v, o, wi_0,
                                           wi_1, wo) scaled fp8 as the transformer's, the rest (shared, the relative
                                           attention biases, the norms) F32

In the transformer's Q8_0, Q4_K_M and mixed files the 1-D tensors and the modulation tables are F32 and the 5-D
`patch_embedding.weight` is F16, stored as 2-D [256, 64] with its real shape in the metadata key
`comfy.gguf.orig_shape.patch_embedding.weight` (INT32 array, PyTorch order), which ComfyUI-GGUF's loader honours for
any tensor.

The Q4_K and Q6_K tensors of the Q4_K_M and Q4_K_S-5d files are quantized from the base weights by this script's own
quantizers (`quantize_q4_k`, `quantize_q6_k`; the gguf package only dequantizes K-quants); they are simpler than
llama.cpp's (no search for the best scale), and their packing is checked against `gguf.quants.dequantize` bit for
bit. The 32-value types are quantized by `gguf.quants.quantize`.

References (`reference/quantized/`, see the "Quantized single files" section of FIXTURES.md): the weights each file
holds are read back from the file and dequantized in f32 (`gguf.quants.dequantize`, which computes as ggml does,
cross-checked bit for bit against diffusers' torch dequantizers run in float32; fp8 cast to f32, times
`scale_weight`; bf16 upcast), renamed by diffusers' `convert_wan_transformer_to_diffusers` (which must map every key)
and loaded strictly into `WanTransformer3DModel(config)`; then `forward.safetensors` (one forward per file),
`pipeline.safetensors` (wan21-tiny-a's pipeline with the transformer replaced, as make_lora_fixtures.py's pipeline
reference), `dequantized.safetensors` (13 tensors of the mixed GGUF, 3.3 MB: for each of the 12 stored types its
smallest linear weight, ties to the first name in sorted order, and the F16 patch embedding in its 5-D shape; the
file's F32 tensors, the base weights as they are, are left out) and `ref.json` (files, sizes, hashes, tensor types,
GGUF metadata, checks, and what diffusers' own `from_single_file` makes of each file). For the text encoder:
`text.safetensors` (transformers' UMT5EncoderModel(config of the folder), its weights loaded strictly from each file
as dequantized in f32 (and the folder's own), run on the prompt and negative-prompt ids of
`reference/wan21-tiny-a/text.safetensors` padded to 512 with their attention mask: `input_ids`, `attention_mask`,
`last_hidden_state_f32`, `last_hidden_state_Q8_0`, `last_hidden_state_fp8_scaled`) and `text.json` (files, tensors,
metadata and checks, kept apart so that ref.json stays as it was).

Everything is seeded, CPU and f32, and no file holds a timestamp, so a rerun reproduces every file byte for byte.
"""

import hashlib
import importlib.metadata
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

import diffusers
from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.quantizers.gguf.utils import dequantize_functions

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_fixtures  # noqa: E402  (wan21-tiny-a's run settings)
import make_image_fixtures  # noqa: E402  (the UniPC pin's check)
from make_fixtures import NEGATIVE_PROMPT, PROMPT, pipeline_kwargs, save  # noqa: E402
from make_lora_fixtures import max_abs, rel, run_pipeline, wan21_pipeline  # noqa: E402
from make_single_file_fixtures import to_official  # noqa: E402

BASE = "wan21-tiny-a"
FILES = ROOT / "quantized"
OUT = ROOT / "reference" / "quantized"
STEM = "wan21-tiny-q"

# wan21-tiny-a's transformer config but for these (its text_dim 32, 16 channels and patch (1, 2, 2) stay, so the
# model fits wan21-tiny-a's text encoder and VAE)
SIZES = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, freq_dim=256, num_layers=1)

WEIGHT_SEED = 4200  # torch generator for the base weights
BYTES_SEED = 4201  # numpy generator for the random K-quant blocks of the mixed file
INPUT_SEED = 4202  # torch generator for the forward's inputs
HIDDEN_SHAPE = (1, 16, 3, 4, 6)  # wan21-tiny-a's latent shape at its run size (32 x 48, 9 frames)
TEXT_SHAPE = (1, 12, 32)
# one of the pinned grid's timesteps (999, 899, 749, 499), passed as f32 [1] as the committed transformer references
# store it (an integer value: the pipeline passes the scheduler's int64 timesteps; diffusers' embedding casts to float)
TIMESTEP = 749.0

QK_K = 256
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# variant -> file; the order of forward.safetensors and ref.json
VARIANTS = {
    "f32": f"{STEM}.safetensors",
    "fp8": f"{STEM}-fp8.safetensors",
    "fp8_scaled": f"{STEM}-fp8-scaled.safetensors",
    "Q8_0": f"{STEM}-Q8_0.gguf",
    "Q4_K_M": f"{STEM}-Q4_K_M.gguf",
    "mixed": f"{STEM}-mixed.gguf",
    "Q4_K_S_5d": f"{STEM}-Q4_K_S-5d.gguf",
}
PIPELINE_VARIANTS = ["Q4_K_M", "fp8_scaled", "f32"]

# the mixed file's round-robin; K-types only where 256 divides the input width
MIXED_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16]
K_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
# what gguf 0.17.1 quantizes itself (and, with F32 / F16, writes as they are)
GGUF_QUANTIZES = {Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}

# Random K-quant blocks: byte offsets of the f16 `d` and `dmin` in a block, and their magnitudes, chosen so that with
# uniformly random quants and packed scales the dequantized values have a standard deviation of about 0.02:
#   Q2_K  d·(sc & 15)·q − dmin·(sc >> 4), q 0..3           Q3_K  d·(sc − 32)·q, q −4..3, sc 6-bit
#   Q4_K  d·sc·q − dmin·m, q 0..15, sc, m 6-bit            Q5_K  the same with q 0..31
#   Q6_K  d·sc·(q − 32), q 0..63, sc int8
# Each d / dmin is that magnitude times U(0.5, 1.5) with a random sign. The Q6_K d (about 1.5e-5) and most Q5_K d
# (about 5e-5) are f16 subnormals (below 6.1e-5), so a dequantizer's f16 decoding is tested there too.
RANDOM_K = {
    Q.Q2_K: dict(d=80, dmin=82, d_mag=1.7e-3, dmin_mag=2.5e-3),
    Q.Q3_K: dict(d=108, dmin=None, d_mag=5e-4, dmin_mag=None),
    Q.Q4_K: dict(d=0, dmin=2, d_mag=1e-4, dmin_mag=7.5e-4),
    Q.Q5_K: dict(d=0, dmin=2, d_mag=5e-5, dmin_mag=7.75e-4),
    Q.Q6_K: dict(d=208, dmin=None, d_mag=1.5e-5, dmin_mag=None),
}


# ---- the model ----


def transformer_config():
    config = json.loads((ROOT / BASE / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(SIZES)
    return config


def base_model(config):
    """Random weights from WEIGHT_SEED: linear and patch-embedding weights N(0, 1 / fan_in) (so activations stay
    O(1) through the blocks), biases N(0, 0.02²), norm weights 1 + N(0, 0.1²), modulation tables N(0, 0.1²)."""
    model = WanTransformer3DModel(**config).eval()
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    sd = {}
    for name, param in model.state_dict().items():
        shape = tuple(param.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("scale_shift_table"):
            sd[name] = 0.1 * noise
        elif name.endswith(".weight") and len(shape) >= 2:
            sd[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".bias"):
            sd[name] = 0.02 * noise
        else:
            assert name.endswith(".weight") and len(shape) == 1, name
            sd[name] = 1.0 + 0.1 * noise
    model.load_state_dict(sd, strict=True)
    return model


def is_linear(name, tensor):
    return name.endswith(".weight") and tensor.ndim == 2


# ---- K-quants (the gguf package only dequantizes them) ----


def f16_bytes(values):
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def safe_div(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32), where=b != 0)


def quantize_q4_k(weight):
    """Q4_K: per 256 values, f16 d and dmin, 8 sub-blocks of 32 with 6-bit scale sc and min m, 4-bit quants q;
    value = d·sc·q − dmin·m. Each sub-block spans [min(x, 0), max(x)]. Returns (block bytes, the values they hold)."""
    rows = weight.reshape(-1, QK_K).astype(np.float32)
    nb = rows.shape[0]
    x = rows.reshape(nb, 8, 32)
    low = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - low) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (-low.min(-1) / 63).astype(np.float16)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(safe_div(scale, df)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(safe_div(-low, dmf)), 0, 63).astype(np.uint8)
    step = (df * sc.astype(np.float32))[..., None]
    offset = (dmf * m.astype(np.float32))[..., None]
    q = np.clip(np.rint(safe_div(x + offset, step)), 0, 15).astype(np.uint8)
    values = step * q.astype(np.float32) - offset

    scales = np.empty((nb, 12), dtype=np.uint8)
    # bytes 0-3: sc[0..3] in the low 6 bits, bits 4-5 of sc[4..7] in the top 2; bytes 4-7 the same for m;
    # bytes 8-11: the low 4 bits of sc[4..7] (low nibble) and of m[4..7] (high nibble)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    # 32 bytes per pair of sub-blocks: the even one in the low nibbles, the odd one in the high nibbles
    pairs = q.reshape(nb, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    blocks = np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, qs], axis=1)
    return blocks, values.reshape(weight.shape)


def quantize_q6_k(weight):
    """Q6_K: per 256 values, 16 sub-blocks of 16 with an int8 scale sc, 6-bit quants q, f16 d;
    value = d·sc·(q − 32). Each sub-block's largest magnitude maps to ±31. Returns (block bytes, values)."""
    rows = weight.reshape(-1, QK_K).astype(np.float32)
    nb = rows.shape[0]
    x = rows.reshape(nb, 16, 16)
    scale = np.abs(x).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(safe_div(scale, df)), 0, 127).astype(np.int8)
    step = (df * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(safe_div(x, step)), -32, 31) + 32).astype(np.uint8)
    values = step * (q.astype(np.int8) - np.int8(32)).astype(np.float32)

    flat = q.reshape(nb, 2, 128)  # two halves of 128 values
    # per half: 64 bytes of low nibbles, values 0-63 in the low nibbles and 64-127 in the high ones
    low = (flat & 0xF).reshape(nb, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    # per half: 32 bytes of high 2-bit pairs, values 32·t + l at bits 2t of byte l
    high = (flat >> 4).reshape(nb, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d)], axis=1)
    return blocks, values.reshape(weight.shape)


OWN_QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q6_K: quantize_q6_k}


def random_k_blocks(n_values, qtype, rng):
    """Random bytes for every field of every block, then the f16 d / dmin overwritten (RANDOM_K)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n_values // block_size
    blocks = rng.integers(0, 256, size=(nb, type_size), dtype=np.uint8)
    spec = RANDOM_K[qtype]
    for field in ("d", "dmin"):
        if spec[field] is None:
            continue
        sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=nb)
        value = spec[f"{field}_mag"] * rng.uniform(0.5, 1.5, size=nb).astype(np.float32) * sign
        blocks[:, spec[field] : spec[field] + 2] = f16_bytes(value)
    return blocks


def encode(weight, qtype, k_mode, rng):
    """A tensor's raw GGUF data: what GGUFWriter.add_tensor takes with raw_dtype=qtype. k_mode: 'quantize' (this
    script's K quantizers) or 'random' (random_k_blocks) for the K-quant types."""
    a = weight.numpy()
    if qtype == Q.F32:
        return a.astype(np.float32)
    if qtype == Q.F16:
        return a.astype(np.float16)
    if qtype in GGUF_QUANTIZES:
        return gguf.quants.quantize(a, qtype)
    assert qtype in K_TYPES and a.shape[-1] % QK_K == 0, (qtype, a.shape)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*a.shape[:-1], a.shape[-1] // QK_K * type_size)
    if k_mode == "random":
        return random_k_blocks(a.size, qtype, rng).reshape(byte_shape)
    blocks, values = OWN_QUANTIZERS[qtype](a)
    # the packing is what ggml reads: gguf's dequantizer gives back exactly the values the quantizer meant
    assert np.array_equal(gguf.quants.dequantize(blocks, qtype).reshape(a.shape), values), qtype
    return blocks.reshape(byte_shape)


# ---- the files ----


def write_fp8(official, path, scaled, linear=is_linear, rest=torch.bfloat16):
    """fp8 for the tensors `linear` picks, the rest cast to `rest`."""
    out = {}
    for name, value in official.items():
        if linear(name, value):
            if scaled:
                s = (value.abs().max() / FP8_MAX).to(torch.float32).reshape(())
                out[name] = (value / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                out[name.removesuffix(".weight") + ".scale_weight"] = s.clone()
            else:
                out[name] = value.to(torch.float8_e4m3fn)
        else:
            out[name] = value.to(rest)
    if scaled:
        # ComfyUI's marker (model_base.state_dict_for_saving): an empty tensor of the fp8 dtype
        out["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    save_file(out, str(path))


def gguf_plan(official, variant):
    """[(name, ggml type, layout)] for a GGUF variant; layout 'orig_shape' (2-D F16 + metadata key), '5d' or
    None."""
    plan = []
    # the mixed file's round-robin runs over the 16 linear weights in name order, the file keeps the model's order:
    # the block's cross_attn.{k,o,q,v} Q4_0, Q4_1, Q5_0, Q5_1, ffn.0 Q8_0, ffn.2 Q2_K (512 wide: two K-quant blocks
    # per row), self_attn.{k,o,q,v} Q3_K, Q4_K, Q5_K, Q6_K; head.head F16, text_embedding.0 BF16 (32 wide, no K-type
    # fits), then again Q4_0, Q4_1, Q5_0, Q5_1 for text_embedding.2, time_embedding.{0,2}, time_projection.1
    mixed = {}
    cycle = 0
    for name in sorted(n for n, v in official.items() if is_linear(n, v)):
        while True:
            qtype = MIXED_TYPES[cycle % len(MIXED_TYPES)]
            cycle += 1
            if qtype not in K_TYPES or official[name].shape[1] % QK_K == 0:
                break
        mixed[name] = qtype
    for name, value in official.items():
        layout = None
        if name == "patch_embedding.weight":
            if variant == "Q4_K_S_5d":
                qtype, layout = Q.F32, "5d"
            else:
                qtype, layout = Q.F16, "orig_shape"
        elif not is_linear(name, value):
            qtype = Q.F32  # 1-D tensors and the 3-D modulation tables
        elif variant == "Q8_0":
            qtype = Q.Q8_0
        elif variant == "Q4_K_M":
            if value.shape[1] % QK_K:
                qtype = Q.Q8_0
            elif name.endswith((".self_attn.v.weight", ".ffn.2.weight")):
                qtype = Q.Q6_K
            else:
                qtype = Q.Q4_K
        elif variant == "Q4_K_S_5d":
            # city96's patched llama-quantize leaves these as the F16 conversion wrote them
            top = ("text_embedding.", "time_embedding.", "time_projection.", "head.")
            qtype = Q.F16 if name.startswith(top) else Q.Q4_K
        else:
            assert variant == "mixed"
            qtype = mixed[name]
        plan.append((name, qtype, layout))
    if variant == "mixed":
        assert {q for _, q, _ in plan} >= set(MIXED_TYPES)
        # the random K-quant tensors: one per K-type, and not the output projection (a random head would make the
        # output mostly noise)
        random = [n for n, q, _ in plan if q in K_TYPES]
        assert len(random) == len(K_TYPES) and "head.head.weight" not in random, random
    if variant == "Q4_K_S_5d":
        # city96's fix_5d_tensors.py adds the 5-D weight back after the tensor named like it with `.bias`
        names = [n for n, _, _ in plan]
        i, j = names.index("patch_embedding.weight"), names.index("patch_embedding.bias")
        plan.insert(j, plan.pop(i))
    return plan


FILE_TYPES = {
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "mixed": None,  # no general.file_type: no llama.cpp ftype describes it
    "Q4_K_S_5d": gguf.LlamaFileType.MOSTLY_Q4_K_S,
}


def write_gguf(official, path, variant, rng):
    plan = gguf_plan(official, variant)
    k_mode = "random" if variant == "mixed" else "quantize"
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if FILE_TYPES[variant] is not None:
        writer.add_file_type(FILE_TYPES[variant])
    written = {}
    for name, qtype, layout in plan:
        value = official[name]
        if layout == "orig_shape":
            # stored 2-D (out, in · kt · kh · kw), the real shape in the metadata, as ComfyUI-GGUF reads it
            writer.add_array(f"comfy.gguf.orig_shape.{name}", [int(n) for n in value.shape])
            value = value.reshape(value.shape[0], -1)
        raw = encode(value, qtype, k_mode, rng)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        written[name] = (qtype, raw)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan, written


# ---- reading the files back: the weights they hold, in f32 ----


def read_safetensors(path):
    sd = load_file(str(path))
    out = {}
    for name, value in sd.items():
        if name == "scaled_fp8" or name.endswith(".scale_weight"):
            continue
        weight = value.to(torch.float32)
        scale = sd.get(name.removesuffix(".weight") + ".scale_weight")
        if scale is not None:
            weight = weight * scale
        out[name] = weight
    return out


def field_value(field):
    value = field.contents()
    if isinstance(value, list):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value.item() if isinstance(value, np.generic) else value


def read_gguf(path):
    """{name: f32 tensor in its real shape} and {name: (ggml type, stored shape in PyTorch order, orig shape)}."""
    reader = gguf.GGUFReader(str(path))
    weights, info = {}, {}
    for t in reader.tensors:
        stored = tuple(int(n) for n in reversed(t.shape.tolist()))
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(stored)
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        orig = None
        if field is not None:
            assert [gguf.GGUFValueType(v) for v in field.types] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            orig = tuple(int(n) for n in field.contents())
            values = values.reshape(orig)
        weights[t.name] = torch.from_numpy(values.copy())
        info[t.name] = (t.tensor_type, stored, orig, t)
    metadata = {
        f.name: dict(type=[gguf.GGUFValueType(v).name for v in f.types], value=field_value(f))
        for f in reader.fields.values()
        if not f.name.startswith("GGUF.")
    }
    return weights, info, metadata


def check_against_diffusers_dequantizer(info, weights):
    """A second implementation: diffusers' torch dequantizers, asked for float32 (its GGUF layers call them with
    dtype=None, in f16), give every quantized tensor bit for bit. Returns how many tensors of each type."""
    seen = {}
    for name, (qtype, _, _, t) in info.items():
        if qtype in (Q.F32, Q.F16):
            continue
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(-1, type_size).copy())
        values = dequantize_functions[qtype](blocks, block_size, type_size, dtype=torch.float32)
        assert torch.equal(values.reshape(weights[name].shape), weights[name]), name
        seen[qtype.name] = seen.get(qtype.name, 0) + 1
    return seen


def reference_model(config, official_f32):
    """diffusers' converter on the file's names, strictly into a fresh model."""
    converted = convert_wan_transformer_to_diffusers(dict(official_f32))
    model = WanTransformer3DModel(**config).eval()
    want = set(model.state_dict())
    assert set(converted) == want, sorted(set(converted) ^ want)
    model.load_state_dict(converted, strict=True)
    return model


def diffusers_single_file(inputs, outputs):
    """What diffusers 0.42.1's own single-file loader makes of each file, recorded for the notes (the references do
    not use it: its GGUF dequantizer computes the K-quant scales in f16)."""
    result = {}
    for variant, file in VARIANTS.items():
        kwargs = {}
        if file.endswith(".gguf"):
            kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.float32)
        try:
            loaded = WanTransformer3DModel.from_single_file(
                str(FILES / file), config=str(FILES), torch_dtype=torch.float32, **kwargs
            ).eval()
        except Exception as e:  # noqa: BLE001 (recorded, whatever it is)
            result[variant] = f"fails: {type(e).__name__}: {str(e).split('. If ')[0]}"
            continue
        out = loaded(**inputs, return_dict=False)[0]
        finite = bool(torch.isfinite(out).all())
        result[variant] = dict(
            loads=True,
            output_finite=finite,
            max_abs_difference_from_reference=max_abs(out, outputs[variant]) if finite else None,
        )
    return result


# ---- the umT5 text encoder (wan21-tiny-a's), as a GGUF and a scaled-fp8 file ----

TEXT_ENCODER = ROOT / BASE / "text_encoder"
TEXT_STEM = "umt5-tiny"
TEXT_VARIANTS = {"Q8_0": f"{TEXT_STEM}-Q8_0.gguf", "fp8_scaled": f"{TEXT_STEM}-fp8-scaled.safetensors"}
TEXT_ARCH = gguf.MODEL_ARCH.T5ENCODER  # "t5encoder": what llama.cpp's convert_hf_to_gguf writes for T5EncoderModel
# the batch of the text reference: the rows of reference/wan21-tiny-a/text.safetensors the pipeline encodes
TEXT_ROWS = {"prompt": PROMPT, "negative": NEGATIVE_PROMPT}

# ComfyUI-GGUF's loader.T5_SD_MAP (llama.cpp names -> transformers names, replaced in this order), copied to check
# that the file's names map back to the folder's
T5_SD_MAP = {
    "enc.": "encoder.",
    ".blk.": ".block.",
    "token_embd": "shared",
    "output_norm": "final_layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_norm": "layer.1.layer_norm",
}


def text_encoder_weights():
    """The folder's f32 weights in its file's order (names sorted, as safe_open lists them and llama.cpp's converter
    walks them). No `encoder.embed_tokens.weight`: transformers ties it to `shared.weight`."""
    with safe_open(str(TEXT_ENCODER / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert all(v.dtype == torch.float32 for v in weights.values())
    return weights


def is_text_linear(name, value):
    """The blocks' 2-D weights: attention q, k, v, o and the FFN's wi_0, wi_1, wo; not the embedding `shared`, not
    the relative attention bias (an embedding table too)."""
    return (
        name.startswith("encoder.block.")
        and name.endswith(".weight")
        and value.ndim == 2
        and ".relative_attention_bias." not in name
    )


def text_gguf_plan(weights, n_blocks):
    """[(transformers name, GGUF name, ggml type)]: Q8_0 for every 2-D weight whose rows 32 divides (the
    embedding, q, k, v, o, wi_0, wi_1), F32 for the norms, the relative attention bias (llama.cpp never quantizes
    `attn_rel_b`) and the rows 32 does not divide (`wo`, 48 wide)."""
    names = gguf.get_tensor_name_map(TEXT_ARCH, n_blocks)
    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    plan = []
    for name, value in weights.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        back = gguf_name
        for src, dst in T5_SD_MAP.items():
            back = back.replace(src, dst)
        assert back == name, (gguf_name, back, name)
        rel_b = gguf_name.endswith(".attn_rel_b.weight")
        qtype = Q.Q8_0 if value.ndim == 2 and not rel_b and value.shape[1] % block == 0 else Q.F32
        plan.append((name, gguf_name, qtype))
    return plan


def write_text_gguf(weights, config, path):
    """As llama.cpp's convert_hf_to_gguf (T5EncoderModel: its set_gguf_parameters' keys, n_positions absent so
    context_length 512) and llama-quantize to Q8_0 would write it, but without the tokenizer keys."""
    plan = text_gguf_plan(weights, config.num_layers)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[TEXT_ARCH])
    writer.add_context_length(512)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for name, gguf_name, qtype in plan:
        raw = encode(weights[name], qtype, "quantize", None)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        written[gguf_name] = (qtype, raw)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan, written


def text_reference_model(config, weights):
    """UMT5EncoderModel(config) with the weights loaded strictly (the tied `encoder.embed_tokens.weight` is
    `shared.weight`)."""
    model = UMT5EncoderModel(config).eval()
    sd = {**weights, "encoder.embed_tokens.weight": weights["shared.weight"]}
    want = set(model.state_dict())
    assert set(sd) == want, sorted(set(sd) ^ want)
    model.load_state_dict(sd, strict=True)
    return model


def text_inputs(msl):
    """input_ids and attention_mask [2, msl] (int64): the prompt and negative-prompt ids of
    reference/wan21-tiny-a/text.safetensors (which stores them unpadded), padded with 0 as the pipeline's tokenizer
    call pads them; checked against that call (made here on the two prompts at once)."""
    stored = load_file(str(ROOT / "reference" / BASE / "text.safetensors"))
    ids = torch.zeros(len(TEXT_ROWS), msl, dtype=torch.int64)
    mask = torch.zeros(len(TEXT_ROWS), msl, dtype=torch.int64)
    for row, key in enumerate(TEXT_ROWS):
        n = stored[f"{key}_ids"].numel()
        ids[row, :n] = stored[f"{key}_ids"]
        mask[row, :n] = 1
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / BASE / "tokenizer"))
    call = tokenizer(
        [prompt_clean(text) for text in TEXT_ROWS.values()],
        padding="max_length",
        max_length=msl,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert torch.equal(call.input_ids, ids) and torch.equal(call.attention_mask, mask)
    return ids, mask, stored


def text_encoder_fixtures():
    """Writes the two text-encoder files and reference/quantized/text.safetensors and text.json; returns the
    checks."""
    config = UMT5Config.from_pretrained(str(TEXT_ENCODER))
    weights = text_encoder_weights()
    linear = [n for n, v in weights.items() if is_text_linear(n, v)]
    plan, written = write_text_gguf(weights, config, FILES / TEXT_VARIANTS["Q8_0"])
    write_fp8(weights, FILES / TEXT_VARIANTS["fp8_scaled"], scaled=True, linear=is_text_linear, rest=torch.float32)

    # read back, in f32, under the transformers names
    held, files, dequantizer_checks = {"f32": weights}, {}, {}
    for variant, file in TEXT_VARIANTS.items():
        path = FILES / file
        entry = dict(file=f"quantized/{file}", bytes=path.stat().st_size, sha256=sha256(path))
        if file.endswith(".gguf"):
            gguf_weights, info, metadata = read_gguf(path)
            assert list(info) == [g for _, g, _ in plan], "tensor order"
            for gguf_name, (qtype, _, orig, t) in info.items():
                want_type, want_raw = written[gguf_name]
                assert qtype == want_type and orig is None, gguf_name
                assert np.array_equal(
                    np.asarray(t.data).view(np.uint8).reshape(-1), want_raw.view(np.uint8).reshape(-1)
                )
            dequantizer_checks[variant] = check_against_diffusers_dequantizer(info, gguf_weights)
            held[variant] = {name: gguf_weights[g] for name, g, _ in plan}
            entry["metadata"] = metadata
            entry["tensors"] = {
                g: dict(ggml_type=qtype.name, shape=list(stored), name=name)
                for (name, g, _), (qtype, stored, _, _) in zip(plan, info.values())
            }
        else:
            held[variant] = read_safetensors(path)
            with safe_open(str(path), "pt") as f:
                entry["header_metadata"] = f.metadata()
                entry["tensors"] = {
                    k: dict(dtype=str(f.get_slice(k).get_dtype()), shape=list(f.get_slice(k).get_shape()))
                    for k in sorted(f.keys())
                }
        assert sorted(held[variant]) == sorted(weights), variant
        for name, value in held[variant].items():
            assert value.shape == weights[name].shape and value.dtype == torch.float32, (variant, name)
            assert torch.isfinite(value).all(), (variant, name)
        files[variant] = entry

    # per-tensor weight error: the tensors each file stores as is are the folder's bit for bit
    weight_checks = {}
    for variant in TEXT_VARIANTS:
        errors = {n: rel(v, weights[n]) for n, v in held[variant].items()}
        exact = sorted(n for n, v in held[variant].items() if torch.equal(v, weights[n]))
        if variant == "Q8_0":
            assert exact == sorted(n for n, _, q in plan if q == Q.F32), exact
        else:
            assert exact == sorted(set(weights) - set(linear)), exact
        worst = max(errors, key=errors.get)
        weight_checks[variant] = dict(
            max_relative_error=errors[worst], worst_tensor=worst, tensors_exact=len(exact), tensors=len(errors)
        )
    assert weight_checks["Q8_0"]["max_relative_error"] < 0.01, weight_checks
    assert weight_checks["fp8_scaled"]["max_relative_error"] < 0.12, weight_checks

    # the encoder on the pipeline's two token rows
    msl = make_fixtures.CONFIGS[BASE]["run"]["max_sequence_length"]
    input_ids, attention_mask, stored = text_inputs(msl)
    outputs = {}
    for variant in ("f32", *TEXT_VARIANTS):
        model = text_reference_model(config, held[variant])
        outputs[variant] = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        assert outputs[variant].shape == (len(TEXT_ROWS), msl, config.d_model)
        assert torch.isfinite(outputs[variant]).all(), variant
    folder_model = UMT5EncoderModel.from_pretrained(str(TEXT_ENCODER), dtype=torch.float32).eval()
    folder_out = folder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    valid = attention_mask.bool()
    lengths = attention_mask.sum(1).tolist()
    # the pipeline keeps each row's first `length` positions and zeroes the rest (_get_t5_prompt_embeds)
    stored_diff = {}
    for row, key in enumerate(TEXT_ROWS):
        embeds, n = stored[f"{key}_embeds"][0], lengths[row]
        assert not embeds[n:].any(), key
        stored_diff[key] = max_abs(outputs["f32"][row, :n], embeds[:n])
    forward_checks = dict(
        f32_equals_from_pretrained=bool(torch.equal(outputs["f32"], folder_out)),
        f32_max_abs_difference_from_text_safetensors=stored_diff,
        f32_std=tensor_std(outputs["f32"][valid]),
        f32_max_abs=float(outputs["f32"][valid].abs().max()),
    )
    assert forward_checks["f32_equals_from_pretrained"]
    assert max(stored_diff.values()) < 1e-5, stored_diff
    for variant in TEXT_VARIANTS:
        a, b = outputs[variant], outputs["f32"]
        forward_checks[variant] = dict(
            relative_difference_from_f32=rel(a[valid], b[valid]),
            relative_difference_from_f32_all_positions=rel(a, b),
            max_abs_difference_from_f32=max_abs(a[valid], b[valid]),
            max_abs_difference_from_f32_all_positions=max_abs(a, b),
        )
    # the 32-wide model amplifies: Q8_0 of the embedding alone moves the output 1.3%, of the blocks alone 1.7%
    for variant, (lo, hi) in dict(Q8_0=(1e-4, 0.05), fp8_scaled=(1e-3, 0.15)).items():
        diff = forward_checks[variant]["relative_difference_from_f32"]
        assert lo < diff < hi, (variant, diff)

    tensors = dict(input_ids=input_ids, attention_mask=attention_mask)
    tensors.update({f"last_hidden_state_{variant}": out for variant, out in outputs.items()})
    save(OUT / "text.safetensors", tensors)
    text_ref = dict(
        model=f"{BASE}/text_encoder",
        config=json.loads((TEXT_ENCODER / "config.json").read_text()),
        files=files,
        gguf_layout=dict(
            writer=f"gguf {importlib.metadata.version('gguf')} GGUFWriter(arch='t5encoder'), alignment 32",
            names="llama.cpp's T5 encoder names (gguf.get_tensor_name_map(MODEL_ARCH.T5ENCODER)), in the folder "
            "file's order (names sorted); ComfyUI-GGUF's T5_SD_MAP maps each back",
            types="Q8_0: 2-D weights whose rows 32 divides; F32: norms, attn_rel_b, ffn_down (rows 48)",
            tokenizer="no tokenizer.ggml.* keys",
        ),
        fp8_layout="transformers names; the blocks' 2-D linear weights F8_E4M3 = fp8(weight / s) with "
        "`<layer>.scale_weight` = s (F32, 0-d, absmax / 448), the marker `scaled_fp8` (F8_E4M3, [0]); the rest F32",
        inputs=dict(
            rows=list(TEXT_ROWS),
            lengths=lengths,
            source=f"reference/{BASE}/text.safetensors prompt_ids, negative_ids, padded with 0 to "
            f"max_sequence_length {msl} (checked against the pipeline's tokenizer call)",
        ),
        outputs=[f"last_hidden_state_{variant}" for variant in outputs],
        checks=dict(
            weights=weight_checks, diffusers_float32_dequantizer_equal=dequantizer_checks, forward=forward_checks
        ),
    )
    (OUT / "text.json").write_text(json.dumps(text_ref, indent=2, ensure_ascii=False) + "\n")
    return text_ref["checks"]


# ---- main ----


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_std(t):
    return float(t.to(torch.float64).std())


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    assert gguf.GGML_QUANT_VERSION == 2
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    make_image_fixtures.check_pin()

    for folder in (FILES, OUT):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    config = transformer_config()
    model = base_model(config)
    model.save_config(str(FILES))  # config.json: _class_name, _diffusers_version and the config, sorted
    base_sd = model.state_dict()
    official = {to_official(k): v.contiguous() for k, v in base_sd.items()}
    assert len(official) == len(base_sd)
    rng = np.random.Generator(np.random.PCG64(BYTES_SEED))

    # write
    save_file(official, str(FILES / VARIANTS["f32"]))
    write_fp8(official, FILES / VARIANTS["fp8"], scaled=False)
    write_fp8(official, FILES / VARIANTS["fp8_scaled"], scaled=True)
    plans = {}
    for variant in ("Q8_0", "Q4_K_M", "mixed", "Q4_K_S_5d"):
        plans[variant], written = write_gguf(official, FILES / VARIANTS[variant], variant, rng)
        plans[variant + "_written"] = written

    # read back, check the files hold what was meant
    held, files, dequantizer_checks = {}, {}, {}
    for variant, file in VARIANTS.items():
        path = FILES / file
        entry = dict(file=f"quantized/{file}", bytes=path.stat().st_size, sha256=sha256(path))
        if file.endswith(".safetensors"):
            held[variant] = read_safetensors(path)
            with safe_open(str(path), "pt") as f:
                entry["header_metadata"] = f.metadata()
                entry["tensors"] = {
                    k: dict(dtype=str(f.get_slice(k).get_dtype()), shape=list(f.get_slice(k).get_shape()))
                    for k in sorted(f.keys())
                }
        else:
            weights, info, metadata = read_gguf(path)
            held[variant] = weights
            dequantizer_checks[variant] = check_against_diffusers_dequantizer(info, weights)
            written = plans[variant + "_written"]
            assert list(info) == [n for n, _, _ in plans[variant]], "tensor order"
            for name, (qtype, stored, orig, t) in info.items():
                want_type, want_raw = written[name]
                assert qtype == want_type, (variant, name)
                assert np.array_equal(
                    np.asarray(t.data).view(np.uint8).reshape(-1), want_raw.view(np.uint8).reshape(-1)
                )
            entry["metadata"] = metadata
            entry["tensors"] = {
                name: dict(ggml_type=qtype.name, shape=list(stored), **({"orig_shape": list(orig)} if orig else {}))
                for name, (qtype, stored, orig, _) in info.items()
            }
        assert sorted(held[variant]) == sorted(official), variant
        for name, value in held[variant].items():
            assert value.shape == official[name].shape and value.dtype == torch.float32, (variant, name)
            assert torch.isfinite(value).all(), (variant, name)
        files[variant] = entry
    assert all(torch.equal(held["f32"][k], official[k]) for k in official)

    # per-tensor weight error against the base (the mixed file's K-quant tensors are random, not approximations)
    weight_checks = {}
    for variant in VARIANTS:
        if variant == "f32":
            continue
        errors = {}
        for name, value in held[variant].items():
            errors[name] = rel(value, official[name])
        if variant == "mixed":
            plan = {n: q for n, q, _ in plans["mixed"]}
            approx = {n: e for n, e in errors.items() if plan[n] not in K_TYPES}
            random = {n: held[variant][n] for n in errors if plan[n] in K_TYPES}
            weight_checks[variant] = dict(
                max_relative_error_quantized=max(approx.values()),
                random_k_std={n: tensor_std(v) for n, v in random.items()},
            )
            for n, std in weight_checks[variant]["random_k_std"].items():
                assert 0.005 < std < 0.08, (n, std)
        else:
            weight_checks[variant] = dict(max_relative_error=max(errors.values()))
            worst = max(errors, key=errors.get)
            weight_checks[variant]["worst_tensor"] = worst
    assert weight_checks["Q8_0"]["max_relative_error"] < 0.01
    for variant in ("fp8", "fp8_scaled", "Q4_K_M", "Q4_K_S_5d"):
        assert weight_checks[variant]["max_relative_error"] < 0.12, (variant, weight_checks[variant])

    # the mixed file, tensor by tensor, as a dequantizer must give it: one tensor per stored type (its smallest
    # linear weight of that type, ties to the first name in sorted order) and the F16 2-D + orig_shape patch
    # embedding (in its 5-D shape); its F32 tensors are the base weights as they are
    dequantized = {"patch_embedding.weight"}
    for qtype in MIXED_TYPES:
        of_type = [(official[n].numel(), n) for n, q, layout in plans["mixed"] if q == qtype and layout is None]
        dequantized.add(min(of_type)[1])
    assert len(dequantized) == len(MIXED_TYPES) + 1, dequantized
    save(OUT / "dequantized.safetensors", {n: v for n, v in held["mixed"].items() if n in dequantized})

    # forward
    gen = torch.Generator().manual_seed(INPUT_SEED)
    inputs = dict(
        hidden_states=torch.randn(HIDDEN_SHAPE, generator=gen),
        timestep=torch.tensor([TIMESTEP], dtype=torch.float32),
        encoder_hidden_states=torch.randn(TEXT_SHAPE, generator=gen),
    )
    models, outputs = {}, {}
    for variant in VARIANTS:
        models[variant] = reference_model(config, held[variant])
        outputs[variant] = models[variant](**inputs, return_dict=False)[0]
        assert torch.isfinite(outputs[variant]).all(), variant
    base_out = model(**inputs, return_dict=False)[0]
    assert torch.equal(outputs["f32"], base_out)
    forward_checks = dict(
        f32_output_std=tensor_std(outputs["f32"]), f32_output_max_abs=float(outputs["f32"].abs().max())
    )
    for variant in VARIANTS:
        if variant == "f32":
            continue
        forward_checks[variant] = dict(
            relative_difference_from_f32=rel(outputs[variant], outputs["f32"]),
            max_abs_difference_from_f32=max_abs(outputs[variant], outputs["f32"]),
            output_max_abs=float(outputs[variant].abs().max()),
        )
    assert 0.3 < forward_checks["f32_output_std"] < 3, forward_checks
    bounds = dict(Q8_0=(1e-5, 0.02), fp8=(1e-3, 0.15), fp8_scaled=(1e-3, 0.15), Q4_K_M=(1e-3, 0.15))
    bounds.update(Q4_K_S_5d=(1e-3, 0.15), mixed=(0.05, 1.0))  # mixed: five random tensors, not quantization noise
    for variant, (lo, hi) in bounds.items():
        diff = forward_checks[variant]["relative_difference_from_f32"]
        assert lo < diff < hi, (variant, diff)
        assert forward_checks[variant]["output_max_abs"] < 20, (variant, forward_checks[variant])
    save(OUT / "forward.safetensors", {**inputs, **outputs})
    from_single_file = diffusers_single_file(inputs, outputs)

    # the pipeline
    run = make_fixtures.CONFIGS[BASE]["run"]
    kwargs = pipeline_kwargs(run, run["max_sequence_length"])
    noise = load_file(str(ROOT / "reference" / BASE / "pipeline.safetensors"))["latents"]
    tensors = {"latents": noise}
    timesteps = None
    for variant in PIPELINE_VARIANTS:
        pipe = wan21_pipeline()
        pipe.transformer = models[variant]
        final_latents, frames = run_pipeline(pipe, kwargs, noise)
        tensors[f"final_latents_{variant}"] = final_latents
        tensors[f"frames_{variant}"] = frames
        timesteps = [float(t) for t in pipe.scheduler.timesteps.tolist()]
    pipeline_checks = {}
    for variant in PIPELINE_VARIANTS[:-1]:
        pipeline_checks[variant] = dict(
            final_latents_relative_difference_from_f32=rel(
                tensors[f"final_latents_{variant}"], tensors["final_latents_f32"]
            ),
            frames_max_abs_difference_from_f32=max_abs(tensors[f"frames_{variant}"], tensors["frames_f32"]),
        )
        assert pipeline_checks[variant]["final_latents_relative_difference_from_f32"] < 0.2, pipeline_checks
    pipeline_checks["f32_final_latents_std"] = tensor_std(tensors["final_latents_f32"])
    save(OUT / "pipeline.safetensors", tensors)

    ref = dict(
        config=config,
        files=files,
        gguf_layout=dict(
            writer=f"gguf {importlib.metadata.version('gguf')} GGUFWriter(arch='wan'), alignment 32 (the default)",
            names="official Wan names, no prefix",
            patch_embedding="F16, stored [256, 64] with comfy.gguf.orig_shape.patch_embedding.weight = "
            "[256, 16, 1, 2, 2] (Q8_0, Q4_K_M, mixed); F32 5-D without the key (Q4_K_S_5d)",
            random_k="mixed: the K-quant tensors are random bytes with f16 d / dmin set (see RANDOM_K in the script)",
        ),
        mixed_types={n: q.name for n, q, _ in plans["mixed"]},
        forward=dict(
            inputs="hidden_states, timestep, encoder_hidden_states in forward.safetensors",
            timestep=dict(value=TIMESTEP, dtype="float32", shape=[1]),
            outputs=list(VARIANTS),
        ),
        pipeline=dict(
            model=BASE,
            transformer="replaced by each variant's reference model",
            variants=PIPELINE_VARIANTS,
            noise=f"reference/{BASE}/pipeline.safetensors latents (copied here as latents)",
            scheduler="UniPC flow (wan21-tiny-a/scheduler), pinned grid",
            timesteps=timesteps,
            **kwargs,
        ),
        checks=dict(
            weights=weight_checks,
            diffusers_float32_dequantizer_equal=dequantizer_checks,
            forward=forward_checks,
            pipeline=pipeline_checks,
        ),
        diffusers_from_single_file=from_single_file,
    )
    (OUT / "ref.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    text_checks = text_encoder_fixtures()
    for path in sorted([*FILES.iterdir(), *OUT.iterdir()]):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size:>8}  {sha256(path)[:16]}")
    print(json.dumps(dict(**ref["checks"], diffusers_from_single_file=from_single_file, text=text_checks), indent=1))


if __name__ == "__main__":
    main()
