//! The CLIP vision encoder that Wan 2.1 image-to-video (I2V-14B) and first-last-frame-to-video (FLF2V-14B)
//! condition on: a ViT (ViT-H/14 in the released checkpoints) whose penultimate layer's states become the
//! transformer's image tokens.
//!
//! Paper: "Learning Transferable Visual Models From Natural Language Supervision", <https://arxiv.org/abs/2103.00020>.
//! Reference: transformers' `CLIPVisionModel`
//! (<https://github.com/huggingface/transformers/blob/v4.57.1/src/transformers/models/clip/modeling_clip.py>),
//! which diffusers' `WanImageToVideoPipeline` loads from the checkpoint's `image_encoder/` folder and reads as
//! `hidden_states[-2]`; its inputs are made by `CLIPImageProcessor` as `image_processor/` configures it
//! ([`ProcessorConfig`]).
//!
//! An image `[B, 3, S, S]` is cut into `patch_size` patches, one token each, behind a learned class token; a
//! learned position embedding is added, then a LayerNorm (`pre_layrnorm`, spelled so in the checkpoint) and
//! pre-norm transformer layers (self-attention, then an MLP).

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Deserializer};

use crate::layers::attention;

/// `image_encoder/config.json` as `CLIPVisionModel.save_pretrained` writes it (the vision config's fields at top
/// level), with transformers' `CLIPVisionConfig` defaults for absent fields. Other fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// Side of the square input image, in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    /// The MLP's activation: `gelu` (erf), `quick_gelu`, `gelu_new` or `gelu_pytorch_tanh`; others are
    /// rejected when the model is built.
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl Config {
    /// Patches along each side of the image.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the class token and one per patch, `1 + (image_size / patch_size)²`.
    pub fn num_positions(&self) -> usize {
        1 + self.grid() * self.grid()
    }
}

/// The MLP activations transformers' `ACT2FN` names that CLIP checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// `gelu`: the exact GELU, with erf.
    Gelu,
    /// `quick_gelu`: `x · σ(1.702 x)`.
    QuickGelu,
    /// `gelu_new` and `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

impl Activation {
    fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "quick_gelu" => Self::QuickGelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            other => bail!(
                "CLIP vision config: `hidden_act` \"{other}\" is not supported (expected \"gelu\", \"quick_gelu\", \
                 \"gelu_new\" or \"gelu_pytorch_tanh\")"
            ),
        })
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// Class token, patch embedding (a bias-free Conv2d with kernel = stride, computed as a matmul) and the
/// learned position embedding.
struct Embeddings {
    /// `[hidden]`.
    class_embedding: Tensor,
    /// The Conv2d's `[hidden, C, p, p]` kernel as `[hidden, C·p·p]`.
    patch_embedding: Linear,
    /// `[1, num_positions, hidden]`.
    position_embedding: Tensor,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
}

