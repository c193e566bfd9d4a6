//! Test fixtures shared by the core's unit tests: small clusters built through real
//! commands, so every fixture is a state the MDM could actually reach.

use crate::model::*;
use crate::units::GIB;
use crate::Command;

/// Applies a command that must succeed; returns the id it touched.
pub fn ok(s: &mut ClusterState, c: Command) -> u64 {
    s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}")).id
}

/// Adds SDS `s{i}` (in fault set `fs{i % 3}` when `fault_sets`) with one ready 10 GiB device
/// in pool `p`.
pub fn add_sds(s: &mut ClusterState, i: u64, fault_sets: bool) {
    ok(
        s,
        Command::AddSds {
            name: format!("s{i}"),
            pd: "pd".into(),
            fault_set: fault_sets.then(|| format!("fs{}", i % 3)),
            data_address: format!("127.0.0.1:{}", 9000 + i),
        },
    );
    let d = ok(s, Command::AddDevice { sds: format!("s{i}"), pool: "p".into(), path: "/d".into() });
    ok(s, Command::DeviceReady { device_id: d, capacity_bytes: 10 * GIB });
}

/// Domain `pd` (with three fault sets when asked), pool `p` of 64 PGs and 20% spare, and
/// `sds_count` SDSs from [`add_sds`].
pub fn cluster(sds_count: u64, fault_sets: bool) -> ClusterState {
    let mut s = ClusterState::default();
    ok(&mut s, Command::CreateProtectionDomain { name: "pd".into() });
    if fault_sets {
        for f in 0..3 {
            ok(&mut s, Command::CreateFaultSet { pd: "pd".into(), name: format!("fs{f}") });
        }
    }
    ok(
        &mut s,
        Command::CreatePool {
            pd: "pd".into(),
            name: "p".into(),
            extent_size_bytes: DEFAULT_EXTENT_SIZE_BYTES,
            pg_count: 64,
            spare_percent: 20,
        },
    );
    for i in 0..sds_count {
        add_sds(&mut s, i, fault_sets);
    }
    s
}
