"""Kinetoscope against diffusers' WanPipeline on the same GPU, the same weights, embeddings and noise.

Three steps, run in order by benches/gpu/run.sh (each in its own process, so that neither holds GPU memory
while the other runs):

  bench.py checkpoint DIR [--model 1.3b|14b|tiny] [--layers N]
      a random-weight Wan 2.1 T2V checkpoint in the diffusers layout: the transformer at the real configuration
      (bf16, sharded with its index), the real VAE configuration (f32), the real scheduler configuration, and a
      one-layer umT5 of the real width (4096) with the test tokenizer: both runs are given the same prompt
      embeddings, so the text encoder only has to load.
  bench.py diffusers DIR WORK [--steps N] [--height H --width W --frames F] [--dtype bf16|f32]
      writes the embeddings and the noise to WORK/inputs.safetensors, runs WanPipeline (bf16, PyTorch SDPA, the VAE
      in f32) from them, and writes WORK/diffusers.json and WORK/diffusers.safetensors.
  bench.py report WORK OUT_JSON
      after Kinetoscope wrote WORK/kinetoscope.json and WORK/kinetoscope.safetensors: the two outputs' relative
      difference, the bf16 matrix-product ceiling measured now on this GPU, the step's FLOP floor, and the figures
      (a table on stdout, OUT_JSON for benches/results/gpu-vs-diffusers.json).

Step times are medians over the timed steps after a warm-up run, each step ended by a device synchronization;
the 50-step end-to-end time is labelled as per-step × 50 plus the decode, measured at --steps.
"""

import argparse
import inspect
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "tiny" / "wan21-tiny-a"

PROMPT = "A red fox trotting through fresh snow in a birch forest at dawn, soft light, cinematic"
NEGATIVE = "blurry, low quality, static, distorted"

# Wan 2.1 T2V's transformer configurations (diffusers' Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers).
TRANSFORMERS = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    # For trying the script on a CPU: same code paths, toy sizes.
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2),
}
COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TEXT_TOKENS = 512


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pin_unipc_schedule(scheduler):
    """diffusers 0.37 changed UniPC's flow-matching sigmas (huggingface/diffusers#12109: the grid now starts at
    sigma 1 instead of 1 − 1/num_train_timesteps), so 0.42.1, the version that runs beside the device's
    transformers, schedules other timesteps than 0.35.2, which Kinetoscope and its fixtures follow. The step's
    cost doesn't depend on the timestep; for the outputs to be comparable, give the new scheduler 0.35.2's grid
    (it applies the same shift to it)."""
    set_timesteps = scheduler.set_timesteps
    if "sigmas" not in inspect.signature(set_timesteps).parameters:
        return  # an older diffusers: already 0.35.2's grid
    n = scheduler.config.num_train_timesteps

    def pinned(num_inference_steps=None, device=None, **_):
        grid = np.flip(1.0 - np.linspace(1.0, 1.0 / n, num_inference_steps + 1))[:-1].copy()
        return set_timesteps(device=device, sigmas=grid)

    scheduler.set_timesteps = pinned


def checkpoint(args):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(args.dir)
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(0)
    config = dict(COMMON, **TRANSFORMERS[args.model])
    if args.layers:
        config["num_layers"] = args.layers
    with torch.device(device()):
        transformer = WanTransformer3DModel(**config).to(torch.bfloat16)
    transformer.save_pretrained(out / "transformer", max_shard_size="2GB")
    del transformer
    vae = AutoencoderKLWan(base_dim=16 if args.model == "tiny" else 96)
    vae.save_pretrained(out / "vae")
    text_config = json.loads((TINY / "text_encoder" / "config.json").read_text())
    text_config.update(d_model=4096, d_kv=64, num_heads=2, d_ff=256, num_layers=1, num_decoder_layers=1)
    for key in ("architectures", "dtype", "transformers_version"):
        text_config.pop(key, None)
    UMT5EncoderModel(UMT5Config(**text_config)).to(torch.bfloat16).save_pretrained(out / "text_encoder")
    for component in ("tokenizer", "scheduler"):
        shutil.copytree(TINY / component, out / component)
    shutil.copy(TINY / "model_index.json", out / "model_index.json")
    label = f"{args.model}" + (f", {args.layers} layers" if args.layers else "")
    (out / "bench.json").write_text(json.dumps(dict(model=label, transformer=config), indent=2) + "\n")
    print(f"checkpoint {out}: Wan 2.1 {label}")