impl Embeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (hidden, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let kernel = vb.pp("patch_embedding").get((hidden, c, p, p), "weight")?;
        let position_embedding =
            vb.pp("position_embedding").get((cfg.num_positions(), hidden), "weight")?.unsqueeze(0)?;
        Ok(Self {
            class_embedding: vb.get(hidden, "class_embedding")?,
            patch_embedding: Linear::new(kernel.reshape((hidden, c * p * p))?, None),
            position_embedding,
            num_channels: c,
            image_size: cfg.image_size,
            patch_size: p,
        })
    }

    /// `[B, C, S, S]` → `[B, num_positions, hidden]`, in the weights' dtype.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if c != self.num_channels || h != self.image_size || w != self.image_size {
            bail!(
                "CLIP vision model: expected pixel values of shape [B, {}, {s}, {s}], got {:?}",
                self.num_channels,
                pixel_values.dims(),
                s = self.image_size
            )
        }
        let (p, g) = (self.patch_size, self.image_size / self.patch_size);
        let hidden = self.class_embedding.dim(0)?;
        // A strided Conv2d drops the pixels past the last whole patch.
        let patches = pixel_values
            .to_dtype(self.class_embedding.dtype())?
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, c * p * p))?;
        let patches = self.patch_embedding.forward(&patches)?;
        let class = self.class_embedding.reshape((1, 1, hidden))?.broadcast_as((b, 1, hidden))?;
        Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// Multi-head self-attention with biased projections, scaled by `head_dim^-½`.
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `[B, L, dim]` → `[B, heads, L, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, ()))?.transpose(1, 2)
    }
}

impl Module for SelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.split_heads(&self.q_proj.forward(x)?)?;
        let k = self.split_heads(&self.k_proj.forward(x)?)?;
        let v = self.split_heads(&self.v_proj.forward(x)?)?;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let out = attention(&q, &k, &v, None, scale)?;
        let (b, _, l, _) = out.dims4()?;
        self.out_proj.forward(&out.transpose(1, 2)?.reshape((b, l, ()))?)
    }
}

/// `x + attn(norm1(x))`, then `x + fc2(act(fc1(norm2(x))))`.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &Config, activation: Activation, vb: VarBuilder) -> Result<Self> {
        let (dim, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: layer_norm(dim, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(dim, eps, vb.pp("layer_norm2"))?,
            fc1: linear(dim, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, dim, vb.pp("mlp").pp("fc2"))?,
            activation,
        })
    }
}

impl Module for EncoderLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let h = self.activation.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// The CLIP vision transformer, as far as its penultimate layer: the part Wan's image conditioning reads.
///
/// Only the weights that part uses are loaded: the last encoder layer and `post_layernorm` are neither
/// required nor read, so a checkpoint with or without them loads the same.
pub struct ClipVisionModel {
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    /// The first `num_hidden_layers − 1` encoder layers.
    layers: Vec<EncoderLayer>,
}

impl ClipVisionModel {
    /// Loads the weights under `vb`, rooted where the checkpoint's keys begin; they compute in `vb`'s dtype.
    ///
    /// Both of transformers' layouts load: `vision_model.embeddings.…`, `vision_model.pre_layrnorm.…`,
    /// `vision_model.encoder.layers.N.…` as transformers 4 saves a `CLIPVisionModel` (the released Wan
    /// checkpoints), and the same keys without `vision_model.` as transformers 5 does.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let activation = Activation::from_name(&cfg.hidden_act)?;
        if cfg.num_hidden_layers == 0 {
            bail!("CLIP vision config: `num_hidden_layers` is 0, so there is no penultimate hidden state")
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "CLIP vision config: `hidden_size` {} is not a multiple of `num_attention_heads` {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        if cfg.patch_size == 0 || cfg.patch_size > cfg.image_size {
            bail!("CLIP vision config: `patch_size` {} does not fit `image_size` {}", cfg.patch_size, cfg.image_size)
        }
        const PREFIX: &str = "vision_model";
        let vb = if vb.contains_tensor(&format!("{PREFIX}.pre_layrnorm.weight")) { vb.pp(PREFIX) } else { vb };
        let layers = (0..cfg.num_hidden_layers - 1)
            .map(|i| EncoderLayer::new(cfg, activation, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            pre_layrnorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
        })
    }

    /// Pixel values `[B, num_channels, image_size, image_size]` (as [`ProcessorConfig`] prepares them) → the
    /// states after the penultimate encoder layer, `[B, 1 + (image_size / patch_size)², hidden_size]` in the
    /// weights' dtype: transformers' `hidden_states[-2]` with `output_hidden_states=True`. The last layer is not
    /// run and `post_layernorm` is not applied.
    pub fn penultimate_hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.pre_layrnorm.forward(&self.embeddings.forward(pixel_values)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}

/// `image_processor/preprocessor_config.json`: how transformers' `CLIPImageProcessor` turns an image into
/// [`ClipVisionModel`]'s pixel values, with its defaults for absent fields. Only the data; the pixel work is the
/// caller's.
///
/// In order, each step when its `do_*` flag is set: convert to RGB; resize (`size`, with PIL filter `resample`);
/// center-crop to `crop_size`; multiply by `rescale_factor` (1/255: bytes to [0, 1]); normalize per channel,
/// `(x − image_mean) / image_std`. The result, channels first, is `pixel_values`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    pub do_resize: bool,
    #[serde(deserialize_with = "deserialize_resize")]
    pub size: Resize,
    /// PIL's resampling filter code: 0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming.
    pub resample: u32,
    pub do_center_crop: bool,
    #[serde(deserialize_with = "deserialize_crop_size")]
    pub crop_size: CropSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Per channel (a single number in the file applies to every channel).
    #[serde(deserialize_with = "deserialize_per_channel")]
    pub image_mean: Vec<f64>,
    #[serde(deserialize_with = "deserialize_per_channel")]
    pub image_std: Vec<f64>,
    pub do_convert_rgb: bool,
}

/// The target of `CLIPImageProcessor`'s resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// `{"shortest_edge": n}` (or a bare `n`): the shorter side becomes `n`, the other keeps the aspect ratio
    /// (rounded down, as transformers' `get_resize_output_image_size` does).
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`: exactly this size.
    Exact { height: usize, width: usize },
}

