"""A tiny random-weight Wan 2.1 VACE model and diffusers' outputs on it (WanVACETransformer3DModel, WanVACEPipeline).

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1), after make_fixtures.py
and make_region_fixtures.py (it reads `wan21-tiny-a/`, `reference/wan21-tiny-a/video_to_video.safetensors` and
`reference/region/region.json`); writes next to this file:

  wan21-vace-tiny/                       WanVACEPipeline in diffusers' layout: `tokenizer/`, `text_encoder/`, `vae/`,
                                         `scheduler/` copied byte for byte from wan21-tiny-a, `transformer/` a
                                         WanVACETransformer3DModel (wan21-tiny-a's sizes, 4 layers, VACE layers [0, 2],
                                         96 control channels), random f32 weights
  reference/vace/transformer.safetensors one transformer forward with fewer control frames than latent frames (the
                                         control tokens are zero-padded) and one with as many, the VACE hints, and the
                                         output without control
  reference/vace/transformer.json        its settings and checks
  reference/vace/vace.safetensors        three whole WanVACEPipeline runs (a masked edit of a clip, a reference image,
                                         a control clip): inputs, noise, the conditioning latents the transformer was
                                         handed, the final latents and the frames; plus the conditioning latents of a
                                         random 8-bit mask with a reference image (no denoising run)
  reference/vace/vace.json               the settings, the schedule, what was passed and the checks

(see the "VACE" section of FIXTURES.md, which states the recipe the Rust side implements). Rebuild:

    /tmp/kt-image/bin/python models/tiny/make_vace_fixtures.py

Everything runs through diffusers' own classes (`WanVACEPipeline.from_pretrained(wan21-vace-tiny)`, f32, CPU); UniPC
gets `benches/gpu/bench.py`'s `pin_unipc_schedule` (the official Wan grid, as every tiny reference) and the pin is
checked as make_image_fixtures.py checks it. The script also rebuilds every conditioning tensor from the saved inputs
with the recipe FIXTURES.md states (diffusers' VAE for the encodes, the rest written out here) and checks it bit for
bit. Everything is CPU, f32, single-threaded and deterministic, so a rerun reproduces the files byte for byte.
"""

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import UMT5EncoderModel

import diffusers
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_fixtures  # noqa: E402  (the tokenizer class, the scheduler settings and the helpers)
import make_image_fixtures  # noqa: E402  (the UniPC pin and its check)
from make_fixtures import SCHEDULER, redraw_, save  # noqa: E402
from make_image_fixtures import pin_unipc_schedule  # noqa: E402
from make_lora_fixtures import max_abs, rel  # noqa: E402
from make_region_fixtures import BOX, decode, pixel_mask  # noqa: E402  (the region edit's box and WanPipeline's decode)

BASE = "wan21-tiny-a"
NAME = "wan21-vace-tiny"
SOURCE = ROOT / "reference" / BASE / "video_to_video.safetensors"
REGION = ROOT / "reference" / "region" / "region.json"
OUT = ROOT / "reference" / "vace"

# wan21-tiny-a's transformer (make_fixtures.py), with 4 layers and the VACE branch: two VACE blocks whose hints are
# added after main blocks 0 and 2, and the control input's 96 channels (16 inactive + 16 reactive latents + 64 mask).
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=16,
    ffn_dim=64,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
    vace_layers=[0, 2],
    vace_in_channels=96,
)
WEIGHT_SEED = 41  # the transformer's weights (make_fixtures' redraw_)
INPUT_SEED = 141  # the transformer forward's random inputs
NOISE_SEED = 241  # + the run's index: each run's initial noise
MASK_SEED = 341  # the 8-bit random mask of the conditioning-only case

STEPS = 4
FORWARD_TIMESTEP = 700  # int64, as the pipeline hands the scheduler's timesteps to the model
FORWARD_CASES = {
    # control with 2 latent frames against 3: diffusers zero-pads the control tokens to the hidden length
    "padded": dict(frames=2, scale=[0.7, 1.3]),
    "full": dict(frames=3, scale=[1.0, 1.0]),
}
RUNS = {
    "masked": dict(conditioning_scale=1.0),
    "reference": dict(conditioning_scale=1.0),
    "control": dict(conditioning_scale=0.8),
}
MIN_CONTROL_EFFECT = 0.1  # relative change of an output between conditioning scale 0 and the run's scale, at least


