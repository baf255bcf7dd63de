//! Prompt → text states, as diffusers' `WanPipeline.encode_prompt` does it: clean the prompt, tokenize
//! with `</s>` appended and truncation to `max_sequence_length`, encode with umT5, and zero-pad the states
//! to `max_sequence_length` rows (the transformer's cross-attention attends over all of them, unmasked).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kinetoscope_models::umt5::{self, UMT5Encoder};
use serde::Serialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result, StageContext};
use crate::model_dir::ModelDir;

/// Where the text encoder's weights live and where it runs. umT5-XXL is 5.7B parameters (11 GB in bf16),
/// more than Wan 2.1 1.3B's transformer and VAE together, and it runs once per prompt, so on a GPU it need not
/// stay there through the denoising loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextEncoderPlacement {
    /// Loaded on the pipeline's device and kept there: the fastest, and its weights take device memory for
    /// good.
    Resident,
    /// The weights stay in their memory-mapped files; each request loads them onto the device, encodes its
    /// prompts, and frees them before denoising starts: a second or so per request from the page cache,
    /// against minutes of denoising, for the encoder's memory back during them (on the CPU too).
    #[default]
    Offload,
    /// Runs on the CPU in f32 (the reference's precision; 4 bytes a parameter of host memory) and hands the
    /// states to the device: for GPUs too small to hold the encoder at all.
    Cpu,
}

impl std::str::FromStr for TextEncoderPlacement {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "resident" => Ok(TextEncoderPlacement::Resident),
            "offload" => Ok(TextEncoderPlacement::Offload),
            "cpu" => Ok(TextEncoderPlacement::Cpu),
            _ => Err(format!("{text:?}: expected resident, offload or cpu")),
        }
    }
}

pub struct TextEncoder {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    weights: Weights,
    config: umt5::Config,
    /// Where the encoder runs.
    device: Device,
    /// Where its states go: the pipeline's device.
    output_device: Device,
    placement: TextEncoderPlacement,
}

enum Weights {
    /// Built once, kept.
    Loaded(UMT5Encoder),
    /// Built from the mapped files for each request's prompts, dropped after them.
    Mapped(VarBuilder<'static>),
}

impl TextEncoder {
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device, placement: TextEncoderPlacement) -> Result<Self> {
        Self::load_from(dir, None, dtype, device, placement)
    }

