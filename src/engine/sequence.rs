//! One running request: its tokens still to feed, its modality state,
//! sampler and detokenizer, its adapters and caches, and what it has
//! streamed so far.
//!
//! Invariants:
//! - `pending` holds the tokens the model has not seen yet (the prompt at
//!   first, then the last sampled token, plus a forced `<eoi>`); the
//!   sequence samples only in a step that feeds its last pending token;
//! - every token the client sees went through [`Sequence::push_token`], so
//!   usage, text deltas, previews and images agree with the Token events;
//! - the unconditional twin (classifier-free guidance) exists exactly while
//!   an image block is open and the request's `cfg_scale` is not 1: it is
//!   `<bos> <boi>` plus the codes of the open image so far, with the same
//!   adapters and routing mode; it never sees the prompt's text, which is
//!   what makes it unconditional. It is fed the same codes as the sequence;
//! - a sequence ends with exactly one `End` or `Error` event;
//! - it never generates more than `max_tokens` tokens (forced ones count):
//!   when an image's last code is the last token that fits, its `<eoi>` is
//!   left out and the image is still delivered; an image that `max_tokens`
//!   cuts short is dropped (only its previews were sent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::detok::Detokenizer;
use super::modality::ModalityState;
use super::params::GenerationParams;
use super::render::{Outbox, Picture};
use super::sampler::{choose_next, Sampler};
use super::types::{Completion, FinishReason, InferEvent, RoutingStats, Usage};
use crate::adapters::{SlotId, NULL_SLOT};
use crate::engine::runner::{AdapterSelection, SeqReport};
use crate::model::config::VocabLayout;
use crate::model::vq::VqModel;
use crate::routing::mode::RoutingMode;
use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// The unconditional side of a guided image.
#[derive(Debug)]
pub struct Twin {
    pub caches: Vec<usize>,
    pub pending: Vec<u32>,
}

/// Adapters a sequence holds in the hot set.
#[derive(Debug, Default)]
pub struct Resolved {
    pub selection: AdapterSelection,
    /// Names acquired (one entry per acquire), released when it ends.
    pub acquired: Vec<String>,
    /// Slot -> adapter name, for the slots this sequence uses.
    pub slot_names: Vec<(SlotId, String)>,
}

/// What the engine shares with a sequence while it handles a token.
pub struct TokenContext<'a> {
    pub vocab: &'a VocabLayout,
    pub vq: Option<&'a VqModel>,
    pub max_context: usize,
    pub tokens_by_modality: &'a mut BTreeMap<String, u64>,
    pub tokens_by_adapter: &'a mut BTreeMap<String, u64>,
}

/// Where a sequence stands after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Continue,
    Finished(FinishReason),
    Failed(String),
}

pub struct Sequence {
    pub id: u64,
    events: Outbox,
    pub params: GenerationParams,
    pub mode: RoutingMode,
    preview_every: Option<usize>,
    pub adapters: Resolved,
    pub caches: Vec<usize>,
    pub twin: Option<Twin>,
    pub pending: Vec<u32>,
    /// Prompt plus generated tokens.
    context_len: usize,
    state: ModalityState,
    sampler: Sampler,
    detok: Detokenizer<Arc<Tokenizer>>,
    /// Codebook indices of the open image.
    image_codes: Vec<u32>,
    generated: usize,
    usage: Usage,
    routing: RoutingStats,
    enqueued: Instant,
}

/// A prompt that passed [`Sequence::check_prompt`].
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub state: ModalityState,
}

/// A new sequence's request fields.
pub struct NewSequence {
    pub id: u64,
    /// The client's event channel, behind the render thread when there is one.
    pub events: Outbox,
    pub params: GenerationParams,
    pub mode: RoutingMode,
    pub preview_every: Option<usize>,
    pub enqueued: Instant,
}

impl Sequence {
    /// Checks a prompt against the vocabulary and the context; returns it
    /// (with the `<eoi>` the grammar forces when it ends on an image's last
    /// code) and the modality state after it. Cheap: run before any adapter
    /// or cache is taken.
    pub fn check_prompt(
        prompt: &[u32],
        vocab: &VocabLayout,
        max_context: usize,
    ) -> Result<Prepared> {
        if prompt.is_empty() {
            return Err(anyhow!("the prompt is empty"));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab.vocab_size) {
            return Err(anyhow!(
                "prompt token {bad} is outside the vocabulary of {} ids",
                vocab.vocab_size
            ));
        }
        let (state, forced) =
            ModalityState::after_prompt(prompt, vocab).map_err(|e| anyhow!("prompt: {e}"))?;
        let mut prompt = prompt.to_vec();
        prompt.extend(forced);
        if prompt.len() >= max_context {
            return Err(anyhow!(
                "the prompt has {} tokens; the context holds {max_context}, leaving no room to generate",
                prompt.len()
            ));
        }
        Ok(Prepared { prompt, state })
    }

