//! Full-text search (PROTOCOL.md section 10), beside the shards rather than on them:
//!
//! - `tokenizer`: words fold case and accents; unspaced scripts index per character;
//! - `index`: a shard's tantivy index on disk, opened as left or rebuilt;
//! - `indexer`: a thread per shard following its log and indexing each durable message;
//! - `query`: one search over the shards' indexes, restricted to the user's conversations.
//!
//! The chat core resolves which conversations the user is a member of now (from their
//! home shards, as for `conv.list`) and hands the search to this service through the
//! shard's core task. One search thread runs searches from a bounded queue (a full queue
//! is answered `unavailable` at once) and answers the session's shard through its reply
//! port, which wakes the shard's core task. No search runs on a shard's loop.

pub mod index;
pub mod indexer;
pub mod query;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use parley_router::protocol::{encode_err, encode_ok, ErrorCode};
use parley_router::search::SearchRequest;
use parley_wal::Wal;

use self::index::{IndexError, ShardIndex};
use self::indexer::IndexerPlan;
use crate::metrics::ShardMetrics;

#[derive(Debug, Clone)]
pub struct SearchSettings {
    /// `<data_dir>/search`: one directory per shard under it.
    pub dir: PathBuf,
    pub heap_bytes: usize,
    pub commit_interval: Duration,
    pub max_results: usize,
    pub queue_len: usize,
    /// The catch-up threads' nice value (`search_rebuild_nice`).
    pub rebuild_nice: i32,
}

/// A search waiting for the search thread.
struct Job {
    shard: usize,
    request: SearchRequest,
    queued: Instant,
}

/// Answers for one shard's sessions, and the waker of its core task.
struct ReplyPort {
    sender: Sender<(u64, String)>,
    receiver: Mutex<Option<Receiver<(u64, String)>>>,
    waker: AtomicWaker,
}

/// The node's search service: the shards' indexes, their indexers, the search thread.
pub struct SearchService {
    settings: SearchSettings,
    indexes: Arc<Vec<OnceLock<Arc<ShardIndex>>>>,
    ports: Arc<Vec<ReplyPort>>,
    jobs: SyncSender<Job>,
    metrics: Vec<Arc<ShardMetrics>>,
}

/// A shard's end of the service.
pub struct ShardSearch {
    service: Arc<SearchService>,
    shard: usize,
    replies: Receiver<(u64, String)>,
}

/// One shard's indexer, running.
pub struct Indexer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SearchService {
    /// The service for `metrics.len()` shards, its search thread started.
    pub fn start(
        settings: SearchSettings,
        metrics: Vec<Arc<ShardMetrics>>,
    ) -> std::io::Result<Arc<Self>> {
        let shards = metrics.len();
        let indexes: Arc<Vec<OnceLock<Arc<ShardIndex>>>> =
            Arc::new((0..shards).map(|_| OnceLock::new()).collect());
        let ports: Arc<Vec<ReplyPort>> = Arc::new(
            (0..shards)
                .map(|_| {
                    let (sender, receiver) = std::sync::mpsc::channel();
                    ReplyPort {
                        sender,
                        receiver: Mutex::new(Some(receiver)),
                        waker: AtomicWaker::new(),
                    }
                })
                .collect(),
        );
        let (jobs, queue) = std::sync::mpsc::sync_channel(settings.queue_len);
        let worker = Worker {
            indexes: indexes.clone(),
            ports: ports.clone(),
            metrics: metrics.clone(),
            max_results: settings.max_results,
        };
        std::thread::Builder::new()
            .name("parley-search".into())
            .spawn(move || worker.run(queue))?;
        Ok(Arc::new(SearchService {
            settings,
            indexes,
            ports,
            jobs,
            metrics,
        }))
    }

