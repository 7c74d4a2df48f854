//! The engine thread: owns the model runner and serves every request with
//! continuous batching.
//!
//! Each turn of the loop: take new requests and adapter commands (blocking
//! only when there is nothing to do); drop requests whose client went away;
//! admit waiting requests while the batch has room (interactive first, FIFO
//! within a priority); run ONE routed forward over every running sequence's
//! new tokens (prefill chunks and decode tokens, mixed modes, adapters and
//! sampling settings); take the logits of the rows that end a sequence's
//! pending tokens in one `logits` call; sample, stream, retire.
//!
//! Invariants:
//! - a sequence's adapters are acquired at admission and released exactly
//!   once when it ends; its caches likewise return to the pool;
//! - a failing forward fails the sequences in it (Error event) and the
//!   engine keeps serving;
//! - per-sequence RNG and per-row math make a seeded request's tokens
//!   independent of its neighbours in the batch.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::admin::model_info;
use super::cache_pool::CachePool;
use super::handle::{EngineConfig, EngineHandle, EngineStats, Message, Shared};
use super::render::{Outbox, Renderer};
use super::scheduler::{plan_step, release, resolve_adapters, Admission, Entry, Pending, Queue};
use super::sequence::{NewSequence, Prepared, Progress, Resolved, Sequence, TokenContext, Twin};
use super::types::InferEvent;
use crate::adapters::{SlotId, NULL_SLOT};
use crate::engine::runner::{ModelRunner, SeqStep};
use crate::model::vq::VqModel;

/// A sequence sampling this step: its index in `running`, the row of its
/// own last token and that of its twin.
type LastRows = (usize, Option<usize>, Option<usize>);

pub struct Engine {
    pub(super) runner: ModelRunner,
    tokenizer: Arc<Tokenizer>,
    pub(super) vq: Option<VqModel>,
    /// Renders pictures off this thread (present when `vq` is).
    renderer: Option<Renderer>,
    cfg: EngineConfig,
    pub(super) shared: Arc<Shared>,
    rx: mpsc::Receiver<Message>,
    queue: Queue,
    pub(super) running: Vec<Sequence>,
    pool: CachePool,
    /// Counters published to the handles after every step.
    stats: EngineStats,
}

/// Marks the engine stopped however its thread ends (a panic included), so
/// `submit` answers `Stopped` instead of queueing into the void.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

impl Engine {
    /// Spawns the engine thread, which owns `runner`, and returns its handle.
    /// `max_context` is capped at the model's `max_position_embeddings`.
    pub fn start(
        runner: ModelRunner,
        tokenizer: Tokenizer,
        vq: Option<VqModel>,
        mut cfg: EngineConfig,
    ) -> EngineHandle {
        cfg.max_context = cfg
            .max_context
            .min(runner.decoder.config().max_position_embeddings);
        cfg.max_batch_size = cfg.max_batch_size.max(1);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::new(cfg, model_info(&runner, vq.is_some())));
        let renderer = vq
            .clone()
            .and_then(|vq| Renderer::start(vq, runner.vocab.image_grid));
        let engine = Engine {
            runner,
            tokenizer: Arc::new(tokenizer),
            vq,
            renderer,
            cfg,
            shared: shared.clone(),
            rx,
            queue: Queue::default(),
            running: Vec::new(),
            pool: CachePool::new(),
            stats: EngineStats::default(),
        };
        let guard = StopGuard(shared.clone());
        let spawned = std::thread::Builder::new()
            .name("molora-engine".into())
            .spawn(move || {
                let _guard = guard;
                engine.run();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the engine thread: {e}");
            shared.stopped.store(true, Ordering::Release);
        }
        EngineHandle { tx, shared }
    }

    fn run(mut self) {
        let mut disconnected = false;
        loop {
            let idle = self.running.is_empty() && self.queue.is_empty();
            if idle {
                if disconnected {
                    return;
                }
                match self.rx.recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    fn handle(&mut self, msg: Message) {
        match msg {
            Message::Submit(entry) => self.queue.push(*entry),
            Message::Adapter(cmd, reply) => {
                let _ = reply.send(self.adapter_command(cmd));
            }
        }
    }

    /// Frees queued and running requests whose client is gone.
    fn drop_abandoned(&mut self) {
        let n = self.queue.drop_abandoned();
        self.shared.left_queue(n);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_abandoned() {
                let seq = self.running.remove(i);
                if seq.render_failed() {
                    self.stats.requests_failed += 1;
                }
                self.retire(&seq);
            } else {
                i += 1;
            }
        }
    }

    /// Moves waiting requests into the running batch while it has room.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch_size {
            let Some(front) = self.queue.front() else {
                break;
            };
            // Cheap checks first; adapters and caches only for a good prompt.
            let prepared =
                Sequence::check_prompt(&front.req.prompt, &self.runner.vocab, self.cfg.max_context);
            let admission = match &prepared {
                Ok(_) => resolve_adapters(&mut self.runner, &front.req.adapters, front.req.mode),
                Err(e) => Admission::Refuse(format!("{e:#}")),
            };
            let resolved = match admission {
                Admission::Ready(r) => Ok(r),
                // Nothing running will free a slot: waiting cannot help.
                Admission::Wait if self.running.is_empty() => {
                    Err("the hot set is full of pinned adapters; the request's adapters cannot be loaded".to_string())
                }
                Admission::Wait => break,
                Admission::Refuse(why) => Err(why),
            };
            let Some(entry) = self.queue.pop_front() else {
                break;
            };
            self.shared.left_queue(1);
            let started = match (resolved, prepared) {
                (Ok(r), Ok(p)) => self.start_sequence(&entry, p, r),
                (Err(why), _) => Err(why),
                (Ok(r), Err(e)) => {
                    release(&mut self.runner, &r);
                    Err(format!("{e:#}"))
                }
            };
            match started {
                Ok(seq) => self.running.push(seq),
                Err(why) => {
                    self.stats.requests_failed += 1;
                    self.publish(); // as in `end`: counted before the client hears
                    let _ = entry.events.send(InferEvent::Error(why));
                }
            }
        }
    }

