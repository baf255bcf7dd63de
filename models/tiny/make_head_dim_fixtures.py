"""Two tiny random-weight Wan 2.1 transformers with heads 64 and 128 wide, and diffusers' output on each.

The other tiny fixtures have heads 32, 24 or 16 wide, which Kinetoscope's flash-attention kernel
(`kernels/flash_attention.cu`, compiled for head dims 64 and 128) does not take: on a GPU in bf16 they run the
plain attention. These two reach the kernel (`benches/gpu_parity.rs` counts its launches), with a token count that
fills one of its 64-row tiles and part of a second.

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1, torch 2.9.1; the CPU-only
torch wheel is enough); it imports make_fixtures.py's helpers (`redraw_`, `save`) and writes next to this file:

  wan21-head64-tiny/transformer/    WanTransformer3DModel, 2 heads x 64, 2 layers, ffn 128
  wan21-head128-tiny/transformer/   WanTransformer3DModel, 1 head x 128, 2 layers, ffn 128
  reference/wan21-head64-tiny/transformer.safetensors
  reference/wan21-head128-tiny/transformer.safetensors

Each transformer folder is what `save_pretrained` writes (config.json and a single f32
diffusion_pytorch_model.safetensors); only the transformer is made, nothing else depends on the head dim. Each
reference is one forward, with the keys of make_fixtures.py's `transformer.safetensors`: `hidden_states`
[1, 16, 5, 8, 10] (5 · 4 · 5 = 100 tokens after the (1, 2, 2) patches), `timestep` [1] (937, passed as int64 as the
pipeline passes the scheduler's timesteps; saved as f32), `encoder_hidden_states` [1, 512, 32] and `output`
[1, 16, 5, 8, 10]. See the "Head dims 64 and 128" section of FIXTURES.md. Rebuild:

    python3 -m venv /tmp/kt-image && /tmp/kt-image/bin/pip install -r models/tiny/requirements-image.txt
    /tmp/kt-image/bin/python models/tiny/make_head_dim_fixtures.py

Everything is seeded, CPU and f32, so a rerun reproduces the files byte for byte.
"""

import shutil
import sys
from pathlib import Path

import torch

import diffusers
from diffusers import WanTransformer3DModel

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from make_fixtures import redraw_, save  # noqa: E402  (the tiny fixtures' weight scales and reference writer)

VERSIONS = {"diffusers": "0.42.1", "torch": "2.9.1"}

# Settings shared by both (as make_image_fixtures' transformers): the text is umT5's d_model 32, 16 latent channels.
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=16,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

CONFIGS = {
    "wan21-head64-tiny": dict(transformer=dict(num_attention_heads=2, attention_head_dim=64), seed=51),
    "wan21-head128-tiny": dict(transformer=dict(num_attention_heads=1, attention_head_dim=128), seed=52),
}

# 5 latent frames of 8 × 10: 100 tokens, more than the kernel's 64-query (and 64-key) tile and not a multiple of it.
LATENTS = (1, 16, 5, 8, 10)
TIMESTEP = 937
TEXT_LEN = 512  # the pipelines' max_sequence_length
TILE = 64
MAX_FOLDER_BYTES = 2_000_000


def check_versions():
    found = {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}
    assert found == VERSIONS, f"pinned {VERSIONS} (requirements-image.txt), found {found}"


def tokens(model):
    _, _, t, h, w = LATENTS
    p_t, p_h, p_w = model.config.patch_size
    return (t // p_t) * (h // p_h) * (w // p_w)


def folder_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@torch.no_grad()
def build(name, cfg):
    folder = ROOT / name
    if folder.exists():
        shutil.rmtree(folder)
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = WanTransformer3DModel(**TRANSFORMER, **cfg["transformer"]).eval()
    redraw_(model, gen)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    size = folder_bytes(folder)
    assert size < MAX_FOLDER_BYTES, f"{name}: {size} bytes"
    return size


@torch.no_grad()
def reference(name, cfg):
    """One forward of the saved model, reloaded as a pipeline would load it, on seeded inputs."""
    model = WanTransformer3DModel.from_pretrained(ROOT / name / "transformer", torch_dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    c = model.config
    assert c.attention_head_dim in (64, 128) and c.num_attention_heads * c.attention_head_dim == 128, c
    n = tokens(model)
    assert n > TILE and n % TILE != 0, n

    out_dir = ROOT / "reference" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    gen = torch.Generator().manual_seed(100 + cfg["seed"])
    hidden = torch.randn(LATENTS, generator=gen)
    text = torch.randn((1, TEXT_LEN, c.text_dim), generator=gen)
    t = torch.tensor([TIMESTEP], dtype=torch.int64)
    out = model(hidden_states=hidden, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == LATENTS, out.shape
    save(
        out_dir / "transformer.safetensors",
        {
            "hidden_states": hidden,
            "timestep": t.to(torch.float32),
            "encoder_hidden_states": text,
            "output": out,
        },
    )
    return n, out


def main():
    check_versions()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name, cfg in CONFIGS.items():
        size = build(name, cfg)
        n, out = reference(name, cfg)
        heads, head_dim = cfg["transformer"]["num_attention_heads"], cfg["transformer"]["attention_head_dim"]
        print(
            f"{name}: {heads} x {head_dim}, {size} bytes, {n} tokens, "
            f"output std {out.std():.3f}, max |output| {out.abs().max():.3f}"
        )


if __name__ == "__main__":
    main()
