//! Metadata benchmark for a running cluster, through the control protocol as any client
//! sees it (`ControlClient`: follows the leader, retries while there is none).
//!
//!   mdm_bench latency  D/tessera.toml [--count 200] [--prefix P]
//!   mdm_bench failover D/tessera.toml [--pid PID | --dir D] [--interval-ms 20] [--warmup-ms 2000]
//!
//! `latency` creates `--count` thin volumes one after another and reports the latency of
//! each call. `failover` creates a volume every `--interval-ms`, SIGKILLs the primary MDM
//! after `--warmup-ms`, and reports the time from the kill to the first successful metadata
//! write after it, and how many calls failed (none should: the client follows the new
//! leader). Results go to stdout as `key=value` lines for `scripts/bench-mdm.sh` to parse;
//! progress and errors go to stderr. A benchmark, not a test: it asserts nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use tessera_core::{Command, CoreError};
use tessera_proto::control::{ClientError, ControlClient, ControlError};
use tessera_proto::ClusterSecret;

/// Size of every volume created: thin, so it costs metadata only.
const VOLUME_SIZE_BYTES: u64 = 64 << 20;
/// Calls made (and not counted) before the latency measurement: connection set-up.
const LATENCY_WARMUP_CALLS: usize = 5;
/// Longest the failover run waits for a successful write after the kill.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many failed calls' errors are printed (as `error=` lines).
const MAX_ERRORS_SHOWN: usize = 5;

#[derive(Parser)]
#[command(about = "MDM metadata latency and failover, measured through ControlClient")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Create volumes one after another; report p50/p99/max latency and ops/s.
    Latency {
        /// tessera.toml of the cluster.
        config: PathBuf,
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Volume name prefix (default: unique per run).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Kill the primary MDM under a steady volume-creation loop; report the gap.
    Failover {
        /// tessera.toml of the cluster.
        config: PathBuf,
        /// Pid of the primary MDM. Default: ask the cluster for its leader and read
        /// `<dir>/mdm-<id>.pid`.
        #[arg(long)]
        pid: Option<i32>,
        /// Cluster directory holding the pid files. Default: the config file's directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Pause between two volume creations.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// How long the loop runs before the kill.
        #[arg(long, default_value_t = 2000)]
        warmup_ms: u64,
        /// How long the loop runs on after the first success following the kill.
        #[arg(long, default_value_t = 1000)]
        after_ms: u64,
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// The part of `tessera.toml` a client needs (the full format: `crates/tessera/src/config.rs`).
#[derive(Deserialize)]
struct ClientConfig {
    secret: String,
    mdm: Vec<String>,
}

fn client_from(path: &Path) -> anyhow::Result<ControlClient> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: ClientConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if cfg.mdm.is_empty() {
        bail!("{} names no MDM address", path.display());
    }
    let secret = ClusterSecret::from_hex(&cfg.secret).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(ControlClient::new(cfg.mdm, secret))
}

fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("bench-{}-{:x}", std::process::id(), nanos & 0xff_ffff)
}

fn create_volume(name: String) -> Command {
    Command::CreateVolume {
        name,
        pool: "default".into(),
        size_bytes: VOLUME_SIZE_BYTES,
        thin: true,
        allow_multi_map: false,
    }
}

fn unix_ms(t: std::time::SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn latency(client: &ControlClient, count: usize, prefix: &str) -> anyhow::Result<()> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    for i in 0..LATENCY_WARMUP_CALLS {
        client.execute(create_volume(format!("{prefix}-warm-{i}"))).await.context("warm-up volume creation")?;
    }
    let mut samples = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        client.execute(create_volume(format!("{prefix}-{i}"))).await.with_context(|| format!("creating volume {i}"))?;
        samples.push(t.elapsed());
    }
    let wall = start.elapsed();
    samples.sort();
    println!("count={count}");
    println!("p50_ms={:.2}", ms(percentile(&samples, 50.0)));
    println!("p99_ms={:.2}", ms(percentile(&samples, 99.0)));
    println!("max_ms={:.2}", ms(*samples.last().expect("count > 0")));
    println!("ops_per_sec={:.1}", count as f64 / wall.as_secs_f64());
    Ok(())
}

/// One call of the failover loop.
struct Call {
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

enum Outcome {
    Ok,
    /// Refused as already existing: an earlier attempt of this same call committed, but its
    /// answer was lost with the primary and the client's retry found the volume. A success.
    CommittedBeforeRetry,
    Failed(String),
}

/// The primary MDM as the cluster names it.
struct Primary {
    id: u64,
    pid: i32,
    role: String,
    address: String,
}

/// True if `pid` runs a tessera daemon (so a stale pid file never makes us kill anything else).
fn is_daemon(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    pid > 1 && String::from_utf8_lossy(&cmdline).contains("daemon")
}

fn process_gone(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) STATE ...": gone, or a zombie waiting for its parent.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, None | Some("Z") | Some("X"))
}

async fn find_primary(client: &ControlClient, pid: Option<i32>, dir: &Path) -> anyhow::Result<Primary> {
    let status = client.status().await.context("asking for the cluster status")?;
    let id = status.leader_id.ok_or_else(|| anyhow!("the cluster reports no leader"))?;
    let member = status.mdm_members.iter().find(|m| m.id == id);
    let pid = match pid {
        Some(p) => p,
        None => {
            let file = dir.join(format!("mdm-{id}.pid"));
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            text.trim().parse().with_context(|| format!("parsing {}", file.display()))?
        }
    };
    if !is_daemon(pid) {
        bail!("pid {pid} (primary mdm-{id}) is not a running tessera daemon");
    }
    Ok(Primary {
        id,
        pid,
        role: member.map_or_else(|| "manager".to_string(), |m| m.role.clone()),
        address: member.map_or_else(String::new, |m| m.address.clone()),
    })
}

