"""A masked region edit on the tiny Wan 2.1 model: redo a masked part of a clip, keep every other pixel.

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1), after make_fixtures.py
(it reads `wan21-tiny-a/` and `reference/wan21-tiny-a/video_to_video.{safetensors,json}`); writes next to this file:

  reference/region/region.safetensors  the edit's inputs, masks, latents and frames (f32), plus an all-zero and an
                                       all-one mask case
  reference/region/region.json         the settings, the schedule and the checks

(see the "Region edits" section of FIXTURES.md, which states the recipe the Rust side implements). Rebuild:

    /tmp/kt-image/bin/python models/tiny/make_region_fixtures.py

The components are diffusers' own (`WanPipeline.from_pretrained(wan21-tiny-a)`, f32, CPU): its VAE encodes the clip
as `WanVideoToVideoPipeline.prepare_latents` does, its transformer and guidance run each step as `WanPipeline`'s loop
does (the loop here is checked bit for bit against `WanPipeline` without a mask), its UniPC scheduler steps, and the
decode is `WanPipeline`'s. The one thing added is the hold: after every step the cells outside the latent mask are
put back to the clean latents noised to the next sigma. UniPC gets `benches/gpu/bench.py`'s `pin_unipc_schedule`
(the official Wan grid, diffusers 0.35.2's, as every tiny reference) and the pin is checked as make_image_fixtures.py
checks it. Everything is CPU, f32, single-threaded and deterministic, so a rerun reproduces the files byte for byte.
"""

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

import diffusers
from diffusers.pipelines.wan.pipeline_wan_video2video import WanVideoToVideoPipeline, retrieve_latents

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_image_fixtures  # noqa: E402  (the UniPC pin and its check)
from make_fixtures import save  # noqa: E402
from make_lora_fixtures import max_abs, rel, wan21_pipeline  # noqa: E402  (wan21-tiny-a, pinned)

BASE = "wan21-tiny-a"
SOURCE = ROOT / "reference" / BASE / "video_to_video"
OUT = ROOT / "reference" / "region"

STEPS = 4
# The edited region: frames 2..=6 (0-based, inclusive), rows y in [8, 24), columns x in [16, 32).
BOX = dict(frames=(2, 6), y=(8, 24), x=(16, 32))


def pixel_mask(num_frames, height, width, box):
    mask = torch.zeros(num_frames, height, width)
    f0, f1 = box["frames"]
    (y0, y1), (x0, x1) = box["y"], box["x"]
    mask[f0 : f1 + 1, y0:y1, x0:x1] = 1.0
    return mask


def latent_frames(t, m):
    """The pixel frames a latent frame stands for: the first alone, then m each."""
    return [0] if t == 0 else list(range((t - 1) * m + 1, t * m + 1))


def latent_mask(mask, m, s):
    """[1, 1, T, h, w]: 1 on latent cells whose pixels (their frames, their s×s block) touch the mask; 0.5 on the
    cells within one cell (3×3×3, clipped at the borders) of such a cell; 0 elsewhere."""
    f, height, width = mask.shape
    assert (f - 1) % m == 0 and height % s == 0 and width % s == 0, mask.shape
    t_n, h_n, w_n = (f - 1) // m + 1, height // s, width // s
    core = torch.zeros(t_n, h_n, w_n)
    for t in range(t_n):
        frames = mask[latent_frames(t, m)]
        for i in range(h_n):
            for j in range(w_n):
                core[t, i, j] = float(bool((frames[:, s * i : s * i + s, s * j : s * j + s] == 1).any()))
    out = torch.zeros(t_n, h_n, w_n)
    for t in range(t_n):
        for i in range(h_n):
            for j in range(w_n):
                if core[t, i, j] == 1:
                    out[t, i, j] = 1.0
                elif (core[max(t - 1, 0) : t + 2, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2] == 1).any():
                    out[t, i, j] = 0.5
    return out.view(1, 1, t_n, h_n, w_n)


