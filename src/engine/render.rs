//! Pictures rendered off the engine thread, delivered in order.
//!
//! Turning image codes into a PNG (VQ decoder, then PNG encoding) takes
//! milliseconds: several decode steps' worth. Done inside a step it stalls
//! every sequence of the batch (at 16 streaming clients, previews and
//! finished pictures took a quarter of the engine thread). The engine hands
//! the codes to one render thread instead and goes on with the next step, so
//! the decoder and the VQ decoder run on different cores.
//!
//! Invariants:
//! - a sequence's events reach its client in the order the engine produced
//!   them: while the sequence has jobs on the render thread, its later events
//!   queue behind them there (one FIFO for all sequences); with none queued
//!   they go straight to the client;
//! - a render that fails sends the sequence's one `Error` event and marks its
//!   outbox failed: every later event is dropped, and the engine retires the
//!   sequence at its next step as it does one whose client went away;
//! - the engine never waits for the render thread: when pictures take longer
//!   to render than the model takes to generate their codes, they queue (and
//!   their sequence's later events behind them), so that sequence's client
//!   sees them late while the other sequences run at full speed;
//! - without a render thread (no VQ model, or a sequence built in a test)
//!   pictures are rendered inline, as before;
//! - dropping the [`Renderer`] lets the thread finish the queued jobs, then
//!   joins it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedSender;

use super::images;
use super::types::InferEvent;
use crate::dispatch::threading;
use crate::model::vq::VqModel;

/// A picture to render: a preview of the codes so far, or a finished image.
#[derive(Debug, Clone, PartialEq)]
pub enum Picture {
    Preview { index: usize, codes: Vec<u32> },
    Finished { index: usize, codes: Vec<u32> },
}

impl Picture {
    /// Decodes and encodes the picture: its event, or the error message the
    /// request fails with.
    pub fn render(self, vq: Option<&VqModel>, grid: [usize; 2]) -> Result<InferEvent, String> {
        match self {
            Picture::Preview { index, codes } => {
                let p = images::render_preview(vq, &codes, grid)
                    .map_err(|e| format!("image {index} preview: {e:#}"))?;
                Ok(InferEvent::ImagePreview {
                    index,
                    codes_done: codes.len(),
                    png: p.png,
                    width: p.width,
                    height: p.height,
                })
            }
            Picture::Finished { index, codes } => {
                let p = images::render(vq, &codes, grid)
                    .map_err(|e| format!("image {index}: {e:#}"))?;
                Ok(InferEvent::Image {
                    index,
                    png: p.png,
                    width: p.width,
                    height: p.height,
                })
            }
        }
    }
}

enum Work {
    Render(Picture),
    Forward(InferEvent),
}

struct Job {
    outbox: Outbox,
    work: Work,
}

/// The render thread; owns a copy of the VQ model (its tensors are shared).
pub struct Renderer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Renderer {
    /// Starts the render thread; `None` when the thread cannot be spawned
    /// (pictures are then rendered inline).
    pub fn start(vq: VqModel, grid: [usize; 2]) -> Option<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("molora-render".into())
            .spawn(move || {
                let jobs = move || {
                    for job in rx {
                        job.run(&vq, grid);
                    }
                };
                // One thread: the VQ decoder's gemm and convolutions would
                // otherwise fan out to rayon's pool, which costs more than
                // it gives at this size on a busy machine (a picture took
                // 7 ms on one thread, 10-30 ms on two under load).
                match threading::single_thread_pool("molora-render") {
                    Some(pool) => pool.install(jobs),
                    None => jobs(),
                }
            });
        match thread {
            Ok(t) => Some(Self {
                jobs: Some(tx),
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!("cannot start the render thread ({e}); rendering inline");
                None
            }
        }
    }
}

impl Drop for Renderer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Job {
    fn run(self, vq: &VqModel, grid: [usize; 2]) {
        let Job { outbox, work } = self;
        if !outbox.state.failed.load(Ordering::Acquire) {
            match work {
                Work::Forward(event) => {
                    let _ = outbox.events.send(event);
                }
                Work::Render(picture) => match picture.render(Some(vq), grid) {
                    Ok(event) => {
                        let _ = outbox.events.send(event);
                    }
                    Err(why) => {
                        outbox.state.failed.store(true, Ordering::Release);
                        let _ = outbox.events.send(InferEvent::Error(why));
                    }
                },
            }
        }
        outbox.state.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct OutboxState {
    /// Jobs of this sequence on the render thread, not yet done.
    queued: AtomicUsize,
    /// A render failed; the client has its Error event.
    failed: AtomicBool,
}

/// Where one sequence's events go: straight to its client, or behind its
/// pictures on the render thread.
#[derive(Clone)]
pub struct Outbox {
    events: UnboundedSender<InferEvent>,
    jobs: Option<mpsc::Sender<Job>>,
    state: Arc<OutboxState>,
}

impl Outbox {
    pub fn new(events: UnboundedSender<InferEvent>, renderer: Option<&Renderer>) -> Self {
        Self {
            events,
            jobs: renderer.and_then(|r| r.jobs.clone()),
            state: Arc::default(),
        }
    }

    /// Sends an event after everything sent before it.
    pub fn send(&self, event: InferEvent) {
        if self.state.failed.load(Ordering::Acquire) {
            return;
        }
        // Zero queued jobs means the render thread has delivered everything
        // this sequence sent before, so a direct send keeps the order.
        if self.state.queued.load(Ordering::Acquire) == 0 {
            let _ = self.events.send(event);
            return;
        }
        if let Err(Work::Forward(event)) = self.enqueue(Work::Forward(event)) {
            let _ = self.events.send(event);
        }
    }

    /// Renders a picture on the render thread and sends its event there;
    /// gives the picture back when there is no render thread.
    pub fn render(&self, picture: Picture) -> Result<(), Picture> {
        match self.enqueue(Work::Render(picture)) {
            Err(Work::Render(picture)) => Err(picture),
            _ => Ok(()),
        }
    }

    /// Queues work behind this sequence's earlier jobs; gives it back when
    /// there is no render thread (or it has stopped), for the caller to run
    /// inline. (Returned by value: boxing would allocate on every event.)
    #[allow(clippy::result_large_err)]
    fn enqueue(&self, work: Work) -> Result<(), Work> {
        let Some(jobs) = &self.jobs else {
            return Err(work);
        };
        self.state.queued.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            outbox: self.clone(),
            work,
        };
        jobs.send(job).map_err(|mpsc::SendError(job)| {
            self.state.queued.fetch_sub(1, Ordering::AcqRel);
            job.work
        })
    }

    /// The client went away, or a render failed (its Error event is sent).
    pub fn is_closed(&self) -> bool {
        self.events.is_closed() || self.state.failed.load(Ordering::Acquire)
    }

    /// A render failed (the request ended with its Error event).
    pub fn render_failed(&self) -> bool {
        self.state.failed.load(Ordering::Acquire)
    }
}
