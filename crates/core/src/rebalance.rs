//! Rebalance and drain: moving copies one PG at a time so that capacity added or removed is
//! used evenly. A move adds the new copy as a syncing replica (back-filled by the primary
//! like any rebuild), and the old copy leaves only once the new one is complete — the PG
//! never has fewer complete copies than before the move.

use std::collections::HashMap;

use crate::command::{Applied, CommandOutcome};
use crate::error::CoreError;
use crate::layout::mix64;
use crate::model::*;
use crate::Command;

/// Moves in flight per pool: enough to keep many devices busy, few enough that application
/// IO keeps most of the bandwidth.
pub const MAX_CONCURRENT_MOVES_PER_POOL: usize = 8;

impl ClusterState {
    pub(crate) fn move_pg(
        &mut self,
        pool_id: u64,
        pg_id: u32,
        epoch: u64,
        from_sds_id: u64,
        to: Replica,
    ) -> CommandOutcome {
        let target_ok = self
            .devices
            .get(&to.device_id)
            .is_some_and(|d| d.sds_id == to.sds_id && d.pool_id == pool_id && d.state == DeviceState::Normal)
            && self.sdss.get(&to.sds_id).is_some_and(|s| s.state == SdsState::Normal);
        if !target_ok {
            return Err(CoreError::Invalid(format!("device {} cannot take a copy", to.device_id)));
        }
        let pd_fault_sets =
            self.pools.get(&pool_id).is_some_and(|p| self.fault_sets.values().any(|f| f.pd_id == p.pd_id));
        let fault_set_of = |sds: u64| self.sdss.get(&sds).and_then(|s| s.fault_set_id);
        let pg = self
            .pools
            .get(&pool_id)
            .and_then(|p| p.pgs.get(pg_id as usize))
            .ok_or_else(|| CoreError::not_found("PG", &format!("{pool_id}/{pg_id}")))?;
        if pg.epoch != epoch || pg.leaving.is_some() || !pg.syncing.is_empty() {
            return Err(CoreError::Invalid(format!("PG {pool_id}/{pg_id} is busy or not at epoch {epoch}")));
        }
        if !pg.in_sync().any(|r| r.sds_id == from_sds_id) {
            return Err(CoreError::Invalid(format!(
                "SDS {from_sds_id} holds no complete copy of PG {pool_id}/{pg_id}"
            )));
        }
        let stays: Vec<&Replica> = pg.replicas.iter().filter(|r| r.sds_id != from_sds_id).collect();
        // Copy state (`syncing`, `leaving`) is keyed by SDS, and copies must be on distinct
        // SDSs, so the new copy may not land on any SDS of the PG — the leaving one included
        // (a move between two devices of one SDS is not a move this model can express).
        if pg.replicas.iter().any(|r| r.sds_id == to.sds_id)
            || (pd_fault_sets && stays.iter().any(|r| fault_set_of(r.sds_id) == fault_set_of(to.sds_id)))
        {
            return Err(CoreError::Invalid("the new copy would share an SDS or fault set with another".into()));
        }
        let pg = self.pools.get_mut(&pool_id).and_then(|p| p.pgs.get_mut(pg_id as usize)).expect("checked above");
        pg.replicas.push(to);
        pg.syncing.insert(to.sds_id);
        pg.leaving = Some(from_sds_id);
        pg.epoch += 1;
        Ok(Applied { id: to.device_id })
    }

    /// After a copy completed: a leaving copy goes once enough complete copies remain.
    pub(crate) fn finish_move(&mut self, pool_id: u64, pg_id: u32) {
        let Some(pg) = self.pools.get_mut(&pool_id).and_then(|p| p.pgs.get_mut(pg_id as usize)) else { return };
        let Some(leaving) = pg.leaving else { return };
        if !pg.syncing.is_empty() {
            return;
        }
        let remaining = pg.replicas.iter().filter(|r| r.sds_id != leaving).count();
        pg.leaving = None;
        if remaining >= REPLICA_COUNT {
            pg.replicas.retain(|r| r.sds_id != leaving);
            pg.epoch += 1;
        }
    }
}

/// Replica counts per device in a pool, not counting copies on their way out.
fn loads(pool: &StoragePool) -> HashMap<u64, u64> {
    let mut m = HashMap::new();
    for pg in &pool.pgs {
        for r in pg.replicas.iter().filter(|r| pg.leaving != Some(r.sds_id)) {
            *m.entry(r.device_id).or_default() += 1;
        }
    }
    m
}

