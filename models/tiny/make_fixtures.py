"""Build the tiny random-weight Wan pipelines and diffusers' reference outputs on them.

Run from anywhere with the pinned environment (requirements.txt); writes next to this file:
`wan21-tiny-a/`, `wan21-tiny-b/` (Wan 2.1 text-to-video), `wan22-ti2v-tiny-a/`, `wan22-ti2v-tiny-b/` (Wan 2.2
TI2V: text- and image-to-video in one network), each in the diffusers layout, and `reference/<model>/` (see
FIXTURES.md).
Everything is seeded, CPU and f32, so a rerun reproduces the files byte for byte.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image

ROOT = Path(__file__).resolve().parent

CORPUS = """
A cat and a dog baking a cake together in a kitchen.
The cat is carefully measuring flour, while the dog is stirring the batter with a wooden spoon.
The kitchen is cozy, with sunlight streaming through the window.
A red fox runs across a snowy field at dawn, its breath visible in the cold air.
Two owls sit on a branch under a full moon and watch the quiet forest below.
A small boat drifts on a calm lake surrounded by tall green mountains.
An astronaut walks slowly on the surface of the moon, leaving deep footprints in the grey dust.
A busy city street at night, cars passing by with bright headlights and colorful neon signs.
Waves crash against the rocks as seagulls fly over the ocean in the golden light of sunset.
A young woman plays the violin in a park while children dance around her.
Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images.
Overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers.
Poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers.
Still picture, messy background, three legs, many people in the background, walking backwards.
The camera pans slowly from left to right, revealing a wide valley full of flowers.
A steaming cup of coffee on a wooden table next to an open book and a pair of glasses.
Rain falls on a quiet village street; a man with an umbrella hurries past a lit bakery.
A close-up of a hummingbird drinking nectar from a bright purple flower, wings a blur.
A train travels through a snowy landscape, smoke rising from the old engine into the blue sky.
Fireworks explode over a river, their colors reflected in the dark, rippling water.
"""

PROMPT = "A red fox and a small owl dance in the snow under the moon."
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality, "
    "ugly, incomplete, extra fingers, poorly drawn hands, deformed, still picture, messy background"
)
MESSY_PROMPT = (
    "   A  cat &amp; a dog\n\tbake a &quot;tiny&quot; cake   in the   kitchen &amp;amp; sing.  \n"
)
LONG_PROMPT = " ".join(line.strip() for line in CORPUS.strip().splitlines())
EDIT_PROMPT = "Two owls sit on a branch under a full moon and watch the quiet forest below."
# Video-to-video strength per model: 4 steps × 0.75 runs the last 3, 3 steps × 0.75 the last 2 (diffusers
# floors steps × strength), so both runs start mid-schedule and take at least one multistep (order 2) step.
EDIT_STRENGTH = 0.75

# The scheduler settings of Wan 2.1 T2V (diffusers' convert_wan_to_diffusers.py and the
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler_config.json): everything else is the class default.
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)

# What Wan 2.2 TI2V-5B changes (Wan-AI/Wan2.2-TI2V-5B-Diffusers): the VAE patchifies 2x2 pixels into 12 channels,
# has residual down/up blocks with a wider decoder and 16x spatial compression; the pipeline gives every latent
# token its own timestep (`expand_timesteps`), the conditioning image's at 0; the schedule is shifted by 5.
TI2V_VAE = dict(
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
)
TI2V_FLOW_SHIFT = 5.0

CONFIGS = {
    "wan21-tiny-a": dict(
        umt5=dict(d_model=32, num_layers=3, num_heads=4, d_kv=8, d_ff=48),
        transformer=dict(num_attention_heads=2, attention_head_dim=32, freq_dim=16, ffn_dim=64, num_layers=2),
        vae=dict(base_dim=4, z_dim=16, num_res_blocks=1),
        run=dict(
            height=32,
            width=48,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=5.0,
            max_sequence_length=512,
        ),
        sharded=False,
        seed=1,
    ),
    "wan21-tiny-b": dict(
        umt5=dict(d_model=40, num_layers=4, num_heads=5, d_kv=6, d_ff=56),
        transformer=dict(num_attention_heads=3, attention_head_dim=24, freq_dim=32, ffn_dim=96, num_layers=3),
        vae=dict(base_dim=6, z_dim=8, num_res_blocks=2),
        run=dict(
            height=48,
            width=32,
            num_frames=13,
            num_inference_steps=3,
            guidance_scale=3.5,
            max_sequence_length=32,
        ),
        sharded=True,
        seed=2,
    ),
    "wan22-ti2v-tiny-a": dict(
        umt5=dict(d_model=32, num_layers=3, num_heads=4, d_kv=8, d_ff=48),
        transformer=dict(num_attention_heads=2, attention_head_dim=32, freq_dim=16, ffn_dim=64, num_layers=2),
        vae=dict(base_dim=4, decoder_base_dim=6, z_dim=8, num_res_blocks=1, **TI2V_VAE),
        run=dict(
            height=64,
            width=96,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=5.0,
            max_sequence_length=512,
        ),
        ti2v=True,
        sharded=False,
        seed=3,
    ),
    "wan22-ti2v-tiny-b": dict(
        umt5=dict(d_model=40, num_layers=4, num_heads=5, d_kv=6, d_ff=56),
        transformer=dict(num_attention_heads=3, attention_head_dim=24, freq_dim=32, ffn_dim=96, num_layers=3),
        vae=dict(base_dim=6, decoder_base_dim=8, z_dim=12, num_res_blocks=2, **TI2V_VAE),
        run=dict(
            height=96,
            width=64,
            num_frames=13,
            num_inference_steps=3,
            guidance_scale=3.5,
            max_sequence_length=32,
        ),
        ti2v=True,
        sharded=True,
        seed=4,
    ),
}


def build_tokenizer():
    """A small Unigram tokenizer in T5's conventions, wrapped as transformers' T5TokenizerFast."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        shrinking_factor=0.75,
        max_piece_length=8,
        n_sub_iterations=2,
    )
    # '&' and '"' are not in the corpus, so the cleaned messy prompt exercises <unk>.
    tok.train_from_iterator(CORPUS.strip().splitlines(), trainer=trainer)
    # The trainer's scores wobble in the last bits, and the characters it adds at the end (1e-4 apart) come in
    # hash order, from run to run: round the scores and sort the pieces so the file is reproducible.
    vocab = [(piece, round(score, 3)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    vocab = vocab[:3] + sorted(vocab[3:], key=lambda v: (-v[1], v[0]))
    trained = tok
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = trained.normalizer
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = trained.decoder
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=512)


def redraw_(model, gen):
    """Re-draw every parameter from a seeded distribution that keeps activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "scale_shift_table":
                new = 0.2 * torch.randn(p.shape, generator=gen)
            elif leaf == "gamma" or (p.ndim == 1 and leaf == "weight"):
                # norm scales: near one, never exactly one
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf == "bias":
                new = 0.05 * torch.randn(p.shape, generator=gen)
            elif "relative_attention_bias" in name:
                new = torch.randn(p.shape, generator=gen)
            elif name in ("shared.weight", "encoder.embed_tokens.weight"):
                new = torch.randn(p.shape, generator=gen)
            else:
                fan_in = math.prod(p.shape[1:])
                new = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(new.to(p.dtype))


def build_pipeline(cfg, tokenizer):
    gen = torch.Generator().manual_seed(cfg["seed"])
    u = cfg["umt5"]
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=u["d_model"],
            d_kv=u["d_kv"],
            d_ff=u["d_ff"],
            num_layers=u["num_layers"],
            num_heads=u["num_heads"],
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    t = cfg["transformer"]
    v = cfg["vae"]
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=t["num_attention_heads"],
        attention_head_dim=t["attention_head_dim"],
        in_channels=v["z_dim"],
        out_channels=v["z_dim"],
        text_dim=u["d_model"],
        freq_dim=t["freq_dim"],
        ffn_dim=t["ffn_dim"],
        num_layers=t["num_layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()
    z = v["z_dim"]
    latents_mean = (0.5 * torch.randn(z, generator=gen)).tolist()
    latents_std = (1.0 + 1.5 * torch.rand(z, generator=gen)).tolist()
    wan22 = {k: v[k] for k in ("decoder_base_dim", *TI2V_VAE) if k in v}
    vae = AutoencoderKLWan(
        base_dim=v["base_dim"],
        z_dim=z,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=v["num_res_blocks"],
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[round(x, 4) for x in latents_mean],
        latents_std=[round(x, 4) for x in latents_std],
        **wan22,
    ).eval()
    for m in (text_encoder, transformer, vae):
        redraw_(m, gen)
    ti2v = cfg.get("ti2v", False)
    scheduler = UniPCMultistepScheduler(**SCHEDULER)
    if ti2v:
        scheduler = UniPCMultistepScheduler(**{**SCHEDULER, "flow_shift": TI2V_FLOW_SHIFT})
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        expand_timesteps=ti2v,
    )


def save_pipeline(pipe, folder, sharded):
    if folder.exists():
        shutil.rmtree(folder)
    if sharded:
        pipe.transformer.to(torch.bfloat16)
        pipe.text_encoder.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    if sharded:
        shutil.rmtree(folder / "transformer")
        pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="150KB")
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()


def ids_of(pipe, text, max_len):
    # exactly the pipeline's tokenizer call, padding stripped with its own attention mask
    out = pipe.tokenizer(
        prompt_clean(text),
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    n = int(out.attention_mask[0].sum())
    assert bool((out.input_ids[0, n:] == 0).all())
    return out.input_ids[0, :n].to(torch.int64)


def pipeline_kwargs(run, msl):
    """The prompt and settings of a reference run, as a Wan pipeline's call takes them."""
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=run["height"],
        width=run["width"],
        num_frames=run["num_frames"],
        num_inference_steps=run["num_inference_steps"],
        guidance_scale=run["guidance_scale"],
        max_sequence_length=msl,
    )


