//! Which extents of a volume the cluster holds: every SDS of the volume's pool is asked
//! (`LIST_EXTENTS`) for the extents it has allocated for the volume.
//!
//! Two callers, two policies over one listing:
//! - copy verification (`verify.rs`) lists what it can reach — a dead SDS answers for no
//!   copy and its extents are checked again on a fresher map;
//! - [`allocated_extents`] must *fail closed*: it backs the volume service's rule that only a
//!   volume that was never written is formatted, so one SDS that cannot answer makes the
//!   whole answer an error, never "no extents".
//!
//! Why listing every SDS that appears in the pool's placement is enough: a write is acked
//! only once every copy of its PG has it, and a copy leaves a PG only while a complete copy
//! stays (or it was removed because it missed writes the others have). So every extent ever
//! written is allocated on at least one SDS that is in some PG's replica set now. An SDS
//! that holds foreign extents not yet collected only adds extents: the answer errs towards
//! "written", which refuses a format rather than losing data.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tessera_core::{ClusterState, StoragePool};
use tessera_proto::control::ControlClient;
use tessera_proto::data::{kind, status};
use tessera_proto::rpc::RpcClient;
use tessera_proto::ClusterSecret;
use thiserror::Error;

use crate::client::DATA_CALL_TIMEOUT;

/// One SDS's whole answer (connect, authenticate, list) must come within this; the RPC
/// layer bounds each part too, this bounds their sum.
pub const LIST_EXTENTS_TIMEOUT: Duration = Duration::from_secs(40);
/// SDSs asked at once.
const LIST_PARALLELISM: usize = 16;
/// Each extent index is a u64, little-endian, on the wire.
const EXTENT_INDEX_BYTES: usize = 8;

/// Why one SDS gave no usable list.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ListError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("answered {0}")]
    Refused(&'static str),
    #[error("sent a malformed list ({0} bytes, not a multiple of 8)")]
    Malformed(usize),
    #[error("gave no answer within {}s", LIST_EXTENTS_TIMEOUT.as_secs())]
    Timeout,
}

/// Why the cluster cannot say which extents of a volume are allocated.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ExtentsError {
    #[error("cannot tell whether volume {volume} was ever written: {reason}")]
    Unknown { volume: String, reason: String },
}

impl ExtentsError {
    fn new(volume: &str, reason: impl Into<String>) -> ExtentsError {
        ExtentsError::Unknown { volume: volume.to_string(), reason: reason.into() }
    }
}

/// Every SDS that holds, or may hold, a copy of some PG of `pool`: primaries, secondaries,
/// copies being back-filled and copies being moved away (they are all in `replicas`;
/// `leaving` is added in case a future change takes it out of them first).
pub fn pool_sds_ids(pool: &StoragePool) -> BTreeSet<u64> {
    pool.pgs.iter().flat_map(|pg| pg.replicas.iter().map(|r| r.sds_id).chain(pg.leaving)).collect()
}

