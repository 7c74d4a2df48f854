//! The HTTP service (actix-web): validation, the engine handle, streaming,
//! metrics and the playground page.
//!
//! Layering: handlers validate requests into `ValidRequest`s and talk to the
//! engine only through its handle (a channel); they never touch tensors.
//! One model is loaded at start-up; the engine thread owns it.
//!
//! Routes:
//! `POST /v1/generate`, `POST /v1/chat/completions`, `POST /v1/compare`,
//! `GET /v1/models`, `GET|POST /v1/adapters`, `DELETE /v1/adapters/{name}`,
//! `GET|POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches/{id}/results`,
//! `POST /v1/batches/{id}/cancel`, `GET /v1/batches/{id}/images/{name}`,
//! `GET /health`, `GET /metrics`, `GET /` (playground). Every error is JSON
//! (`error.rs`), unknown routes and methods included.

pub mod api;
pub mod config;
pub mod error;
pub mod fields;
pub mod handlers;
pub mod metrics;
pub mod output;
pub mod playground;
pub mod validation;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpServer};
use anyhow::{anyhow, Context, Result};
use candle_core::Device;

use crate::adapters::hot_set::HotSetConfig;
use crate::batch::runner::{DataLock, Runner, RunnerOptions};
use crate::batch::{BatchService, FilesLayout, SqliteStore};
use crate::engine::images::VQ_WEIGHTS_FILE;
use crate::engine::runner::ModelRunner;
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::model::config::Config;
use crate::model::vq::{VqConfig, VqModel};
use config::ServerConfig;
use error::ApiError;
use metrics::{ErrorKind, Metrics};
use validation::Validator;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub validator: Validator,
    pub metrics: Metrics,
    pub config: ServerConfig,
    /// The base model's name (the model folder's name, as the engine reports it).
    pub model_name: String,
    /// Batch jobs: the store and the runner's wake-up.
    pub batches: BatchService,
}

impl AppState {
    /// With an admin key configured, `Authorization: Bearer <key>` is required.
    pub fn require_admin(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(key) = &self.config.admin_key else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The compute device: the first GPU with `--features cuda`, else the CPU.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Device::cuda_if_available(0).context("cannot open the CUDA device");
    }
    #[cfg(not(feature = "cuda"))]
    Ok(Device::Cpu)
}

/// The VQ model of a model directory, when it has one (`vq_config` in
/// config.json and its weights beside it).
pub fn load_vq(model_dir: &Path, cfg: &Config, device: &Device) -> Result<Option<VqModel>> {
    let weights = model_dir.join(VQ_WEIGHTS_FILE);
    match (&cfg.vq_config, weights.exists()) {
        (Some(v), true) => {
            let vq_cfg = VqConfig::from_value(v)
                .with_context(|| format!("{}: vq_config", model_dir.display()))?;
            Ok(Some(VqModel::load(&weights, &vq_cfg, device)?))
        }
        (Some(_), false) => {
            tracing::warn!(
                "{}: vq_config is set but {VQ_WEIGHTS_FILE} is missing; images are off",
                model_dir.display()
            );
            Ok(None)
        }
        (None, _) => Ok(None),
    }
}

/// Batch pictures go to `<data_dir>/batches/<job id>/images/`.
pub const BATCH_FILES_DIR: &str = "batches";

/// Starts the batch runner when this process is the first to hold the data
/// folder; another server on the same folder serves the API and leaves the
/// running to the holder.
pub fn start_batch_runner(state: Arc<AppState>) -> Result<Option<Runner>> {
    let dir = state.config.data_dir.clone();
    let Some(lock) = DataLock::try_acquire(&dir)? else {
        tracing::warn!(
            "{}: another molora process runs this folder's batch jobs; this one only stores them",
            dir.display()
        );
        return Ok(None);
    };
    let opts = RunnerOptions {
        concurrency: state.config.limits.batch_concurrency,
        busy_concurrency: state.config.limits.batch_concurrency_busy,
        stop_when_idle: false,
        poll: std::time::Duration::from_millis(250),
    };
    Runner::spawn(state, opts, lock).map(Some)
}

/// Loads the model, starts the engine thread, and builds the shared state.
pub fn build_state(cfg: ServerConfig) -> Result<AppState> {
    let device = device()?;
    let model_dir = cfg.model_dir.clone();
    let model_cfg = Config::from_file(&model_dir.join("config.json"))?;
    let vocab = model_cfg.vocab()?;
    let tokenizer_path = model_dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", tokenizer_path.display()))?;
    let vq = load_vq(&model_dir, &model_cfg, &device)?;
    let hot = HotSetConfig {
        capacity: cfg.hot_set.capacity,
        max_rank: cfg.hot_set.max_rank,
    };
    let started = Instant::now();
    let (mut runner, refused) = ModelRunner::load(&model_dir, &cfg.adapter_dir(), hot, &device)?;
    runner.decoder.set_weight_dtype(cfg.weight_dtype.dtype())?;
    for r in &refused {
        tracing::warn!("adapter refused: {r}");
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("{}: cannot create the data folder", cfg.data_dir.display()))?;
    let engine_cfg = EngineConfig {
        max_batch_size: cfg.limits.max_batch_size,
        max_queue: cfg.limits.max_queue,
        max_batch_tokens: cfg.limits.max_batch_tokens,
        max_context: model_cfg.max_position_embeddings,
    };
    let engine = Engine::start(runner, tokenizer.clone(), vq.clone(), engine_cfg);
    let model_name = engine.model_info().name;
    tracing::info!(
        model = %model_dir.display(),
        images = vq.is_some(),
        "model loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let validator = Validator {
        tokenizer: Arc::new(tokenizer),
        vocab,
        vq,
        limits: cfg.limits.clone(),
        max_context: model_cfg.max_position_embeddings,
        preview_every: cfg.preview_every,
    };
    let store = SqliteStore::open_in(&cfg.data_dir)?;
    let batches = BatchService::new(
        Arc::new(store),
        FilesLayout::PerJob(cfg.data_dir.join(BATCH_FILES_DIR)),
    );
    Ok(AppState {
        engine,
        validator,
        metrics: Metrics::new(),
        config: cfg,
        model_name,
        batches,
    })
}

