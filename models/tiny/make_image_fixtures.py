"""Tiny random-weight Wan 2.2 A14B (two experts) and Wan 2.1 image-to-video pipelines, and diffusers' outputs on them.

Run from anywhere with the environment pinned in requirements-image.txt, after make_fixtures.py (it reuses
`wan21-tiny-a`'s tokenizer, text encoder, VAE and scheduler config byte for byte); writes next to this file:

  wan22-t2v-a14b-tiny/  WanPipeline, a high-noise and a low-noise expert of different widths, boundary_ratio 0.875
  wan22-i2v-a14b-tiny/  WanImageToVideoPipeline, the same with 36 input channels, boundary_ratio 0.9, no CLIP
  wan21-i2v-tiny/       WanImageToVideoPipeline, one transformer, a tiny CLIPVisionModel and CLIPImageProcessor
  wan21-flf2v-tiny/     the same with the first-last-frame transformer (`pos_embed_seq_len` = 2 × 17)

and `reference/<model>/` (see the "Wan 2.2 A14B and Wan 2.1 image-to-video" section of FIXTURES.md).

diffusers 0.37 moved UniPC's flow-matching grid (it now starts at sigma 1, not 1 − 1/1000); Kinetoscope follows the
official Wan grid, diffusers 0.35.2's, so every pipeline run here gets `benches/gpu/bench.py`'s
`pin_unipc_schedule`, and the script checks the timesteps against the 0.35.2 formula and the committed
`reference/wan21-tiny-a/scheduler.safetensors`.
Everything is seeded, CPU and f32, so a rerun reproduces the files byte for byte.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5EncoderModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_fixtures  # noqa: E402  (the tiny fixtures' prompt, scheduler settings and helpers)
from make_fixtures import SCHEDULER, latent_shape_of, pipeline_kwargs, redraw_, save  # noqa: E402


def load_bench():
    spec = importlib.util.spec_from_file_location("kinetoscope_bench", ROOT.parents[1] / "benches" / "gpu" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


pin_unipc_schedule = load_bench().pin_unipc_schedule

# tokenizer, text encoder (umT5, d_model 32), VAE (z_dim 16) and scheduler configuration (UniPC flow, shift 3) of
# every model here, copied from this folder byte for byte
BASE = "wan21-tiny-a"
REUSED = ("tokenizer", "text_encoder", "vae", "scheduler")

# Transformer settings shared by every expert (as make_fixtures' wan21-tiny-a): the text is umT5's d_model 32.
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    out_channels=16,
    text_dim=32,
    freq_dim=16,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
HIGH = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2)  # high-noise expert
LOW = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=48, num_layers=1)  # low-noise expert, narrower

# The tiny CLIP vision tower: 32×32 images in 8×8 patches, 16 patch tokens + the class token = 17 tokens of width 24.
CLIP = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=24,
)
CLIP_TOKENS = (CLIP["image_size"] // CLIP["patch_size"]) ** 2 + 1
# CLIP's default mean/std, bicubic; the shortest edge to 32 leaves a 32×48 image as it is, then a centre crop.
CLIP_PROCESSOR = dict(
    size={"shortest_edge": 32},
    crop_size={"height": 32, "width": 32},
    resample=3,  # PIL bicubic
    do_resize=True,
    do_center_crop=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
)

RUN = dict(height=32, width=48, num_frames=9, num_inference_steps=6)

CONFIGS = {
    "wan22-t2v-a14b-tiny": dict(
        kind="t2v",
        experts=dict(transformer=dict(HIGH, in_channels=16), transformer_2=dict(LOW, in_channels=16)),
        boundary_ratio=0.875,
        run=dict(RUN, guidance_scale=4.0, guidance_scale_2=3.0, max_sequence_length=32),
        runs=[""],
        seed=11,
    ),
    "wan22-i2v-a14b-tiny": dict(
        kind="i2v",
        experts=dict(transformer=dict(HIGH, in_channels=36), transformer_2=dict(LOW, in_channels=36)),
        boundary_ratio=0.9,
        run=dict(RUN, guidance_scale=3.5, guidance_scale_2=2.0, max_sequence_length=32),
        runs=["", "last_"],
        seed=12,
    ),
    # The CLIP models' runs must pad the text to 512: diffusers' attention takes the image tokens to be the first
    # `encoder_hidden_states.shape[1] - 512` of the cross-attention context.
    "wan21-i2v-tiny": dict(
        kind="i2v",
        experts=dict(
            transformer=dict(HIGH, in_channels=36, image_dim=CLIP["hidden_size"], added_kv_proj_dim=64),
        ),
        boundary_ratio=None,
        clip=True,
        run=dict(RUN, guidance_scale=5.0, guidance_scale_2=None, max_sequence_length=512),
        runs=[""],
        seed=13,
    ),
    "wan21-flf2v-tiny": dict(
        kind="i2v",
        experts=dict(
            transformer=dict(
                HIGH,
                in_channels=36,
                image_dim=CLIP["hidden_size"],
                added_kv_proj_dim=64,
                pos_embed_seq_len=2 * CLIP_TOKENS,
            ),
        ),
        boundary_ratio=None,
        clip=True,
        run=dict(RUN, guidance_scale=5.0, guidance_scale_2=None, max_sequence_length=512),
        runs=["last_"],
        seed=14,
    ),
}


def official_grid(n_steps, shift, n_train=1000):
    """diffusers 0.35.2's UniPC flow-matching schedule (sigmas [N+1] as f32, timesteps [N] as i64), the official
    Wan grid, written out independently of the scheduler code."""
    alphas = np.linspace(1, 1 / n_train, n_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    timesteps = (sigmas * n_train).copy()
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps).to(torch.int64)


def check_pin():
    """The pinned 0.42 scheduler is 0.35.2's: the same schedules as the committed wan21-tiny-a references (4 steps
    at shift 3, 7 steps at shift 5, made with 0.35.2) and as the formula at this script's settings, and bit for bit
    the same steps on the references' random model outputs."""
    ref = load_file(str(ROOT / "reference" / BASE / "scheduler.safetensors"))
    config = json.loads((ROOT / BASE / "scheduler" / "scheduler_config.json").read_text())
    for prefix, steps, shift in (("unipc_", 4, 3.0), ("unipc2_", 7, 5.0), (None, RUN["num_inference_steps"], 3.0)):
        sched = UniPCMultistepScheduler.from_config(config, flow_shift=shift)
        pin_unipc_schedule(sched)
        sched.set_timesteps(steps)
        sigmas, timesteps = official_grid(steps, shift)
        assert torch.equal(sched.timesteps, timesteps), (steps, shift, sched.timesteps, timesteps)
        assert torch.equal(sched.sigmas, sigmas), (steps, shift, sched.sigmas, sigmas)
        if prefix:
            assert torch.equal(sched.timesteps.to(torch.float32), ref[f"{prefix}timesteps"]), prefix
            assert torch.equal(sched.sigmas, ref[f"{prefix}sigmas"]), prefix
            sample = ref[f"{prefix}sample_0"]
            for k, t in enumerate(sched.timesteps):
                sample = sched.step(ref[f"{prefix}model_output_{k}"], t, sample, return_dict=False)[0]
                assert torch.equal(sample, ref[f"{prefix}sample_{k + 1}"]), (prefix, k)


