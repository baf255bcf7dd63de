"""Tiny Wan transformers as single-file checkpoints in the official Wan layout, and diffusers' forwards on them.

Run from anywhere with the environment pinned in requirements-image.txt (diffusers 0.42.1), after make_fixtures.py and
make_image_fixtures.py (it reads `wan21-tiny-a/transformer`, `wan21-i2v-tiny/transformer`,
`wan21-flf2v-tiny/transformer` and their references); writes next to this file:

  single_file/wan21-tiny-a.safetensors              official names (`blocks.0.self_attn.q.weight`, `head.modulation`,
                                                    ...), f32, no prefix: the Wan repository's own layout
  single_file/wan21-tiny-a-comfyui-bf16.safetensors the same names behind `model.diffusion_model.`, bf16, as ComfyUI
                                                    saves a checkpoint
  single_file/wan21-i2v-tiny.safetensors            the image-to-video transformer (`cross_attn.k_img`,
                                                    `img_emb.proj.*`)
  single_file/wan21-i2v-tiny-comfyui-bf16.safetensors
  single_file/wan21-flf2v-tiny.safetensors          first-last-frame (`img_emb.emb_pos`), f32, no prefix; no diffusers
                                                    reference: diffusers 0.42.1's single-file converter does not map
                                                    `img_emb.emb_pos` (see FIXTURES.md)

and `reference/single_file/<model>.safetensors` (see the "Single-file checkpoints" section of FIXTURES.md).

Each file is the diffusers folder's tensors renamed by `to_official` below (diffusers' conversion inverted, written
without it); the script checks that diffusers' own converter (`convert_wan_transformer_to_diffusers`, what
`WanTransformer3DModel.from_single_file` runs) gives the folder's names and tensors back, and that `from_single_file`
with the folder as `config` loads tensors equal to the folder's (bf16-rounded for the bf16 files) before running it.
Everything is CPU and f32, so a rerun reproduces the files byte for byte.
"""

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, infer_diffusers_model_type

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from make_fixtures import save  # noqa: E402

FILES = ROOT / "single_file"
OUT = ROOT / "reference" / "single_file"
PREFIX = "model.diffusion_model."

# (model, also written prefixed in bf16, diffusers loads it)
MODELS = [("wan21-tiny-a", True, True), ("wan21-i2v-tiny", True, True), ("wan21-flf2v-tiny", False, False)]

# diffusers name -> official name, for the parts inside `blocks.N.`; module names take `.weight` / `.bias` after them,
# `scale_shift_table` is a parameter of its own (official `blocks.N.modulation`).
BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers' norm2 (before cross-attention, affine) is the official norm3; the official norm1/norm2 have no
    # parameters
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
# the same outside the blocks
TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}


def rename(name, table):
    """`name` by `table`: an exact entry (a parameter), or an entry followed by `.weight` / `.bias` (a module)."""
    if name in table:
        return table[name]
    module, _, tail = name.rpartition(".")
    assert tail in ("weight", "bias") and module in table, name
    return f"{table[module]}.{tail}"


def to_official(name):
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        return f"blocks.{index}.{rename(rest, BLOCK)}"
    return rename(name, TOP)


def equal_dicts(got, want, what):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (what, k)


def check_diffusers_converter(official, folder_sd, model):
    """diffusers' single-file converter maps the official names back to the folder's (it pops from its input)."""
    converted = convert_wan_transformer_to_diffusers(dict(official))
    prefixed = convert_wan_transformer_to_diffusers({PREFIX + k: v for k, v in official.items()})
    if model == "wan21-flf2v-tiny":
        # diffusers 0.42.1's single-file converter has no entry for the FLF2V position embedding (its conversion
        # script, scripts/convert_wan_to_diffusers.py, maps it to condition_embedder.image_embedder.pos_embed):
        # `img_emb.emb_pos` comes out unrenamed, and from_single_file drops it as an unexpected key.
        pos = "condition_embedder.image_embedder.pos_embed"
        assert torch.equal(converted.pop("img_emb.emb_pos"), folder_sd[pos])
        assert torch.equal(prefixed.pop("img_emb.emb_pos"), folder_sd[pos])
        folder_sd = {k: v for k, v in folder_sd.items() if k != pos}
    equal_dicts(converted, folder_sd, f"{model}: diffusers' converter")
    equal_dicts(prefixed, folder_sd, f"{model}: diffusers' converter, prefixed")


