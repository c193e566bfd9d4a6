//! Per-SDC volume limits (ScaleIO's IOPS and bandwidth limits), against real daemons on
//! loopback and a real NBD client (fio): a limited volume is held near its limit while the
//! same workload runs far faster without one, clearing the limit restores the speed, a limit
//! set under a running workload applies within moments, and bad limits are refused with a
//! clear error.
//!
//! Every check is a ratio against the limit or against the same workload unlimited in the
//! same cluster, never an absolute speed: the host may be slow or busy.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tessera_core::{Command as Cmd, CoreError};
use tessera_proto::control::{ClientError, ControlClient, ControlError};

/// A limited run may exceed its limit by this factor (fio's accounting, the tail of the
/// burst, timer slack).
const MAX_OVER_LIMIT: f64 = 1.3;
/// An unlimited run must reach at least this multiple of the limit, or the limited run
/// proved nothing.
const MIN_UNLIMITED_OVER_LIMIT: f64 = 2.0;
const IOPS_LIMIT: u64 = 300;
const BANDWIDTH_LIMIT: u64 = 8 * MIB;

/// 4 KiB random reads, 16 deep, 4 s measured. The first second is not counted
/// (`ramp_time`): it takes the one-second burst a limit allows when it starts.
const RANDREAD_4K: &[&str] =
    &["--rw=randread", "--bs=4k", "--iodepth=16", "--time_based", "--runtime=4", "--ramp_time=1", "--size=64M"];
/// 1 MiB sequential reads, otherwise as [`RANDREAD_4K`].
const SEQREAD_1M: &[&str] =
    &["--rw=read", "--bs=1M", "--iodepth=16", "--time_based", "--runtime=4", "--ramp_time=1", "--size=64M"];

/// Fills the first 64 MiB, so the reads below fetch real data from the SDSs.
fn fill(c: &Cluster, uri: &str) {
    let (fio, started) = Fio::start(c, "fill", uri, &["--rw=write", "--bs=1M", "--iodepth=4", "--size=64M"]);
    let r = fio.finish(started);
    r.assert_clean(Some(64 * MIB), 0);
}

/// Runs `job` to completion; returns its read IOPS and read bytes per second.
fn read_rate(c: &Cluster, label: &str, uri: &str, job: &[&str]) -> (f64, f64) {
    let (fio, started) = Fio::start(c, label, uri, job);
    let r = fio.finish(started);
    assert!(r.status.success(), "fio {label} failed: {}", r.describe());
    assert_eq!(r.job["error"].as_i64(), Some(0), "fio {label} job error: {}", r.describe());
    let iops = r.job["read"]["iops"].as_f64().unwrap_or_else(|| panic!("no read iops: {}", r.describe()));
    let bw = r.job["read"]["bw_bytes"].as_f64().unwrap_or_else(|| panic!("no read bw_bytes: {}", r.describe()));
    eprintln!("fio {label}: {iops:.0} IOPS, {:.1} MiB/s", bw / MIB as f64);
    (iops, bw)
}

/// The volume's limits as `volume show` prints them.
fn shown_limits(c: &Cluster, name: &str) -> (Option<u64>, Option<u64>) {
    let v = c.json(&["volume", "show", name]);
    (v["qos"]["iops_limit"].as_u64(), v["qos"]["bandwidth_limit_bytes_per_sec"].as_u64())
}

/// Runs a CLI command that must fail; returns its stderr.
fn cli_fails(c: &Cluster, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(!out.status.success(), "tessera {args:?} succeeded: {}", describe(&out));
    text(&out.stderr)
}

