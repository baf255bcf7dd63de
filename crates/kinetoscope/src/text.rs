//! Prompt → text states, as diffusers' `WanPipeline.encode_prompt` does it: clean the prompt, tokenize
//! with `</s>` appended and truncation to `max_sequence_length`, encode with umT5, and zero-pad the states
//! to `max_sequence_length` rows (the transformer's cross-attention attends over all of them, unmasked).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kinetoscope_models::umt5::{self, UMT5Encoder};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result, StageContext};
use crate::model_dir::ModelDir;

pub struct TextEncoder {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    encoder: UMT5Encoder,
    config: umt5::Config,
    device: Device,
}

impl TextEncoder {
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let tokenizer_path = dir.component("tokenizer").join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::MissingFile { path: tokenizer_path, what: "the tokenizer (tokenizer.json)".into() });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;
        let cfg: umt5::Config = dir.config("text_encoder", "config.json")?;
        let vb = dir.var_builder("text_encoder", dtype, device)?;
        let encoder = UMT5Encoder::new(&cfg, vb).map_err(|e| Error::Weights {
            component: "text_encoder",
            path: dir.component("text_encoder"),
            reason: e.to_string(),
        })?;
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
        Ok(TextEncoder { tokenizer, tokenizer_path, encoder, config: cfg, device: device.clone() })
    }

    /// Width of the text states.
    pub fn dim(&self) -> usize {
        self.config.d_model
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

    /// Text states `[1, max_len, d_model]`: the encoder's output for the prompt's tokens, zero past them.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Tensor> {
        let ids = self.token_ids(prompt, max_len)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device).stage("text encoding")?;
        // The reference pads to max_len and masks the padding out of attention; since every other op is
        // per token and the position bias is relative, encoding the n real tokens alone gives the same rows.
        let states = self.encoder.forward(&ids).stage("text encoding")?;
        states.pad_with_zeros(1, 0, max_len - n).stage("text encoding")
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
