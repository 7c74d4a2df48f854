//! Incremental detokenisation for streaming text.
//!
//! The prefix-offset method of TGI and vLLM: keep the ids since the last
//! emitted boundary; decode `ids[prefix..read]` (text already sent, with its
//! left context) and `ids[prefix..]`; when the second is longer and does not
//! end in U+FFFD (an incomplete UTF-8 sequence from a byte-level token), the
//! difference is the new delta. Decoding a window with its left context keeps
//! the decoder's space handling (Metaspace, byte-level, word joining) what
//! the full decode does.
//!
//! Invariants:
//! - The concatenated deltas of `push` and `finish` equal
//!   `tokenizer.decode(text_ids, true)` of all text ids pushed.
//! - Image codes and the layout's specials (bos, eos, pad, boi, eoi) are not
//!   text: `push` ignores them (the engine routes them elsewhere); any other
//!   special the tokenizer marks is dropped by `skip_special_tokens`.
//! - The pending window stays a few tokens long: ids before the prefix
//!   offset are dropped after every emitted delta.

use std::borrow::Borrow;
use std::ops::Range;

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use crate::model::config::VocabLayout;

/// How many prompt ids `prime` keeps as left context.
const CONTEXT_IDS: usize = 6;

/// Streaming text decoder for one sequence. `T` is anything that lends a
/// tokenizer: `&Tokenizer`, `Arc<Tokenizer>`.
pub struct Detokenizer<T: Borrow<Tokenizer>> {
    tokenizer: T,
    image_range: Range<u32>,
    specials: [Option<u32>; 5],
    ids: Vec<u32>,
    /// Start of the left context of the next delta.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, cached between pushes.
    prefix_text: Option<String>,
}

impl<T: Borrow<Tokenizer>> Detokenizer<T> {
    pub fn new(tokenizer: T, vocab: &VocabLayout) -> Self {
        Self {
            tokenizer,
            image_range: vocab.image_range(),
            specials: [vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi],
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix_text: None,
        }
    }

    /// Whether `id` is a text token this decoder handles.
    pub fn is_text(&self, id: u32) -> bool {
        !self.image_range.contains(&id) && !self.specials.contains(&Some(id))
    }

    /// Sets the prompt's last text tokens as left context, never emitted, so
    /// that the first generated token decodes as it would after the prompt
    /// (e.g. its leading space is kept).
    pub fn prime(&mut self, prompt: &[u32]) {
        let text: Vec<u32> = prompt
            .iter()
            .rev()
            .copied()
            .filter(|&id| self.is_text(id))
            .take(CONTEXT_IDS)
            .collect();
        self.ids = text.into_iter().rev().collect();
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self.prefix_text = None;
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .borrow()
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizer: cannot decode ids {ids:?}: {e}"))
    }

