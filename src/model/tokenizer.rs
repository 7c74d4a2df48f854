//! The unified tokenizer: byte-level BPE for text, trained in-process with
//! the `tokenizers` crate (no downloads), plus one added token per image
//! code, named as Chameleon names them (`IMGIMG...Z`).
//!
//! Layout (ids, contiguous, no gaps):
//! - `0..5`: specials `<pad>`, `<s>`, `</s>`, `<racm3:break>` (begin of
//!   image), `<eoss>` (end of image);
//! - `5..text_end`: byte-level BPE tokens (all 256 bytes, then merges), so
//!   any text round-trips;
//! - `text_end..vocab_size`: image codes, code `c` at `text_end + c`.
//!
//! [`TokenizerLayout::text_range`] is `0..text_end`: the text modality owns the
//! specials too, so every id below the image codes routes as text.
//! Digits are pre-tokenized one by one (arithmetic stays digit-wise).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::config::{
    image_token_name, Config, ModalitySpec, CHAMELEON_BOI_NAME, CHAMELEON_EOI_NAME,
};
use crate::train::data::text_domains::text_corpus;

pub const PAD_TOKEN: &str = "<pad>";
pub const BOS_TOKEN: &str = "<s>";
pub const EOS_TOKEN: &str = "</s>";
/// The specials, in id order (ids 0..5).
pub const SPECIAL_TOKENS: [&str; 5] = [
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    CHAMELEON_BOI_NAME,
    CHAMELEON_EOI_NAME,
];

/// Seed and size of the corpus [`build_default_tokenizer`] trains on.
const DEFAULT_CORPUS_SEED: u64 = 0x70_6b_6e;
const DEFAULT_CORPUS_ITEMS: usize = 4000;

/// Where everything sits in the tokenizer's id space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerLayout {
    /// Specials and BPE tokens: `0..text_end`.
    pub text_range: Range<u32>,
    /// Image codes: `text_end..vocab_size` (code c is `image_range.start + c`).
    pub image_range: Range<u32>,
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub boi: u32,
    pub eoi: u32,
    pub vocab_size: usize,
    /// Every token name -> id, as Chameleon's config.json ships it.
    pub vocabulary_map: BTreeMap<String, u32>,
}