/// The next moves the leader should commit: drains first, then balance. Pure.
pub fn next_moves(state: &ClusterState) -> Vec<Command> {
    let mut out = Vec::new();
    for pool in state.pools.values() {
        if pool.pgs.is_empty() {
            continue;
        }
        let busy = pool.pgs.iter().filter(|pg| pg.leaving.is_some() || !pg.syncing.is_empty()).count();
        let mut budget = MAX_CONCURRENT_MOVES_PER_POOL.saturating_sub(busy);
        let idle = |pg: &&PlacementGroup| pg.leaving.is_none() && pg.syncing.is_empty();
        let draining = |r: &Replica| {
            state.sdss.get(&r.sds_id).is_some_and(|s| s.state == SdsState::Draining)
                || state.devices.get(&r.device_id).is_some_and(|d| d.state == DeviceState::Draining)
        };
        // Drains: every idle PG with a copy on a draining SDS or device.
        let planned_before = out.len();
        for pg in pool.pgs.iter().filter(idle) {
            if budget == 0 {
                break;
            }
            let Some(from) = pg.in_sync().find(|r| draining(r)) else { continue };
            let stays: Vec<Replica> = pg.replicas.iter().filter(|r| r.sds_id != from.sds_id).copied().collect();
            if let Some(to) = state.choose_replacement(pool.id, pg.id, &stays_with_leaving(&stays, from)) {
                out.push(Command::MovePg {
                    pool_id: pool.id,
                    pg_id: pg.id,
                    epoch: pg.epoch,
                    from_sds_id: from.sds_id,
                    to,
                });
                budget -= 1;
            }
        }
        if budget == 0 || out.len() > planned_before {
            continue;
        }
        // Balance: copies from the most to the least loaded device while that narrows the
        // gap, planned on a scratch copy of the state so each move sees the ones before it.
        let mut scratch = state.clone();
        while budget > 0 {
            let Some(cmd) = balance_move(&scratch, pool.id) else { break };
            if scratch.apply(&cmd).is_err() {
                break;
            }
            out.push(cmd);
            budget -= 1;
        }
    }
    out
}

/// One copy from the most to the least loaded device of a pool, if that narrows the gap.
fn balance_move(state: &ClusterState, pool_id: u64) -> Option<Command> {
    let pool = state.pools.get(&pool_id)?;
    let load = loads(pool);
    let candidates: Vec<&Device> = state
        .devices_of_pool(pool.id)
        .filter(|d| d.state == DeviceState::Normal && d.capacity_bytes > 0)
        .filter(|d| state.sdss.get(&d.sds_id).is_some_and(|s| s.state == SdsState::Normal))
        .collect();
    let per_weight = |d: &Device, extra: i64| {
        (load.get(&d.id).copied().unwrap_or(0) as i64 + extra) as f64 / d.capacity_bytes as f64
    };
    let src = candidates.iter().max_by(|a, b| per_weight(a, 0).total_cmp(&per_weight(b, 0)).then(a.id.cmp(&b.id)))?;
    // The target is on another SDS: copies of a PG never share one.
    let dst = candidates
        .iter()
        .filter(|d| d.sds_id != src.sds_id)
        .min_by(|a, b| per_weight(a, 0).total_cmp(&per_weight(b, 0)).then(a.id.cmp(&b.id)))?;
    // Move only while it leaves the source no lighter than the target becomes.
    if per_weight(src, -1) < per_weight(dst, 1) {
        return None;
    }
    let fault_set_of = |sds: u64| state.sdss.get(&sds).and_then(|s| s.fault_set_id);
    let use_fs = state.fault_sets.values().any(|f| f.pd_id == pool.pd_id);
    let mut options: Vec<&PlacementGroup> = pool
        .pgs
        .iter()
        .filter(|pg| pg.leaving.is_none() && pg.syncing.is_empty())
        .filter(|pg| pg.in_sync().any(|r| r.device_id == src.id))
        .filter(|pg| {
            pg.replicas.iter().all(|r| r.sds_id != dst.sds_id)
                && pg
                    .replicas
                    .iter()
                    .filter(|r| r.device_id != src.id)
                    .all(|r| !use_fs || fault_set_of(r.sds_id) != fault_set_of(dst.sds_id))
        })
        .collect();
    options.sort_by_key(|pg| mix64(u64::from(pg.id) ^ dst.id));
    let pg = options.first()?;
    Some(Command::MovePg {
        pool_id: pool.id,
        pg_id: pg.id,
        epoch: pg.epoch,
        from_sds_id: src.sds_id,
        to: Replica { sds_id: dst.sds_id, device_id: dst.id },
    })
}