/// Creates volumes `prefix-N` one after another every `interval` until `stop`, logging each call.
async fn creation_loop(
    client: Arc<ControlClient>,
    prefix: String,
    interval: Duration,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Call>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let started = Instant::now();
        in_flight.store(true, Ordering::Relaxed);
        let result = client.execute(create_volume(format!("{prefix}-{n}"))).await;
        in_flight.store(false, Ordering::Relaxed);
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(ClientError::Control(ControlError::Refused(CoreError::AlreadyExists { .. }))) => {
                Outcome::CommittedBeforeRetry
            }
            Err(e) => Outcome::Failed(e.to_string()),
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).push(Call { started, ended: Instant::now(), outcome });
        tokio::time::sleep(interval).await;
    }
}

async fn failover(
    client: ControlClient,
    primary: Primary,
    interval: Duration,
    warmup: Duration,
    after: Duration,
    prefix: String,
) -> anyhow::Result<bool> {
    let client = Arc::new(client);
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Call>>> = Arc::new(Mutex::new(Vec::new()));
    let load =
        tokio::spawn(creation_loop(client.clone(), prefix, interval, stop.clone(), in_flight.clone(), log.clone()));

    tokio::time::sleep(warmup).await;
    // Where the kill lands is left to chance: often mid-call, which exercises the client's
    // retry of a call whose answer was lost.
    let was_in_flight = in_flight.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    let killed_wall = std::time::SystemTime::now();
    if unsafe { libc::kill(primary.pid, libc::SIGKILL) } != 0 {
        stop.store(true, Ordering::Relaxed);
        bail!("kill -9 {}: {}", primary.pid, std::io::Error::last_os_error());
    }
    eprintln!("mdm_bench: killed the primary mdm-{} (pid {})", primary.id, primary.pid);
    let first_ok_after = |log: &[Call]| {
        log.iter().find(|c| c.ended > killed_at && !matches!(c.outcome, Outcome::Failed(_))).map(|c| c.ended)
    };
    let deadline = killed_at + RECOVERY_TIMEOUT;
    let recovered = loop {
        if let Some(t) = first_ok_after(&log.lock().unwrap_or_else(|p| p.into_inner())) {
            break Some(t);
        }
        if Instant::now() > deadline || load.is_finished() {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if recovered.is_some() {
        tokio::time::sleep(after).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.context("volume-creation loop")?;
    let dead = process_gone(primary.pid);

    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    let before: Vec<&Call> = log.iter().filter(|c| c.ended <= killed_at).collect();
    let after_kill: Vec<&Call> = log.iter().filter(|c| c.ended > killed_at).collect();
    let failed: Vec<&String> =
        log.iter().filter_map(|c| if let Outcome::Failed(e) = &c.outcome { Some(e) } else { None }).collect();
    let committed_before_retry = log.iter().filter(|c| matches!(c.outcome, Outcome::CommittedBeforeRetry)).count();
    // The call that bridged the gap: the longest one, normally the one in flight at the kill
    // or the first one started after it.
    let longest = log.iter().map(|c| c.ended - c.started).max().unwrap_or_default();
    let mut steady: Vec<Duration> = before.iter().map(|c| c.ended - c.started).collect();
    steady.sort();

    println!("killed_id={}", primary.id);
    println!("killed_pid={}", primary.pid);
    println!("killed_role={}", primary.role);
    println!("killed_address={}", primary.address);
    println!("killed_process_gone={}", u8::from(dead));
    // Wall-clock time of the kill, to line it up with the daemons' logs (UTC timestamps).
    println!("killed_at_unix_ms={}", unix_ms(killed_wall));
    println!("in_flight_at_kill={}", u8::from(was_in_flight));
    println!("calls_before_kill={}", before.len());
    println!("calls_after_kill={}", after_kill.len());
    if !steady.is_empty() {
        println!("steady_p50_ms={:.2}", ms(percentile(&steady, 50.0)));
    }
    match recovered {
        Some(t) => println!("failover_ms={:.1}", ms(t - killed_at)),
        None => println!("failover_ms=none"),
    }
    println!("longest_call_ms={:.1}", ms(longest));
    println!("failed_calls={}", failed.len());
    println!("committed_before_retry={committed_before_retry}");
    for e in failed.iter().take(MAX_ERRORS_SHOWN) {
        println!("error={}", e.replace('\n', " "));
    }
    if recovered.is_some() {
        match client.status().await {
            Ok(s) => println!("new_leader_id={}", s.leader_id.map_or_else(|| "none".into(), |id| id.to_string())),
            Err(e) => println!("new_leader_id=unknown ({e})"),
        }
    }
    Ok(recovered.is_some())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread, like the CLI: latency is then the MDM's, not the scheduler's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match args.mode {
        Mode::Latency { config, count, prefix } => {
            let client = client_from(&config)?;
            rt.block_on(latency(&client, count, &prefix.unwrap_or_else(unique_prefix)))
        }
        Mode::Failover { config, pid, dir, interval_ms, warmup_ms, after_ms, prefix } => {
            let client = client_from(&config)?;
            let dir = dir.unwrap_or_else(|| config.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf));
            let recovered = rt.block_on(async {
                let primary = find_primary(&client, pid, &dir).await?;
                failover(
                    client,
                    primary,
                    Duration::from_millis(interval_ms),
                    Duration::from_millis(warmup_ms),
                    Duration::from_millis(after_ms),
                    prefix.unwrap_or_else(unique_prefix),
                )
                .await
            })?;
            if !recovered {
                bail!("no metadata write succeeded within {RECOVERY_TIMEOUT:?} of the kill");
            }
            Ok(())
        }
    }
}
