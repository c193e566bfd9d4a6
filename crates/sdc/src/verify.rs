//! Copy verification: compares both copies of every allocated extent of a volume by
//! checksum, read by each SDS from its own device. Which extents exist is listed as
//! `extents.rs` lists them, tolerating an SDS that cannot answer (see there).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;
use tessera_core::layout::pg_of_extent;
use tessera_proto::control::ControlClient;
use tessera_proto::data::{flags, kind, status, IoHeader};
use tessera_proto::rpc::RpcClient;
use tessera_proto::ClusterSecret;

use crate::client::DATA_CALL_TIMEOUT;
use crate::extents::{list_on, pool_sds_ids};

/// Checksum requests in flight at once.
const VERIFY_PARALLELISM: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct CopyChecksum {
    pub sds_id: u64,
    /// `None` when that SDS could not answer.
    pub crc32c: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub extent_index: u64,
    pub pg_id: u32,
    pub copies: Vec<CopyChecksum>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub volume: String,
    pub extents_checked: u64,
    /// Checked extents whose PG has only one complete copy right now (degraded or being
    /// rebuilt): there was nothing to compare them with.
    pub extents_with_one_copy: u64,
    pub mismatches: Vec<Mismatch>,
}

/// Verification passes: extents a copy could not answer for (its PG moved between our map
/// fetch and the request, say) are checked again against a fresh map.
const VERIFY_PASSES: usize = 5;

pub async fn verify_volume(
    control: &ControlClient,
    secret: &ClusterSecret,
    volume_name: &str,
) -> anyhow::Result<VerifyReport> {
    let mut pending: Option<BTreeSet<u64>> = None;
    let mut settled: Vec<Mismatch> = Vec::new();
    let (mut checked, mut one_copy) = (0u64, 0u64);
    for pass in 0..VERIFY_PASSES {
        let (round_checked, round_one_copy, round) =
            verify_pass(control, secret, volume_name, pending.as_ref()).await?;
        if pass == 0 {
            (checked, one_copy) = (round_checked, round_one_copy);
        }
        let (unanswered, differing): (Vec<Mismatch>, Vec<Mismatch>) =
            round.into_iter().partition(|m| m.copies.iter().any(|c| c.crc32c.is_none()));
        settled.extend(differing);
        if unanswered.is_empty() || pass + 1 == VERIFY_PASSES {
            settled.extend(unanswered);
            break;
        }
        pending = Some(unanswered.iter().map(|m| m.extent_index).collect());
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    settled.sort_by_key(|m| m.extent_index);
    Ok(VerifyReport {
        volume: volume_name.to_string(),
        extents_checked: checked,
        extents_with_one_copy: one_copy,
        mismatches: settled,
    })
}

/// One pass over the volume's allocated extents (or only `only`, when given).
async fn verify_pass(
    control: &ControlClient,
    secret: &ClusterSecret,
    volume_name: &str,
    only: Option<&BTreeSet<u64>>,
) -> anyhow::Result<(u64, u64, Vec<Mismatch>)> {
    let view = control.state().await?;
    let state = view.state;
    let volume =
        state.volume_by_name(volume_name).ok_or_else(|| anyhow::anyhow!("volume {volume_name:?} not found"))?.clone();
    let pool =
        state.pools.get(&volume.pool_id).ok_or_else(|| anyhow::anyhow!("pool of {volume_name} missing"))?.clone();
    let sds_ids = pool_sds_ids(&pool);
    // An SDS that cannot be reached (dead, not yet replaced) answers for no copy: its
    // extents show as unreadable and are checked again on a fresher map.
    let mut conns = HashMap::new();
    for id in &sds_ids {
        let Some(sds) = state.sdss.get(id) else { continue };
        match RpcClient::connect(&sds.data_address, secret).await {
            Ok(c) => {
                conns.insert(*id, c);
            }
            Err(e) => tracing::warn!(sds_id = id, "verify: {e}"),
        }
    }
    // An extent allocated on any copy is checked: one copy allocated and the other not is a
    // difference unless the allocated one holds zeros, which the checksums show.
    let mut extents = BTreeSet::new();
    for conn in conns.values() {
        let listed =
            list_on(conn, volume.id).await.map_err(|e| anyhow::anyhow!("listing extents on {}: {e}", conn.addr()))?;
        extents.extend(listed);
    }
    if let Some(only) = only {
        extents.retain(|e| only.contains(e));
    }
    let one_copy = extents
        .iter()
        .filter(|&&e| {
            pool.pgs
                .get(pg_of_extent(volume.id, e, pool.pg_count) as usize)
                .is_some_and(|pg| pg.in_sync().count() < tessera_core::REPLICA_COUNT)
        })
        .count() as u64;
    let conns = Arc::new(conns);
    let mut tasks = tokio::task::JoinSet::new();
    let mut mismatches = Vec::new();
    let mut checked = 0u64;
    for extent_index in extents.iter().copied() {
        let pg_id = pg_of_extent(volume.id, extent_index, pool.pg_count);
        let Some(pg) = pool.pgs.get(pg_id as usize).cloned() else { continue };
        let conns = conns.clone();
        let (pool_id, volume_id) = (pool.id, volume.id);
        tasks.spawn(async move {
            let mut copies = Vec::new();
            // Copies still being back-filled are incomplete by definition: compare the
            // complete ones.
            for r in pg.in_sync() {
                let h = IoHeader {
                    pool_id,
                    volume_id,
                    extent_index,
                    pg_id,
                    flags: flags::LOCAL_ONLY,
                    pg_epoch: pg.epoch,
                    offset_in_extent: 0,
                    length: 0,
                    mapping_epoch: 0,
                };
                let crc = match conns.get(&r.sds_id) {
                    Some(c) => match c.call(kind::EXTENT_CHECKSUM, &[&h.encode()], DATA_CALL_TIMEOUT).await {
                        Ok(reply) if reply.status == status::OK && reply.payload.len() == 4 => {
                            Some(u32::from_le_bytes([
                                reply.payload[0],
                                reply.payload[1],
                                reply.payload[2],
                                reply.payload[3],
                            ]))
                        }
                        _ => None,
                    },
                    None => None,
                };
                copies.push(CopyChecksum { sds_id: r.sds_id, crc32c: crc });
            }
            let same = copies.iter().all(|c| c.crc32c.is_some() && c.crc32c == copies[0].crc32c);
            (extent_index, pg_id, copies, same)
        });
        while tasks.len() >= VERIFY_PARALLELISM {
            if let Some(Ok(r)) = tasks.join_next().await {
                checked += 1;
                record(&mut mismatches, r);
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        checked += 1;
        record(&mut mismatches, r?);
    }
    Ok((checked, one_copy, mismatches))
}

fn record(mismatches: &mut Vec<Mismatch>, (extent_index, pg_id, copies, same): (u64, u32, Vec<CopyChecksum>, bool)) {
    if !same {
        mismatches.push(Mismatch { extent_index, pg_id, copies });
    }
}