/// The replicas a replacement must avoid while `from` is still in place (it stays a member
/// until its successor is complete, so the successor must not share its SDS either).
fn stays_with_leaving(stays: &[Replica], from: &Replica) -> Vec<Replica> {
    let mut v = stays.to_vec();
    v.push(*from);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, ok};
    use crate::units::GIB;

    fn add_sds(s: &mut ClusterState, i: u64) {
        testkit::add_sds(s, i, false);
    }

    fn cluster_with_volume(n: u64) -> ClusterState {
        let mut s = testkit::cluster(n, false);
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p".into(),
                size_bytes: GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        s
    }

    /// Applies moves and completes their syncs until the planner has nothing left.
    fn settle(s: &mut ClusterState) -> usize {
        let mut moves = 0;
        for _ in 0..10_000 {
            let cmds = next_moves(s);
            if cmds.is_empty() {
                return moves;
            }
            for c in cmds {
                ok(s, c);
                moves += 1;
            }
            let pool_id = s.pool_by_name("p").unwrap().id;
            let syncing: Vec<(u32, u64, u64)> = s.pools[&pool_id]
                .pgs
                .iter()
                .flat_map(|pg| pg.syncing.iter().map(move |t| (pg.id, pg.epoch, *t)))
                .collect();
            for (pg_id, epoch, sds_id) in syncing {
                ok(s, Command::SyncComplete { pool_id, pg_id, epoch, sds_id });
            }
        }
        panic!("rebalance did not settle");
    }

    fn device_loads(s: &ClusterState) -> Vec<u64> {
        let pool = s.pool_by_name("p").unwrap();
        let l = loads(pool);
        let mut v: Vec<u64> = s.devices_of_pool(pool.id).map(|d| l.get(&d.id).copied().unwrap_or(0)).collect();
        v.sort();
        v
    }

    #[test]
    fn added_sdss_get_an_even_share() {
        let mut s = cluster_with_volume(3);
        add_sds(&mut s, 3);
        add_sds(&mut s, 4);
        let moves = settle(&mut s);
        assert!(moves > 0);
        let l = device_loads(&s);
        assert!(l.last().unwrap() - l.first().unwrap() <= 1, "uneven after rebalance: {l:?}");
        assert_eq!(l.iter().sum::<u64>(), 128, "every PG still has two copies");
        for pg in &s.pool_by_name("p").unwrap().pgs {
            assert_eq!(pg.replicas.len(), 2);
            assert_ne!(pg.replicas[0].sds_id, pg.replicas[1].sds_id);
        }
    }

    #[test]
    fn drain_moves_everything_off_then_removal_is_allowed() {
        let mut s = cluster_with_volume(4);
        assert!(s.apply(&Command::RemoveSds { name: "s1".into() }).is_err(), "holding data: refused");
        ok(&mut s, Command::DrainSds { name: "s1".into() });
        settle(&mut s);
        let id = s.sds_by_name("s1").unwrap().id;
        assert!(s.pool_by_name("p").unwrap().pgs.iter().all(|pg| pg.replicas.iter().all(|r| r.sds_id != id)));
        ok(&mut s, Command::RemoveSds { name: "s1".into() });
        assert_eq!(device_loads(&s).iter().sum::<u64>(), 128);
    }

    #[test]
    fn a_move_never_lowers_complete_copies() {
        let mut s = cluster_with_volume(3);
        add_sds(&mut s, 3);
        let cmds = next_moves(&s);
        let Command::MovePg { pool_id, pg_id, .. } = cmds[0].clone() else { panic!() };
        ok(&mut s, cmds[0].clone());
        let pg = &s.pools[&pool_id].pgs[pg_id as usize];
        assert_eq!(pg.in_sync().count(), 2, "both old copies serve until the new one completes");
        assert_eq!(pg.replicas.len(), 3);
    }

    #[test]
    fn never_moves_a_copy_onto_an_sds_of_the_pg() {
        // sds s0 gets a second, empty device: the balancer must not move copies between the
        // two devices of s0 (found by the simulator, seed 36).
        let mut s = cluster_with_volume(3);
        let d = ok(&mut s, Command::AddDevice { sds: "s0".into(), pool: "p".into(), path: "/e".into() });
        ok(&mut s, Command::DeviceReady { device_id: d, capacity_bytes: 10 * GIB });
        settle(&mut s);
        for pg in &s.pool_by_name("p").unwrap().pgs {
            let mut sdss: Vec<u64> = pg.replicas.iter().map(|r| r.sds_id).collect();
            sdss.sort();
            sdss.dedup();
            assert_eq!(sdss.len(), pg.replicas.len(), "{pg:?}");
        }
    }

    #[test]
    fn a_move_whose_target_dies_is_cancelled() {
        // Found by the simulator (seed 20): the PG must not stay busy forever.
        let mut s = cluster_with_volume(3);
        add_sds(&mut s, 3);
        let cmd = next_moves(&s).into_iter().next().unwrap();
        let Command::MovePg { pool_id, pg_id, to, .. } = cmd.clone() else { panic!() };
        ok(&mut s, cmd);
        ok(&mut s, Command::DeclareSdsDown { sds_id: to.sds_id, unresponsive: vec![] });
        let pg = &s.pools[&pool_id].pgs[pg_id as usize];
        assert_eq!(pg.leaving, None, "{pg:?}");
        assert!(pg.syncing.is_empty(), "{pg:?}");
        assert_eq!(pg.replicas.len(), 2);
    }

    #[test]
    fn spare_covers_the_largest_sds() {
        let mut s = cluster_with_volume(3);
        let pool = s.pool_by_name("p").unwrap().clone();
        // 30 GiB raw; 20% spare (6 GiB) is less than one SDS (10 GiB): usable = (30-10)/2.
        assert_eq!(s.pool_usable_capacity_bytes(&pool), 10 * GIB);
        assert!(s
            .apply(&Command::CreateVolume {
                name: "t".into(),
                pool: "p".into(),
                size_bytes: 11 * GIB,
                thin: false,
                allow_multi_map: false
            })
            .is_err());
        ok(
            &mut s,
            Command::CreateVolume {
                name: "t".into(),
                pool: "p".into(),
                size_bytes: 10 * GIB,
                thin: false,
                allow_multi_map: false,
            },
        );
    }
}