def forward(model, inputs):
    kwargs = dict(
        hidden_states=inputs["hidden_states"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        return_dict=False,
    )
    if "encoder_hidden_states_image" in inputs:
        kwargs["encoder_hidden_states_image"] = inputs["encoder_hidden_states_image"]
    with torch.no_grad():
        return model(**kwargs)[0]


def single_file_model(path, config_dir):
    model = WanTransformer3DModel.from_single_file(str(path), config=str(config_dir), torch_dtype=torch.float32)
    return model.eval()


def check_flf2v_fails(path, config_dir):
    """diffusers 0.42.1 cannot load the FLF2V file: `img_emb.emb_pos` is dropped as unexpected and `pos_embed` stays
    on the meta device, which the final `.to()` refuses."""
    try:
        single_file_model(path, config_dir)
    except NotImplementedError as e:
        assert "meta tensor" in str(e), e
        return f"fails: NotImplementedError: {e}"
    raise AssertionError("diffusers loaded the FLF2V single file; update FIXTURES.md and the Rust loader's notes")


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_grad_enabled(False)
    # from_single_file reports the keys it drops at warning level; make it loud enough to see in the log
    logging.getLogger("diffusers").setLevel(logging.WARNING)
    FILES.mkdir(parents=True, exist_ok=True)
    summary = {}
    for model, with_bf16, diffusers_loads in MODELS:
        folder = ROOT / model / "transformer"
        config = json.loads((folder / "config.json").read_text())
        folder_sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        official = {to_official(k): v.contiguous() for k, v in folder_sd.items()}
        assert len(official) == len(folder_sd), model
        check_diffusers_converter(official, folder_sd, model)

        plain = FILES / f"{model}.safetensors"
        save_file(official, str(plain))
        files = {"plain": plain.name}
        if with_bf16:
            comfy = FILES / f"{model}-comfyui-bf16.safetensors"
            save_file({PREFIX + k: v.to(torch.bfloat16) for k, v in official.items()}, str(comfy))
            files["comfyui_bf16"] = comfy.name
        # diffusers' model-type inference picks a released variant's config by the patch embedding alone; these tiny
        # shapes fit none, which is why every load here passes the folder as `config`
        summary[model] = {
            "files": files,
            "official_keys": sorted(official),
            "diffusers_model_type_guess": infer_diffusers_model_type(load_file(str(plain))),
            "config": {k: v for k, v in config.items() if not k.startswith("_")},
        }
        if not diffusers_loads:
            summary[model]["diffusers_from_single_file"] = check_flf2v_fails(plain, folder)
            continue

        inputs = load_file(str(ROOT / "reference" / model / "transformer.safetensors"))
        reference_out = inputs["output"] if "output" in inputs else inputs["out"]
        from_folder = WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
        folder_out = forward(from_folder, inputs)

        loaded = single_file_model(plain, folder)
        equal_dicts(loaded.state_dict(), from_folder.state_dict(), f"{model}: from_single_file (f32)")
        out = forward(loaded, inputs)
        assert torch.equal(out, folder_out), model
        tensors = {"output": out}
        checks = {"output_vs_committed_reference_max_abs": float((out - reference_out).abs().max())}

        if with_bf16:
            loaded = single_file_model(FILES / files["comfyui_bf16"], folder)
            rounded = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in from_folder.state_dict().items()}
            equal_dicts(loaded.state_dict(), rounded, f"{model}: from_single_file (bf16, prefixed)")
            bf16_out = forward(loaded, inputs)
            tensors["bf16_output"] = bf16_out
            checks["bf16_output_vs_output_max_abs"] = float((bf16_out - out).abs().max())
            checks["output_max_abs"] = float(out.abs().max())
        save(OUT / f"{model}.safetensors", tensors)
        summary[model]["checks"] = checks
        print(model, checks)

    (OUT / "ref.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
