//! The MDM state machine: [`ClusterState`] plus the Raft bookkeeping, persisted after every
//! applied batch (`state_machine.json`, replaced atomically). Metadata is small — the PG
//! tables are a few KiB per pool — so writing it whole keeps recovery trivial: load the
//! file, and openraft replays any committed entries after `last_applied`.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tessera_core::{ClusterState, CommandOutcome};
use tokio::sync::RwLock;

use crate::durable_file;
use crate::membership::MdmNode;
use crate::TypeConfig;

type NodeId = u64;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, MdmNode>,
    pub state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MdmNode>,
    data: Vec<u8>,
}

/// Shared by openraft (which applies) and the control server (which reads).
#[derive(Clone)]
pub struct StateMachineStore {
    dir: PathBuf,
    pub data: Arc<RwLock<SmData>>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The last applied index, for long polls that wait for a change.
    pub version: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachineStore {
    pub fn open(dir: &Path) -> std::io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let data = match durable_file::read_optional(&dir.join("state_machine.json"))? {
            Some(b) => {
                serde_json::from_slice(&b).map_err(|e| std::io::Error::other(format!("state_machine.json: {e}")))?
            }
            None => SmData::default(),
        };
        let version = Arc::new(tokio::sync::watch::Sender::new(data.last_applied.map_or(0, |l| l.index)));
        Ok(StateMachineStore {
            dir: dir.to_path_buf(),
            data: Arc::new(RwLock::new(data)),
            snapshot_seq: Arc::default(),
            version,
        })
    }

    /// Writes the whole state machine and syncs it, on the blocking pool (see the log
    /// store's append for why).
    async fn persist(&self, data: &SmData) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(data).map_err(std::io::Error::other)?;
        let path = self.dir.join("state_machine.json");
        tokio::task::spawn_blocking(move || durable_file::replace(&path, &bytes))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("state machine write task failed: {e}"))))
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = self.data.read().await.clone();
        let bytes = serde_json::to_vec(&data).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let seq = self.snapshot_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta =
            SnapshotMeta { last_log_id: data.last_applied, last_membership: data.membership.clone(), snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes.clone() };
        let encoded = serde_json::to_vec(&stored).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        durable_file::replace(&self.snapshot_path(), &encoded).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MdmNode>), StorageError<NodeId>> {
        let d = self.data.read().await;
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut d = self.data.write().await;
        let mut outcomes = Vec::new();
        for entry in entries {
            d.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Ok(tessera_core::command::Applied { id: 0 }),
                EntryPayload::Normal(cmd) => d.state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(tessera_core::command::Applied { id: 0 })
                }
            };
            if let Err(e) = &outcome {
                tracing::info!(index = entry.log_id.index, "command refused: {e}");
            }
            outcomes.push(outcome);
        }
        self.persist(&d).await.map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.version.send_replace(d.last_applied.map_or(0, |l| l.index));
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MdmNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let mut new_data: SmData =
            serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        new_data.last_applied = meta.last_log_id;
        new_data.membership = meta.last_membership.clone();
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes };
        let encoded = serde_json::to_vec(&stored).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        durable_file::replace(&self.snapshot_path(), &encoded).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.persist(&new_data).await.map_err(|e| StorageIOError::write_state_machine(&e))?;
        let version = new_data.last_applied.map_or(0, |l| l.index);
        *self.data.write().await = new_data;
        self.version.send_replace(version);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(b) =
            durable_file::read_optional(&self.snapshot_path()).map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = serde_json::from_slice(&b).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
