//! Named trade-offs of quality against speed: each sets the denoising steps, the size and the step cache
//! of a request.
//!
//! | preset | steps | width × height | step cache |
//! | --- | --- | --- | --- |
//! | `quality` | 50 | 832 × 480 | off |
//! | `balanced` | 30 | 832 × 480 | 0.05 |
//! | `draft` | 20 | 416 × 240 | 0.10 |
//! | `turbo` | 4, no guidance | unchanged | off |
//!
//! `quality` is Wan 2.1's own pipeline defaults. `draft` halves both sides of Wan 2.1's 832 × 480, which
//! stays a multiple of 16 (8 pixels per latent cell × the transformer's 2 × 2 patches). The step cache
//! thresholds are relative L1 changes of the first transformer block's residual (see
//! [`GenerateRequest::step_cache`]): 0.05 is diffusers' `FirstBlockCacheConfig` default, 0.10 reuses more
//! steps at a visible cost in fine detail.
//!
//! `turbo` is for step- and guidance-distilled weights (a distilled model, or a distill LoRA such as lightx2v's
//! or Wan 2.2 Lightning's): their recipe from `models/distilled.json`, 4 steps of flow-match Euler over explicit
//! sigmas at guidance 1, which skips the unconditional pass; a model with a recipe of its own (FastWan's 3 DMD
//! steps) runs that ([`crate::Pipeline::distilled_request`]). It marks the request as relying on distillation
//! ([`GenerateRequest::distilled`]), so a model without it is refused rather than run into a blurred video.
//!
//! A preset is a starting point, not a mode: callers start from [`GenerateRequest::default`], apply the
//! preset, then set the fields the user gave explicitly, so an explicit value always wins. The number of
//! frames, guidance and everything else keep their values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::request::GenerateRequest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A quick look: half size, 20 steps, a strong step cache.
    Draft,
    /// Full size, 30 steps, a mild step cache.
    Balanced,
    /// Full size, 50 steps, every step computed.
    Quality,
    /// A distilled model's (or distill LoRA's) few steps without guidance.
    Turbo,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Draft, Preset::Balanced, Preset::Quality, Preset::Turbo];

    /// Sets `steps`, `height`, `width` and `step_cache` of `request` to this preset's values (the table in
    /// the module documentation).
    pub fn apply(self, request: &mut GenerateRequest) {
        let (steps, width, height, step_cache) = match self {
            Preset::Draft => (20, 416, 240, Some(0.10)),
            Preset::Balanced => (30, 832, 480, Some(0.05)),
            Preset::Quality => (50, 832, 480, None),
            Preset::Turbo => {
                // The default recipe; a model with its own (FastWan's DMD) runs that instead
                // (`Pipeline::distilled_request`).
                crate::registry::distill_recipes()[0].apply(request);
                request.step_cache = None;
                request.distilled = true;
                return;
            }
        };
        request.steps = steps;
        request.width = width;
        request.height = height;
        request.step_cache = step_cache;
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Draft => "draft",
            Preset::Balanced => "balanced",
            Preset::Quality => "quality",
            Preset::Turbo => "turbo",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset {s:?}: expected one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Schedule;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for preset in Preset::ALL {
            assert_eq!(preset.to_string().parse::<Preset>(), Ok(preset));
            let json = serde_json::to_string(&preset).unwrap();
            assert_eq!(json, format!("\"{preset}\""));
            assert_eq!(serde_json::from_str::<Preset>(&json).unwrap(), preset);
        }
        let err = "fast".parse::<Preset>().unwrap_err();
        assert!(err.contains("\"fast\"") && err.contains("draft, balanced, quality, turbo"), "{err}");
    }

    #[test]
    fn quality_is_the_pipeline_default_and_the_others_are_cheaper() {
        let default = GenerateRequest::default();
        let mut quality = GenerateRequest::default();
        Preset::Quality.apply(&mut quality);
        assert_eq!(
            (quality.steps, quality.width, quality.height, quality.step_cache),
            (default.steps, default.width, default.height, default.step_cache)
        );

        let mut balanced = GenerateRequest { num_frames: 49, ..Default::default() };
        Preset::Balanced.apply(&mut balanced);
        assert_eq!((balanced.steps, balanced.width, balanced.height, balanced.step_cache), (30, 832, 480, Some(0.05)));
        assert_eq!(balanced.num_frames, 49, "a preset leaves the frame count alone");

        let mut draft = GenerateRequest::default();
        Preset::Draft.apply(&mut draft);
        assert_eq!((draft.steps, draft.width, draft.height, draft.step_cache), (20, 416, 240, Some(0.10)));
        assert!(draft.width % 16 == 0 && draft.height % 16 == 0);

        let mut turbo = GenerateRequest { width: 1280, height: 720, ..Default::default() };
        Preset::Turbo.apply(&mut turbo);
        assert_eq!((turbo.steps, turbo.guidance_scale, turbo.shift, turbo.distilled), (4, 1.0, Some(5.0), true));
        assert_eq!(turbo.schedule, Some(Schedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25])));
        assert_eq!((turbo.width, turbo.height), (1280, 720), "turbo keeps the size");
    }
}