    /// Gives an admitted request its caches and builds its sequence; on
    /// failure releases what it took and returns the reason.
    fn start_sequence(
        &mut self,
        entry: &Entry,
        prepared: Prepared,
        adapters: Resolved,
    ) -> Result<Sequence, String> {
        let n = ModelRunner::caches_needed(entry.req.mode, &adapters.selection);
        let caches = match self.pool.alloc(n, &self.runner) {
            Ok(c) => c,
            Err(e) => {
                release(&mut self.runner, &adapters);
                return Err(format!("cannot allocate KV caches: {e:#}"));
            }
        };
        let new = NewSequence {
            id: entry.id,
            events: Outbox::new(entry.events.clone(), self.renderer.as_ref()),
            params: entry.req.params.clone(),
            mode: entry.req.mode,
            preview_every: entry.req.preview_every,
            enqueued: entry.enqueued,
        };
        let mut seq = Sequence::start(
            new,
            prepared,
            adapters,
            caches,
            self.tokenizer.clone(),
            &self.runner.vocab,
        );
        seq.set_queue_time(Instant::now());
        if let Err(e) = sync_twin(&mut self.pool, &self.runner, &mut seq) {
            self.retire(&seq);
            return Err(format!("cannot allocate the guidance caches: {e}"));
        }
        Ok(seq)
    }

    /// Returns a finished sequence's adapters and caches.
    fn retire(&mut self, seq: &Sequence) {
        release(&mut self.runner, &seq.adapters);
        self.pool.release(&seq.caches, &self.runner);
        if let Some(twin) = &seq.twin {
            self.pool.release(&twin.caches, &self.runner);
        }
    }

    /// Retires the sequences at `ended` (indices into `running`), sending
    /// each its last event.
    fn end(&mut self, mut ended: Vec<(usize, Progress)>) {
        // Highest index first, so removing one never moves a pending index;
        // `remove` keeps the admission order the scheduler relies on.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut retired = Vec::with_capacity(ended.len());
        for (i, progress) in ended {
            let seq = self.running.remove(i);
            self.retire(&seq);
            match &progress {
                Progress::Finished(_) => self.stats.requests_finished += 1,
                Progress::Failed(_) => self.stats.requests_failed += 1,
                Progress::Continue => {}
            }
            retired.push((seq, progress));
        }
        // Counters first, last events second: a client holding its
        // completion must find its tokens already counted in `stats()`.
        self.publish();
        for (seq, progress) in retired {
            match progress {
                Progress::Finished(reason) => seq.finish(reason),
                Progress::Failed(why) => seq.fail(why),
                Progress::Continue => {}
            }
        }
    }

    fn fail_all(&mut self, seqs: &[usize], err: &anyhow::Error) {
        tracing::error!("engine step failed: {err:#}");
        let why = format!("generation failed: {err:#}");
        self.end(
            seqs.iter()
                .map(|&i| (i, Progress::Failed(why.clone())))
                .collect(),
        );
    }

    /// Publishes the counters to the handles.
    fn publish(&mut self) {
        self.stats.running = self.running.len();
        self.stats.hot_set_hits = self.runner.hot_set.hits();
        self.stats.hot_set_misses = self.runner.hot_set.misses();
        self.stats.hot_set_evictions = self.runner.hot_set.evictions();
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.stats.clone();
    }
}

/// Creates the unconditional twin when an image block opens under guidance,
/// and frees it when the block closes.
fn sync_twin(pool: &mut CachePool, runner: &ModelRunner, seq: &mut Sequence) -> Result<(), String> {
    let wants = seq.wants_twin(&runner.vocab);
    if wants && seq.twin.is_none() {
        let caches = pool
            .alloc(seq.caches.len(), runner)
            .map_err(|e| format!("{e:#}"))?;
        seq.twin = Some(Twin {
            caches,
            pending: seq.twin_prefix(&runner.vocab),
        });
    } else if !wants {
        if let Some(twin) = seq.twin.take() {
            pool.release(&twin.caches, runner);
        }
    }
    Ok(())
}

