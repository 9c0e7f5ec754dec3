//! search-bench: parleyd's search over a log of many messages, beside SQLite FTS5 holding
//! the same messages (issue 22's figures, docs/BENCHMARKS.md).
//!
//! 1. Writes `--messages` chat messages into one WAL per shard (as parleyd's shards would,
//!    conversations homed by the same hash), in `--convs` conversations.
//! 2. Runs parleyd's own indexers over those logs (the code parleyd runs, with its default
//!    heap and commit interval) and reports the indexing rate per shard.
//! 3. Runs `--queries` one-word searches, each over `--user-convs` conversations (a user's),
//!    through parleyd's search, and the same queries against an FTS5 table of the same
//!    messages; reports p50/p99 of each.
//!
//! Messages are synthetic but shaped like chat: 4-16 words, drawn with Zipf-like
//! frequencies from a vocabulary of 50,000 made-up words. Everything is seeded, so two
//! runs search the same text with the same queries.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_gateway::metrics::ShardMetrics;
use parley_gateway::search::index::{self, ShardIndex};
use parley_gateway::search::indexer::{self, IndexerPlan};
use parley_gateway::search::query;
use parley_router::ownership::conversation_home;
use parley_router::record::{ChatRecord, MessageKind, StoredMessage, CHAT_RECORD_TYPE};
use parley_router::search::{SearchQuery, SearchRequest, Term};
use parley_wal::{Entry, Wal, WalOptions};

struct Args {
    dir: PathBuf,
    messages: u64,
    convs: u64,
    shards: usize,
    queries: usize,
    user_convs: usize,
    sqlite: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: PathBuf::from("/tmp/parley-search-bench"),
        messages: 10_000_000,
        convs: 10_000,
        shards: 2,
        queries: 1_000,
        user_convs: 100,
        sqlite: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--messages" => args.messages = number(value()?)?,
            "--convs" => args.convs = number(value()?)?,
            "--shards" => args.shards = number(value()?)? as usize,
            "--queries" => args.queries = number(value()?)? as usize,
            "--user-convs" => args.user_convs = number(value()?)? as usize,
            "--no-sqlite" => args.sqlite = false,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.shards == 0 || args.convs == 0 || args.user_convs as u64 > args.convs {
        return Err("--shards and --convs must be positive, --user-convs at most --convs".into());
    }
    Ok(args)
}

/// xorshift64*: deterministic and fast; quality is not the point.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const VOCABULARY: u64 = 50_000;
const SYLLABLES: [&str; 20] = [
    "ka", "lo", "mi", "te", "ru", "sa", "no", "vi", "de", "po", "ha", "li", "ze", "mu", "ta", "ri",
    "go", "be", "fa", "ni",
];

/// The made-up word of frequency rank `rank` (0 the most frequent).
fn word(rank: u64) -> String {
    let mut n = rank + 20;
    let mut out = String::new();
    while n > 0 {
        out.push_str(SYLLABLES[(n % 20) as usize]);
        n /= 20;
    }
    out
}

/// A rank with probability about 1/rank (log-uniform).
fn zipf_rank(rng: &mut Rng) -> u64 {
    ((VOCABULARY as f64).powf(rng.unit()) as u64).saturating_sub(1)
}

fn conv_id(i: u64) -> String {
    format!("g-bench{i:06}")
}

/// The `n`th message of the seeded stream, its conversation's next seq taken from `seqs`.
fn message(rng: &mut Rng, n: u64, convs: u64, seqs: &mut [u64]) -> StoredMessage {
    let conv = rng.below(convs);
    seqs[conv as usize] += 1;
    let words = 4 + rng.below(13);
    let body = (0..words)
        .map(|_| word(zipf_rank(rng)))
        .collect::<Vec<_>>()
        .join(" ");
    StoredMessage {
        conv: conv_id(conv),
        seq: seqs[conv as usize],
        from: format!("user{}", rng.below(1000)),
        cmid: format!("m{n}"),
        ts: 1_700_000_000_000 + n,
        kind: MessageKind::Text,
        body,
        media: None,
        reply_to: None,
    }
}

fn wal_options() -> WalOptions {
    WalOptions::default()
}

fn progress(what: &str, done: u64, of: u64, since: Instant) {
    eprintln!(
        "search-bench: {what}: {done} of {of} ({:.0}/s)",
        done as f64 / since.elapsed().as_secs_f64()
    );
}