/// The size of `CLIPImageProcessor`'s center crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct CropSize {
    pub height: usize,
    pub width: usize,
}

/// OpenAI CLIP's normalization constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: Resize::ShortestEdge(224),
            resample: 3,
            do_center_crop: true,
            crop_size: CropSize { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.to_vec(),
            image_std: OPENAI_CLIP_STD.to_vec(),
            do_convert_rgb: true,
        }
    }
}

/// A size as image processors' configs write it: a bare number (older files) or a dictionary.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeField {
    Int(usize),
    Dict { shortest_edge: Option<usize>, height: Option<usize>, width: Option<usize> },
}

/// `size`: a bare number is a shortest edge (transformers' `get_size_dict(default_to_square=False)`).
fn deserialize_resize<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Resize, D::Error> {
    match SizeField::deserialize(deserializer)? {
        SizeField::Int(n) | SizeField::Dict { shortest_edge: Some(n), .. } => Ok(Resize::ShortestEdge(n)),
        SizeField::Dict { height: Some(height), width: Some(width), .. } => Ok(Resize::Exact { height, width }),
        SizeField::Dict { .. } => Err(serde::de::Error::custom(
            "image processor `size` must have \"shortest_edge\" or both \"height\" and \"width\"",
        )),
    }
}

/// `crop_size`: a bare number is a square.
fn deserialize_crop_size<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<CropSize, D::Error> {
    match SizeField::deserialize(deserializer)? {
        SizeField::Int(n) => Ok(CropSize { height: n, width: n }),
        SizeField::Dict { height: Some(height), width: Some(width), .. } => Ok(CropSize { height, width }),
        SizeField::Dict { .. } => {
            Err(serde::de::Error::custom("image processor `crop_size` must have both \"height\" and \"width\""))
        }
    }
}