/// The step itself.
impl Engine {
    fn step(&mut self) {
        let started = Instant::now();
        let pending: Vec<Pending> = self
            .running
            .iter()
            .map(|s| Pending {
                cond: s.pending.len(),
                twin: s.twin.as_ref().map(|t| t.pending.len()),
            })
            .collect();
        let takes = plan_step(&pending, self.cfg.max_batch_tokens);

        // 1. One forward over every scheduled side; `spans[k]` = (seq, twin?, first row, rows).
        let mut steps = Vec::with_capacity(takes.len() * 2);
        let mut spans = Vec::with_capacity(takes.len() * 2);
        let mut row = 0;
        for t in &takes {
            let s = &self.running[t.seq];
            let sides = [(false, t.cond, &s.pending, &s.caches)];
            let twin = s
                .twin
                .as_ref()
                .map(|tw| (true, t.twin, &tw.pending, &tw.caches));
            for (is_twin, n, tokens, caches) in sides.into_iter().chain(twin) {
                if n > 0 {
                    steps.push(SeqStep {
                        tokens: &tokens[..n],
                        mode: s.mode,
                        adapters: &s.adapters.selection,
                        caches,
                    });
                    spans.push((t.seq, is_twin, row, n));
                    row += n;
                }
            }
        }
        let out = self.runner.forward(&steps, self.pool.caches_mut());
        drop(steps);
        let out = match out {
            Ok(out) => out,
            Err(e) => return self.fail_all(&takes.iter().map(|t| t.seq).collect::<Vec<_>>(), &e),
        };
        let forward_ms = out.report.elapsed.as_secs_f64() * 1e3;

        // 2. Account the work, consume what was fed, and find the rows to sample from.
        let mut last_rows: Vec<LastRows> = Vec::new();
        for (k, &(seq, is_twin, start, n)) in spans.iter().enumerate() {
            let s = &mut self.running[seq];
            s.record_step(
                &out.report.per_seq[k],
                if is_twin { 0.0 } else { forward_ms },
            );
            let side = if is_twin {
                &mut s.twin.as_mut().expect("twin span").pending
            } else {
                &mut s.pending
            };
            side.drain(..n);
            if side.is_empty() {
                let end = start + n - 1;
                match last_rows.iter_mut().find(|r| r.0 == seq) {
                    Some(r) if is_twin => r.2 = Some(end),
                    Some(r) => r.1 = Some(end),
                    None if is_twin => last_rows.push((seq, None, Some(end))),
                    None => last_rows.push((seq, Some(end), None)),
                }
            }
        }
        // A sequence samples when its own side is done (its twin, if any, is
        // scheduled to finish in the same step).
        last_rows.retain(|r| r.1.is_some());
        let result = self.sample_all(&out.hidden, &out.top_picks, &last_rows);
        if let Err(e) = result {
            let seqs: Vec<usize> = last_rows.iter().map(|r| r.0).collect();
            return self.fail_all(&seqs, &e);
        }
        self.stats.steps += 1;
        self.stats.last_batch_size = takes.len();
        self.stats.last_batch_rows = out.report.rows_processed;
        self.stats.last_step_ms = started.elapsed().as_secs_f64() * 1e3;
    }

    /// Samples every sequence in `last_rows` from one logits call, streams
    /// the tokens and retires the sequences that ended.
    fn sample_all(
        &mut self,
        hidden: &Tensor,
        top_picks: &[SlotId],
        last_rows: &[LastRows],
    ) -> Result<()> {
        if last_rows.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<u32> = Vec::with_capacity(last_rows.len() * 2);
        for r in last_rows {
            rows.extend(r.1.iter().chain(r.2.iter()).map(|&i| i as u32));
        }
        let n = rows.len();
        let picked = hidden.index_select(&Tensor::from_vec(rows, n, hidden.device())?, 0)?;
        let logits = self.runner.decoder.logits(&picked).context("logits")?;
        let vocab_size = logits.dim(1)?;
        let mut logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let mut ended = Vec::new();
        let mut at = 0;
        for &(seq, cond_row, twin_row) in last_rows {
            // The twin's row, when present, follows the sequence's own.
            let (own, rest) = logits[at * vocab_size..].split_at_mut(vocab_size);
            let uncond = twin_row.map(|_| &rest[..vocab_size]);
            at += 1 + usize::from(twin_row.is_some());
            let pick = cond_row
                .and_then(|r| top_picks.get(r).copied())
                .unwrap_or(NULL_SLOT);
            let mut ctx = TokenContext {
                vocab: &self.runner.vocab,
                vq: self.vq.as_ref(),
                max_context: self.cfg.max_context,
                tokens_by_modality: &mut self.stats.tokens_by_modality,
                tokens_by_adapter: &mut self.stats.tokens_by_adapter,
            };
            let s = &mut self.running[seq];
            let progress = match s.sample_next(own, uncond, pick, &mut ctx) {
                Progress::Continue => match sync_twin(&mut self.pool, &self.runner, s) {
                    Ok(()) => continue,
                    Err(e) => Progress::Failed(format!("cannot allocate the guidance caches: {e}")),
                },
                p => p,
            };
            ended.push((seq, progress));
        }
        self.end(ended);
        Ok(())
    }
}
