"""diffusers' tiled VAE decode (`AutoencoderKLWan.enable_tiling`) on the tiny fixtures' VAEs.

Run after make_fixtures.py, with the environment pinned in requirements-tiled.txt; writes
`reference/<model>/vae_tiled.safetensors` (see FIXTURES.md). A separate script and a newer diffusers than the
other fixtures because diffusers 0.35.2's `tiled_decode` is wrong for Wan 2.2: it neither tells the decoder
which chunk is a stream's first nor unpatchifies. Seeded, CPU and f32: a rerun reproduces the files.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKLWan

ROOT = Path(__file__).resolve().parent

# Latents larger than the tiles in both directions, sizes that the strides don't divide (narrow edge tiles), and
# tiles/strides in pixels: Wan 2.1 compresses 8× (tiles of 3×4 latents), Wan 2.2 16× and blends in its 2×2
# patchified pixels.
CASES = {
    "wan21-tiny-a": dict(latent=(1, 16, 2, 7, 10), tile=(24, 32), stride=(16, 24), seed=1),
    "wan21-tiny-b": dict(latent=(1, 8, 3, 9, 5), tile=(32, 24), stride=(24, 16), seed=2),
    "wan22-ti2v-tiny-a": dict(latent=(1, 8, 2, 5, 7), tile=(64, 64), stride=(32, 48), seed=3),
    "wan22-ti2v-tiny-b": dict(latent=(1, 12, 3, 6, 5), tile=(64, 48), stride=(48, 32), seed=4),
}


@torch.no_grad()
def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name, case in CASES.items():
        vae = AutoencoderKLWan.from_pretrained(ROOT / name / "vae", torch_dtype=torch.float32).eval()
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        gen = torch.Generator().manual_seed(200 + case["seed"])
        latents = torch.randn(case["latent"], generator=gen) * std + mean
        (th, tw), (sh, sw) = case["tile"], case["stride"]
        vae.enable_tiling(
            tile_sample_min_height=th, tile_sample_min_width=tw, tile_sample_stride_height=sh, tile_sample_stride_width=sw
        )
        decoded = vae.decode(latents, return_dict=False)[0]
        assert torch.isfinite(decoded).all()
        save_file(
            {
                "latents": latents.contiguous(),
                "decoded": decoded.contiguous(),
                # tile height, tile width, stride height, stride width, in pixels
                "tiling": torch.tensor([th, tw, sh, sw], dtype=torch.int64),
            },
            str(ROOT / "reference" / name / "vae_tiled.safetensors"),
        )
        print(f"{name}: latents {list(latents.shape)} → {list(decoded.shape)}")


if __name__ == "__main__":
    main()
