//! Wan 2.1 (<https://github.com/Wan-Video/Wan2.1>): the spacetime transformer and the causal 3D VAE,
//! in diffusers' layout and key names.

pub mod lora;
pub mod transformer;
pub mod vae;