#[test]
fn iops_limit_holds_and_clearing_restores_speed() {
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    fill(&c, &uri);
    assert_eq!(shown_limits(&c, "v"), (None, None), "a new volume is unlimited");

    let (free_iops, _) = read_rate(&c, "unlimited", &uri, RANDREAD_4K);

    c.ok(&["volume", "set-qos", "v", "--iops", &IOPS_LIMIT.to_string()]);
    assert_eq!(shown_limits(&c, "v"), (Some(IOPS_LIMIT), None));
    let (limited_iops, _) = read_rate(&c, "limited", &uri, RANDREAD_4K);

    c.ok(&["volume", "set-qos", "v", "--iops", "0"]);
    assert_eq!(shown_limits(&c, "v"), (None, None), "--iops 0 clears the limit");
    let (cleared_iops, _) = read_rate(&c, "cleared", &uri, RANDREAD_4K);

    let limit = IOPS_LIMIT as f64;
    assert!(
        free_iops >= MIN_UNLIMITED_OVER_LIMIT * limit,
        "unlimited 4k random reads reach only {free_iops:.0} IOPS: too slow to test a {IOPS_LIMIT} IOPS limit"
    );
    assert!(
        limited_iops <= MAX_OVER_LIMIT * limit,
        "{limited_iops:.0} IOPS under a {IOPS_LIMIT} IOPS limit (unlimited: {free_iops:.0})"
    );
    assert!(limited_iops >= limit / 2.0, "{limited_iops:.0} IOPS: the limit stalls the volume rather than pacing it");
    assert!(
        cleared_iops >= MIN_UNLIMITED_OVER_LIMIT * limit,
        "{cleared_iops:.0} IOPS after the limit was cleared (unlimited before: {free_iops:.0})"
    );
    c.assert_all_alive();
}

#[test]
fn bandwidth_limit_holds_and_clearing_restores_speed() {
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    fill(&c, &uri);

    let (_, free_bw) = read_rate(&c, "unlimited", &uri, SEQREAD_1M);

    c.ok(&["volume", "set-qos", "v", "--bandwidth", "8MiB/s"]);
    assert_eq!(shown_limits(&c, "v"), (None, Some(BANDWIDTH_LIMIT)));
    let (_, limited_bw) = read_rate(&c, "limited", &uri, SEQREAD_1M);

    // Setting one limit keeps the other; --unlimited clears both.
    c.ok(&["volume", "set-qos", "v", "--iops", "1000"]);
    assert_eq!(shown_limits(&c, "v"), (Some(1000), Some(BANDWIDTH_LIMIT)));
    c.ok(&["volume", "set-qos", "v", "--unlimited"]);
    assert_eq!(shown_limits(&c, "v"), (None, None));
    let (_, cleared_bw) = read_rate(&c, "cleared", &uri, SEQREAD_1M);

    let limit = BANDWIDTH_LIMIT as f64;
    let mib = |b: f64| b / MIB as f64;
    assert!(
        free_bw >= MIN_UNLIMITED_OVER_LIMIT * limit,
        "unlimited 1M reads reach only {:.1} MiB/s: too slow to test an 8 MiB/s limit",
        mib(free_bw)
    );
    assert!(
        limited_bw <= MAX_OVER_LIMIT * limit,
        "{:.1} MiB/s under an 8 MiB/s limit (unlimited: {:.1} MiB/s)",
        mib(limited_bw),
        mib(free_bw)
    );
    assert!(limited_bw >= limit / 2.0, "{:.1} MiB/s: the limit stalls the volume", mib(limited_bw));
    assert!(
        cleared_bw >= MIN_UNLIMITED_OVER_LIMIT * limit,
        "{:.1} MiB/s after the limit was cleared (unlimited before: {:.1} MiB/s)",
        mib(cleared_bw),
        mib(free_bw)
    );
    c.assert_all_alive();
}