/// Step 1: the messages into one log per shard.
fn write_logs(args: &Args) -> Result<Vec<Arc<Wal>>, String> {
    let mut wals = Vec::new();
    for shard in 0..args.shards {
        let dir = args.dir.join(format!("shard-{shard}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (wal, _) = Wal::open(&dir, wal_options(), &mut |_| {}).map_err(|e| e.to_string())?;
        wals.push(Arc::new(wal));
    }
    let mut rng = Rng(0x5eed);
    let mut seqs = vec![0u64; args.convs as usize];
    let mut batches: Vec<Vec<Vec<u8>>> = vec![Vec::new(); args.shards];
    let started = Instant::now();
    let mut last_report = Instant::now();
    let flush = |wal: &Wal, batch: &mut Vec<Vec<u8>>| -> Result<(), String> {
        let entries: Vec<Entry<'_>> = batch
            .iter()
            .map(|payload| Entry {
                record_type: CHAT_RECORD_TYPE,
                timestamp: 0,
                payload,
            })
            .collect();
        wal.append_batch(&entries).map_err(|e| e.to_string())?;
        batch.clear();
        Ok(())
    };
    for n in 0..args.messages {
        let message = message(&mut rng, n, args.convs, &mut seqs);
        let shard = conversation_home(&message.conv, args.shards as u32) as usize;
        batches[shard].push(ChatRecord::Message(message).encode());
        if batches[shard].len() == 256 {
            flush(&wals[shard], &mut batches[shard])?;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress("writing the logs", n, args.messages, started);
        }
    }
    for (wal, batch) in wals.iter().zip(&mut batches) {
        if !batch.is_empty() {
            flush(wal, batch)?;
        }
        wal.wait_durable(wal.next_lsn() - 1)
            .map_err(|e| e.to_string())?;
    }
    eprintln!(
        "search-bench: wrote {} messages in {:.1} s",
        args.messages,
        started.elapsed().as_secs_f64()
    );
    Ok(wals)
}

/// Step 2: parleyd's indexers over the logs, all at once; the index of each shard.
fn index_logs(args: &Args, wals: &[Arc<Wal>]) -> Result<Vec<Arc<ShardIndex>>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut indexes = Vec::new();
    let mut threads = Vec::new();
    let mut metrics = Vec::new();
    let started = Instant::now();
    for (shard, wal) in wals.iter().enumerate() {
        let dir = args.dir.join("search").join(format!("shard-{shard}"));
        let (index, position, opened) =
            index::open(&dir, wal.durable_lsn()).map_err(|e| e.to_string())?;
        let index = Arc::new(index);
        let shard_metrics = Arc::new(ShardMetrics::default());
        let plan = IndexerPlan {
            shard,
            wal: wal.clone(),
            index: index.clone(),
            position,
            opened,
            // parleyd's defaults (search_index_heap_bytes, search_commit_interval_ms).
            heap_bytes: 32 << 20,
            commit_interval: Duration::from_millis(500),
            // Nothing else runs here: the catch-up's priority changes nothing.
            rebuild_nice: 10,
            metrics: shard_metrics.clone(),
            stop: stop.clone(),
        };
        threads.push(std::thread::spawn(move || indexer::run(plan)));
        indexes.push(index);
        metrics.push(shard_metrics);
    }
    let mut done_at: Vec<Option<Duration>> = vec![None; wals.len()];
    let mut last_report = Instant::now();
    while done_at.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(50));
        for (shard, wal) in wals.iter().enumerate() {
            let indexed = metrics[shard].search_indexed_lsn.load(Relaxed);
            if done_at[shard].is_none() && indexed == wal.durable_lsn() {
                done_at[shard] = Some(started.elapsed());
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let indexed: u64 = metrics
                .iter()
                .map(|m| m.search_docs_indexed.load(Relaxed))
                .sum();
            progress("indexing", indexed, args.messages, started);
        }
    }
    stop.store(true, Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    for (shard, took) in done_at.iter().enumerate() {
        let docs = metrics[shard].search_docs_indexed.load(Relaxed);
        let took = took.unwrap_or_default().as_secs_f64();
        let bytes = index::size_on_disk(&indexes[shard].dir);
        println!(
            "index shard {shard}: {docs} messages in {took:.1} s = {:.0} messages/s; index {:.0} MiB on disk",
            docs as f64 / took,
            bytes as f64 / (1 << 20) as f64
        );
    }
    for index in &indexes {
        index.reader.reload().map_err(|e| e.to_string())?;
    }
    Ok(indexes)
}

/// The queries: a user's conversations and a word of middling frequency, each.
fn queries(args: &Args) -> Vec<(Vec<String>, String)> {
    let mut rng = Rng(0x9e37);
    (0..args.queries)
        .map(|_| {
            let mut convs = std::collections::BTreeSet::new();
            while convs.len() < args.user_convs {
                convs.insert(conv_id(rng.below(args.convs)));
            }
            // Ranks 100-2000: words each in roughly 0.1 %-1 % of messages.
            let rank = 100 + rng.below(1900);
            (convs.into_iter().collect(), word(rank))
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1e3
}

fn report(name: &str, mut times: Vec<Duration>, hits: u64) {
    times.sort();
    println!(
        "{name}: {} queries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.1} hits per query on average",
        times.len(),
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        percentile(&times, 1.0),
        hits as f64 / times.len() as f64
    );
}

/// Step 3a: parleyd's search.
/// Each query's hits, as (conv, seq).
type HitSets = Vec<std::collections::BTreeSet<(String, u64)>>;

fn query_parley(
    indexes: &[Arc<ShardIndex>],
    queries: &[(Vec<String>, String)],
) -> Result<HitSets, String> {
    let indexes: Vec<Option<&ShardIndex>> = indexes.iter().map(|i| Some(&**i)).collect();
    let mut times = Vec::new();
    let mut hits = 0;
    let mut sets = Vec::new();
    for (convs, word) in queries {
        let request = SearchRequest {
            conn: 0,
            re: 0,
            user: Arc::from("bench"),
            convs: convs.clone(),
            query: SearchQuery {
                terms: vec![Term::Word(word.clone())],
                conv: None,
                from: None,
                after_ts: None,
                before_ts: None,
                limit: 20,
                offset: 0,
            },
        };
        let started = Instant::now();
        let answer = query::run(&request, &indexes, 1000).map_err(|e| e.to_string())?;
        times.push(started.elapsed());
        hits += answer.hits.len() as u64;
        sets.push(answer.hits.into_iter().map(|h| (h.conv, h.seq)).collect());
    }
    report("parleyd search (tantivy)", times, hits);
    Ok(sets)
}

/// Step 3b: the same messages and queries in SQLite FTS5.
fn sqlite(args: &Args, queries: &[(Vec<String>, String)]) -> Result<HitSets, String> {
    let path = args.dir.join("fts5.sqlite");
    let _ = std::fs::remove_file(&path);
    let db = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
    let sql = |e: rusqlite::Error| e.to_string();
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE VIRTUAL TABLE msgs USING fts5(
             body, conv UNINDEXED, seq UNINDEXED, sender UNINDEXED, ts UNINDEXED,
             tokenize = 'unicode61 remove_diacritics 2');",
    )
    .map_err(sql)?;
    let mut rng = Rng(0x5eed);
    let mut seqs = vec![0u64; args.convs as usize];
    let started = Instant::now();
    let mut last_report = Instant::now();
    db.execute_batch("BEGIN").map_err(sql)?;
    {
        let mut insert = db
            .prepare("INSERT INTO msgs (body, conv, seq, sender, ts) VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(sql)?;
        for n in 0..args.messages {
            let m = message(&mut rng, n, args.convs, &mut seqs);
            insert
                .execute(rusqlite::params![
                    m.body,
                    m.conv,
                    m.seq as i64,
                    m.from,
                    m.ts as i64
                ])
                .map_err(sql)?;
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress("SQLite FTS5 inserts", n, args.messages, started);
            }
        }
    }
    db.execute_batch("COMMIT").map_err(sql)?;
    let took = started.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "SQLite FTS5: {} messages in {took:.1} s = {:.0} messages/s (one thread, one transaction); {:.0} MiB on disk",
        args.messages,
        args.messages as f64 / took,
        bytes as f64 / (1 << 20) as f64
    );
    let mut times = Vec::new();
    let mut hits = 0;
    let mut sets = Vec::new();
    for (convs, word) in queries {
        let list = convs
            .iter()
            .map(|c| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(",");
        let text = format!(
            "SELECT conv, seq, sender, ts, snippet(msgs, 0, '<b>', '</b>', '…', 16) FROM msgs \
             WHERE msgs MATCH ?1 AND conv IN ({list}) ORDER BY rank LIMIT 20"
        );
        let started = Instant::now();
        let mut statement = db.prepare(&text).map_err(sql)?;
        let rows: std::collections::BTreeSet<(String, u64)> = statement
            .query_map([word], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
            })
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)?;
        times.push(started.elapsed());
        hits += rows.len() as u64;
        sets.push(rows);
    }
    report("SQLite FTS5", times, hits);
    Ok(sets)
}

fn run(args: &Args) -> Result<(), String> {
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    }
    let wals = write_logs(args)?;
    let indexes = index_logs(args, &wals)?;
    let queries = queries(args);
    let parley = query_parley(&indexes, &queries)?;
    drop(indexes);
    drop(wals);
    if args.sqlite {
        let fts5 = sqlite(args, &queries)?;
        // Where a query has fewer hits than a page, both must have found the same ones.
        let complete = (parley.iter().zip(&fts5)).filter(|(p, f)| p.len() < 20 && f.len() < 20);
        let (compared, differ) =
            complete.fold((0, 0), |(n, d), (p, f)| (n + 1, d + usize::from(p != f)));
        println!(
            "same hits: {} of {compared} queries with under a page of hits",
            compared - differ
        );
        if differ > 0 {
            return Err(format!(
                "{differ} queries found other messages than SQLite FTS5"
            ));
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("search-bench: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("search-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