def diffusers(args):
    from diffusers import AutoencoderKLWan, WanPipeline

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = device()
    vae = AutoencoderKLWan.from_pretrained(args.dir, subfolder="vae", torch_dtype=torch.float32)
    dtype = dict(bf16=torch.bfloat16, f32=torch.float32)[args.dtype]
    pipe = WanPipeline.from_pretrained(args.dir, vae=vae, torch_dtype=dtype).to(dev)
    pipe.set_progress_bar_config(disable=True)
    pin_unipc_schedule(pipe.scheduler)

    prompt_embeds, negative_embeds = pipe.encode_prompt(
        PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=TEXT_TOKENS, device=dev
    )
    z = vae.config.z_dim
    shape = (1, z, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    save_file(
        {
            "prompt_embeds": prompt_embeds.float().cpu().contiguous(),
            "negative_embeds": negative_embeds.float().cpu().contiguous(),
            "latents": noise,
        },
        str(work / "inputs.safetensors"),
    )

    def run(steps, times):
        def on_step(pipe, i, t, kwargs):
            sync()
            times.append(time.perf_counter())
            return kwargs

        sync()
        times.append(time.perf_counter())
        return pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            num_inference_steps=steps,
            guidance_scale=5.0,
            latents=noise.to(dev),
            output_type="latent",
            callback_on_step_end=on_step,
        ).frames

    with torch.no_grad():
        run(2, [])  # warm-up: kernels chosen, allocator grown
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        latents = run(args.steps, times)
        sync()
        start = time.perf_counter()
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(dev)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(dev)
        video = vae.decode(latents.to(torch.float32) * std + mean, return_dict=False)[0]
        sync()
        decode_s = time.perf_counter() - start
    steps = [b - a for a, b in zip(times, times[1:])]
    frames = (video[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # [F, H, W, 3]
    save_file(
        {"final_latents": latents.float().cpu().contiguous(), "frames": frames.float().cpu().contiguous()},
        str(work / "diffusers.safetensors"),
    )
    record = dict(
        step_times_s=steps,
        step_s=statistics.median(steps[1:] if len(steps) > 2 else steps),
        decode_s=decode_s,
        peak_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        dtype=args.dtype,
        versions=dict(torch=torch.__version__, diffusers=__import__("diffusers").__version__),
    )
    (work / "diffusers.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"diffusers: {record['step_s']:.3f} s/step, decode {decode_s:.2f} s")


def step_flops(config, frames, height, width, text_tokens=TEXT_TOKENS, batch=2):
    """Matrix and attention FLOPs of one guided step (a batch of two): 2 per multiply-add."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    per_layer = (
        2 * tokens * dim * dim * 4  # self-attention q, k, v, o
        + 2 * tokens * dim * tokens * 2  # self-attention scores and weighted sum
        + 2 * tokens * dim * dim * 2  # cross-attention q, o
        + 2 * text_tokens * dim * dim * 2  # cross-attention k, v of the text
        + 2 * tokens * dim * text_tokens * 2  # cross-attention scores and weighted sum
        + 2 * tokens * dim * config["ffn_dim"] * 2  # feed-forward
    )
    patch = 2 * tokens * 16 * 4 * dim * 2  # patch embedding and the output projection
    text = 2 * text_tokens * (config["text_dim"] * dim + dim * dim)  # text embedding
    return batch * (config["num_layers"] * per_layer + patch + text)


def matmul_ceiling(n=8192, reps=10):
    """bf16 TFLOP/s of an n×n×n product on random data: the mean of `reps` after three warm-ups."""
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def relative_difference(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def report(args):
    work = Path(args.work)
    d, k = (json.loads((work / f"{name}.json").read_text()) for name in ("diffusers", "kinetoscope"))
    dt, kt = (load_file(str(work / f"{name}.safetensors")) for name in ("diffusers", "kinetoscope"))
    bench = json.loads((Path(k["model_dir"]) / "bench.json").read_text())
    run = k["run"]
    flops = step_flops(bench["transformer"], run["frames"], run["height"], run["width"])
    ceiling = matmul_ceiling() if torch.cuda.is_available() else float("nan")
    floor = flops / (ceiling * 1e12)
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    result = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        commit=k.get("commit"),
        date=time.strftime("%Y-%m-%d"),
        model=bench["model"],
        size=f"{run['width']}x{run['height']}x{run['frames']}",
        timed_steps=run["steps"],
        dtype=d["dtype"],
        kinetoscope_step_s=k["step_s"],
        diffusers_step_s=d["step_s"],
        step_ratio=k["step_s"] / d["step_s"],
        floor_step_s=floor,
        kinetoscope_over_floor=k["step_s"] / floor,
        diffusers_over_floor=d["step_s"] / floor,
        step_tflop=flops / 1e12,
        matmul_ceiling_tflops=ceiling,
        kinetoscope_decode_s=k["decode_s"],
        diffusers_decode_s=d["decode_s"],
        kinetoscope_50_steps_s=50 * k["step_s"] + k["decode_s"],
        diffusers_50_steps_s=50 * d["step_s"] + d["decode_s"],
        kinetoscope_peak_gib=gib(k["peak_bytes"]),
        diffusers_peak_gib=gib(d["peak_bytes"]),
        rel_diff=relative_difference(kt["final_latents"], dt["final_latents"]),
        frames_rel_diff=relative_difference(kt["frames"], dt["frames"]),
        versions=d["versions"],
        attention=k.get("attention"),
        conv=k.get("conv"),
    )
    # Kinetoscope's decode of the same latents by its other convolution path (gpu_vs_diffusers --only decode).
    for path in sorted(work.glob("kinetoscope-decode-*.json")):
        again = json.loads(path.read_text())
        result[f"kinetoscope_decode_{again['conv']}_s"] = again["decode_s"]
        result[f"kinetoscope_decode_{again['conv']}_peak_gib"] = gib(again["peak_bytes"])
        result[f"kinetoscope_decode_{again['conv']}_frames_rel_diff"] = again["frames_rel_diff"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| | Kinetoscope | diffusers |\n| --- | --- | --- |")
    print(f"| step (CFG), s | {k['step_s']:.3f} | {d['step_s']:.3f} |")
    print(f"| step / FLOP floor ({floor:.3f} s) | {result['kinetoscope_over_floor']:.2f} | {result['diffusers_over_floor']:.2f} |")
    print(f"| VAE decode ({k.get('conv')} convolutions), s | {k['decode_s']:.2f} | {d['decode_s']:.2f} |")
    for path in sorted(work.glob("kinetoscope-decode-*.json")):
        again = json.loads(path.read_text())
        print(f"| VAE decode ({again['conv']} convolutions), s | {again['decode_s']:.2f} | |")
    print(f"| 50 steps + decode (per-step × 50), s | {result['kinetoscope_50_steps_s']:.1f} | {result['diffusers_50_steps_s']:.1f} |")
    peak = lambda g: "n/a" if g is None else f"{g:.1f}"  # noqa: E731
    print(f"| peak GPU memory, GiB | {peak(result['kinetoscope_peak_gib'])} | {peak(result['diffusers_peak_gib'])} |")
    print(
        f"step ratio {result['step_ratio']:.3f}; final latents relative difference {result['rel_diff']:.2e}, "
        f"frames {result['frames_rel_diff']:.2e}; {result['step_tflop']:.0f} TFLOP a step, "
        f"matmul ceiling {ceiling:.0f} TFLOP/s"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("dir")
    p.add_argument("--model", choices=sorted(TRANSFORMERS), default="1.3b")
    p.add_argument("--layers", type=int, help="fewer transformer layers than the real model (labelled)")
    p.set_defaults(func=checkpoint)
    p = sub.add_parser("diffusers")
    p.add_argument("dir")
    p.add_argument("work")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="f32: to check the harness itself")
    p.set_defaults(func=diffusers)
    p = sub.add_parser("report")
    p.add_argument("work")
    p.add_argument("out")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