def save(path, tensors):
    """Floats as f32, ids as i64; refuses NaN/inf so a broken reference never gets committed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        if v.is_floating_point():
            v = v.to(torch.float32)
            assert torch.isfinite(v).all(), f"{path.name}: {k} is not finite"
        out[k] = v
    save_file(out, str(path))


def latent_shape_of(vae, run):
    c = vae.config
    lat_t = (run["num_frames"] - 1) // c.scale_factor_temporal + 1
    return (1, c.z_dim, lat_t, run["height"] // c.scale_factor_spatial, run["width"] // c.scale_factor_spatial)


def scheduler_run(sched, n, sample_shape, gen, prefix):
    sched.set_timesteps(n)
    out = {
        f"{prefix}sigmas": sched.sigmas.to(torch.float32),
        f"{prefix}timesteps": sched.timesteps.to(torch.float32),
    }
    sample = torch.randn(sample_shape, generator=gen)
    out[f"{prefix}sample_0"] = sample
    for k, t in enumerate(sched.timesteps):
        model_output = torch.randn(sample_shape, generator=gen)
        sample = sched.step(model_output, t, sample, return_dict=False)[0]
        out[f"{prefix}model_output_{k}"] = model_output
        out[f"{prefix}sample_{k + 1}"] = sample
    return out


@torch.no_grad()
def references(name, cfg, pipe):
    run = cfg["run"]
    msl = run["max_sequence_length"]
    out_dir = ROOT / "reference" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    gen = torch.Generator().manual_seed(100 + cfg["seed"])
    vae = pipe.vae
    z = vae.config.z_dim
    latent_shape = latent_shape_of(vae, run)

    # text
    def embeds(text):
        return pipe._get_t5_prompt_embeds(text, max_sequence_length=msl, device="cpu", dtype=torch.float32)

    prompt_embeds, negative_embeds = pipe.encode_prompt(
        PROMPT, NEGATIVE_PROMPT, do_classifier_free_guidance=True, max_sequence_length=msl, device="cpu"
    )
    text = {
        "prompt_ids": ids_of(pipe, PROMPT, msl),
        "prompt_embeds": prompt_embeds,
        "negative_ids": ids_of(pipe, NEGATIVE_PROMPT, msl),
        "negative_embeds": negative_embeds,
        "long_ids": ids_of(pipe, LONG_PROMPT, msl),
        "long_embeds": embeds(LONG_PROMPT),
        "messy_ids": ids_of(pipe, MESSY_PROMPT, msl),
        "messy_embeds": embeds(MESSY_PROMPT),
    }
    assert len(pipe.tokenizer(prompt_clean(LONG_PROMPT)).input_ids) > msl
    save(out_dir / "text.safetensors", text)

    # transformer: one forward at an intermediate timestep, exactly as the pipeline passes it
    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(run["num_inference_steps"])
    t = sched.timesteps[1:2]
    hidden = torch.randn(latent_shape, generator=gen)
    if pipe.config.expand_timesteps:
        # one timestep per token, the first latent frame's at 0, as the image-to-video loop passes them
        _, _, lat_t, lat_h, lat_w = latent_shape
        mask = torch.ones(lat_t, lat_h // 2, lat_w // 2)
        mask[0] = 0
        t = (mask * t).flatten().unsqueeze(0)
    tr_out = pipe.transformer(
        hidden_states=hidden, timestep=t, encoder_hidden_states=prompt_embeds, return_dict=False
    )[0]
    save(
        out_dir / "transformer.safetensors",
        {
            "hidden_states": hidden,
            "timestep": t.to(torch.float32),
            "encoder_hidden_states": prompt_embeds,
            "output": tr_out,
        },
    )

    # schedulers
    n = run["num_inference_steps"]
    shift = pipe.scheduler.config.flow_shift
    unipc = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    unipc2 = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    sch = {}
    sch.update(scheduler_run(unipc, n, latent_shape, gen, "unipc_"))
    sch.update(scheduler_run(euler, n, latent_shape, gen, "euler_"))
    sch.update(scheduler_run(unipc2, n + 3, latent_shape, gen, "unipc2_"))
    save(out_dir / "scheduler.safetensors", sch)

    # VAE
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    latents = torch.randn(latent_shape, generator=gen) * std + mean
    decoded = vae.decode(latents, return_dict=False)[0]
    video = torch.rand((1, 3, run["num_frames"], run["height"], run["width"]), generator=gen) * 2 - 1
    dist = vae.encode(video).latent_dist
    save(
        out_dir / "vae.safetensors",
        {
            "latents": latents,
            "decoded": decoded,
            "video": video,
            "encoded_mean": dist.mean,
            "encoded_logvar": dist.logvar,
        },
    )

    # full pipeline
    noise = torch.randn(latent_shape, generator=gen)
    common = pipeline_kwargs(run, msl)
    frames = pipe(**common, latents=noise.clone(), output_type="np").frames[0]
    final_latents = pipe(**common, latents=noise.clone(), output_type="latent").frames
    frames = torch.from_numpy(np.ascontiguousarray(frames))
    save(out_dir / "pipeline.safetensors", {"latents": noise, "final_latents": final_latents, "frames": frames})

    ref = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        **run,
        flow_shift=pipe.scheduler.config.flow_shift,
        messy_prompt=MESSY_PROMPT,
        messy_prompt_cleaned=prompt_clean(MESSY_PROMPT),
        long_prompt=LONG_PROMPT,
    )
    (out_dir / "ref.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def video_to_video_references(name, cfg, pipe):
    """`WanVideoToVideoPipeline` on the text-to-video reference's own frames, with a new prompt.

    The pipeline draws its noise with `generator` (after encoding the video to the posterior's mode, no
    sampling); the same draw from the same seed is saved as `noise` so an implementation can be handed it.
    """
    run = cfg["run"]
    out_dir = ROOT / "reference" / name
    frames = load_file(str(out_dir / "pipeline.safetensors"))["frames"]
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    v2v = WanVideoToVideoPipeline(**{k: pipe.components[k] for k in names})
    v2v.set_progress_bar_config(disable=True)
    # the preprocessed video must be exactly 2x - 1 of the frames: no resampling at the same size
    pre = v2v.video_processor.preprocess_video(frames.numpy(), height=run["height"], width=run["width"])
    assert torch.equal(pre, (frames * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)), "preprocessing resampled"

    seed = 200 + cfg["seed"]
    noise = torch.randn(latent_shape_of(pipe.vae, run), generator=torch.Generator().manual_seed(seed))
    start = {}
    prepare = v2v.prepare_latents

    def capture(*args, **kwargs):
        start["latents"] = prepare(*args, **kwargs).clone()
        return start["latents"]

    v2v.prepare_latents = capture
    common = dict(
        video=frames.numpy(),
        prompt=EDIT_PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=run["height"],
        width=run["width"],
        num_inference_steps=run["num_inference_steps"],
        guidance_scale=run["guidance_scale"],
        strength=EDIT_STRENGTH,
        max_sequence_length=run["max_sequence_length"],
    )
    final_latents = v2v(**common, generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    start_latents = start["latents"]
    out = v2v(**common, generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]
    assert torch.equal(start["latents"], start_latents)
    save(
        out_dir / "video_to_video.safetensors",
        {
            "input_frames": frames,
            "noise": noise,
            "start_latents": start_latents,
            "final_latents": final_latents,
            "frames": torch.from_numpy(np.ascontiguousarray(out)),
        },
    )
    settings = dict(prompt=EDIT_PROMPT, negative_prompt=NEGATIVE_PROMPT, strength=EDIT_STRENGTH, **run)
    (out_dir / "video_to_video.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def image_to_video_references(name, cfg, pipe):
    """`WanImageToVideoPipeline` with `expand_timesteps` (Wan 2.2 TI2V) from the same components and noise.

    The image is 8-bit (so a PNG of it is exact) at the run's size, so preprocessing only maps it to [-1, 1];
    the script checks that. It is encoded alone (one frame) to the posterior's mode, normalized, and held as
    the first latent frame, whose tokens get timestep 0.
    """
    run = cfg["run"]
    out_dir = ROOT / "reference" / name
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    i2v = WanImageToVideoPipeline(**{k: pipe.components[k] for k in names}, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(300 + cfg["seed"])
    pixels = torch.randint(0, 256, (run["height"], run["width"], 3), generator=gen, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    image_f32 = pixels.to(torch.float32) / 255
    pre = i2v.video_processor.preprocess(image, height=run["height"], width=run["width"])
    assert torch.equal(pre, (image_f32 * 2 - 1).permute(2, 0, 1).unsqueeze(0)), "preprocessing resampled"

    noise = torch.randn(latent_shape_of(pipe.vae, run), generator=gen)
    captured = {}
    prepare = i2v.prepare_latents

    def capture(*args, **kwargs):
        out = prepare(*args, **kwargs)
        captured["condition"] = out[1].clone()
        return out

    i2v.prepare_latents = capture
    common = dict(
        image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=run["height"],
        width=run["width"],
        num_frames=run["num_frames"],
        num_inference_steps=run["num_inference_steps"],
        guidance_scale=run["guidance_scale"],
        max_sequence_length=run["max_sequence_length"],
    )
    final_latents = i2v(**common, latents=noise.clone(), output_type="latent").frames
    frames = i2v(**common, latents=noise.clone(), output_type="np").frames[0]
    save(
        out_dir / "image_to_video.safetensors",
        {
            "image": image_f32,
            "noise": noise,
            "condition": captured["condition"],
            "final_latents": final_latents,
            "frames": torch.from_numpy(np.ascontiguousarray(frames)),
        },
    )
    Image.fromarray(pixels.numpy()).save(out_dir / "image.png")


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    for name, cfg in CONFIGS.items():
        folder = ROOT / name
        pipe = build_pipeline(cfg, tokenizer)
        save_pipeline(pipe, folder, cfg["sharded"])
        del pipe
        pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        for m in (pipe.text_encoder, pipe.transformer, pipe.vae):
            assert all(p.dtype == torch.float32 for p in m.parameters())
        pipe.set_progress_bar_config(disable=True)
        references(name, cfg, pipe)
        if cfg.get("ti2v"):
            image_to_video_references(name, cfg, pipe)
        else:
            video_to_video_references(name, cfg, pipe)
        print(f"{name}: done")


if __name__ == "__main__":
    main()