/// Routes and extractor settings; the body limit comes from the config.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |c: &mut web::ServiceConfig| {
        use handlers::{adapters, batches, chat, compare, generate, ops};
        let limit = state.config.limits.max_body_bytes;
        let json = web::JsonConfig::default()
            .limit(limit)
            .content_type_required(false)
            .error_handler(move |err, _req| error::json_error(err, limit).into());
        let not_allowed = || web::to(ops::method_not_allowed);
        c.app_data(state)
            .app_data(json)
            .app_data(web::PayloadConfig::new(limit))
            .service(
                web::resource("/")
                    .get(playground::page)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/health")
                    .get(ops::health)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/metrics")
                    .get(ops::metrics)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/models")
                    .get(ops::models)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/generate")
                    .post(generate::generate)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/chat/completions")
                    .post(chat::chat_completions)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/compare")
                    .post(compare::compare)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/adapters")
                    .get(adapters::list)
                    .post(adapters::load)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/adapters/{name}")
                    .delete(adapters::unload)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/batches")
                    .get(batches::list)
                    .post(batches::create)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/batches/{id}")
                    .get(batches::get)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/batches/{id}/results")
                    .get(batches::results)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/batches/{id}/cancel")
                    .post(batches::cancel)
                    .default_service(not_allowed()),
            )
            .service(
                web::resource("/v1/batches/{id}/images/{name}")
                    .get(batches::image)
                    .default_service(not_allowed()),
            )
            .default_service(web::to(error::not_found));
    }
}

/// Logs every request through tracing and counts it (by route pattern,
/// status and error type).
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = req.method().clone();
    let path = req.path().to_string();
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let kind = res.response().extensions().get::<ErrorKind>().map(|k| k.0);
    if let Some(state) = state {
        state.metrics.observe_request(&route, status, kind);
    }
    tracing::info!(%method, path, status, error = kind, ms = start.elapsed().as_secs_f64() * 1e3, "request");
    Ok(res)
}

/// A server running on its own thread.
pub struct RunningServer {
    pub addr: SocketAddr,
    handle: ServerHandle,
    thread: JoinHandle<std::io::Result<()>>,
    /// The batch runner, when this server holds its data folder.
    batch_runner: Option<Runner>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets open requests finish, and waits.
    pub fn stop(self) -> Result<()> {
        futures::executor::block_on(self.handle.stop(true));
        self.wait()
    }

    /// Blocks until the server exits (Ctrl-C stops it); then stops the
    /// batch runner, which gives its running items back to the store.
    pub fn wait(self) -> Result<()> {
        let served = self
            .thread
            .join()
            .map_err(|_| anyhow!("the server thread panicked"))?
            .context("the HTTP server failed");
        if let Some(runner) = self.batch_runner {
            let stats = runner.stop()?;
            tracing::info!(released = stats.released, "batch runner stopped");
        }
        served
    }
}

/// Loads the model, binds `cfg.bind` (port 0 picks a free port) and serves
/// on a background thread. Returns once the socket is bound.
pub fn start(cfg: ServerConfig) -> Result<RunningServer> {
    let listener =
        TcpListener::bind(&cfg.bind).with_context(|| format!("cannot bind {}", cfg.bind))?;
    let addr = listener.local_addr()?;
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let state = web::Data::new(build_state(cfg)?);
    let batch_runner = start_batch_runner(state.clone().into_inner())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("molora-http".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .wrap(from_fn(observe))
                        .configure(configure(state.clone()))
                })
                .workers(workers)
                .shutdown_timeout(5)
                // Streams are many small writes: without this, Nagle's algorithm
                // holds each one until the client's delayed ACK (~40 ms).
                .tcp_nodelay(true)
                .listen(listener)?
                .run();
                let _ = tx.send(server.handle());
                server.await
            })
        })?;
    let handle = rx
        .recv()
        .map_err(|_| anyhow!("the HTTP server did not start"))?;
    tracing::info!("listening on http://{addr}");
    Ok(RunningServer {
        addr,
        handle,
        thread,
        batch_runner,
    })
}

/// `molora serve`: start and block until stopped.
pub fn serve(cfg: ServerConfig) -> Result<()> {
    start(cfg)?.wait()
}
