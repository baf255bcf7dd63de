//! Wan 2.1 (<https://github.com/Wan-Video/Wan2.1>): the spacetime transformer and the causal 3D VAE,
//! in diffusers' layout and key names; the official repository's names for the transformer's parts
//! ([`original_names`]), read in its single-file checkpoints ([`single_file`]) and LoRA files ([`lora`]).

pub mod lora;
pub mod original_names;
pub mod single_file;
pub mod transformer;
pub mod vae;
