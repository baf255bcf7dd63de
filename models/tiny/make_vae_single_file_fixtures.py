"""Tiny Wan VAEs as single files in the official Wan layout, and diffusers' decodes of them.

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1), after make_fixtures.py
(it reads `wan21-tiny-a/vae` and `wan22-ti2v-tiny-a/vae`); writes next to this file:

  single_file/wan21-tiny-a-vae.safetensors       wan21-tiny-a's VAE (1 residual block per stage) under the official
                                                 names (`encoder.conv1.weight`, `decoder.upsamples.3.residual.0.gamma`,
                                                 `conv2.bias`, ...), f32, no prefix: the layout of the Wan
                                                 repository's `Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors`
  single_file/wan21-tiny-a-vae-bf16.safetensors  the same in bf16
  single_file/wan21-tiny-a-vae-res2.safetensors  a VAE of wan21-tiny-a's config but with `num_res_blocks` 2, the
                                                 released value, its weights drawn here (seeded): the only structure
                                                 diffusers' single-file converter maps right (see below), f32

and `reference/single_file/vae.safetensors` (see the "Single-file VAEs" section of FIXTURES.md); it prints what it
found of diffusers (the converter's wrong keys, `from_single_file`'s errors), which FIXTURES.md records.

Each file is the diffusers tensors renamed by `to_official` below (diffusers' conversion inverted, written from the
table in FIXTURES.md, not from its converter). The script checks that

- diffusers' own converter (`convert_wan_vae_to_diffusers`, what `AutoencoderKLWan.from_single_file` runs) gives the
  res2 file's diffusers names and tensors back exactly, and `from_single_file` loads them and decodes the reference
  latents as the model they came from does;
- that converter maps wan21-tiny-a's decoder wrong (its decoder indices are written for 2 residual blocks per
  stage) and `from_single_file` cannot load that file, nor any file behind a `first_stage_model.` or `vae.` prefix,
  nor a Wan 2.2 VAE in its official layout (recorded in FIXTURES.md; the Wan 2.2 official names are those of
  diffusers' conversion script, `scripts/convert_wan_to_diffusers.py` `convert_vae_22`, inverted).

Optionally, `--wan21-vae PATH` (the Wan2.1 repository's `wan/modules/vae.py`) and `--wan22-vae PATH` (Wan2.2's
`wan/modules/vae2_2.py`), which need einops on the path, also check the official names against the official code:
its model's `state_dict` has exactly the file's keys and shapes, and (Wan 2.1) it loads the files strictly and decodes
the reference latents as diffusers does. Those checks write nothing.

Everything is CPU and f32 (the bf16 file rounds the f32 tensors), so a rerun reproduces the files byte for byte.
"""

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from make_fixtures import redraw_, save  # noqa: E402

FILES = ROOT / "single_file"
OUT = ROOT / "reference" / "single_file"
MODEL = "wan21-tiny-a"
MODEL_22 = "wan22-ti2v-tiny-a"
SEED = 4242
LATENTS = (1, 16, 2, 4, 6)

# diffusers' parts of a residual block -> the official `ResidualBlock`'s (`residual` is
# Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d)); `.weight` / `.bias` follow the
# convolutions, `.gamma` is the norms' parameter
RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def residual(part):
    """A resnet's part (`conv1.weight`, `norm1.gamma`) by its official name."""
    if part in RESIDUAL:
        return RESIDUAL[part]
    module, _, tail = part.rpartition(".")
    assert tail in ("weight", "bias") and module in RESIDUAL, part
    return f"{RESIDUAL[module]}.{tail}"