impl TokenizerLayout {
    /// Reads and validates the layout of a tokenizer built by this module
    /// (or any tokenizer with the same layout).
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let id = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| anyhow!("tokenizer has no {name:?} token"))
        };
        let specials = SPECIAL_TOKENS
            .iter()
            .map(|name| id(name))
            .collect::<Result<Vec<u32>>>()?;
        if specials != [0, 1, 2, 3, 4] {
            bail!("special tokens {SPECIAL_TOKENS:?} have ids {specials:?}; expected 0..5");
        }
        let text_end = tokenizer.get_vocab_size(false) as u32;
        let mut codes = 0u32;
        while let Some(found) = tokenizer.token_to_id(&image_token_name(codes)) {
            if found != text_end + codes {
                bail!(
                    "image code {codes} ({}) has id {found}; expected {}",
                    image_token_name(codes),
                    text_end + codes
                );
            }
            codes += 1;
        }
        let vocabulary_map: BTreeMap<String, u32> = tokenizer.get_vocab(true).into_iter().collect();
        let vocab_size = vocabulary_map.len();
        if vocab_size != (text_end + codes) as usize {
            bail!(
                "tokenizer has {vocab_size} tokens but {text_end} text tokens and {codes} image codes"
            );
        }
        if let Some((name, &max)) = vocabulary_map.iter().max_by_key(|(_, &id)| id) {
            if max as usize + 1 != vocab_size {
                bail!("token ids are not contiguous: {name:?} has id {max} of {vocab_size} tokens");
            }
        }
        Ok(Self {
            text_range: 0..text_end,
            image_range: text_end..text_end + codes,
            pad: specials[0],
            bos: specials[1],
            eos: specials[2],
            boi: specials[3],
            eoi: specials[4],
            vocab_size,
            vocabulary_map,
        })
    }

    /// Token id of image code `code`, if the tokenizer has that many codes.
    pub fn image_token(&self, code: u32) -> Option<u32> {
        let id = self.image_range.start.checked_add(code)?;
        self.image_range.contains(&id).then_some(id)
    }

    pub fn num_image_codes(&self) -> usize {
        self.image_range.len()
    }

    /// The `molora.modalities` entries: text, then image (when present).
    pub fn modalities(&self) -> Vec<ModalitySpec> {
        let mut out = vec![ModalitySpec {
            name: "text".into(),
            token_range: Some([self.text_range.start, self.text_range.end]),
        }];
        if !self.image_range.is_empty() {
            out.push(ModalitySpec {
                name: "image".into(),
                token_range: Some([self.image_range.start, self.image_range.end]),
            });
        }
        out
    }

    /// Writes the vocabulary fields of `config.json`: vocab size, special ids,
    /// vocabulary map, modalities, begin/end of image and the code grid.
    pub fn apply_to_config(&self, cfg: &mut Config, image_grid: [usize; 2]) {
        cfg.vocab_size = self.vocab_size;
        cfg.bos_token_id = Some(self.bos);
        cfg.eos_token_id = Some(self.eos);
        cfg.pad_token_id = Some(self.pad);
        cfg.vocabulary_map = Some(self.vocabulary_map.clone());
        cfg.molora.modalities = self.modalities();
        cfg.molora.boi_token_id = Some(self.boi);
        cfg.molora.eoi_token_id = Some(self.eoi);
        cfg.molora.image_grid = Some(image_grid);
        cfg.molora.tokens_per_image = Some(image_grid[0] * image_grid[1]);
    }
}

/// Trains byte-level BPE on `corpus` with at most `text_vocab` text ids
/// (specials and the 256 byte tokens included), then adds `num_image_codes`
/// image-code tokens after them.
pub fn train_tokenizer<I, S>(
    corpus: I,
    text_vocab: usize,
    num_image_codes: usize,
) -> Result<(Tokenizer, TokenizerLayout)>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let minimum = SPECIAL_TOKENS.len() + 256;
    if text_vocab < minimum {
        bail!("text_vocab is {text_vocab}; byte-level BPE needs at least {minimum} (specials and 256 bytes)");
    }
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(text_vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build()
        .into();

    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, false, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, corpus)
        .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;

    let codes: Vec<AddedToken> = (0..num_image_codes as u32)
        .map(|c| AddedToken::from(image_token_name(c), false))
        .collect();
    let added = tokenizer.add_tokens(&codes);
    if added != num_image_codes {
        bail!("added {added} of {num_image_codes} image-code tokens");
    }
    let layout = TokenizerLayout::from_tokenizer(&tokenizer)
        .context("the freshly trained tokenizer has an unexpected layout")?;
    Ok((tokenizer, layout))
}

/// The demo model's tokenizer: trained on a fixed-seed corpus of every text
/// domain's training items. Deterministic.
pub fn build_default_tokenizer(
    text_vocab: usize,
    num_image_codes: usize,
) -> Result<(Tokenizer, TokenizerLayout)> {
    let corpus = text_corpus(DEFAULT_CORPUS_SEED, DEFAULT_CORPUS_ITEMS);
    train_tokenizer(corpus.into_iter(), text_vocab, num_image_codes)
}

/// Writes `tokenizer.json`.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    tokenizer
        .save(path, true)
        .map_err(|e| anyhow!("{}: cannot write tokenizer: {e}", path.display()))
}