    /// A sequence after its prompt ([`Self::check_prompt`]).
    pub fn start(
        new: NewSequence,
        prepared: Prepared,
        adapters: Resolved,
        caches: Vec<usize>,
        tokenizer: Arc<Tokenizer>,
        vocab: &VocabLayout,
    ) -> Self {
        let Prepared { prompt, state } = prepared;
        let image_codes = match state {
            ModalityState::Image { emitted } => prompt[prompt.len() - emitted..]
                .iter()
                .filter_map(|&t| vocab.image_code(t))
                .collect(),
            ModalityState::Text => vec![],
        };
        let mut detok = Detokenizer::new(tokenizer, vocab);
        detok.prime(&prompt);
        let routing = RoutingStats {
            mode: new.mode.as_str().to_string(),
            ..Default::default()
        };
        Self {
            id: new.id,
            events: new.events,
            sampler: Sampler::new(new.params.seed),
            params: new.params,
            mode: new.mode,
            preview_every: new.preview_every.filter(|&n| n > 0),
            adapters,
            caches,
            twin: None,
            usage: Usage {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
            context_len: prompt.len(),
            pending: prompt,
            state,
            detok,
            image_codes,
            generated: 0,
            routing,
            enqueued: new.enqueued,
        }
    }

    /// Whether the client stopped listening, or a picture failed to render
    /// on the render thread (which sent the request's Error event).
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Whether the request ended with a render failure (see [`Self::is_abandoned`]).
    pub fn render_failed(&self) -> bool {
        self.events.render_failed()
    }

    pub fn set_queue_time(&mut self, admitted: Instant) {
        self.routing.queue_ms = ms(admitted - self.enqueued);
    }

    /// Whether this sequence wants an unconditional twin now.
    pub fn wants_twin(&self, vocab: &VocabLayout) -> bool {
        self.state.is_image() && self.params.uses_cfg() && vocab.image_modality.is_some()
    }

    /// The twin's tokens when it is created: `<bos> <boi>` and the codes of
    /// the open image so far.
    pub fn twin_prefix(&self, vocab: &VocabLayout) -> Vec<u32> {
        let mut t: Vec<u32> = vocab.bos.into_iter().chain(vocab.boi).collect();
        t.extend(self.image_codes.iter().map(|&c| vocab.image_token(c)));
        t
    }

    /// Adds one forward's share of work to the request's routing stats.
    pub fn record_step(&mut self, report: &SeqReport, forward_ms: f64) {
        self.routing.passes += report.passes;
        self.routing.token_rows += report.rows_processed;
        for (name, rows) in &report.rows_per_adapter {
            *self
                .routing
                .rows_per_adapter
                .entry(name.clone())
                .or_default() += rows;
        }
        self.routing.forward_ms += forward_ms;
    }

    /// Samples the next token from this step's logits (and the twin's, for
    /// guidance), streams it, and queues it to be fed next step.
    /// `top_pick`: the gate's best pick on the row that produced the logits.
    pub fn sample_next(
        &mut self,
        logits: &mut [f32],
        uncond: Option<&[f32]>,
        top_pick: SlotId,
        ctx: &mut TokenContext<'_>,
    ) -> Progress {
        let chosen = match choose_next(
            &mut self.state,
            &mut self.sampler,
            logits,
            uncond,
            &self.params,
            ctx.vocab,
        ) {
            Ok(c) => c,
            Err(e) => return Progress::Failed(format!("sampling failed: {e}")),
        };
        let adapter = self.serving_adapter(chosen.token, top_pick, ctx.vocab);
        let mut fed = vec![chosen.token];
        if let Err(e) = self.push_token(chosen.token, adapter, ctx) {
            return Progress::Failed(e);
        }
        if let Some(forced) = chosen.forced {
            // max_tokens (and the context) are hard limits: a forced <eoi>
            // that does not fit is left out. Its image's codes are all
            // there, so the image is still delivered.
            let done = if self.has_room(ctx.max_context) {
                fed.push(forced);
                self.push_token(forced, None, ctx)
            } else {
                self.complete_image(ctx)
            };
            if let Err(e) = done {
                return Progress::Failed(e);
            }
        }
        if chosen.token == ctx.vocab.eos.unwrap_or(u32::MAX) && self.params.stop_at_eos {
            return Progress::Finished(FinishReason::Stop);
        }
        if !self.has_room(ctx.max_context) {
            return Progress::Finished(FinishReason::Length);
        }
        if let Some(twin) = self.twin.as_mut() {
            twin.pending
                .extend(fed.iter().filter(|&&t| ctx.vocab.is_image_code(t)));
        }
        self.pending = fed;
        Progress::Continue
    }

    /// Whether one more token fits in `max_tokens` and the context.
    fn has_room(&self, max_context: usize) -> bool {
        self.generated < self.params.max_tokens && self.context_len < max_context
    }

    /// The adapter that served a generated token most: the image adapter
    /// for image codes, the gate's top pick (else the text adapter) for
    /// the rest, the first forced adapter in per_sequence mode.
    fn serving_adapter(&self, token: u32, top_pick: SlotId, vocab: &VocabLayout) -> Option<String> {
        let slot = match self.mode {
            RoutingMode::Base => return None,
            RoutingMode::PerSequence => self.adapters.selection.forced.first().map(|f| f.0),
            _ => {
                let m = vocab.modality_of(token);
                let own = self.adapters.selection.modality.get(m).copied().flatten();
                match (vocab.is_image_code(token), top_pick) {
                    (false, p) if p != NULL_SLOT => Some(p),
                    _ => own,
                }
            }
        }?;
        self.adapters
            .slot_names
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, n)| n.clone())
    }

    /// Streams one generated token: the Token event, then its text delta,
    /// preview or finished image.
    fn push_token(
        &mut self,
        token: u32,
        adapter: Option<String>,
        ctx: &mut TokenContext<'_>,
    ) -> Result<(), String> {
        let vocab = ctx.vocab;
        let modality = vocab.modalities[vocab.modality_of(token)].name.clone();
        *ctx.tokens_by_modality.entry(modality.clone()).or_default() += 1;
        *ctx.tokens_by_adapter
            .entry(adapter.clone().unwrap_or_else(|| "none".into()))
            .or_default() += 1;
        self.generated += 1;
        self.context_len += 1;
        self.send(InferEvent::Token {
            id: token,
            modality,
            adapter,
        });
        if let Some(code) = vocab.image_code(token) {
            self.usage.image_tokens += 1;
            self.image_codes.push(code);
            let done = self.image_codes.len();
            if let Some(n) = self.preview_every {
                if done.is_multiple_of(n) && done < vocab.tokens_per_image {
                    let index = self.usage.images;
                    let codes = self.image_codes.clone();
                    self.send_picture(Picture::Preview { index, codes }, ctx)?;
                }
            }
            return Ok(());
        }
        self.usage.text_tokens += 1;
        if Some(token) == vocab.eoi {
            self.complete_image(ctx)?;
        }
        match self.detok.push(token) {
            Ok(Some(delta)) => self.send(InferEvent::TextDelta(delta)),
            Ok(None) => {}
            Err(e) => return Err(format!("{e:#}")),
        }
        Ok(())
    }

    /// Streams a picture: rendered on the render thread when there is one
    /// (its event follows every event sent before it), else here.
    fn send_picture(&self, picture: Picture, ctx: &TokenContext<'_>) -> Result<(), String> {
        if let Err(picture) = self.events.render(picture) {
            self.send(picture.render(ctx.vq, ctx.vocab.image_grid)?);
        }
        Ok(())
    }

    /// Sends the open image once it holds all its codes (a no-op otherwise).
    fn complete_image(&mut self, ctx: &TokenContext<'_>) -> Result<(), String> {
        if self.image_codes.len() != ctx.vocab.tokens_per_image {
            return Ok(());
        }
        let codes = std::mem::take(&mut self.image_codes);
        let index = self.usage.images;
        self.usage.images += 1;
        self.send_picture(Picture::Finished { index, codes }, ctx)?;
        Ok(())
    }

    /// Sends the final event: the rest of the text and `End`.
    pub fn finish(mut self, reason: FinishReason) {
        match self.detok.finish() {
            Ok(Some(delta)) => self.send(InferEvent::TextDelta(delta)),
            Ok(None) => {}
            Err(e) => return self.fail(format!("{e:#}")),
        }
        self.routing.total_ms = ms(self.enqueued.elapsed());
        let completion = Completion {
            finish_reason: reason,
            usage: self.usage.clone(),
            routing: self.routing.clone(),
        };
        self.send(InferEvent::End(completion));
    }

    /// Sends the final event of a failed request.
    pub fn fail(self, message: String) {
        self.send(InferEvent::Error(message));
    }

    /// A closed receiver is noticed at the next step ([`Self::is_abandoned`]).
    fn send(&self, event: InferEvent) {
        self.events.send(event);
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
