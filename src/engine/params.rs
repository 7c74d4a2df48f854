//! Per-request generation parameters, as the HTTP layer deserialises them, and
//! their validation against the server's limits.
//!
//! Defaults (documented in one place, here):
//! - text tokens: temperature 0.7, top_p 0.9, no top_k (a little diversity,
//!   the long tail cut off);
//! - image tokens: temperature 1.0, top_k 100, no top_p (VQ codes want the
//!   model's own distribution; top_k removes the rare codes that show up as
//!   speckles in the decoded picture);
//! - `cfg_scale` 1.0 (classifier-free guidance off: it costs a second,
//!   unconditional sequence per image);
//! - `max_tokens` 256, `stop_at_eos` true;
//! - `seed`: a fresh random seed per request when none is given.
//!
//! A modality object given in JSON is merged over that modality's defaults:
//! `"text": {"temperature": 0.2}` keeps text's top_p 0.9; `"top_p": null`
//! (or `"top_k": null`) switches that filter off explicitly.
//!
//! Invariant: a `GenerationParams` that passed [`GenerationParams::validate`]
//! holds only finite numbers inside the bounds below, so the sampler never
//! sees a NaN temperature or a zero top_k.

use std::fmt::Display;

use serde::{Deserialize, Deserializer, Serialize};

use super::modality::ModalityState;

/// Largest accepted temperature (beyond this the distribution is uniform
/// for every practical purpose).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Largest accepted classifier-free guidance scale.
pub const MAX_CFG_SCALE: f32 = 100.0;

/// How to draw the next token of one modality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (None = off).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass is >= `p`
    /// (None or 1.0 = off).
    #[serde(default)]
    pub top_p: Option<f32>,
}

impl SamplingParams {
    pub const fn text_default() -> Self {
        Self {
            temperature: 0.7,
            top_k: None,
            top_p: Some(0.9),
        }
    }

    pub const fn image_default() -> Self {
        Self {
            temperature: 1.0,
            top_k: Some(100),
            top_p: None,
        }
    }

    pub const fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Everything a request says about how to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(
        default = "SamplingParams::text_default",
        deserialize_with = "text_sampling"
    )]
    pub text: SamplingParams,
    #[serde(
        default = "SamplingParams::image_default",
        deserialize_with = "image_sampling"
    )]
    pub image: SamplingParams,
    /// Classifier-free guidance for image tokens: logits = uncond + scale ·
    /// (cond − uncond). 1.0 = off.
    #[serde(default = "default_cfg_scale")]
    pub cfg_scale: f32,
    #[serde(default = "random_seed")]
    pub seed: u64,
    /// Finish the sequence when `<eos>` is sampled.
    #[serde(default = "default_true")]
    pub stop_at_eos: bool,
}

fn default_max_tokens() -> usize {
    256
}
fn default_cfg_scale() -> f32 {
    1.0
}
fn default_true() -> bool {
    true
}
fn random_seed() -> u64 {
    rand::random()
}

impl Default for GenerationParams {
    /// The documented defaults, with a fresh random seed.
    fn default() -> Self {
        Self {
            max_tokens: default_max_tokens(),
            text: SamplingParams::text_default(),
            image: SamplingParams::image_default(),
            cfg_scale: default_cfg_scale(),
            seed: random_seed(),
            stop_at_eos: true,
        }
    }
}

/// A modality object in JSON: each field left out keeps the default; `null`
/// turns top_k / top_p off.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingPatch {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "present")]
    top_k: Option<Option<usize>>,
    #[serde(default, deserialize_with = "present")]
    top_p: Option<Option<f32>>,
}

/// Distinguishes "field absent" (outer None, via `default`) from `null`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl SamplingPatch {
    fn over(self, mut base: SamplingParams) -> SamplingParams {
        if let Some(t) = self.temperature {
            base.temperature = t;
        }
        if let Some(k) = self.top_k {
            base.top_k = k;
        }
        if let Some(p) = self.top_p {
            base.top_p = p;
        }
        base
    }
}

