//! The Raft log and vote, persisted under the MDM's directory:
//!
//! - `vote.json`, `committed.json`, `purged.json`: replaced atomically ([`durable_file`]);
//! - `log.jsonl`: one entry per line, `<crc32c as 8 hex digits> <entry as JSON>`.
//!
//! An append is acknowledged to openraft only after `fdatasync`, so an entry it counts as
//! stored survives a crash. A torn last line (crash mid-append, never acknowledged) is
//! dropped on load; a bad checksum anywhere else is corruption and stops the MDM.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use tokio::sync::Mutex;

use crate::durable_file;
use crate::TypeConfig;

type NodeId = u64;

struct Inner {
    dir: PathBuf,
    log_file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

fn encode_line(entry: &Entry<TypeConfig>) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(entry)?;
    let mut line = format!("{:08x} ", crc32c::crc32c(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

fn decode_line(line: &[u8]) -> Option<Entry<TypeConfig>> {
    let (crc_hex, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc_hex).ok()?, 16).ok()?;
    if crc32c::crc32c(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match durable_file::read_optional(path)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| io_err(format!("{}: {e}", path.display()))),
    }
}

/// Replaces `path` with `value` as JSON, durably, on the blocking pool.
async fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io_err)?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || durable_file::replace(&path, &bytes))
        .await
        .unwrap_or_else(|e| Err(io_err(format!("write task failed: {e}"))))
}

impl LogStore {
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let log_path = dir.join("log.jsonl");
        let last_purged: Option<LogId<NodeId>> = read_json(&dir.join("purged.json"))?;
        let mut entries = BTreeMap::new();
        let raw = durable_file::read_optional(&log_path)?.unwrap_or_default();
        let lines: Vec<&[u8]> = raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        let mut torn_tail = false;
        for (i, line) in lines.iter().enumerate() {
            match decode_line(line) {
                Some(e) => {
                    entries.insert(e.log_id.index, e);
                }
                None if i + 1 == lines.len() => torn_tail = true,
                None => {
                    return Err(io_err(format!("{}: corrupt entry at line {}", log_path.display(), i + 1)));
                }
            }
        }
        if let Some(p) = last_purged {
            entries.retain(|&idx, _| idx > p.index);
        }
        let store = Inner {
            dir: dir.to_path_buf(),
            log_file: OpenOptions::new().create(true).append(true).open(&log_path)?,
            entries,
            last_purged,
            vote: read_json(&dir.join("vote.json"))?,
            committed: read_json(&dir.join("committed.json"))?,
        };
        let mut store = store;
        if torn_tail {
            tracing::warn!("dropping a torn, unacknowledged last entry of {}", log_path.display());
            store.rewrite()?;
        }
        Ok(LogStore { inner: Arc::new(Mutex::new(store)) })
    }

    /// True when this node has never voted nor logged anything: a brand-new MDM.
    pub async fn is_pristine(&self) -> bool {
        let s = self.inner.lock().await;
        s.vote.is_none() && s.entries.is_empty() && s.last_purged.is_none()
    }
}

impl Inner {
    /// Rewrites `log.jsonl` from memory (after truncate or purge, which are rare).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let mut content = Vec::new();
        for e in self.entries.values() {
            content.extend(encode_line(e).map_err(io_err)?);
        }
        let path = self.dir.join("log.jsonl");
        durable_file::replace(&path, &content)?;
        self.log_file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let s = self.inner.lock().await;
        // Only entries that continue from the start of the range: openraft 0.9 may ask for a
        // range it chose before a purge, and would send whatever comes back — entries after a
        // hole, which a follower must never store. Nothing at all makes it fall back to a
        // snapshot instead. (Found by tests/raft_sim.rs.)
        let start = match range.start_bound() {
            std::ops::Bound::Included(i) => *i,
            std::ops::Bound::Excluded(i) => i + 1,
            std::ops::Bound::Unbounded => s.entries.keys().next().copied().unwrap_or(0),
        };
        Ok(s.entries
            .range(range)
            .zip(start..)
            .take_while(|((index, _), expected)| **index == *expected)
            .map(|((_, entry), _)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let s = self.inner.lock().await;
        let last = s.entries.values().next_back().map(|e| e.log_id).or(s.last_purged);
        Ok(LogState { last_purged_log_id: s.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.inner.lock().await;
        write_json(&s.dir.join("vote.json"), vote).await.map_err(|e| StorageIOError::write_vote(&e))?;
        s.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().await.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.inner.lock().await;
        write_json(&s.dir.join("committed.json"), &committed).await.map_err(|e| StorageIOError::write(&e))?;
        s.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut s = self.inner.lock().await;
        let mut buf = Vec::new();
        let mut new_entries = Vec::new();
        for e in entries {
            buf.extend(encode_line(&e).map_err(|err| StorageIOError::write_logs(&err))?);
            new_entries.push(e);
        }
        // The write and fdatasync run on the blocking pool: on a current-thread runtime an
        // fsync stalled behind other disk traffic would otherwise also stall heartbeats and
        // cost the leadership. The log lock is held throughout, so appends stay ordered.
        let written = match s.log_file.try_clone() {
            Ok(mut file) => tokio::task::spawn_blocking(move || file.write_all(&buf).and_then(|_| file.sync_data()))
                .await
                .unwrap_or_else(|e| Err(io_err(format!("log append task failed: {e}")))),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let msg = e.to_string();
            callback.log_io_completed(Err(e));
            return Err(StorageIOError::write_logs(&io_err(msg)).into());
        }
        for e in new_entries {
            s.entries.insert(e.log_id.index, e);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.inner.lock().await;
        s.entries.retain(|&idx, _| idx < log_id.index);
        s.rewrite().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut s = self.inner.lock().await;
        // Record the purge point first: a crash before the rewrite leaves extra old entries,
        // which load drops; the reverse order could lose the purge point.
        write_json(&s.dir.join("purged.json"), &log_id).await.map_err(|e| StorageIOError::write_logs(&e))?;
        s.last_purged = Some(log_id);
        s.entries.retain(|&idx, _| idx > log_id.index);
        s.rewrite().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