    /// [`Self::load`] with the weights from `file` where one is given (see [`umt5::file_weights`]).
    pub fn load_from(
        dir: &ModelDir,
        file: Option<&std::path::Path>,
        dtype: DType,
        device: &Device,
        placement: TextEncoderPlacement,
    ) -> Result<Self> {
        let tokenizer_path = dir.component("tokenizer").join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::MissingFile { path: tokenizer_path, what: "the tokenizer (tokenizer.json)".into() });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;
        let cfg: umt5::Config = dir.config("text_encoder", "config.json")?;
        let (run_device, run_dtype) = match placement {
            TextEncoderPlacement::Cpu => (Device::Cpu, DType::F32),
            _ => (device.clone(), dtype),
        };
        let vb = match file {
            None => dir.var_builder("text_encoder", run_dtype, &run_device)?,
            Some(file) => umt5::file_weights(file, run_dtype, &run_device).map_err(|e| Error::Weights {
                component: "text_encoder",
                path: file.to_path_buf(),
                reason: e.to_string(),
            })?,
        };
        // Built now in every placement, so that weights that don't fit the config fail the load, not the
        // first request.
        let encoder = UMT5Encoder::new(&cfg, vb.clone()).map_err(|e| Error::Weights {
            component: "text_encoder",
            path: file.map_or_else(|| dir.component("text_encoder"), std::path::Path::to_path_buf),
            reason: e.to_string(),
        })?;
        let weights = if placement == TextEncoderPlacement::Offload {
            drop(encoder);
            Weights::Mapped(vb)
        } else {
            Weights::Loaded(encoder)
        };
        // A tokenizer whose ids run past the encoder's embedding table would fail deep inside the first
        // request; say so at load time instead.
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > cfg.vocab_size {
            return Err(Error::Tokenizer {
                path: tokenizer_path,
                reason: format!(
                    "has {vocab} tokens but the text encoder's vocab_size is {}: tokenizer and encoder don't match",
                    cfg.vocab_size
                ),
            });
        }
        let output_device = device.clone();
        Ok(TextEncoder {
            tokenizer,
            tokenizer_path,
            weights,
            config: cfg,
            device: run_device,
            output_device,
            placement,
        })
    }

    /// Width of the text states.
    pub fn dim(&self) -> usize {
        self.config.d_model
    }

    /// Where the encoder lives, as loaded.
    pub fn placement(&self) -> TextEncoderPlacement {
        self.placement
    }

    /// The encoder's `config.json`.
    pub fn config(&self) -> &umt5::Config {
        &self.config
    }

    /// Token ids of the cleaned prompt, `</s>` included, truncated to `max_len` as the Hugging Face
    /// tokenizer truncates (the end-of-sequence token kept).
    pub fn token_ids(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
        let mut tokenizer = self.tokenizer.clone();
        let truncation = TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            direction: TruncationDirection::Right,
            stride: 0,
        };
        let failed =
            |e: tokenizers::Error| Error::Tokenizer { path: self.tokenizer_path.clone(), reason: e.to_string() };
        tokenizer.with_padding(None).with_truncation(Some(truncation)).map_err(failed)?;
        let encoding = tokenizer.encode(clean_prompt(prompt), true).map_err(failed)?;
        let ids = encoding.get_ids().to_vec();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                reason: format!(
                    "produced token id {bad} outside the text encoder's vocab_size {}",
                    self.config.vocab_size
                ),
            });
        }
        Ok(ids)
    }

    /// Text states `[1, max_len, d_model]` for each prompt, on the pipeline's device: the encoder's output for
    /// the prompt's tokens, zero past them. With the weights offloaded they are loaded once for all the prompts
    /// and freed before this returns.
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> Result<Vec<Tensor>> {
        const STAGE: &str = "text encoding";
        let built;
        let encoder = match &self.weights {
            Weights::Loaded(encoder) => encoder,
            Weights::Mapped(vb) => {
                built = UMT5Encoder::new(&self.config, vb.clone()).stage(STAGE)?;
                &built
            }
        };
        prompts
            .iter()
            .map(|prompt| {
                let ids = self.token_ids(prompt, max_len)?;
                let n = ids.len();
                let ids = Tensor::from_vec(ids, (1, n), &self.device).stage(STAGE)?;
                // The reference pads to max_len and masks the padding out of attention; since every other op is
                // per token and the position bias is relative, encoding the n real tokens alone gives the same
                // rows.
                let states = encoder.forward(&ids).stage(STAGE)?;
                states.pad_with_zeros(1, 0, max_len - n).and_then(|s| s.to_device(&self.output_device)).stage(STAGE)
            })
            .collect()
    }
}

/// diffusers' `prompt_clean`: ftfy's `fix_text` (the parts a typed prompt meets: curly quotes, ligatures,
/// full-width letters, terminal escapes, line breaks, NFC; not its mojibake repair), HTML entities
/// unescaped twice, whitespace collapsed.
pub fn clean_prompt(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_escape::decode_html_entities(&html_escape::decode_html_entities(&fixed)).into_owned();
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Terminal colour codes, ESC [ params letter.
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                while chars.next_if(|c| c.is_ascii_digit() || *c == ';').is_some() {}
                chars.next_if(|c| c.is_ascii_alphabetic());
            }
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            // Latin ligatures and full-width forms become their plain letters.
            '\u{132}'
            | '\u{133}'
            | '\u{149}'
            | '\u{1c4}'..='\u{1cc}'
            | '\u{1f1}'..='\u{1f3}'
            | '\u{fb00}'..='\u{fb06}'
            | '\u{3000}'
            | '\u{ff01}'..='\u{ff5e}' => out.extend(std::iter::once(c).nfkc().map(uncurl)),
            c => out.push(uncurl(c)),
        }
    }
    out.nfc().collect()
}

fn uncurl(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings are what diffusers' `prompt_clean` (ftfy 6) returns for the same inputs.
    #[test]
    fn cleans_like_diffusers() {
        assert_eq!(
            clean_prompt("it\u{2019}s \u{201c}quoted\u{201d} \u{fb01}ne \u{ff21}\u{ff22}\u{ff23}\u{3000}x"),
            "it's \"quoted\" fine ABC x"
        );
        assert_eq!(clean_prompt("caf\u{65}\u{301} \u{1b}[31mred\u{1b}[0m"), "caf\u{e9} red");
        assert_eq!(clean_prompt("  tab\there\r\nnew  "), "tab here new");
        assert_eq!(clean_prompt("&amp;amp; &lt;b&gt; &quot;x&quot;"), "& <b> \"x\"");
        assert_eq!(clean_prompt("\u{132} \u{149} \u{1c6} \u{fb06}"), "IJ 'n d\u{17e} st");
    }
}
