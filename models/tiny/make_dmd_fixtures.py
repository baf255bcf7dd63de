"""FastVideo's DMD sampler (the FastWan models' 3-step, guidance-free sampler) on the tiny Wan 2.1 model.

Run from anywhere with the environment pinned in requirements-image.txt, after make_fixtures.py (it reads
`wan21-tiny-a/` and `reference/wan21-tiny-a/video_to_video.{json,safetensors}`); writes next to this file:

  reference/dmd/dmd.safetensors  the run's inputs, every intermediate and the decoded frames (keys in DMD.md)
  reference/dmd/dmd.json         the settings, the sigma lookup and the formulas used

Rerun with

    /tmp/kt42/bin/python models/tiny/make_dmd_fixtures.py

What the sampler computes is written up in DMD.md (next to this file), from FastVideo's
`fastvideo/pipelines/stages/denoising.py` (`DmdDenoisingStage`), `fastvideo/models/utils.py`
(`pred_noise_to_pred_video`) and `fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py` (`add_noise`).
In short, for t_i in (1000, 757, 522): the transformer gets the integer t_i; sigma_i is the sigma of the entry of
the scheduler's 1000-entry training table (shift 8, no `set_timesteps`) whose timestep is nearest to t_i;
x0_i = x_i - sigma_i * v_i (in f64); x_{i+1} = (1 - sigma_{i+1}) * x0_i + sigma_{i+1} * eps_{i+1} with fresh
Gaussian noise; the output is x0 of the last step. One conditional pass per step, no guidance.

Here everything runs with diffusers' components (the pipeline's text encoder, transformer and VAE; diffusers'
`FlowMatchEulerDiscreteScheduler(shift=8.0)` for the table), in f32 on CPU. The first step's input is the
video-to-video reference's `noise`; the re-noising noise comes from `torch.Generator("cpu").manual_seed(1234)`,
drawn in FastVideo's [B, T, C, H, W] layout and saved (permuted to diffusers' [B, C, T, H, W]), so an implementation
can be handed it. Seeded, single-threaded, CPU and f32: a rerun reproduces the files byte for byte.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from make_fixtures import latent_shape_of, save  # noqa: E402

MODEL = "wan21-tiny-a"
OUT = ROOT / "reference" / "dmd"

# FastVideo's FastWan settings: `dmd_denoising_steps` of FastWan2_1_T2V_480P_Config / FastWan2_2_TI2V_5B_Config, and
# the shift DmdDenoisingStage hard-codes for its own scheduler (whatever the pipeline's `flow_shift`).
DMD_STEPS = (1000, 757, 522)
SHIFT = 8.0
RENOISE_SEED = 1234


def table_lookup(sched, t):
    """FastVideo's sigma lookup: the training-table entry whose timestep is nearest to t (first on ties).

    `pred_noise_to_pred_video` compares in f64, `add_noise` in f32; both must pick the same entry.
    """
    t = torch.tensor([t], dtype=torch.long)
    idx64 = int(torch.argmin((sched.timesteps.double().unsqueeze(0) - t.double().unsqueeze(1)).abs(), dim=1))
    idx32 = int(torch.argmin((sched.timesteps.unsqueeze(0) - t.unsqueeze(1)).abs(), dim=1))
    assert idx64 == idx32, (t, idx64, idx32)
    return idx64


def check_table(sched):
    """The scheduler as constructed (no `set_timesteps`) holds the shifted 1000-entry training table."""
    n = sched.config.num_train_timesteps
    s = torch.arange(n, 0, -1, dtype=torch.float32) / n  # 1, 0.999, ..., 0.001
    shifted = SHIFT * s / (1 + (SHIFT - 1) * s)
    assert sched.sigmas.shape == (n,) and torch.equal(sched.sigmas, shifted), "unexpected sigma table"
    assert torch.equal(sched.timesteps, shifted * n), "unexpected timestep table"


def decode(pipe, latents):
    """What WanPipeline does after its loop when output_type="np": un-normalize, decode, postprocess."""
    vae = pipe.vae
    z = vae.config.z_dim
    latents = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return torch.from_numpy(pipe.video_processor.postprocess_video(video, output_type="np")[0].copy())


@torch.no_grad()
def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    ref_dir = ROOT / "reference" / MODEL
    run = json.loads((ref_dir / "video_to_video.json").read_text())
    v2v = load_file(str(ref_dir / "video_to_video.safetensors"))
    noise = v2v["noise"]

    pipe = WanPipeline.from_pretrained(ROOT / MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    shape = latent_shape_of(pipe.vae, run)
    assert tuple(noise.shape) == shape, (noise.shape, shape)

    # the decode above is WanPipeline's: it reproduces the video-to-video reference's frames from its latents
    check = decode(pipe, v2v["final_latents"])
    assert check.shape == v2v["frames"].shape and torch.allclose(check, v2v["frames"], atol=1e-5, rtol=0), (
        float((check - v2v["frames"]).abs().max())
    )

    # one conditional pass per step: only the prompt is encoded (no negative prompt, no guidance)
    prompt_embeds, _ = pipe.encode_prompt(
        prompt=run["prompt"],
        do_classifier_free_guidance=False,
        num_videos_per_prompt=1,
        max_sequence_length=run["max_sequence_length"],
        device=torch.device("cpu"),
        dtype=torch.float32,
    )

    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    check_table(sched)
    indices = [table_lookup(sched, t) for t in DMD_STEPS]
    sigmas = torch.stack([sched.sigmas[i] for i in indices])  # f32

    # FastVideo draws its noise in [B, T, C, H, W] (the DMD stage's layout); the same draws, in order, moved to
    # diffusers' [B, C, T, H, W]
    gen = torch.Generator("cpu").manual_seed(RENOISE_SEED)
    btchw = (shape[0], shape[2], shape[1], shape[3], shape[4])
    renoise = torch.stack(
        [
            torch.randn(btchw, generator=gen, dtype=torch.float32).permute(0, 2, 1, 3, 4).contiguous()
            for _ in DMD_STEPS[1:]
        ]
    )

    latents = noise.clone()
    timesteps, preds, inputs = [], [], []
    for i, t in enumerate(DMD_STEPS):
        timestep = torch.tensor([t], dtype=torch.long).expand(latents.shape[0])  # FastVideo passes int64
        inputs.append(latents)
        v = pipe.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]
        if i == 0:
            # the embedding casts the timestep to f32 first: an int64 and an f32 timestep give the same output
            v_f32 = pipe.transformer(
                hidden_states=latents,
                timestep=timestep.to(torch.float32),
                encoder_hidden_states=prompt_embeds,
                return_dict=False,
            )[0]
            assert torch.equal(v, v_f32)
        timesteps.append(float(t))
        # pred_noise_to_pred_video: in f64, with the f32 table sigma, back to the model output's dtype
        x0 = (latents.double() - sigmas[i].double() * v.double()).to(v.dtype)
        preds.append(x0)
        if i + 1 < len(DMD_STEPS):
            # add_noise at the next step's sigma, in f32
            s = sigmas[i + 1]
            latents = (1 - s) * x0 + s * renoise[i]
        else:
            latents = x0
    final_latents = latents
    frames = decode(pipe, final_latents)
    assert frames.shape == (run["num_frames"], run["height"], run["width"], 3)

    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {
        "latents": noise,
        "renoise": renoise,
        "timesteps": torch.tensor(timesteps, dtype=torch.float32),
        "sigmas": sigmas,
        "step_inputs": torch.stack(inputs),
        "final_latents": final_latents.clone(),
        "frames": frames,
    }
    for i, x0 in enumerate(preds):
        tensors[f"pred_video_{i}"] = x0
    save(OUT / "dmd.safetensors", tensors)

    settings = {
        "model": MODEL,
        "prompt": run["prompt"],
        "height": run["height"],
        "width": run["width"],
        "num_frames": run["num_frames"],
        "max_sequence_length": run["max_sequence_length"],
        "latent_shape": list(shape),
        "dmd_denoising_steps": list(DMD_STEPS),
        "guidance": "none: one conditional transformer pass per step, no negative prompt",
        "scheduler": f"diffusers FlowMatchEulerDiscreteScheduler(shift={SHIFT}) as constructed, no set_timesteps: "
        "the 1000-entry training table sigma_k = shift*s_k/(1+(shift-1)*s_k), s_k = (1000-k)/1000, "
        "timestep_k = 1000*sigma_k (f32), k = 0..999",
        "shift": SHIFT,
        "table_indices": indices,
        "table_timesteps": [float(sched.timesteps[i]) for i in indices],
        "sigmas": [float(s) for s in sigmas],
        "sigma_lookup": "k = argmin_k |timestep_k - t| (first on ties); sigma = sigma_k",
        "transformer_timestep": "the raw DMD step t as an integer (int64 in FastVideo; f32 gives the same output)",
        "initial_latents": "video_to_video.safetensors `noise` (reference/wan21-tiny-a), unscaled",
        "pred_video": "x0_i = x_i - sigma_i * v_i, computed in f64 from f32 operands, rounded to f32",
        "renoise": "x_{i+1} = (1 - sigma_{i+1}) * x0_i + sigma_{i+1} * eps_{i+1}, in f32",
        "renoise_noise": f"torch.Generator('cpu').manual_seed({RENOISE_SEED}); two torch.randn draws of shape "
        f"{list(btchw)} ([B, T, C, H, W], FastVideo's layout), in order, each permuted to [B, C, T, H, W]",
        "final_latents": "x0 of the last step (pred_video_2)",
        "frames": "WanPipeline's decode: latents * latents_std + latents_mean, AutoencoderKLWan.decode, "
        "postprocess_video (x / 2 + 0.5, clamped to [0, 1]), [num_frames, height, width, 3]",
        "source": "FastVideo fastvideo/pipelines/stages/denoising.py DmdDenoisingStage; fastvideo/models/utils.py "
        "pred_noise_to_pred_video; fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py add_noise",
    }
    (OUT / "dmd.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    print("sigmas", [float(s) for s in sigmas], "indices", indices)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