    /// Shard `shard`'s end: taken once, by its core task.
    pub fn shard_end(self: &Arc<Self>, shard: usize) -> Option<ShardSearch> {
        let receiver = self.ports.get(shard)?.receiver.lock().ok()?.take()?;
        Some(ShardSearch {
            service: self.clone(),
            shard,
            replies: receiver,
        })
    }

    /// Open (or rebuild) shard `shard`'s index for its recovered log and start its indexer.
    pub fn start_indexer(&self, shard: usize, wal: Arc<Wal>) -> Result<Indexer, IndexError> {
        let dir = shard_dir(&self.settings.dir, shard);
        let (index, position, opened) = index::open(&dir, wal.durable_lsn())?;
        let index = Arc::new(index);
        let _ = self.indexes[shard].set(index.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let plan = IndexerPlan {
            shard,
            wal,
            index: index.clone(),
            position,
            opened,
            heap_bytes: self.settings.heap_bytes,
            commit_interval: self.settings.commit_interval,
            rebuild_nice: self.settings.rebuild_nice,
            metrics: self.metrics[shard].clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("parley-index-{shard}"))
            .spawn(move || indexer::run(plan))
            .map_err(|source| IndexError::Io {
                path: dir,
                what: "starting its indexer thread",
                source,
            })?;
        Ok(Indexer {
            stop,
            thread: Some(thread),
        })
    }
}

fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

impl ShardSearch {
    /// Queue a search; a full queue answers the session `unavailable` at once.
    pub fn submit(&self, request: SearchRequest) {
        let metrics = &self.service.metrics[self.shard];
        let job = Job {
            shard: self.shard,
            request,
            queued: Instant::now(),
        };
        match self.service.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                metrics.search_queries_refused.fetch_add(1, Relaxed);
                metrics.error_sent(ErrorCode::Unavailable);
                let doc = encode_err(
                    Some(job.request.re),
                    ErrorCode::Unavailable,
                    "the search service is busy (search_queue_len searches wait): retry",
                );
                self.service.ports[self.shard].send(job.request.conn, doc);
            }
        }
    }

    /// Answers ready for this shard's sessions; `waker` is woken when more arrive.
    pub fn take_replies(&self, waker: &std::task::Waker, mut each: impl FnMut(u64, String)) {
        self.service.ports[self.shard].waker.register(waker);
        while let Ok((conn, doc)) = self.replies.try_recv() {
            each(conn, doc);
        }
    }
}

impl ReplyPort {
    fn send(&self, conn: u64, doc: String) {
        // The shard is gone (stopping): nobody to answer.
        let _ = self.sender.send((conn, doc));
        self.waker.wake();
    }
}

impl Indexer {
    /// Stop the indexer after it commits what it indexed, and wait for it.
    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The search thread.
struct Worker {
    indexes: Arc<Vec<OnceLock<Arc<ShardIndex>>>>,
    ports: Arc<Vec<ReplyPort>>,
    metrics: Vec<Arc<ShardMetrics>>,
    max_results: usize,
}

impl Worker {
    fn run(self, queue: Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            let indexes: Vec<Option<&ShardIndex>> =
                self.indexes.iter().map(|i| i.get().map(|i| &**i)).collect();
            let re = job.request.re;
            // A panic in the search library must cost one search, not the service.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                query::run(&job.request, &indexes, self.max_results)
            }));
            let doc = match ran {
                Ok(Ok(answer)) => encode_ok(re, &answer),
                failed => {
                    match failed {
                        Ok(Err(error)) => tracing::error!(%error, "search failed"),
                        _ => tracing::error!("search panicked"),
                    }
                    self.metrics[job.shard].error_sent(ErrorCode::Internal);
                    encode_err(Some(re), ErrorCode::Internal, "the search failed")
                }
            };
            let metrics = &self.metrics[job.shard];
            metrics.search_queries.fetch_add(1, Relaxed);
            metrics.search_query_latency.record(job.queued.elapsed());
            self.ports[job.shard].send(job.request.conn, doc);
        }
    }
}