def alpha_of(mask):
    """min(M, box blur of M): the blur is the mean over the (2r+1)² window at each pixel, in-bounds pixels only,
    r = max(1, min(H, W) // 64), frame by frame."""
    _, height, width = mask.shape
    r = max(1, min(height, width) // 64)
    kernel = torch.ones(1, 1, 2 * r + 1, 2 * r + 1)
    sums = torch.nn.functional.conv2d(mask.unsqueeze(1), kernel, padding=r).squeeze(1)
    counts = torch.nn.functional.conv2d(torch.ones(1, 1, height, width), kernel, padding=r)[0]
    # 0/1 values summed over at most 9 (25, ...) pixels: both sums are exact integers
    assert torch.equal(sums, sums.round()) and torch.equal(counts, counts.round())
    return torch.minimum(mask, sums / counts), r


def encode(pipe, frames):
    """The clip's normalized latents, as WanVideoToVideoPipeline.prepare_latents makes them from the frames
    make_fixtures.py hands it: video 2·frames − 1 as [1, 3, F, H, W], the posterior's mode, then
    (z − latents_mean) · (1 / latents_std)."""
    vae = pipe.vae
    video = (frames * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)
    height, width = frames.shape[1:3]
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    pre = WanVideoToVideoPipeline(**{k: pipe.components[k] for k in names})
    assert torch.equal(pre.video_processor.preprocess_video(frames.numpy(), height=height, width=width), video)
    z = vae.config.z_dim
    latents = torch.cat([retrieve_latents(vae.encode(v.unsqueeze(0)), sample_mode="argmax") for v in video])
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    return (latents - mean) * inv_std


def decode(pipe, latents):
    """WanPipeline's output_type="np": de-normalize, decode, (video · 0.5 + 0.5) clamped to [0, 1], [F, H, W, 3]."""
    vae = pipe.vae
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return torch.from_numpy(np.ascontiguousarray(frames))


def holder(clean, noise, lmask):
    """hold(x, σ) = held(σ) + (x − held(σ)) · L, held(σ) = (1 − σ) · clean + σ · noise, 1 − σ taken in f32."""

    def hold(x, sigma):
        s = np.float32(sigma.item())
        one_minus = float(np.float32(1.0) - s)
        held = clean * one_minus + noise * float(s)
        return held + (x - held) * lmask

    return hold


def denoise(pipe, embeds, noise, guidance, hold=None):
    """WanPipeline's loop (Wan 2.1: one transformer, no expanded timesteps), a hold after each step if given."""
    prompt_embeds, negative_embeds = embeds
    sched = pipe.scheduler
    sched.set_timesteps(STEPS, device="cpu")
    sched.set_begin_index(0)
    x = noise.clone() if hold is None else hold(noise, sched.sigmas[0])
    for i, t in enumerate(sched.timesteps):
        timestep = t.expand(x.shape[0])
        call = dict(hidden_states=x, timestep=timestep, return_dict=False)
        cond = pipe.transformer(**call, encoder_hidden_states=prompt_embeds)[0]
        uncond = pipe.transformer(**call, encoder_hidden_states=negative_embeds)[0]
        v = uncond + guidance * (cond - uncond)
        x = sched.step(v, t, x, return_dict=False)[0]
        if hold is not None:
            x = hold(x, sched.sigmas[i + 1])
    return x


def edit(pipe, embeds, guidance, frames, clean, noise, mask):
    m, s = pipe.vae.config.scale_factor_temporal, pipe.vae.config.scale_factor_spatial
    lmask = latent_mask(mask, m, s)
    final = denoise(pipe, embeds, noise, guidance, holder(clean, noise, lmask))
    generated = decode(pipe, final)
    alpha, r = alpha_of(mask)
    out = frames + alpha.unsqueeze(-1) * (generated - frames)
    return dict(latent_mask=lmask, final_latents=final, generated=generated, alpha=alpha, frames=out, radius=r)


def seam_gradient(frames, mask):
    """Mean over the frames that have a mask boundary of: the mean, over the pixel pairs (x, x+1) and (y, y+1)
    with one pixel in the mask and one out, and over the channels, of |O(a) − O(b)|."""
    per_frame = []
    for f in range(mask.shape[0]):
        m, o = mask[f], frames[f].double()
        across = (m[:, :-1] != m[:, 1:], m[:-1, :] != m[1:, :])
        diffs = ((o[:, :-1] - o[:, 1:]).abs()[across[0]], (o[:-1, :] - o[1:, :]).abs()[across[1]])
        pairs = torch.cat(diffs)
        if len(pairs):
            per_frame.append(float(pairs.mean()))
    return float(np.mean(per_frame)), len(per_frame)


@torch.no_grad()
def main():
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    make_image_fixtures.check_pin()

    source = load_file(str(SOURCE.with_suffix(".safetensors")))
    settings = json.loads(SOURCE.with_suffix(".json").read_text())
    frames, noise = source["input_frames"], source["noise"]
    num_frames, height, width, _ = frames.shape
    assert (num_frames, height, width) == (settings["num_frames"], settings["height"], settings["width"])
    assert settings["num_inference_steps"] == STEPS
    guidance, msl = settings["guidance_scale"], settings["max_sequence_length"]
    kwargs = dict(
        prompt=settings["prompt"],
        negative_prompt=settings["negative_prompt"],
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=msl,
    )

    pipe = wan21_pipeline()
    embeds = pipe.encode_prompt(
        settings["prompt"],
        settings["negative_prompt"],
        do_classifier_free_guidance=True,
        max_sequence_length=msl,
        device="cpu",
    )
    embeds = tuple(e.to(pipe.transformer.dtype) for e in embeds)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas, timesteps = pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone()
    grid_sigmas, grid_timesteps = make_image_fixtures.official_grid(STEPS, pipe.scheduler.config.flow_shift)
    assert torch.equal(sigmas, grid_sigmas) and torch.equal(timesteps, grid_timesteps)
    assert float(sigmas[-1]) == 0.0

    clean = encode(pipe, frames)
    assert clean.shape == noise.shape, (clean.shape, noise.shape)
    # the committed video-to-video start (diffusers 0.35.2) is this encoding noised to its first step (strength
    # 0.75 of 4 steps: the second timestep)
    start_sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    make_image_fixtures.pin_unipc_schedule(start_sched)
    start_sched.set_timesteps(STEPS)
    start = start_sched.add_noise(clean, noise, start_sched.timesteps[1:2])
    clean_vs_v2v_start = max_abs(start, source["start_latents"])
    assert clean_vs_v2v_start <= 1e-5, clean_vs_v2v_start

    # the loop here is WanPipeline's: bit for bit without a mask
    plain = denoise(pipe, embeds, noise, guidance)
    piped = pipe(**kwargs, latents=noise.clone(), output_type="latent").frames
    assert torch.equal(plain, piped), max_abs(plain, piped)
    piped_frames = torch.from_numpy(np.ascontiguousarray(pipe(**kwargs, latents=noise.clone()).frames[0]))
    assert torch.equal(decode(pipe, plain), piped_frames), "decode differs from WanPipeline's"

    mask = pixel_mask(num_frames, height, width, BOX)
    region = edit(pipe, embeds, guidance, frames, clean, noise, mask)
    empty = edit(pipe, embeds, guidance, frames, clean, noise, torch.zeros_like(mask))
    full = edit(pipe, embeds, guidance, frames, clean, noise, torch.ones_like(mask))

    out = region["frames"]
    outside = float((out - frames).abs()[mask == 0].max())
    inside = float((out - frames).abs()[mask == 1].double().mean())
    assert outside == 0.0 and inside > 0.0, (outside, inside)
    held = region["latent_mask"].expand_as(clean) == 0
    held_vs_clean = max_abs(region["final_latents"][held], clean[held])
    assert held_vs_clean == 0.0, held_vs_clean
    assert torch.equal(empty["frames"], frames), "an empty mask changed the clip"
    assert not empty["latent_mask"].any() and torch.equal(empty["final_latents"], clean)
    assert bool((full["latent_mask"] == 1).all())
    full_rel, full_abs = rel(full["final_latents"], plain), max_abs(full["final_latents"], plain)
    assert full_rel <= 1e-5, full_rel
    seam, seam_frames = seam_gradient(out, mask)
    hard = frames + mask.unsqueeze(-1) * (region["generated"] - frames)
    lmask = region["latent_mask"][0, 0]

    OUT.mkdir(parents=True, exist_ok=True)
    tensors = dict(
        input_frames=frames,
        noise=noise,
        mask=mask,
        latent_mask=region["latent_mask"],
        clean=clean,
        final_latents=region["final_latents"],
        generated=region["generated"],
        alpha=region["alpha"],
        frames=out,
        frames_empty=empty["frames"],
        final_latents_full=full["final_latents"],
        final_latents_plain=plain,
    )
    save(OUT / "region.safetensors", tensors)
    ref = dict(
        model=BASE,
        source=f"reference/{BASE}/video_to_video.safetensors (input_frames, noise) and video_to_video.json",
        **kwargs,
        mask=dict(
            frames=list(BOX["frames"]),
            y=list(BOX["y"]),
            x=list(BOX["x"]),
            note="frames inclusive (0-based), y and x half-open; 1 inside, 0 elsewhere",
        ),
        temporal_factor=pipe.vae.config.scale_factor_temporal,
        spatial_factor=pipe.vae.config.scale_factor_spatial,
        latent_mask_counts={str(v): int((lmask == v).sum()) for v in (1.0, 0.5, 0.0)},
        blur_radius=region["radius"],
        scheduler="UniPC flow (wan21-tiny-a/scheduler), pinned grid (benches/gpu/bench.py pin_unipc_schedule)",
        sigmas=[float(v) for v in sigmas.tolist()],
        timesteps=[int(v) for v in timesteps.tolist()],
        encode="retrieve_latents(vae.encode(2*frames-1 as [1,3,F,H,W]), sample_mode='argmax'), then "
        "(z - latents_mean) * (1 / latents_std) as WanVideoToVideoPipeline.prepare_latents",
        decode="latents / (1 / latents_std) + latents_mean, vae.decode, (video * 0.5 + 0.5).clamp(0, 1) as WanPipeline",
        guidance="two transformer calls per step (prompt, then negative prompt, batch 1 each, as WanPipeline), "
        "v = v_uncond + guidance_scale * (v_cond - v_uncond)",
        checks=dict(
            outside_max_abs=outside,
            inside_mean_abs=inside,
            seam_mean_gradient=seam,
            seam_frames=seam_frames,
            seam_mean_gradient_input=seam_gradient(frames, mask)[0],
            seam_mean_gradient_hard_paste=seam_gradient(hard, mask)[0],
            held_latents_vs_clean_max_abs=held_vs_clean,
            empty_frames_vs_input_max_abs=max_abs(empty["frames"], frames),
            full_vs_plain_relative=full_rel,
            full_vs_plain_max_abs=full_abs,
            plain_loop_vs_wanpipeline_max_abs=max_abs(plain, piped),
            clean_noised_vs_video_to_video_start_max_abs=clean_vs_v2v_start,
        ),
    )
    (OUT / "region.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    for path in sorted(OUT.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size:>7}  {digest}")
    for k, v in tensors.items():
        print(f"  {k} {list(v.shape)}")
    print(json.dumps(ref["checks"], indent=1))


if __name__ == "__main__":
    main()