/// Reads `tokenizer.json` and its layout.
pub fn load_tokenizer(path: &Path) -> Result<(Tokenizer, TokenizerLayout)> {
    let tokenizer = Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
    let layout = TokenizerLayout::from_tokenizer(&tokenizer)
        .with_context(|| format!("{}: unexpected token layout", path.display()))?;
    Ok((tokenizer, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (Tokenizer, TokenizerLayout) {
        build_default_tokenizer(600, 64).expect("tokenizer builds")
    }

    #[test]
    fn layout_is_specials_then_text_then_image_codes() {
        let (tok, layout) = small();
        assert_eq!(
            (layout.pad, layout.bos, layout.eos, layout.boi, layout.eoi),
            (0, 1, 2, 3, 4)
        );
        assert_eq!(layout.text_range.start, 0);
        assert!(layout.text_range.end as usize <= 600);
        // The corpus is varied enough to learn merges beyond the bytes.
        assert!(layout.text_range.end as usize > SPECIAL_TOKENS.len() + 256 + 50);
        println!("text vocabulary of a 600 target: {}", layout.text_range.end);
        assert_eq!(layout.image_range.start, layout.text_range.end);
        assert_eq!(layout.image_range.len(), 64);
        assert_eq!(layout.vocab_size, layout.image_range.end as usize);
        assert_eq!(layout.vocab_size, tok.get_vocab_size(true));
        assert_eq!(layout.image_token(10), Some(layout.image_range.start + 10));
        assert_eq!(layout.image_token(64), None);
        assert_eq!(
            layout.vocabulary_map.get("IMGIMGBAZ"),
            Some(&(layout.image_range.start + 10))
        );
    }

    #[test]
    fn saved_tokenizer_reloads_and_round_trips() {
        let (tok, layout) = small();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        save_tokenizer(&tok, &path).unwrap();
        let reloaded = Tokenizer::from_file(&path).unwrap();
        let (_, reloaded_layout) = load_tokenizer(&path).unwrap();
        assert_eq!(reloaded_layout, layout);

        for text in [
            "what is (12+7)*3?",
            "let a = 17; let b = 3; print a * b ; result 51",
            "a small red circle at the top left on a white background",
            "  Unseen words, ünïcödé & émoji 🙂\n\ttabs",
        ] {
            let enc = reloaded.encode(text, false).unwrap();
            assert!(enc
                .get_ids()
                .iter()
                .all(|id| layout.text_range.contains(id)));
            assert_eq!(reloaded.decode(enc.get_ids(), false).unwrap(), text);
        }
        // Digits are single tokens.
        let enc = reloaded.encode("12345", false).unwrap();
        assert_eq!(enc.get_ids().len(), 5);
        // Image-code names map to image_range.start + code.
        for code in [0u32, 7, 10, 63] {
            let name = image_token_name(code);
            assert_eq!(
                reloaded.token_to_id(&name),
                Some(layout.image_range.start + code)
            );
            let enc = reloaded
                .encode(
                    format!("{CHAMELEON_BOI_NAME}{name}{CHAMELEON_EOI_NAME}"),
                    false,
                )
                .unwrap();
            assert_eq!(
                enc.get_ids(),
                [layout.boi, layout.image_range.start + code, layout.eoi]
            );
        }
    }

    #[test]
    fn training_is_deterministic() {
        let a = small().0.to_string(false).unwrap();
        let b = small().0.to_string(false).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn layout_fills_a_valid_config() {
        let (_, layout) = small();
        let mut cfg: Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 1, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 256
        }))
        .unwrap();
        layout.apply_to_config(&mut cfg, [8, 8]);
        cfg.validate().unwrap();
        let vocab = cfg.vocab().unwrap();
        assert_eq!(vocab.text_range(), layout.text_range);
        assert_eq!(vocab.image_range(), layout.image_range);
        assert_eq!((vocab.boi, vocab.eoi), (Some(layout.boi), Some(layout.eoi)));
        assert_eq!(vocab.image_token(5), layout.image_range.start + 5);
    }

    #[test]
    fn too_small_a_vocabulary_is_an_error() {
        assert!(train_tokenizer(["abc"].into_iter(), 100, 4).is_err());
    }
}