fn text_sampling<'de, D: Deserializer<'de>>(d: D) -> Result<SamplingParams, D::Error> {
    Ok(SamplingPatch::deserialize(d)?.over(SamplingParams::text_default()))
}

fn image_sampling<'de, D: Deserializer<'de>>(d: D) -> Result<SamplingParams, D::Error> {
    Ok(SamplingPatch::deserialize(d)?.over(SamplingParams::image_default()))
}

/// The server's limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most new tokens one request may ask for.
    pub max_tokens: usize,
    /// Largest top_k accepted (the vocabulary size is a natural choice).
    pub max_top_k: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 4096,
            max_top_k: 65536,
        }
    }
}

/// A parameter outside its bounds. Messages name the field, the bounds and
/// the value given, e.g. "`text.temperature` must be >= 0 and <= 100. Given: -1".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{field}` must be >= {min} and <= {max}. Given: {given}")]
    OutOfRange {
        field: &'static str,
        min: String,
        max: String,
        given: String,
    },
    #[error("`{field}` must be > {min} and <= {max}. Given: {given}")]
    OutOfRangeExclusiveMin {
        field: &'static str,
        min: String,
        max: String,
        given: String,
    },
}

impl ValidationError {
    /// The offending field's name as the request spells it.
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutOfRange { field, .. } | Self::OutOfRangeExclusiveMin { field, .. } => field,
        }
    }
}

/// `min <= given <= max`; NaN fails. Values are reported in their own type,
/// so an f32 0.9 reads "0.9", not its f64 widening.
fn check_inclusive<T: PartialOrd + Display>(
    field: &'static str,
    given: T,
    min: T,
    max: T,
) -> Result<(), ValidationError> {
    if given >= min && given <= max {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field,
            min: min.to_string(),
            max: max.to_string(),
            given: given.to_string(),
        })
    }
}