def to_official(name, num_res_blocks, wan22=False):
    """diffusers' name of a Wan VAE tensor -> the official one.

    Wan 2.1: the official encoder's `downsamples` is diffusers' flat `down_blocks` (same indices); the official
    decoder's `upsamples` is flat too, each stage's `num_res_blocks + 1` residual blocks then its upsampler, so
    diffusers' `up_blocks.S.resnets.R` is `upsamples.{S*(num_res_blocks+2) + R}` and `up_blocks.S.upsamplers.0` is
    `upsamples.{S*(num_res_blocks+2) + num_res_blocks+1}`.
    Wan 2.2: down and up blocks are nested, `downsamples.S.downsamples.R` / `upsamples.S.upsamples.R`, the resampler
    last (index `num_res_blocks` in the encoder, `num_res_blocks + 1` in the decoder).
    """
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    p = name.split(".")
    if p[0] in top:
        return ".".join([top[p[0]], *p[1:]])
    side, rest = p[0], p[1:]
    assert side in ("encoder", "decoder"), name
    head = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
    if rest[0] in head:
        return ".".join([side, head[rest[0]], *rest[1:]])
    if rest[:2] == ["mid_block", "resnets"]:
        return f"{side}.middle.{2 * int(rest[2])}.{residual('.'.join(rest[3:]))}"
    if rest[:3] == ["mid_block", "attentions", "0"]:
        return ".".join([side, "middle", "1", *rest[3:]])
    blocks, inner, resampler = {
        "encoder": ("down_blocks", "downsamples", "downsampler"),
        "decoder": ("up_blocks", "upsamples", "upsampler"),
    }[side]
    assert rest[0] == blocks, name
    stage, kind = int(rest[1]), rest[2] if len(rest) > 2 else None
    per_stage = num_res_blocks + (1 if side == "encoder" else 2)  # resnets + the resampler
    if wan22:
        if kind == "resnets":
            return f"{side}.{inner}.{stage}.{inner}.{rest[3]}.{residual('.'.join(rest[4:]))}"
        assert kind == resampler, name
        return ".".join([side, inner, str(stage), inner, str(per_stage - 1), *rest[3:]])
    if side == "encoder":  # flat already: a resnet's parts, or a resampler's (`resample.1`, `time_conv`) unchanged
        tail = ".".join(rest[2:])
        resnet = tail in RESIDUAL or tail.rpartition(".")[0] in RESIDUAL
        return f"encoder.downsamples.{stage}.{residual(tail) if resnet else tail}"
    if kind == "resnets":
        return f"decoder.upsamples.{stage * per_stage + int(rest[3])}.{residual('.'.join(rest[4:]))}"
    assert rest[2:4] == ["upsamplers", "0"], name
    return ".".join(["decoder", "upsamples", str(stage * per_stage + per_stage - 1), *rest[4:]])


def official_of(sd, num_res_blocks, wan22=False):
    out = {to_official(k, num_res_blocks, wan22): v.contiguous() for k, v in sd.items()}
    assert len(out) == len(sd), "two diffusers names gave one official name"
    return out


def equal_dicts(got, want, what):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:8])
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (what, k)


def misses(converted, want):
    """What diffusers' converter got wrong: keys it made that the model lacks, keys the model has that it missed."""
    return {"unexpected": sorted(set(converted) - set(want)), "missing": sorted(set(want) - set(converted))}


def decode(vae, latents):
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


def from_single_file(path, config_dir):
    vae = AutoencoderKLWan.from_single_file(str(path), config=str(config_dir), torch_dtype=torch.float32)
    return vae.eval()


def fails(path, config_dir):
    """from_single_file on a file it cannot load: the error's type and text."""
    try:
        from_single_file(path, config_dir)
    except Exception as e:  # noqa: BLE001 - recorded, whatever it is
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    raise AssertionError(f"diffusers loaded {path.name}; update FIXTURES.md and the Rust loader's notes")


def import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_official_21(code, config, files, latents, want):
    """The Wan repository's own WanVAE_ has exactly the files' keys and shapes, and decodes as diffusers does."""
    wan = import_file(code, "wan21_vae")
    out = {}
    for path, num_res_blocks, reference in files:
        model = wan.WanVAE_(
            dim=config["base_dim"],
            z_dim=config["z_dim"],
            dim_mult=config["dim_mult"],
            num_res_blocks=num_res_blocks,
            attn_scales=[],
            temperal_downsample=config["temperal_downsample"],
            dropout=0.0,
        ).eval()
        tensors = load_file(str(path))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in tensors.items()}, path.name
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        z = config["z_dim"]
        with torch.no_grad():  # scale (mean 0, 1/std 1): the latents are already de-normalized
            decoded = model.decode(latents, [torch.zeros(z), torch.ones(z)]).clamp(-1, 1)
        if reference is not None:
            out[path.name] = float((decoded - want[reference]).abs().max())
    return out