def build_transformer(cfg, gen):
    model = WanTransformer3DModel(**TRANSFORMER, **cfg).eval()
    redraw_(model, gen)
    embedder = model.condition_embedder.image_embedder
    if embedder is not None and embedder.pos_embed is not None:
        # diffusers starts it at zero; make the first/last-frame position embedding matter
        with torch.no_grad():
            embedder.pos_embed.copy_(0.5 * torch.randn(embedder.pos_embed.shape, generator=gen))
    return model


def build_pipeline(cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    base = ROOT / BASE
    parts = dict(
        tokenizer=make_fixtures.T5TokenizerFast.from_pretrained(base / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval(),
        vae=AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=torch.float32).eval(),
        scheduler=UniPCMultistepScheduler(**SCHEDULER),
    )
    for name, expert in cfg["experts"].items():
        parts[name] = build_transformer(expert, gen)
    if cfg["kind"] == "t2v":
        return WanPipeline(**parts, boundary_ratio=cfg["boundary_ratio"])
    if cfg.get("clip"):
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
        redraw_(parts["image_encoder"], gen)
        parts["image_processor"] = CLIPImageProcessor(**CLIP_PROCESSOR)
    return WanImageToVideoPipeline(**parts, boundary_ratio=cfg["boundary_ratio"], expand_timesteps=False)


def save_with_reused(pipe, folder):
    """`pipe` saved to `folder`, its reused components replaced by wan21-tiny-a's files; its model_index.json."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # the reused components exactly as wan21-tiny-a has them (and as its tests read them)
    for name in REUSED:
        shutil.rmtree(folder / name)
        shutil.copytree(ROOT / BASE / name, folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = json.loads((ROOT / BASE / "model_index.json").read_text())["tokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def save_pipeline(pipe, folder, cfg):
    index = save_with_reused(pipe, folder)
    assert index["boundary_ratio"] == cfg["boundary_ratio"], index
    assert index["expand_timesteps"] is False, index
    for name in ("transformer_2", "image_encoder", "image_processor"):
        if name in index:
            assert (index[name][0] is not None) == (folder / name).is_dir(), (name, index[name])


def load_pipeline(folder, cfg):
    cls = WanPipeline if cfg["kind"] == "t2v" else WanImageToVideoPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pin_unipc_schedule(pipe.scheduler)
    assert {k: pipe.scheduler.config[k] for k in SCHEDULER} == SCHEDULER, pipe.scheduler.config
    for name in ("text_encoder", "transformer", "transformer_2", "vae", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            assert all(p.dtype == torch.float32 for p in module.parameters()), name
    assert (pipe.transformer_2 is not None) == ("transformer_2" in cfg["experts"])
    assert (getattr(pipe, "image_encoder", None) is not None) == bool(cfg.get("clip"))
    return pipe


def random_image(gen, run):
    pixels = torch.randint(0, 256, (run["height"], run["width"], 3), generator=gen, dtype=torch.uint8)
    return pixels, Image.fromarray(pixels.numpy())


def check_video_preprocessing(pipe, pixels, image, run):
    """diffusers' image preprocessing only maps the 8-bit image to [-1, 1]: no resampling at the run's size."""
    pre = pipe.video_processor.preprocess(image, height=run["height"], width=run["width"])
    expected = (pixels.to(torch.float32) / 255 * 2 - 1).permute(2, 0, 1).unsqueeze(0)
    assert torch.equal(pre, expected), "preprocessing resampled"


def check_clip_preprocessing(pipe, pixels_list, images, pixel_values):
    """CLIPImageProcessor at this size: the shortest edge is already 32, so the bicubic resize hands the image back
    unchanged; then the centre crop 32×32 (columns 8..40 of 48) and, in f32, (x − 255·mean) / (255·std) (transformers
    5's torchvision backend fuses the 1/255 into mean and std). The PIL backend agrees to f32 rounding."""
    proc = pipe.image_processor
    for p in pixels_list:
        chw = p.permute(2, 0, 1).contiguous()
        assert torch.equal(proc.resize(chw, proc.size, resample=proc.resample), chw), "CLIP resampled"
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    h, w = pixels_list[0].shape[:2]
    crop = proc.crop_size
    top, left = (h - crop["height"]) // 2, (w - crop["width"]) // 2
    x = torch.stack([p.permute(2, 0, 1) for p in pixels_list]).to(torch.float32)
    x = x[:, :, top : top + crop["height"], left : left + crop["width"]]
    assert torch.equal(pixel_values, (x - mean * 255.0) / (std * 255.0)), "CLIP preprocessing changed"
    assert torch.allclose(pixel_values, (x / 255 - mean) / std, rtol=0, atol=1e-6)
    pil = CLIPImageProcessorPil(**CLIP_PROCESSOR, image_mean=proc.image_mean, image_std=proc.image_std)
    pil_values = pil(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(pixel_values, pil_values, rtol=0, atol=1e-6), (pixel_values - pil_values).abs().max()


class ExpertRecorder:
    """Forward pre-hooks on the experts: which one each call went to, and what it was handed."""

    def __init__(self, pipe):
        self.calls = []
        self.handles = []
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(self.hook(name), with_kwargs=True))

    def hook(self, name):
        def record(module, args, kwargs):
            self.calls.append((name, kwargs))

        return record

    def per_step(self, n_steps, cfg):
        """One expert per step: classifier-free guidance makes two calls per step, both to the same expert."""
        per = 2 if cfg else 1
        assert len(self.calls) == per * n_steps, (len(self.calls), n_steps)
        steps = []
        for i in range(n_steps):
            names = {name for name, _ in self.calls[per * i : per * (i + 1)]}
            assert len(names) == 1, f"step {i} used {names}"
            steps.append(names.pop())
        return steps

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def references(name, cfg, pipe):
    run = cfg["run"]
    msl = run["max_sequence_length"]
    out_dir = ROOT / "reference" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(100 + cfg["seed"])
    latent_shape = latent_shape_of(pipe.vae, run)
    i2v = cfg["kind"] == "i2v"
    clip = bool(cfg.get("clip"))

    # the schedule (pinned) and which expert each step goes to by diffusers' rule
    pipe.scheduler.set_timesteps(run["num_inference_steps"])
    timesteps = pipe.scheduler.timesteps.clone()
    sigmas = pipe.scheduler.sigmas.clone()
    assert torch.equal(timesteps, official_grid(run["num_inference_steps"], pipe.scheduler.config.flow_shift)[1])
    if cfg["boundary_ratio"] is not None:
        boundary = cfg["boundary_ratio"] * pipe.scheduler.config.num_train_timesteps
        expected = ["transformer" if t >= boundary else "transformer_2" for t in timesteps.tolist()]
        for expert in ("transformer", "transformer_2"):
            assert expected.count(expert) >= 2, (expert, timesteps, boundary)
    else:
        expected = ["transformer"] * len(timesteps)

    # one forward of each expert on random inputs of the real shapes, at a timestep of its own stage
    for expert in cfg["experts"]:
        model = getattr(pipe, expert)
        c = model.config
        _, _, lat_t, lat_h, lat_w = latent_shape
        hidden = torch.randn((1, c.in_channels, lat_t, lat_h, lat_w), generator=gen)
        t = timesteps[expected.index(expert) + 1 : expected.index(expert) + 2]
        assert expected[expected.index(expert) + 1] == expert
        text = torch.randn((1, msl, c.text_dim), generator=gen)
        inputs = dict(hidden_states=hidden, timestep=t, encoder_hidden_states=text)
        if c.image_dim is not None:
            n_images = 2 if c.pos_embed_seq_len is not None else 1
            inputs["encoder_hidden_states_image"] = torch.randn((n_images, CLIP_TOKENS, c.image_dim), generator=gen)
        out = model(**inputs, return_dict=False)[0]
        assert out.shape == (1, c.out_channels, lat_t, lat_h, lat_w)
        save(out_dir / f"{expert}.safetensors", {**inputs, "timestep": t.to(torch.float32), "out": out})

    # the images, and the CLIP tower on them
    image_pixels, image = random_image(gen, run)
    last_pixels, last_image = random_image(gen, run)
    noise = torch.randn(latent_shape, generator=gen)
    if i2v:
        check_video_preprocessing(pipe, image_pixels, image, run)
        check_video_preprocessing(pipe, last_pixels, last_image, run)
        image.save(out_dir / "image.png")
        if "last_" in cfg["runs"]:
            last_image.save(out_dir / "last_image.png")
        for png, pixels in (("image.png", image_pixels), ("last_image.png", last_pixels)):
            if (out_dir / png).exists():
                assert torch.equal(torch.from_numpy(np.array(Image.open(out_dir / png))), pixels), png
    if clip:
        # FLF2V encodes both frames (one batch of two); Wan 2.1 I2V the first frame only
        both = cfg["runs"] == ["last_"]
        pixels_list, images = ([image_pixels, last_pixels], [image, last_image]) if both else ([image_pixels], [image])
        pixel_values = pipe.image_processor(images=images if both else image, return_tensors="pt").pixel_values
        check_clip_preprocessing(pipe, pixels_list, images, pixel_values)
        penultimate = pipe.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        assert penultimate.shape == (len(images), CLIP_TOKENS, CLIP["hidden_size"])
        save(out_dir / "image_encoder.safetensors", {"pixel_values": pixel_values, "penultimate": penultimate})

    # the pipeline runs
    tensors = {}
    experts = None
    for prefix in cfg["runs"]:
        common = pipeline_kwargs(run, msl)
        if run["guidance_scale_2"] is not None:
            common["guidance_scale_2"] = run["guidance_scale_2"]
        captured = {}
        if i2v:
            common["image"] = image
            if prefix == "last_":
                common["last_image"] = last_image
            prepare = WanImageToVideoPipeline.prepare_latents.__get__(pipe)

            def capture(*args, **kwargs):
                out = prepare(*args, **kwargs)
                captured.setdefault("condition", []).append(out[1].clone())
                return out

            pipe.prepare_latents = capture
        recorder = ExpertRecorder(pipe)
        final_latents = pipe(**common, latents=noise.clone(), output_type="latent").frames
        steps = recorder.per_step(run["num_inference_steps"], run["guidance_scale"] > 1)
        calls = recorder.calls
        recorder.remove()
        recorder = ExpertRecorder(pipe)
        frames = pipe(**common, latents=noise.clone(), output_type="np").frames[0]
        assert recorder.per_step(run["num_inference_steps"], run["guidance_scale"] > 1) == steps
        recorder.remove()
        assert torch.equal(pipe.scheduler.timesteps, timesteps), "the pinned schedule did not hold"
        assert steps == expected, (steps, expected)
        assert experts is None or experts == steps
        experts = steps

        out = {
            "noise": noise.clone(),
            "final_latents": final_latents,
            "frames": torch.from_numpy(np.ascontiguousarray(frames)),
        }
        if i2v:
            a, b = captured["condition"]
            assert torch.equal(a, b)
            assert a.shape == (1, 4 + latent_shape[1], *latent_shape[2:]), a.shape
            out["condition"] = a
        # what the transformer was handed as image tokens: the same at every call
        image_states = [kw.get("encoder_hidden_states_image") for _, kw in calls]
        if clip:
            assert all(torch.equal(s, image_states[0]) for s in image_states)
            assert torch.equal(image_states[0], penultimate), "image_embeds are not the CLIP penultimate states"
            out["image_embeds"] = image_states[0]
        else:
            assert all(s is None for s in image_states)
        # the text states have the run's padded length (the CLIP models' 512 makes the image/text split right)
        assert all(kw["encoder_hidden_states"].shape[1] == msl for _, kw in calls)
        tensors.update({prefix + k: v for k, v in out.items()})
    save(out_dir / "pipeline.safetensors", tensors)

    ref = dict(
        **pipeline_kwargs(run, msl),
        guidance_scale_2=run["guidance_scale_2"],
        flow_shift=pipe.scheduler.config.flow_shift,
        boundary_ratio=cfg["boundary_ratio"],
        timesteps=[float(t) for t in timesteps.tolist()],
        sigmas=[float(s) for s in sigmas.tolist()],
        experts=experts,
        runs=cfg["runs"],
    )
    (out_dir / "ref.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    return ref


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    check_pin()
    for name, cfg in CONFIGS.items():
        folder = ROOT / name
        pipe = build_pipeline(cfg)
        save_pipeline(pipe, folder, cfg)
        del pipe
        pipe = load_pipeline(folder, cfg)
        ref = references(name, cfg, pipe)
        print(f"{name}: timesteps {ref['timesteps']} experts {ref['experts']}")


if __name__ == "__main__":
    main()