# ---- the model ----


def build_pipeline():
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    transformer = WanVACETransformer3DModel(**TRANSFORMER).eval()
    redraw_(transformer, gen)
    for name, p in transformer.named_parameters():
        assert p.dtype == torch.float32 and int(p.count_nonzero()) == p.numel(), name
    base = ROOT / BASE
    return WanVACEPipeline(
        tokenizer=make_fixtures.T5TokenizerFast.from_pretrained(base / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval(),
        vae=AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=torch.float32).eval(),
        scheduler=UniPCMultistepScheduler(**SCHEDULER),
        transformer=transformer,
    )


def save_pipeline(pipe, folder):
    index = make_image_fixtures.save_with_reused(pipe, folder)
    assert index["_class_name"] == "WanVACEPipeline", index
    assert index["transformer"] == ["diffusers", "WanVACETransformer3DModel"], index
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None, index
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    return index


def load_pipeline(folder):
    pipe = WanVACEPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pin_unipc_schedule(pipe.scheduler)
    assert {k: pipe.scheduler.config[k] for k in SCHEDULER} == SCHEDULER, pipe.scheduler.config
    for name in ("text_encoder", "transformer", "vae"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name
    assert pipe.transformer_2 is None
    return pipe


# ---- the transformer forward ----


class BlockRecorder:
    """Hooks on the transformer's blocks: each main block's input and output, each VACE block's hint (its proj_out
    output) and what the first VACE block is handed as control tokens."""

    def __init__(self, model):
        self.main_in, self.main_out, self.hints, self.control_tokens = {}, {}, {}, []
        self.handles = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.register_forward_pre_hook(self.keep(self.main_in, i, lambda a: a[0])))
            self.handles.append(block.register_forward_hook(self.keep_out(self.main_out, i, lambda o: o)))
        for k, block in enumerate(model.vace_blocks):
            self.handles.append(block.register_forward_hook(self.keep_out(self.hints, k, lambda o: o[0])))
        first = model.vace_blocks[0]
        self.handles.append(first.register_forward_pre_hook(lambda m, a: self.control_tokens.append(a[2].clone())))

    @staticmethod
    def keep(store, key, pick):
        return lambda module, args: store.__setitem__(key, pick(args).clone())

    @staticmethod
    def keep_out(store, key, pick):
        return lambda module, args, out: store.__setitem__(key, pick(out).clone())

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def transformer_references(model):
    """One forward per FORWARD_CASES entry on random inputs, and the forward with conditioning scale 0."""
    gen = torch.Generator().manual_seed(INPUT_SEED)
    hidden = torch.randn(1, 16, 3, 4, 6, generator=gen)
    text = torch.randn(1, 512, TRANSFORMER["text_dim"], generator=gen)
    timestep = torch.tensor([FORWARD_TIMESTEP], dtype=torch.int64)
    controls = {case: torch.randn(1, 96, c["frames"], 4, 6, generator=gen) for case, c in FORWARD_CASES.items()}
    call = dict(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    p_t, p_h, p_w = TRANSFORMER["patch_size"]
    tokens = (3 // p_t) * (4 // p_h) * (6 // p_w)

    # the main path alone: a plain Wan transformer with the VACE model's non-VACE weights
    plain_config = {k: v for k, v in TRANSFORMER.items() if not k.startswith("vace_")}
    plain = WanTransformer3DModel(**plain_config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vace_")}
    plain.load_state_dict(state, strict=True)
    plain_out = plain(**call)[0]

    tensors = dict(hidden_states=hidden, timestep=timestep.to(torch.float32), encoder_hidden_states=text)
    checks = {}
    layers = sorted(TRANSFORMER["vace_layers"])
    for case, spec in FORWARD_CASES.items():
        control, scale = controls[case], torch.tensor(spec["scale"])
        rec = BlockRecorder(model)
        out = model(**call, control_hidden_states=control, control_hidden_states_scale=scale)[0]
        rec.remove()
        zero = model(**call, control_hidden_states=control, control_hidden_states_scale=torch.zeros(2))[0]
        ones = model(**call, control_hidden_states=control, control_hidden_states_scale=torch.ones(2))[0]
        # the control tokens: vace_patch_embedding's tokens, then zeros up to the hidden length
        control_tokens = rec.control_tokens[0]
        embedded = model.vace_patch_embedding(control).flatten(2).transpose(1, 2)
        n = embedded.shape[1]
        assert n == spec["frames"] * tokens // 3 and control_tokens.shape[1] == tokens
        assert torch.equal(control_tokens[:, :n], embedded) and not control_tokens[:, n:].any()
        # hint k (VACE block k's proj_out output) times scale k is added after the k-th smallest main layer of
        # vace_layers; nothing else changes between blocks
        for i in range(len(model.blocks) - 1):
            want = rec.main_out[i]
            if i in layers:
                k = layers.index(i)
                want = want + rec.hints[k] * scale[k]
            assert torch.equal(rec.main_in[i + 1], want), (case, i)
        # at scale 0 the control does not matter at all
        if "no_control.output" in tensors:
            assert torch.equal(zero, tensors["no_control.output"]), case
        tensors["no_control.output"] = zero
        tensors[f"{case}.control_hidden_states"] = control
        tensors[f"{case}.control_hidden_states_scale"] = scale
        for k in range(len(layers)):
            tensors[f"{case}.hint_{k}"] = rec.hints[k]
        tensors[f"{case}.output"] = out
        checks[f"{case}_padding_tokens"] = tokens - n
        checks[f"{case}_scale_1_vs_0_relative"] = rel(ones, zero)
        checks[f"{case}_hint_rms"] = [float(rec.hints[k].pow(2).mean().sqrt()) for k in range(len(layers))]
        assert checks[f"{case}_scale_1_vs_0_relative"] >= MIN_CONTROL_EFFECT, checks
    no_control = tensors["no_control.output"]
    for case in FORWARD_CASES:
        checks[f"{case}_vs_no_control_relative"] = rel(tensors[f"{case}.output"], no_control)
    # the same up to f32 rounding: the two models' time embedders already differ by 2e-7 on equal weights and input
    # (the matmuls round differently on the from_pretrained weights' memory, presumably)
    checks["scale_0_vs_plain_wan_transformer_max_abs"] = max_abs(no_control, plain_out)
    assert checks["scale_0_vs_plain_wan_transformer_max_abs"] <= 1e-5, checks
    checks["output_rms_no_control"] = float(no_control.pow(2).mean().sqrt())
    save(OUT / "transformer.safetensors", tensors)
    ref = dict(
        model=NAME,
        transformer=f"{NAME}/transformer (WanVACETransformer3DModel, f32)",
        inputs=dict(
            seed=INPUT_SEED,
            draws="torch.Generator().manual_seed(seed): hidden_states, encoder_hidden_states, then each case's "
            "control_hidden_states in the order below, all torch.randn",
            hidden_states=list(hidden.shape),
            encoder_hidden_states=list(text.shape),
            timestep=FORWARD_TIMESTEP,
            timestep_note="passed to the model as int64 [1]; saved as f32",
            hidden_tokens=tokens,
        ),
        cases={
            case: dict(control_hidden_states=list(controls[case].shape), control_hidden_states_scale=spec["scale"])
            for case, spec in FORWARD_CASES.items()
        },
        keys=dict(
            hidden_states="[1, 16, 3, 4, 6]",
            timestep="[1] f32 (700)",
            encoder_hidden_states="[1, 512, 32]",
            **{f"{case}.control_hidden_states": "[1, 96, T_c, 4, 6]" for case in FORWARD_CASES},
            **{f"{case}.control_hidden_states_scale": "[2]" for case in FORWARD_CASES},
            **{f"{case}.hint_k": "[1, 18, 64]: VACE block k's proj_out output (tokens, before the scale)"
               for case in FORWARD_CASES},
            **{f"{case}.output": "[1, 16, 3, 4, 6]" for case in FORWARD_CASES},
            **{"no_control.output": "[1, 16, 3, 4, 6]: conditioning scale 0 (any control), equal to a plain "
               "WanTransformer3DModel with the non-VACE weights"},
        ),
        checks=checks,
    )
    (OUT / "transformer.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    return tensors, ref


# ---- the pipeline runs: inputs ----


def to_unit(pixels):
    """uint8 → the f32 values diffusers' PIL preprocessing reads (np.float32(k) / 255)."""
    return pixels.to(torch.float32) / 255


def source_clip():
    """wan21-tiny-a's video-to-video source clip ([9, 32, 48, 3] in [0, 1], not 8-bit), rounded to 8 bits."""
    frames = load_file(str(SOURCE))["input_frames"]
    return torch.round(frames.double() * 255).clamp(0, 255).to(torch.uint8)


def luminance(clip):
    """The control clip: each pixel's Rec. 601 luma round(0.299 R + 0.587 G + 0.114 B) (f64), as all three channels."""
    rgb = clip.double()
    y = torch.round(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).clamp(0, 255).to(torch.uint8)
    return y.unsqueeze(-1).expand(*y.shape, 3).contiguous()


def reference_picture(height, width):
    """A smooth red (left → right) and green (top → bottom) ramp on blue 96, a magenta disc and a dark square."""
    y = torch.arange(height, dtype=torch.float64).view(-1, 1).expand(height, width)
    x = torch.arange(width, dtype=torch.float64).view(1, -1).expand(height, width)
    red, green = torch.round(255 * x / (width - 1)), torch.round(255 * y / (height - 1))
    img = torch.stack([red, green, torch.full_like(x, 96.0)], -1)
    disc = (y - 13.5) ** 2 + (x - 31.5) ** 2 <= 7.5**2
    img[disc] = torch.tensor([235.0, 30.0, 220.0], dtype=torch.float64)
    img[20:28, 4:14] = torch.tensor([20.0, 24.0, 28.0], dtype=torch.float64)
    return img.to(torch.uint8)


def rgb_frames(pixels):
    frames = [Image.fromarray(p.numpy()) for p in pixels]
    assert all(f.mode == "RGB" for f in frames)
    return frames


def gray_frames(pixels):
    frames = [Image.fromarray(p.numpy()) for p in pixels]
    assert all(f.mode == "L" for f in frames)
    return frames


# ---- the recipe, written out (checked against what the pipeline hands the transformer) ----


def normalized_latents(vae, video):
    """The posterior's mode of video [1, 3, F, H, W] in [-1, 1], then (z − latents_mean) · (1 / latents_std)."""
    z = retrieve_latents(vae.encode(video), sample_mode="argmax")
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (z - mean) * inv_std


def source_frame(t, num_frames, latent_frames):
    """nearest-exact: pixel frame min(floor((t + 0.5) · F / T), F − 1) for latent frame t (F / T taken in f32)."""
    scale = np.float32(num_frames) / np.float32(latent_frames)
    return min(int(math.floor(np.float32(t + 0.5) * scale)), num_frames - 1)


def mask_channels(mask, s, m):
    """[s·s, T, H/s, W/s]: channel sy·s + sx of latent frame t, cell (i, j) = mask[src(t), s·i + sy, s·j + sx]."""
    num_frames, height, width = mask.shape
    latent_frames = (num_frames + m - 1) // m
    out = torch.zeros(s * s, latent_frames, height // s, width // s)
    for t in range(latent_frames):
        f = source_frame(t, num_frames, latent_frames)
        for sy in range(s):
            for sx in range(s):
                out[sy * s + sx, t] = mask[f, sy::s, sx::s]
    return out


def conditioning_by_recipe(pipe, num_frames, height, width, frames=None, mask=None, references=()):
    """The 96 control channels from the f32 inputs as FIXTURES.md states them (frames [F, H, W, 3] and references
    [H, W, 3] in [0, 1], mask [F, H, W] in [0, 1])."""
    vae = pipe.vae
    s, m = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    if frames is None:
        video = torch.zeros(1, 3, num_frames, height, width)
    else:
        video = (frames * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)
    if mask is None:
        mask = torch.ones(num_frames, height, width)
    else:
        mask = ((mask * 2 - 1) + 1) / 2  # diffusers' [-1, 1] round trip (the identity on these values)
    hard = torch.where(mask > 0.5, 1.0, 0.0).view(1, 1, num_frames, height, width)
    latents = torch.cat([normalized_latents(vae, video * (1 - hard)), normalized_latents(vae, video * hard)], dim=1)
    for ref in references:  # each one goes in front of what is there: the last reference ends up first
        r = normalized_latents(vae, (ref * 2 - 1).permute(2, 0, 1)[None, :, None])
        latents = torch.cat([torch.cat([r, torch.zeros_like(r)], dim=1), latents], dim=2)
    channels = mask_channels(mask, s, m)
    channels = torch.cat([torch.zeros(s * s, len(references), *channels.shape[2:]), channels], dim=1)
    return torch.cat([latents, channels.unsqueeze(0)], dim=1)


def check_nearest_exact(max_frames=401, latent_step=4):
    """source_frame is torch's nearest-exact for every valid Wan length up to max_frames."""
    for num_frames in range(1, max_frames + 1, latent_step):
        latent_frames = (num_frames + latent_step - 1) // latent_step
        idx = torch.arange(num_frames, dtype=torch.float32).view(1, 1, -1, 1, 1)
        got = torch.nn.functional.interpolate(idx, size=(latent_frames, 1, 1), mode="nearest-exact").flatten()
        want = [source_frame(t, num_frames, latent_frames) for t in range(latent_frames)]
        exact = [min((2 * t + 1) * num_frames // (2 * latent_frames), num_frames - 1) for t in range(latent_frames)]
        assert got.to(torch.int64).tolist() == want == exact, num_frames
    return max_frames


# ---- the pipeline runs ----


class ControlRecorder:
    """A forward pre-hook on the transformer: what each call was handed."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        keys = ("hidden_states", "timestep", "control_hidden_states", "control_hidden_states_scale")
        self.calls.append({k: kwargs[k].detach().clone() for k in keys})

    def remove(self):
        self.handle.remove()


def run_pipeline(pipe, call, noise, steps=STEPS, output_type="np"):
    """One WanVACEPipeline call: the frames (or latents), the latents after the last step (callback_on_step_end),
    and what the transformer was handed (the same conditioning at every call, checked)."""
    rec = ControlRecorder(pipe.transformer)
    last = {}

    def on_step_end(_pipe, i, t, kwargs):
        last["latents"], last["step"] = kwargs["latents"].clone(), i
        return kwargs

    try:
        out = pipe(
            **call,
            num_inference_steps=steps,
            latents=noise.clone(),
            output_type=output_type,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).frames
    finally:
        rec.remove()
    assert last["step"] == steps - 1 and len(rec.calls) == 2 * steps, (last["step"], len(rec.calls))
    first = rec.calls[0]
    for c in rec.calls:
        assert torch.equal(c["control_hidden_states"], first["control_hidden_states"])
        assert torch.equal(c["control_hidden_states_scale"], first["control_hidden_states_scale"])
    assert [int(c["timestep"]) for c in rec.calls[::2]] == [int(c["timestep"]) for c in rec.calls[1::2]]
    result = dict(
        conditioning=first["control_hidden_states"],
        scale=first["control_hidden_states_scale"],
        timesteps=[int(c["timestep"]) for c in rec.calls[::2]],
        timestep_dtype=str(first["timestep"].dtype),
        final_latents=last["latents"],
    )
    if output_type == "np":
        result["frames"] = torch.from_numpy(np.ascontiguousarray(out[0]))
    else:
        result["latents"] = out
    return result


@torch.no_grad()
def pipeline_references(pipe, region):
    height, width, num_frames = 32, 48, 9
    steps = STEPS
    msl = region["max_sequence_length"]
    assert (region["height"], region["width"], region["num_frames"]) == (height, width, num_frames)
    assert region["num_inference_steps"] == steps and region["guidance_scale"] == 5.0
    assert [list(BOX["frames"]), list(BOX["y"]), list(BOX["x"])] == [
        region["mask"]["frames"],
        region["mask"]["y"],
        region["mask"]["x"],
    ]
    base = dict(
        prompt=region["prompt"],
        negative_prompt=region["negative_prompt"],
        height=height,
        width=width,
        num_frames=num_frames,
        guidance_scale=region["guidance_scale"],
        max_sequence_length=msl,
    )
    pipe.scheduler.set_timesteps(steps)
    sigmas, timesteps = pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone()
    grid_sigmas, grid_timesteps = make_image_fixtures.official_grid(steps, pipe.scheduler.config.flow_shift)
    assert torch.equal(sigmas, grid_sigmas) and torch.equal(timesteps, grid_timesteps)
    assert timesteps.tolist() == region["timesteps"]

    clip = source_clip()
    control_clip = luminance(clip)
    picture = reference_picture(height, width)
    box = pixel_mask(num_frames, height, width, BOX)
    box_pixels = (box * 255).to(torch.uint8)
    mask_gen = torch.Generator().manual_seed(MASK_SEED)
    soft_pixels = torch.randint(0, 256, (num_frames, height, width), generator=mask_gen, dtype=torch.uint8)

    # what the Rust side reads: the 8-bit inputs as f32 in [0, 1]
    video_f, control_f, picture_f = to_unit(clip), to_unit(control_clip), to_unit(picture)
    box_f, soft_f = to_unit(box_pixels), to_unit(soft_pixels)
    assert torch.equal(box_f, box)

    # diffusers' preprocessing of the PIL inputs only maps them to [-1, 1] (and the masks back to [0, 1])
    v, mk, refs = pipe.preprocess_conditions(
        rgb_frames(clip), gray_frames(soft_pixels), [Image.fromarray(picture.numpy())], 1, height, width,
        num_frames, torch.float32, "cpu",
    )
    assert torch.equal(v, (video_f * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0))
    assert mk.shape == (1, 1, num_frames, height, width)
    soft_roundtrip = ((soft_f * 2 - 1) + 1) / 2
    assert torch.equal(mk[0, 0], soft_roundtrip)
    assert len(refs) == 1 and len(refs[0]) == 1 and torch.equal(refs[0][0], (picture_f * 2 - 1).permute(2, 0, 1))

    inputs = {
        "masked": dict(video=rgb_frames(clip), mask=gray_frames(box_pixels)),
        "reference": dict(reference_images=[Image.fromarray(picture.numpy())]),
        "control": dict(video=rgb_frames(control_clip)),
    }
    recipe_inputs = {
        "masked": dict(frames=video_f, mask=box_f),
        "reference": dict(references=[picture_f]),
        "control": dict(frames=control_f),
    }
    saved_inputs = {
        "masked": {"video": video_f, "mask": box_f},
        "reference": {"image": picture_f},
        "control": {"video": control_f},
    }
    tensors, runs, checks = {}, {}, {}
    latent_t = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    for index, (run, spec) in enumerate(RUNS.items()):
        n_ref = len(inputs[run].get("reference_images", []))
        shape = (1, 16, latent_t + n_ref, height // 8, width // 8)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED + index))
        call = dict(base, **inputs[run], conditioning_scale=spec["conditioning_scale"])
        main = run_pipeline(pipe, call, noise)
        again = run_pipeline(pipe, call, noise)
        latent = run_pipeline(pipe, call, noise, output_type="latent")
        off = run_pipeline(pipe, dict(call, conditioning_scale=0.0), noise)
        cond = main["conditioning"]
        assert cond.shape == (1, 96, latent_t + n_ref, 4, 6), cond.shape
        assert main["timesteps"] == timesteps.tolist() and main["timestep_dtype"] == "torch.int64"
        assert torch.equal(main["scale"], torch.full((2,), spec["conditioning_scale"]))
        # output_type="latent" returns the latents with the reference frames; the frames are their decode without
        by_recipe = conditioning_by_recipe(pipe, num_frames, height, width, **recipe_inputs[run])
        decoded = decode(pipe, main["final_latents"][:, :, n_ref:])
        c = dict(
            rerun_frames_relative=rel(again["frames"], main["frames"]),
            rerun_final_latents_relative=rel(again["final_latents"], main["final_latents"]),
            rerun_conditioning_max_abs=max_abs(again["conditioning"], cond),
            latent_output_vs_last_step_max_abs=max_abs(latent["latents"], main["final_latents"]),
            decode_of_kept_latents_vs_frames_max_abs=max_abs(decoded, main["frames"]),
            conditioning_vs_recipe_max_abs=max_abs(by_recipe, cond),
            scale_0_vs_run_final_latents_relative=rel(off["final_latents"], main["final_latents"]),
            scale_0_vs_run_frames_relative=rel(off["frames"], main["frames"]),
            scale_0_conditioning_equal=bool(torch.equal(off["conditioning"], cond)),
        )
        assert c["rerun_frames_relative"] == 0.0 and c["rerun_final_latents_relative"] == 0.0, c
        assert c["rerun_conditioning_max_abs"] == 0.0 and c["latent_output_vs_last_step_max_abs"] == 0.0, c
        assert c["decode_of_kept_latents_vs_frames_max_abs"] == 0.0, c
        assert c["conditioning_vs_recipe_max_abs"] == 0.0, c
        assert c["scale_0_conditioning_equal"], c
        assert c["scale_0_vs_run_final_latents_relative"] >= MIN_CONTROL_EFFECT, c
        frames = main["frames"]
        if run == "masked":
            inside = box.unsqueeze(-1).expand_as(frames) == 1
            c["mean_abs_change_inside_mask"] = float((frames - video_f).abs()[inside].double().mean())
            c["mean_abs_change_outside_mask"] = float((frames - video_f).abs()[~inside].double().mean())
        if run == "control":
            c["mean_abs_vs_control_clip"] = float((frames - control_f).abs().double().mean())
        checks[run] = c
        for k, t in saved_inputs[run].items():
            tensors[f"{run}.{k}"] = t
        tensors[f"{run}.noise"] = noise
        tensors[f"{run}.conditioning_latents"] = cond
        tensors[f"{run}.final_latents"] = main["final_latents"]
        tensors[f"{run}.frames"] = frames
        runs[run] = dict(
            conditioning_scale=spec["conditioning_scale"],
            noise_seed=NOISE_SEED + index,
            reference_latent_frames=n_ref,
            latent_frames=latent_t + n_ref,
            shapes={k: list(v.shape) for k, v in tensors.items() if k.startswith(run + ".")},
        )
    runs["masked"]["passed"] = (
        "video=list of 9 RGB PIL images (masked.video · 255, exact uint8: reference/wan21-tiny-a/video_to_video "
        "input_frames rounded to 8 bits), mask=list of 9 'L' PIL images (0 / 255: masked.mask · 255), no reference"
    )
    runs["reference"]["passed"] = (
        "reference_images=[one RGB PIL image 48×32 (W×H), reference.image · 255], no video, no mask"
    )
    runs["control"]["passed"] = (
        "video=list of 9 RGB PIL images (control.video · 255: the masked run's 8-bit clip's Rec. 601 luma "
        "round(0.299 R + 0.587 G + 0.114 B) in all three channels), no mask, no reference"
    )

    # conditioning only: the clip, a random 8-bit mask (the 64 channels carry it unthresholded, sub-pixel by
    # sub-pixel) and the reference image, through the pipeline's own call (one step, latents out)
    soft_call = dict(
        base,
        video=rgb_frames(clip),
        mask=gray_frames(soft_pixels),
        reference_images=[Image.fromarray(picture.numpy())],
        conditioning_scale=1.0,
    )
    soft = run_pipeline(pipe, soft_call, tensors["reference.noise"], steps=1, output_type="latent")
    soft_by_recipe = conditioning_by_recipe(pipe, num_frames, height, width, video_f, soft_f, [picture_f])
    checks["soft"] = dict(
        conditioning_vs_recipe_max_abs=max_abs(soft_by_recipe, soft["conditioning"]),
        mask_roundtrip_is_identity=bool(torch.equal(soft_roundtrip, soft_f)),
        mask_pixels_above_half=int((soft_f > 0.5).sum()),
    )
    assert checks["soft"]["conditioning_vs_recipe_max_abs"] == 0.0, checks["soft"]
    tensors["soft.mask"] = soft_f
    tensors["soft.conditioning_latents"] = soft["conditioning"]
    runs["soft"] = dict(
        passed="video=the masked run's 9 RGB PIL frames, mask=list of 9 'L' PIL images (soft.mask · 255, "
        "uniform random uint8 from torch.Generator().manual_seed(%d) torch.randint(0, 256, [9, 32, 48])), "
        "reference_images=[the reference run's image]; one pipeline call (1 step, output_type='latent') only to "
        "capture the conditioning" % MASK_SEED,
        reference_latent_frames=1,
        latent_frames=latent_t + 1,
        shapes={k: list(v.shape) for k, v in tensors.items() if k.startswith("soft.")},
        inputs="soft.mask here; the video is masked.video, the reference image reference.image",
    )
    checks["nearest_exact_formula_checked_up_to_frames"] = check_nearest_exact()
    return tensors, dict(
        sigmas=[float(v) for v in sigmas.tolist()], timesteps=[int(v) for v in timesteps.tolist()], **base
    ), runs, checks


@torch.no_grad()
def main():
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    make_image_fixtures.check_pin()

    folder = ROOT / NAME
    index = save_pipeline(build_pipeline(), folder)
    for name in make_image_fixtures.REUSED:
        for path in sorted((ROOT / BASE / name).iterdir()):
            assert (folder / name / path.name).read_bytes() == path.read_bytes(), path
    pipe = load_pipeline(folder)
    OUT.mkdir(parents=True, exist_ok=True)
    forward_tensors, forward_ref = transformer_references(pipe.transformer)

    region = json.loads(REGION.read_text())
    tensors, settings, runs, checks = pipeline_references(pipe, region)
    save(OUT / "vace.safetensors", tensors)
    ref = dict(
        model=NAME,
        pipeline="WanVACEPipeline.from_pretrained(wan21-vace-tiny, torch_dtype=float32), CPU",
        model_index=index,
        **settings,
        num_inference_steps=STEPS,
        prompt_source="reference/region/region.json (prompt, negative_prompt, max_sequence_length, size, steps, "
        "guidance)",
        output_type="np (frames [F, H, W, 3] in [0, 1]); final_latents from callback_on_step_end at the last step, "
        "equal to output_type='latent' (checked), reference latent frames included",
        scheduler="UniPC flow (wan21-tiny-a/scheduler), pinned grid (benches/gpu/bench.py pin_unipc_schedule)",
        noise="torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed)), passed as latents=",
        mask_box=dict(region["mask"]),
        vace_layers=TRANSFORMER["vace_layers"],
        temporal_factor=pipe.vae_scale_factor_temporal,
        spatial_factor=pipe.vae_scale_factor_spatial,
        mask_time_sampling={
            "formula": "latent frame t takes pixel frame min(floor((t + 0.5) * F / T), F - 1), T = ceil(F / 4)",
            "F=9": [source_frame(t, 9, 3) for t in range(3)],
        },
        conditioning_channels="[0:16] inactive latents, [16:32] reactive latents, [32:96] mask (sub-pixel sy*8+sx)",
        runs=runs,
        checks=checks,
    )
    (OUT / "vace.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")

    written = [*sorted(folder.rglob("*")), *sorted(OUT.iterdir())]
    for path in written:
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size:>8}  {digest}")
    for name, ts in (("transformer", forward_tensors), ("vace", tensors)):
        print(name)
        for k, v in ts.items():
            print(f"  {k} {list(v.shape)} {v.dtype}")
    print(json.dumps(forward_ref["checks"], indent=1))
    print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