fn deserialize_per_channel<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum PerChannel {
        One(f64),
        Each(Vec<f64>),
    }
    Ok(match PerChannel::deserialize(deserializer)? {
        PerChannel::One(x) => vec![x; 3],
        PerChannel::Each(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tiny_config() -> Config {
        Config {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            image_size: 12,
            patch_size: 4,
            hidden_act: "gelu".to_string(),
            ..Config::default()
        }
    }

    /// The keys `CLIPVisionModel.save_pretrained` writes, which the model ignores, and transformers' defaults.
    #[test]
    fn config_reads_a_saved_vision_config() {
        let cfg: Config = serde_json::from_str(
            r#"{"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": 1280,
                "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16, "image_size": 224,
                "patch_size": 14, "hidden_act": "gelu", "projection_dim": 1024, "torch_dtype": "float16"}"#,
        )
        .unwrap();
        assert_eq!((cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.layer_norm_eps), (1280, 14, 3, 1e-5));
        assert_eq!(cfg.num_positions(), 257);
        let defaults: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(defaults, Config::default());
        assert_eq!(defaults.hidden_act, "quick_gelu");
    }

    #[test]
    fn unknown_activation_is_rejected_by_name() {
        let cfg = Config { hidden_act: "relu".to_string(), ..tiny_config() };
        let err = ClipVisionModel::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).err().unwrap();
        assert!(err.to_string().contains("\"relu\""), "{err}");
        for name in ["gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh"] {
            assert!(Activation::from_name(name).is_ok(), "{name}");
        }
    }

    /// `quick_gelu` is `x·σ(1.702x)`; the two GELUs differ slightly away from 0.
    #[test]
    fn activations() -> Result<()> {
        let x = Tensor::new(&[-2f32, 0.0, 1.0], &Device::Cpu)?;
        let quick = Activation::QuickGelu.forward(&x)?.to_vec1::<f32>()?;
        let want = [-2.0 / (1.0 + 3.404f32.exp()), 0.0, 1.0 / (1.0 + (-1.702f32).exp())];
        for (g, w) in quick.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{quick:?}");
        }
        let erf = Activation::Gelu.forward(&x)?.to_vec1::<f32>()?;
        assert!((erf[2] - 0.841_344_7).abs() < 1e-6, "{erf:?}");
        Ok(())
    }

    #[test]
    fn penultimate_states_shape_and_input_check() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let cfg = tiny_config();
        let model = ClipVisionModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let out = model.penultimate_hidden_states(&Tensor::randn(0f32, 1.0, (2, 3, 12, 12), &dev)?)?;
        assert_eq!(out.dims(), [2, 1 + 9, 16]);
        // Two layers of three are built: the last one and `post_layernorm` are never loaded.
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().any(|n| n.starts_with("encoder.layers.1.")), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("layers.2.") || n.contains("post_layernorm")), "{names:?}");
        let err = model.penultimate_hidden_states(&Tensor::zeros((1, 3, 12, 16), DType::F32, &dev)?).err().unwrap();
        assert!(err.to_string().contains("[1, 3, 12, 16]"), "{err}");
        Ok(())
    }

    /// transformers 4's layout: every key under `vision_model.`.
    #[test]
    fn prefixed_checkpoints_load() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        varmap.get(16, "vision_model.pre_layrnorm.weight", candle_nn::Init::Const(1.0), DType::F32, &dev)?;
        ClipVisionModel::new(&tiny_config(), VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(names.len() > 1 && names.iter().all(|n| n.starts_with("vision_model.")), "{names:?}");
        Ok(())
    }

    /// With one layer, the penultimate state is the embeddings after `pre_layrnorm`; with all-zero weights, the
    /// LayerNorm's output is its bias, the same for every token.
    #[test]
    fn single_layer_model_returns_the_normed_embeddings() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Config { num_hidden_layers: 1, ..tiny_config() };
        let model = ClipVisionModel::new(&cfg, VarBuilder::zeros(DType::F32, &dev))?;
        let out = model.penultimate_hidden_states(&Tensor::ones((1, 3, 12, 12), DType::F32, &dev)?)?;
        assert_eq!(out.dims(), [1, 10, 16]);
        assert_eq!(out.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let err = ClipVisionModel::new(&Config { num_hidden_layers: 0, ..cfg }, VarBuilder::zeros(DType::F32, &dev));
        assert!(err.err().unwrap().to_string().contains("num_hidden_layers"));
        Ok(())
    }

    #[test]
    fn processor_config_reads_both_size_forms() {
        let wan: ProcessorConfig = serde_json::from_str(
            r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
                "do_normalize": true, "do_rescale": true, "do_resize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}"#,
        )
        .unwrap();
        assert_eq!(wan, ProcessorConfig::default());

        let old: ProcessorConfig =
            serde_json::from_str(r#"{"size": 256, "crop_size": 240, "image_mean": 0.5, "do_resize": false}"#).unwrap();
        assert_eq!(old.size, Resize::ShortestEdge(256));
        assert_eq!(old.crop_size, CropSize { height: 240, width: 240 });
        assert_eq!(old.image_mean, [0.5; 3]);
        assert!(!old.do_resize);

        let exact: ProcessorConfig = serde_json::from_str(r#"{"size": {"height": 320, "width": 200}}"#).unwrap();
        assert_eq!(exact.size, Resize::Exact { height: 320, width: 200 });
        assert!(serde_json::from_str::<ProcessorConfig>(r#"{"size": {"longest_edge": 320}}"#).is_err());
    }
}