impl SamplingParams {
    /// `names` are the request's spellings of temperature, top_k, top_p.
    fn validate(&self, names: [&'static str; 3], limits: &Limits) -> Result<(), ValidationError> {
        let [temperature, top_k, top_p] = names;
        check_inclusive(temperature, self.temperature, 0.0, MAX_TEMPERATURE)?;
        if let Some(k) = self.top_k {
            check_inclusive(top_k, k, 1, limits.max_top_k)?;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ValidationError::OutOfRangeExclusiveMin {
                    field: top_p,
                    min: "0".into(),
                    max: "1".into(),
                    given: p.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl GenerationParams {
    /// Checks every field against its bounds and the server's limits; the
    /// first violation is returned.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        check_inclusive("max_tokens", self.max_tokens, 1, limits.max_tokens)?;
        self.text
            .validate(["text.temperature", "text.top_k", "text.top_p"], limits)?;
        self.image
            .validate(["image.temperature", "image.top_k", "image.top_p"], limits)?;
        check_inclusive("cfg_scale", self.cfg_scale, 0.0, MAX_CFG_SCALE)?;
        Ok(())
    }

    /// The sampling settings for the next token of a sequence in `state`.
    pub fn sampling_for(&self, state: &ModalityState) -> &SamplingParams {
        if state.is_image() {
            &self.image
        } else {
            &self.text
        }
    }

    /// Whether classifier-free guidance is on (an unconditional sequence is
    /// needed while an image is being generated).
    pub fn uses_cfg(&self) -> bool {
        self.cfg_scale != 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> GenerationParams {
        serde_json::from_str(json).expect("valid params json")
    }

    #[test]
    fn defaults_when_fields_are_absent() {
        let p = parse(r#"{"seed": 7}"#);
        assert_eq!(p.max_tokens, 256);
        assert_eq!(p.text, SamplingParams::text_default());
        assert_eq!(p.image, SamplingParams::image_default());
        assert_eq!(p.cfg_scale, 1.0);
        assert_eq!(p.seed, 7);
        assert!(p.stop_at_eos);
        assert!(!p.uses_cfg());
        p.validate(&Limits::default()).expect("defaults are valid");
    }

    #[test]
    fn modality_objects_merge_over_their_own_defaults() {
        let p = parse(r#"{"text": {"temperature": 0.2}, "image": {"top_k": null, "top_p": 0.5}}"#);
        assert_eq!(
            p.text,
            SamplingParams {
                temperature: 0.2,
                top_k: None,
                top_p: Some(0.9)
            }
        );
        assert_eq!(
            p.image,
            SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: Some(0.5)
            }
        );
    }

    #[test]
    fn wrong_types_and_unknown_sampling_fields_fail_to_parse() {
        assert!(serde_json::from_str::<GenerationParams>(r#"{"max_tokens": "ten"}"#).is_err());
        assert!(serde_json::from_str::<GenerationParams>(r#"{"text": {"temp": 1}}"#).is_err());
        assert!(serde_json::from_str::<GenerationParams>(r#"{"image": {"top_k": -3}}"#).is_err());
    }

    #[test]
    fn seeds_differ_when_not_given() {
        // Two random u64 seeds colliding has probability 2^-64.
        assert_ne!(parse("{}").seed, parse("{}").seed);
    }

    fn message(p: &GenerationParams, limits: &Limits) -> String {
        p.validate(limits)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn validation_messages_name_field_limit_and_value() {
        let limits = Limits {
            max_tokens: 100,
            max_top_k: 50,
        };
        let base = parse(r#"{"seed": 1, "max_tokens": 10, "image": {"top_k": 50}}"#);

        let mut p = base.clone();
        p.text.temperature = -1.0;
        assert_eq!(
            message(&p, &limits),
            "`text.temperature` must be >= 0 and <= 100. Given: -1"
        );

        let mut p = base.clone();
        p.image.temperature = f32::NAN;
        assert_eq!(
            message(&p, &limits),
            "`image.temperature` must be >= 0 and <= 100. Given: NaN"
        );

        let mut p = base.clone();
        p.max_tokens = 101;
        assert_eq!(
            message(&p, &limits),
            "`max_tokens` must be >= 1 and <= 100. Given: 101"
        );

        let mut p = base.clone();
        p.max_tokens = 0;
        assert_eq!(
            message(&p, &limits),
            "`max_tokens` must be >= 1 and <= 100. Given: 0"
        );

        let mut p = base.clone();
        p.image.top_k = Some(0);
        assert_eq!(
            message(&p, &limits),
            "`image.top_k` must be >= 1 and <= 50. Given: 0"
        );

        let mut p = base.clone();
        p.image.top_k = Some(51);
        let err = p.validate(&limits).expect_err("top_k over the limit");
        assert_eq!(err.field(), "image.top_k");
        assert_eq!(
            err.to_string(),
            "`image.top_k` must be >= 1 and <= 50. Given: 51"
        );

        let mut p = base.clone();
        p.text.top_p = Some(0.0);
        assert_eq!(
            message(&p, &limits),
            "`text.top_p` must be > 0 and <= 1. Given: 0"
        );

        let mut p = base.clone();
        p.image.top_p = Some(-0.9);
        assert_eq!(
            message(&p, &limits),
            "`image.top_p` must be > 0 and <= 1. Given: -0.9"
        );

        let mut p = base.clone();
        p.text.top_p = Some(1.5);
        assert_eq!(
            message(&p, &limits),
            "`text.top_p` must be > 0 and <= 1. Given: 1.5"
        );

        let mut p = base.clone();
        p.cfg_scale = f32::INFINITY;
        assert_eq!(
            message(&p, &limits),
            "`cfg_scale` must be >= 0 and <= 100. Given: inf"
        );

        let mut p = base;
        p.text.temperature = 0.0;
        p.text.top_p = Some(1.0);
        p.image.top_k = Some(50);
        p.max_tokens = 100;
        p.cfg_scale = 3.0;
        p.validate(&limits).expect("values on the bounds are valid");
        assert!(p.uses_cfg());
    }

    #[test]
    fn sampling_follows_the_modality_state() {
        let p = parse("{}");
        assert_eq!(p.sampling_for(&ModalityState::Text), &p.text);
        assert_eq!(
            p.sampling_for(&ModalityState::Image { emitted: 3 }),
            &p.image
        );
    }
}
