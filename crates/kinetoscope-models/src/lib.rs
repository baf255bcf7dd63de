//! The networks Kinetoscope runs, written against candle and loaded by the checkpoints' own key names:
//! the umT5 text encoder, the CLIP vision encoder (Wan 2.1 image-to-video's image conditioning), the Wan
//! spacetime transformer (DiT) and the Wan causal 3D VAE; and LoRA adapters ([`lora`]), merged into a network's
//! weights as they load or applied at run time by its linear layers ([`layers::Linear`]).
//!
//! Each model takes a `Config` deserialized from its `config.json` and a `VarBuilder` rooted at the
//! component's weights; nothing here knows about folders, schedulers or the diffusion loop.

pub mod checkpoint;
pub mod clip;
pub mod compact;
pub mod layers;
pub mod lora;
pub mod umt5;
pub mod wan;