/// Per-second read IOPS from fio's `--write_iops_log` file: (end of the second in ms since
/// the job started, IOPS in that second).
fn iops_log(path: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            // time, value, direction (0 = read), block size, offset[, priority]
            match fields.as_slice() {
                [t, v, "0", ..] => Some((t.parse().ok()?, v.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

/// No NBD connection is reopened here: the SDC learns the limit only by following the map
/// (its long poll), as it would for a volume a database holds open for months.
#[test]
fn limit_set_under_a_running_workload_applies_within_moments() {
    /// Lower than the other tests' limit, so the drop is plain even on a slow host.
    const LIMIT: u64 = 200;
    /// Time for the SDC to learn the limit and for the burst it allows to run out.
    const SETTLE: Duration = Duration::from_millis(1500);
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    fill(&c, &uri);

    let log_prefix = c.dir.join("running");
    let log_arg = format!("--write_iops_log={}", log_prefix.display());
    let job = [
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--time_based",
        "--runtime=10",
        "--size=64M",
        &log_arg,
        "--log_avg_msec=1000",
    ];
    let (fio, started) = Fio::start(&c, "running", &uri, &job);
    std::thread::sleep(Duration::from_secs(3));
    c.ok(&["volume", "set-qos", "v", "--iops", &LIMIT.to_string()]);
    // fio's clock starts after ours, so its log times are at most ours: a second it logs
    // as ending at `t` ended by `t` on our clock, and began after `t - 1 s` on its own.
    let limited_from_ms = (started.elapsed() + SETTLE).as_millis() as u64;
    let r = fio.finish(started);
    assert!(r.status.success(), "fio failed: {}", r.describe());

    let log = iops_log(Path::new(&format!("{}_iops.1.log", log_prefix.display())));
    eprintln!("per-second IOPS (limit {LIMIT} from about {limited_from_ms} ms): {log:?}");
    let set_at_ms = limited_from_ms - SETTLE.as_millis() as u64;
    let before: Vec<f64> = log.iter().filter(|(t, _)| *t + 500 <= set_at_ms).map(|(_, v)| *v).collect();
    let after: Vec<f64> =
        log.iter().filter(|(t, _)| t.saturating_sub(1000) >= limited_from_ms).map(|(_, v)| *v).collect();
    assert!(after.len() >= 3, "too few whole seconds logged after the limit: {log:?}");
    let limit = LIMIT as f64;
    assert!(
        before.iter().any(|v| *v >= MIN_UNLIMITED_OVER_LIMIT * limit),
        "no second before the limit ran well above it; cannot tell it took effect: {log:?}"
    );
    assert!(
        after.iter().all(|v| *v <= MAX_OVER_LIMIT * limit),
        "the running workload was not held to {LIMIT} IOPS within {SETTLE:?} of the limit: {log:?}"
    );
}

#[test]
fn bad_limits_are_refused_with_a_clear_error() {
    let c = Cluster::start(2);
    c.create_volume("v", "64MiB");
    c.ok(&["volume", "set-qos", "v", "--iops", "500"]);

    for (args, says) in [
        (vec!["--iops", "fast"], "invalid IOPS limit \"fast\""),
        (vec!["--iops=-3"], "invalid IOPS limit"),
        (vec!["--bandwidth", "lots"], "invalid bandwidth limit \"lots\""),
        (vec!["--bandwidth", "10XB/s"], "invalid bandwidth limit"),
        (vec!["--iops", "5"], "below the minimum of 10"),
        (vec!["--bandwidth", "512KiB"], "below the minimum"),
        (vec![], "give --iops, --bandwidth or --unlimited"),
    ] {
        let mut all = vec!["volume", "set-qos", "v"];
        all.extend(args.iter().copied());
        let stderr = cli_fails(&c, &all);
        assert!(stderr.contains(says), "tessera {all:?}: expected {says:?} in:\n{stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "one error line:\n{stderr}");
    }
    let stderr = cli_fails(&c, &["volume", "set-qos", "nope", "--iops", "100"]);
    assert!(stderr.contains("not found"), "{stderr}");
    assert_eq!(shown_limits(&c, "v"), (Some(500), None), "a refused limit changes nothing");

    // A limit of 0 means "no limit" to the CLI; sent as a limit it is refused by the MDM
    // itself, for any client.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let control = ControlClient::new(vec![c.mdm_addr()], c.secret());
    for (iops, bandwidth) in [(Some(0), None), (None, Some(0))] {
        let cmd = Cmd::SetVolumeQos { name: "v".into(), iops_limit: iops, bandwidth_limit_bytes_per_sec: bandwidth };
        match rt.block_on(control.execute(cmd)) {
            Err(ClientError::Control(ControlError::Refused(CoreError::Invalid(msg)))) => {
                assert!(msg.contains("of 0 would stop all IO"), "{msg}")
            }
            other => panic!("a zero limit ({iops:?}, {bandwidth:?}) gave {other:?}"),
        }
    }
    assert_eq!(shown_limits(&c, "v"), (Some(500), None));
}
