//! One shard's search index on disk: its schema, and opening it as it was left, or
//! rebuilding it when it is missing, damaged, of another schema, or ahead of the log.
//!
//! The index is derived state. Each commit records, in tantivy's commit payload, the last
//! LSN of the shard's log it covers; a restart resumes from there. Anything doubtful is
//! answered by deleting the index and indexing the log again from its start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED, STRING,
};
use tantivy::{Index, IndexReader, ReloadPolicy};

use super::tokenizer::{analyzer, TOKENIZER_NAME};

/// The payload's format; another one is rebuilt.
const POSITION_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("search index {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("search index {path}: {what}: {source}")]
    Tantivy {
        path: PathBuf,
        what: &'static str,
        source: tantivy::TantivyError,
    },
    #[error("search index {path}: its schema lacks the message fields")]
    Schema { path: PathBuf },
}

/// The fields of a message's document.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    pub conv: Field,
    pub seq: Field,
    pub from: Field,
    pub ts: Field,
    pub kind: Field,
    pub body: Field,
}

impl Fields {
    fn of(schema: &Schema) -> Option<Fields> {
        let field = |name| schema.get_field(name).ok();
        Some(Fields {
            conv: field("conv")?,
            seq: field("seq")?,
            from: field("from")?,
            ts: field("ts")?,
            kind: field("kind")?,
            body: field("body")?,
        })
    }
}

pub fn schema() -> Schema {
    let mut builder = Schema::builder();
    builder.add_text_field("conv", STRING | STORED);
    builder.add_u64_field("seq", STORED);
    builder.add_text_field("from", STRING | STORED);
    builder.add_u64_field("ts", INDEXED | STORED | FAST);
    builder.add_text_field("kind", STRING | STORED);
    let body = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(TOKENIZER_NAME)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    builder.add_text_field("body", body);
    builder.build()
}

/// What a commit records: the last LSN of the log the index covers.
#[derive(Debug, Serialize, Deserialize)]
struct Position {
    format: u32,
    lsn: u64,
}

/// The LSN a commit payload records, if it is this build's.
fn parse_position(payload: &str) -> Option<u64> {
    serde_json::from_str::<Position>(payload)
        .ok()
        .filter(|p| p.format == POSITION_FORMAT)
        .map(|p| p.lsn)
}

/// The LSN the index's last commit covers, as it is on disk now.
pub fn committed_lsn(index: &Index) -> Option<u64> {
    parse_position(&index.load_metas().ok()?.payload?)
}

pub fn position_payload(lsn: u64) -> String {
    serde_json::to_string(&Position {
        format: POSITION_FORMAT,
        lsn,
    })
    .unwrap_or_default()
}

/// A shard's index, open.
pub struct ShardIndex {
    pub dir: PathBuf,
    pub index: Index,
    /// Reloaded by the indexer after each commit; clones share it.
    pub reader: IndexReader,
    pub fields: Fields,
}

/// How the index was found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// As left: indexing resumes after `lsn`.
    Resumed { lsn: u64 },
    /// There was none.
    Created,
    /// There was one, but `why`: indexing starts from the log's beginning.
    Rebuilt { why: String },
}

/// Open the index in `dir` for a log that is durable up to `durable_lsn`: the index,
/// the LSN it covers, and how it was found.
pub fn open(dir: &Path, durable_lsn: u64) -> Result<(ShardIndex, u64, Opened), IndexError> {
    let opened = match dir.exists() {
        false => Opened::Created,
        true => match check(dir, durable_lsn).and_then(|(index, lsn)| {
            // A reader that cannot open it is one more reason to rebuild.
            ready(dir, index)
                .map(|ready| (ready, lsn))
                .map_err(|e| e.to_string())
        }) {
            Ok((index, lsn)) => return Ok((index, lsn, Opened::Resumed { lsn })),
            Err(why) => {
                std::fs::remove_dir_all(dir).map_err(|source| IndexError::Io {
                    path: dir.to_path_buf(),
                    what: "removing it to rebuild",
                    source,
                })?;
                Opened::Rebuilt { why }
            }
        },
    };
    std::fs::create_dir_all(dir).map_err(|source| IndexError::Io {
        path: dir.to_path_buf(),
        what: "creating it",
        source,
    })?;
    let index = Index::create_in_dir(dir, schema()).map_err(|source| IndexError::Tantivy {
        path: dir.to_path_buf(),
        what: "creating it",
        source,
    })?;
    Ok((ready(dir, index)?, 0, opened))
}

/// The index in `dir` and the LSN it covers, if it can be trusted; else why not.
fn check(dir: &Path, durable_lsn: u64) -> Result<(Index, u64), String> {
    let index = Index::open_in_dir(dir).map_err(|e| format!("it does not open: {e}"))?;
    if index.schema() != schema() {
        return Err("its schema is not this build's".into());
    }
    let corrupt = index
        .validate_checksum()
        .map_err(|e| format!("its checksums cannot be read: {e}"))?;
    if !corrupt.is_empty() {
        let mut files: Vec<String> = corrupt.iter().map(|p| p.display().to_string()).collect();
        files.sort();
        return Err(format!("files fail their checksum: {}", files.join(", ")));
    }
    let metas = index
        .load_metas()
        .map_err(|e| format!("its commit cannot be read: {e}"))?;
    let lsn = match metas.payload.as_deref() {
        // Created and never committed: nothing indexed yet.
        None if metas.segments.is_empty() => 0,
        None => return Err("its commit records no log position".into()),
        Some(payload) => parse_position(payload)
            .ok_or_else(|| format!("its commit's log position {payload:?} is not this build's"))?,
    };
    if lsn > durable_lsn {
        return Err(format!(
            "it covers the log up to LSN {lsn}, past the log's end {durable_lsn}"
        ));
    }
    Ok((index, lsn))
}

fn ready(dir: &Path, index: Index) -> Result<ShardIndex, IndexError> {
    index.tokenizers().register(TOKENIZER_NAME, analyzer());
    let reader = index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
        .map_err(|source| IndexError::Tantivy {
            path: dir.to_path_buf(),
            what: "opening a reader",
            source,
        })?;
    // `check` compared the schema with ours, and a new index has ours.
    let fields = Fields::of(&index.schema()).ok_or_else(|| IndexError::Schema {
        path: dir.to_path_buf(),
    })?;
    Ok(ShardIndex {
        dir: dir.to_path_buf(),
        index,
        reader,
        fields,
    })
}

/// Bytes the index's files take on disk.
pub fn size_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len())
        .sum()
}