/// Decodes a `LIST_EXTENTS` reply payload: extent indexes, u64 LE each.
pub fn decode_extent_list(payload: &[u8]) -> Result<Vec<u64>, ListError> {
    if !payload.len().is_multiple_of(EXTENT_INDEX_BYTES) {
        return Err(ListError::Malformed(payload.len()));
    }
    Ok(payload
        .chunks_exact(EXTENT_INDEX_BYTES)
        .map(|c| {
            let mut b = [0u8; EXTENT_INDEX_BYTES];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect())
}

/// Asks the SDS behind `conn` for the extents of `volume_id` it holds.
pub async fn list_on(conn: &RpcClient, volume_id: u64) -> Result<Vec<u64>, ListError> {
    let reply = conn
        .call(kind::LIST_EXTENTS, &[&volume_id.to_le_bytes()], DATA_CALL_TIMEOUT)
        .await
        .map_err(|e| ListError::Unreachable(e.to_string()))?;
    if reply.status != status::OK {
        return Err(ListError::Refused(status::name(reply.status)));
    }
    decode_extent_list(&reply.payload)
}

/// Connects to the SDS at `address` and lists the extents of `volume_id` there, all within
/// [`LIST_EXTENTS_TIMEOUT`].
pub async fn list_at(address: &str, secret: &ClusterSecret, volume_id: u64) -> Result<Vec<u64>, ListError> {
    let listing = async {
        let conn = RpcClient::connect(address, secret).await.map_err(|e| ListError::Unreachable(e.to_string()))?;
        list_on(&conn, volume_id).await
    };
    tokio::time::timeout(LIST_EXTENTS_TIMEOUT, listing).await.unwrap_or(Err(ListError::Timeout))
}

/// The extents of one volume that the cluster holds, and on which SDS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocatedExtents {
    /// Union over every SDS of the pool.
    pub extents: BTreeSet<u64>,
    /// SDS id → how many extents of the volume it holds (every SDS asked is present).
    pub per_sds: BTreeMap<u64, usize>,
}

/// The extents of `volume_name` that any SDS of its pool holds, read from a fresh cluster
/// state. Fails closed: an SDS of the pool that is unknown, unreachable, answers an error
/// or a malformed list makes this an error, never a smaller (or empty) set.
pub async fn allocated_extents(
    control: &ControlClient,
    secret: &ClusterSecret,
    volume_name: &str,
) -> Result<AllocatedExtents, ExtentsError> {
    let view = control.state().await.map_err(|e| ExtentsError::new(volume_name, format!("asking the MDM: {e}")))?;
    allocated_extents_in(&view.state, secret, volume_name).await
}

/// [`allocated_extents`] against a state the caller already holds.
pub async fn allocated_extents_in(
    state: &ClusterState,
    secret: &ClusterSecret,
    volume_name: &str,
) -> Result<AllocatedExtents, ExtentsError> {
    let volume =
        state.volume_by_name(volume_name).ok_or_else(|| ExtentsError::new(volume_name, "the volume does not exist"))?;
    let pool = state
        .pools
        .get(&volume.pool_id)
        .ok_or_else(|| ExtentsError::new(volume_name, format!("its pool #{} is missing", volume.pool_id)))?;
    // Resolve every address first: an SDS in the placement that the state does not know
    // cannot be asked, so the answer is unknown.
    let mut targets = Vec::new();
    for sds_id in pool_sds_ids(pool) {
        let sds = state.sdss.get(&sds_id).ok_or_else(|| {
            ExtentsError::new(volume_name, format!("SDS #{sds_id} holds copies of pool {} but is unknown", pool.name))
        })?;
        targets.push((sds_id, sds.name.clone(), sds.data_address.clone()));
    }
    let volume_id = volume.id;
    let mut found = AllocatedExtents::default();
    let mut failures: Vec<String> = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = targets.into_iter();
    loop {
        while tasks.len() < LIST_PARALLELISM {
            let Some((sds_id, name, address)) = queue.next() else { break };
            let secret = secret.clone();
            tasks.spawn(async move { (sds_id, name, list_at(&address, &secret, volume_id).await) });
        }
        let Some(joined) = tasks.join_next().await else { break };
        match joined {
            Ok((sds_id, _, Ok(extents))) => {
                found.per_sds.insert(sds_id, extents.len());
                found.extents.extend(extents);
            }
            Ok((_, name, Err(e))) => failures.push(format!("SDS {name} {e}")),
            Err(e) => failures.push(format!("listing task failed: {e}")),
        }
    }
    if !failures.is_empty() {
        failures.sort();
        return Err(ExtentsError::new(volume_name, failures.join("; ")));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::{Command, PlacementGroup, Replica, DEFAULT_EXTENT_SIZE_BYTES};

    fn apply(s: &mut ClusterState, c: Command) {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }

    /// A placed pool on two SDSs whose data ports are real but closed (bound, then freed:
    /// connecting is refused), and a volume `v` in it.
    fn cluster_with_dead_sdss() -> ClusterState {
        let mut s = ClusterState::default();
        apply(&mut s, Command::CreateProtectionDomain { name: "pd".into() });
        let pool = Command::CreatePool {
            pd: "pd".into(),
            name: "p".into(),
            extent_size_bytes: DEFAULT_EXTENT_SIZE_BYTES,
            pg_count: 8,
            spare_percent: 20,
        };
        apply(&mut s, pool);
        for i in 0..2u64 {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
            let sds = format!("s{i}");
            let add = Command::AddSds {
                name: sds.clone(),
                pd: "pd".into(),
                fault_set: None,
                data_address: closed.to_string(),
            };
            apply(&mut s, add);
            let device_id =
                s.apply(&Command::AddDevice { sds, pool: "p".into(), path: "/d".into() }).expect("device").id;
            apply(&mut s, Command::DeviceReady { device_id, capacity_bytes: 1 << 30 });
        }
        let volume = Command::CreateVolume {
            name: "v".into(),
            pool: "p".into(),
            size_bytes: 1 << 24,
            thin: true,
            allow_multi_map: false,
        };
        apply(&mut s, volume);
        s
    }

    #[tokio::test]
    async fn an_sds_that_cannot_answer_makes_the_answer_unknown_never_empty() {
        let state = cluster_with_dead_sdss();
        assert!(!state.pools.values().next().expect("pool").pgs.is_empty(), "the pool is placed");
        let secret = ClusterSecret::generate();
        let e = allocated_extents_in(&state, &secret, "v").await.expect_err("dead SDSs must not read as empty");
        let text = e.to_string();
        assert!(text.starts_with("cannot tell whether volume v was ever written: SDS s0 unreachable"), "{text}");
        assert!(text.contains("SDS s1 unreachable"), "every failure is named: {text}");
        let e = allocated_extents_in(&state, &secret, "nope").await.expect_err("no such volume");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn extent_lists_decode_strictly() {
        let payload: Vec<u8> = [0u64, 8, u64::MAX].iter().flat_map(|e| e.to_le_bytes()).collect();
        assert_eq!(decode_extent_list(&payload), Ok(vec![0, 8, u64::MAX]));
        assert_eq!(decode_extent_list(&[]), Ok(vec![]));
        assert_eq!(decode_extent_list(&payload[..12]), Err(ListError::Malformed(12)), "a torn list is no list");
    }

    fn pg(id: u32, replicas: &[u64], leaving: Option<u64>) -> PlacementGroup {
        PlacementGroup {
            id,
            epoch: 1,
            replicas: replicas.iter().map(|&sds_id| Replica { sds_id, device_id: sds_id * 10 }).collect(),
            syncing: BTreeSet::new(),
            leaving,
        }
    }

    #[test]
    fn every_sds_in_the_placement_is_asked() {
        let pool = StoragePool {
            id: 1,
            name: "p".into(),
            pd_id: 1,
            extent_size_bytes: 1 << 20,
            pg_count: 3,
            spare_percent: 10,
            pgs: vec![pg(0, &[1, 2], None), pg(1, &[2, 3, 4], None), pg(2, &[3, 1], Some(5))],
        };
        assert_eq!(pool_sds_ids(&pool), BTreeSet::from([1, 2, 3, 4, 5]));
        let unplaced = StoragePool { pgs: vec![], ..pool };
        assert!(pool_sds_ids(&unplaced).is_empty(), "an unplaced pool has no copies anywhere");
    }
}