    /// Adds one generated token; returns the new text, if a clean UTF-8
    /// extension is ready.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if !self.is_text(id) {
            return Ok(None);
        }
        self.ids.push(id);
        self.emit(false)
    }

    /// Flushes what is still held back (e.g. a trailing incomplete UTF-8
    /// sequence, as U+FFFD, exactly as the full decode shows it).
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        self.emit(true)
    }

    fn emit(&mut self, flush: bool) -> Result<Option<String>> {
        let prefix = match self.prefix_text.take() {
            Some(p) => p,
            None => self.decode(&self.ids[self.prefix_offset..self.read_offset])?,
        };
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        let ready = flush || !full.ends_with('\u{FFFD}');
        // The full text normally starts with the prefix; when a decoder
        // rewrites it, cut at the prefix's length as TGI does, if that is a
        // character boundary.
        let delta = if !ready || full.len() <= prefix.len() {
            None
        } else if full.starts_with(&prefix) || full.is_char_boundary(prefix.len()) {
            Some(full[prefix.len()..].to_string())
        } else {
            None
        };
        match delta {
            Some(delta) => {
                self.ids.drain(..self.read_offset);
                self.prefix_offset = 0;
                self.read_offset = self.ids.len();
                Ok(Some(delta))
            }
            None => {
                if flush {
                    self.ids.drain(..self.read_offset);
                    self.prefix_offset = 0;
                    self.read_offset = self.ids.len();
                } else {
                    self.prefix_text = Some(prefix);
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::BPE;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    use tokenizers::AddedToken;

    use super::*;

    const SPECIALS: [&str; 5] = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"];

    /// Layout for the test tokenizers: specials 0..5, text 5..300, image
    /// codes 300..364.
    fn layout() -> VocabLayout {
        let mut v = crate::engine::modality::test_layout(true);
        v.vocab_size = 400;
        v.pad = Some(0);
        v.modalities[0].range = 5..300;
        v.modalities[1].range = 300..364;
        v
    }

    fn with_specials_and_images(vocab: &mut HashMap<String, u32>) {
        for (i, s) in SPECIALS.iter().enumerate() {
            vocab.insert(s.to_string(), i as u32);
        }
        // Image codes as plain (non-special) tokens: only the layout says
        // they are not text.
        for c in 0..64u32 {
            vocab.insert(format!("<img{c}>"), 300 + c);
        }
    }

    fn mark_specials(tok: &mut Tokenizer) {
        let added: Vec<AddedToken> = SPECIALS
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect();
        tok.add_special_tokens(&added);
    }

    /// Byte-level BPE: the 256 byte symbols at ids 5..261, a few merges.
    fn byte_level_tokenizer() -> Tokenizer {
        let mut symbols: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        symbols.sort_unstable();
        let mut vocab: HashMap<String, u32> = symbols
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), 5 + i as u32))
            .collect();
        let merges: Vec<(String, String)> = [
            ("H", "e"),
            ("He", "l"),
            ("Hel", "lo"),
            ("l", "o"),
            ("Ġ", "w"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        for (id, (a, b)) in (261..).zip(&merges) {
            vocab.insert(format!("{a}{b}"), id);
        }
        with_specials_and_images(&mut vocab);
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .expect("bpe");
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::default(),
        ));
        tok.with_decoder(Some(ByteLevel::default()));
        mark_specials(&mut tok);
        tok
    }

    /// Word-level, no decoder: the full decode joins tokens with spaces.
    fn word_level_tokenizer() -> Tokenizer {
        let mut vocab: HashMap<String, u32> = ["a", "circle", "red", "ünïcödé", "[UNK]"]
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), 5 + i as u32))
            .collect();
        with_specials_and_images(&mut vocab);
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .expect("wordlevel");
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(WhitespaceSplit));
        mark_specials(&mut tok);
        tok
    }

    fn stream<T: Borrow<Tokenizer>>(d: &mut Detokenizer<T>, ids: &[u32]) -> Vec<String> {
        let mut out: Vec<String> = ids.iter().filter_map(|&id| d.push(id).unwrap()).collect();
        out.extend(d.finish().unwrap());
        out
    }

    #[test]
    fn byte_level_deltas_concatenate_to_the_full_decode() {
        let tok = byte_level_tokenizer();
        let v = layout();
        let text = "Hello wörld, 你好 🎉 — ok";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.iter().all(|&id| v.text_range().contains(&id)));
        let full = tok.decode(&ids, true).unwrap();
        assert_eq!(full.trim_start(), text);

        let mut d = Detokenizer::new(&tok, &v);
        let deltas = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), full);
        // Multi-byte characters are held back until complete: no delta
        // carries a replacement character, and fewer deltas than tokens.
        assert!(deltas.iter().all(|s| !s.contains('\u{FFFD}')));
        assert!(deltas.len() < ids.len());
        assert!(deltas.contains(&"🎉".to_string()));
    }

    #[test]
    fn images_and_specials_are_skipped() {
        let tok = Arc::new(byte_level_tokenizer());
        let v = layout();
        let before = tok.encode("Hi é", false).unwrap().get_ids().to_vec();
        let after = tok.encode(" done", false).unwrap().get_ids().to_vec();
        let mut ids = vec![v.bos.unwrap()];
        ids.extend(&before);
        ids.push(v.boi.unwrap());
        ids.extend(300..316);
        ids.push(v.eoi.unwrap());
        ids.extend(&after);
        ids.push(v.eos.unwrap());

        let mut d = Detokenizer::new(Arc::clone(&tok), &v);
        let text_ids: Vec<u32> = ids.iter().copied().filter(|&i| d.is_text(i)).collect();
        assert_eq!(text_ids, [before.clone(), after.clone()].concat());
        let deltas = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), tok.decode(&text_ids, true).unwrap());
        assert!(!deltas.concat().contains("img"));
    }

    #[test]
    fn a_trailing_incomplete_character_is_flushed_by_finish() {
        let tok = byte_level_tokenizer();
        let v = layout();
        let ids = tok.encode("ok 🎉", false).unwrap().get_ids().to_vec();
        let cut = &ids[..ids.len() - 1]; // the emoji's last byte missing
        let mut d = Detokenizer::new(&tok, &v);
        let pushed: Vec<String> = cut.iter().filter_map(|&id| d.push(id).unwrap()).collect();
        // " ok " is out; the emoji's first three bytes are held back.
        assert_eq!(pushed.concat(), " ok ");
        let rest = d.finish().unwrap().expect("held-back bytes");
        assert!(rest.ends_with('\u{FFFD}'));
        assert_eq!(pushed.concat() + &rest, tok.decode(cut, true).unwrap());
        assert_eq!(d.finish().unwrap(), None, "nothing left after finish");
    }

    #[test]
    fn word_level_spaces_come_from_the_left_context() {
        let tok = word_level_tokenizer();
        let v = layout();
        let ids = tok
            .encode("a red ünïcödé circle", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut d = Detokenizer::new(&tok, &v);
        let deltas = stream(&mut d, &ids);
        assert_eq!(deltas, ["a", " red", " ünïcödé", " circle"]);
        assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());

        // Primed with the prompt, the first generated word gets its space.
        let prompt = tok.encode("a red", false).unwrap().get_ids().to_vec();
        let mut d = Detokenizer::new(&tok, &v);
        d.prime(
            &[v.bos.unwrap()]
                .into_iter()
                .chain(prompt)
                .collect::<Vec<_>>(),
        );
        let circle = tok.token_to_id("circle").unwrap();
        assert_eq!(d.push(circle).unwrap().as_deref(), Some(" circle"));
    }
}