def check_official_22(code, config, official):
    """The Wan2.2 repository's WanVAE_ (vae2_2.py) has exactly these official keys and shapes."""
    wan = import_file(code, "wan22_vae")
    model = wan.WanVAE_(
        dim=config["base_dim"],
        dec_dim=config["decoder_base_dim"],
        z_dim=config["z_dim"],
        dim_mult=config["dim_mult"],
        num_res_blocks=config["num_res_blocks"],
        attn_scales=[],
        temperal_downsample=config["temperal_downsample"],
        dropout=0.0,
    )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in official.items()}, sorted(set(shapes) ^ set(official))[:8]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wan21-vae", type=Path, help="the Wan2.1 repository's wan/modules/vae.py (optional check)")
    parser.add_argument("--wan22-vae", type=Path, help="the Wan2.2 repository's wan/modules/vae2_2.py (optional)")
    parser.add_argument("--keys", action="store_true", help="also print the official key lists")
    args = parser.parse_args()
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_grad_enabled(False)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    FILES.mkdir(parents=True, exist_ok=True)
    summary = {}

    # wan21-tiny-a's VAE: 1 residual block per stage
    folder = ROOT / MODEL / "vae"
    config = json.loads((folder / "config.json").read_text())
    folder_sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    official = official_of(folder_sd, config["num_res_blocks"])
    plain, bf16 = FILES / f"{MODEL}-vae.safetensors", FILES / f"{MODEL}-vae-bf16.safetensors"
    save_file(official, str(plain))
    save_file({k: v.to(torch.bfloat16) for k, v in official.items()}, str(bf16))
    converted = convert_wan_vae_to_diffusers(dict(official))
    wrong = misses(converted, folder_sd)
    assert wrong["unexpected"] and wrong["missing"], "diffusers' converter now maps 1 residual block per stage"
    assert all(k.startswith("decoder.up") for k in wrong["unexpected"] + wrong["missing"]), wrong
    summary[MODEL] = {
        "files": [plain.name, bf16.name],
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "official_keys": sorted(official),
        "diffusers_converter_wrong": wrong,
        "diffusers_from_single_file": fails(plain, folder),
    }

    gen = torch.Generator().manual_seed(SEED)
    latents = torch.randn(LATENTS, generator=gen)
    folder_vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    tensors = {"latents": latents, "decoded": decode(folder_vae, latents)}

    # the same config with 2 residual blocks per stage (the released value), drawn here
    config2 = {**config, "num_res_blocks": 2}
    res2 = AutoencoderKLWan(**{k: v for k, v in config2.items() if not k.startswith("_")}).eval()
    redraw_(res2, gen)
    res2_sd = {k: v.contiguous() for k, v in res2.state_dict().items()}
    official2 = official_of(res2_sd, 2)
    res2_file = FILES / f"{MODEL}-vae-res2.safetensors"
    save_file(official2, str(res2_file))
    equal_dicts(convert_wan_vae_to_diffusers(dict(official2)), res2_sd, "diffusers' converter (res2)")
    prefixes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(res2.config, indent=1))
        loaded = from_single_file(res2_file, tmp)
        equal_dicts(loaded.state_dict(), res2_sd, "from_single_file (res2)")
        tensors["decoded_res2"] = decode(loaded, latents)
        assert torch.equal(tensors["decoded_res2"], decode(res2, latents))
        for prefix in ("first_stage_model.", "vae."):
            prefixed = tmp / "prefixed.safetensors"
            save_file({prefix + k: v for k, v in official2.items()}, str(prefixed))
            unchanged = convert_wan_vae_to_diffusers(load_file(str(prefixed)))
            assert sorted(unchanged) == sorted(prefix + k for k in official2), prefix
            prefixes[prefix] = fails(prefixed, tmp)
    summary["res2"] = {
        "file": res2_file.name,
        "num_res_blocks": 2,
        "official_keys": sorted(official2),
        "diffusers_converter": "exact",
        "diffusers_from_single_file_prefixed": prefixes,
    }

    # Wan 2.2 (TI2V 5B's VAE): nested down/up blocks, which diffusers' single-file converter does not know
    folder22 = ROOT / MODEL_22 / "vae"
    config22 = json.loads((folder22 / "config.json").read_text())
    sd22 = load_file(str(folder22 / "diffusion_pytorch_model.safetensors"))
    official22 = official_of(sd22, config22["num_res_blocks"], wan22=True)
    converted22 = convert_wan_vae_to_diffusers(dict(official22))
    wrong22 = misses(converted22, sd22)
    assert wrong22["unexpected"] and wrong22["missing"], "diffusers' converter now maps Wan 2.2's VAE"
    with tempfile.TemporaryDirectory() as tmp:
        path22 = Path(tmp) / "wan22.safetensors"
        save_file(official22, str(path22))
        fails22 = fails(path22, folder22)
    summary[MODEL_22] = {
        "written": False,
        "official_keys": sorted(official22),
        "diffusers_converter_kept": len(converted22),
        "official_tensors": len(official22),
        "diffusers_converter_wrong": {
            k: v[:12] + ([f"... {len(v) - 12} more"] if len(v) > 12 else []) for k, v in wrong22.items()
        },
        "diffusers_from_single_file": fails22,
    }

    checks = {}
    if args.wan21_vae:
        files = [(plain, 1, "decoded"), (bf16, 1, None), (res2_file, 2, "decoded_res2")]
        checks["official_code_decode_max_abs_diff"] = check_official_21(args.wan21_vae, config, files, latents, tensors)
    if args.wan22_vae:
        check_official_22(args.wan22_vae, config22, official22)
        checks["official_code_wan22_keys"] = "equal"
    summary["checks"] = checks
    save(OUT / "vae.safetensors", tensors)
    # the summary is for FIXTURES.md (the key lists are long: printed with --keys)
    for part in summary.values():
        if not args.keys and isinstance(part, dict):
            part.pop("official_keys", None)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
