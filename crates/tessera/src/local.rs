//! The embedded default: a whole cluster on one machine, started as real daemon processes
//! on loopback with file-backed devices. `up` starts or restarts it; `down` stops it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tessera_agent::process::{self, live_daemon_pid, log_tail, pid_alive};
use tessera_core::units::{format_size, parse_size_bytes};
use tessera_core::{Command, DeviceState};
use tessera_proto::control::{ControlClient, ControlRequest, ControlResponse};
use tessera_proto::ClusterSecret;

use crate::cli::UpArgs;
use crate::config::{new_cluster_id, ClientConfig, LocalLayout};

pub const LOCAL_PD: &str = "default";
pub const LOCAL_POOL: &str = "default";
pub const LOCAL_SDC: &str = "sdc-1";
/// How long `up` waits for the cluster to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("tessera.toml")
}

fn sds_port(layout: &LocalLayout, n: u32) -> u16 {
    layout.base_port + 10 + n as u16
}

/// MDM `n` of `count` listens on base+n-1. In a multi-MDM cluster on 127.0.0.1 each MDM
/// also gets its own loopback address, 127.0.0.(10+n), as if it ran on its own node: it
/// talks to the other MDMs from that address, so they (and a packet filter that partitions
/// the cluster) can tell MDM traffic from clients'.
fn mdm_address(ip: &str, count: u32, base_port: u16, n: u32) -> String {
    let port = base_port + n as u16 - 1;
    if count > 1 && ip == "127.0.0.1" {
        format!("127.0.0.{}:{port}", 10 + n)
    } else {
        format!("{ip}:{port}")
    }
}

/// The role of local MDM `n` of `count`: managers first, then tiebreakers.
fn mdm_role(count: u32, n: u32) -> &'static str {
    let managers = match count {
        5 => 3,
        3 => 2,
        _ => 1,
    };
    if n <= managers {
        "manager"
    } else {
        "tiebreaker"
    }
}

fn spawn_daemon(dir: &Path, role_id: &str, config: &Path, args: &[String]) -> anyhow::Result<i32> {
    let mut daemon_args = vec!["daemon".to_string()];
    daemon_args.extend_from_slice(args);
    process::spawn_daemon(&std::env::current_exe()?, dir, role_id, config, &daemon_args)
}

/// Starts (or restarts) the local cluster in `args.dir` and waits until it is ready.
pub async fn up(args: &UpArgs) -> anyhow::Result<ClientConfig> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let cfg_path = config_path(&dir);
    for entry in std::fs::read_dir(&dir)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "pid") && live_daemon_pid(&p).is_some() {
            bail!(
                "a cluster is already running in {} ({} is alive); run `tessera down --dir {}` first",
                dir.display(),
                p.display(),
                dir.display()
            );
        }
    }
    let fresh = !cfg_path.exists();
    let cfg = if fresh {
        let sds_count = args.sds.unwrap_or(3);
        let device_size_bytes = parse_size_bytes(&args.device_size).map_err(|e| anyhow!(e))?;
        if device_size_bytes < 64 * 1024 * 1024 {
            bail!("--device-size must be at least 64MiB");
        }
        if args.base_port.checked_add(10 + sds_count as u16).is_none() || sds_count > 64 {
            bail!("--sds must be at most 64 and fit above --base-port");
        }
        let mdm_count = args.mdm.unwrap_or(1);
        if ![1, 3, 5].contains(&mdm_count) {
            bail!("--mdm must be 1, 3 or 5 (the MDM cluster modes 1_node, 3_node and 5_node)");
        }
        let cfg = ClientConfig {
            cluster_id: new_cluster_id(),
            secret: ClusterSecret::generate().to_hex(),
            mdm: (1..=mdm_count).map(|n| mdm_address(&args.ip, mdm_count, args.base_port, n)).collect(),
            sdc: Some(LOCAL_SDC.to_string()),
            local: Some(LocalLayout {
                ip: args.ip.clone(),
                base_port: args.base_port,
                sds_count,
                device_size_bytes,
                mdm_count,
            }),
            volumes: Some(crate::volumes::local_config(&dir, &plugin_socket_for(&dir, &args.plugin_socket))),
        };
        cfg.save(&cfg_path)?;
        cfg
    } else {
        let cfg = ClientConfig::load(&cfg_path)?;
        let layout =
            cfg.local.as_ref().ok_or_else(|| anyhow!("{} was not written by `tessera up`", cfg_path.display()))?;
        if args.mdm.is_some_and(|n| n != layout.mdm_count) {
            bail!(
                "{} already holds a cluster with {} MDM(s); change modes with `tessera cluster switch-mode`",
                dir.display(),
                layout.mdm_count
            );
        }
        if let Some(n) = args.sds {
            if n != layout.sds_count {
                bail!(
                    "{} already holds a cluster with {} SDS(s); remove the directory to start anew",
                    dir.display(),
                    layout.sds_count
                );
            }
        }
        cfg
    };
    let layout = cfg.local.clone().expect("set above");
    let cfg_arg = cfg_path.clone();
    let mut pids = Vec::new();
    for n in 1..=layout.mdm_count {
        let role_id = format!("mdm-{n}");
        let mut daemon_args = vec![
            "mdm".to_string(),
            "--dir".into(),
            dir.join(&role_id).display().to_string(),
            "--id".into(),
            n.to_string(),
            "--listen".into(),
            mdm_address(&layout.ip, layout.mdm_count, layout.base_port, n),
            "--role".into(),
            mdm_role(layout.mdm_count, n).into(),
        ];
        // MDM 1 creates the cluster; the others wait to be added (a restarted member
        // resumes from its own log whatever the flag says).
        if n > 1 {
            daemon_args.push("--standby".into());
        }
        pids.push((role_id.clone(), spawn_daemon(&dir, &role_id, &cfg_arg, &daemon_args)?));
    }
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);
    wait_for(&dir, &pids, "the MDM to answer", || async { control.status().await.is_ok() }).await?;
    if fresh {
        form_mdm_cluster(&control, &dir, &pids, &layout).await?;
        // With no SDSs (`--sds 0`) agents bring the storage; they create what they need.
        if layout.sds_count > 0 {
            create_layout(&control, &dir, &layout).await?;
        }
    }
    for n in 1..=layout.sds_count {
        let id = format!("sds-{n}");
        let listen = format!("{}:{}", layout.ip, sds_port(&layout, n));
        pids.push((
            id.clone(),
            spawn_daemon(&dir, &id, &cfg_arg, &["sds".into(), "--name".into(), id.clone(), "--listen".into(), listen])?,
        ));
    }
    let socket = dir.join(format!("{LOCAL_SDC}.sock"));
    // A socket file left by the previous run would pass the readiness check below before the
    // new SDC has bound it.
    let _ = std::fs::remove_file(&socket);
    pids.push((
        LOCAL_SDC.to_string(),
        spawn_daemon(
            &dir,
            LOCAL_SDC,
            &cfg_arg,
            &["sdc".into(), "--name".into(), LOCAL_SDC.into(), "--socket".into(), socket.display().to_string()],
        )?,
    ));
    let volumes = cfg.volumes.clone().unwrap_or_default();
    crate::volumes::check_local_socket(&volumes.plugin_socket)?;
    pids.push(("volumes-1".to_string(), spawn_daemon(&dir, "volumes-1", &cfg_arg, &["volumes".into()])?));
    let expect_sds = layout.sds_count as usize;
    wait_for(&dir, &pids, "SDSs, devices and the SDC to be ready", || async {
        let (Ok(status), Ok(view)) = (control.status().await, control.state().await) else { return false };
        let sds_up = status.sdss.iter().filter(|s| s.state == "up").count() == expect_sds;
        let devices_ready = view.state.devices.values().all(|d| d.state == DeviceState::Normal);
        let placed = expect_sds < 2 || status.pgs.unplaced_pgs == 0;
        let sdc = view.state.sdc_by_name(LOCAL_SDC).is_some() && socket.exists();
        let plugin = std::os::unix::net::UnixStream::connect(&volumes.plugin_socket).is_ok();
        sds_up && devices_ready && placed && sdc && plugin
    })
    .await?;
    Ok(cfg)
}

/// Where the local volume service's plugin socket goes: as asked, unless its directory
/// cannot be created (not root, for the default under /run), then inside the cluster
/// directory, where Docker does not look but dvdcli and `tessera run` can be pointed.
fn plugin_socket_for(dir: &Path, wanted: &Path) -> PathBuf {
    match wanted.parent().map(std::fs::create_dir_all) {
        Some(Err(e)) => {
            let fallback = dir.join("tessera-plugin.sock");
            eprintln!(
                "warning: cannot create {} ({e}); the Docker volume plugin socket is {}",
                wanted.parent().map_or_else(String::new, |p| p.display().to_string()),
                fallback.display()
            );
            fallback
        }
        _ => wanted.to_path_buf(),
    }
}

/// Adds MDMs 2..n as standbys and switches to the mode they make.
async fn form_mdm_cluster(
    control: &ControlClient,
    dir: &Path,
    pids: &[(String, i32)],
    layout: &LocalLayout,
) -> anyhow::Result<()> {
    if layout.mdm_count == 1 {
        return Ok(());
    }
    for n in 2..=layout.mdm_count {
        let address = mdm_address(&layout.ip, layout.mdm_count, layout.base_port, n);
        // The standby may still be starting; adding is refused until it answers.
        wait_for(dir, pids, &format!("MDM {n} to join"), || async {
            let req = ControlRequest::AddMdm { address: address.clone(), expect_id: Some(n as u64) };
            matches!(control.request(&req).await, Ok(ControlResponse::Members(_)))
        })
        .await?;
    }
    let mode = format!("{}_node", layout.mdm_count);
    let req = ControlRequest::SwitchClusterMode { mode: mode.clone(), managers: None, tiebreakers: None };
    match control.request(&req).await? {
        ControlResponse::Members(_) => {}
        other => bail!("switching to {mode}: unexpected answer {other:?}"),
    }
    eprintln!("formed a {mode} MDM cluster");
    Ok(())
}

async fn create_layout(control: &ControlClient, dir: &Path, layout: &LocalLayout) -> anyhow::Result<()> {
    control.execute(Command::CreateProtectionDomain { name: LOCAL_PD.into() }).await?;
    // Spare at least one SDS's share, as ScaleIO advises (1/N of the pool).
    let spare_percent = (100 / layout.sds_count.max(1) + 1).clamp(10, 50) as u8;
    control
        .execute(Command::CreatePool {
            pd: LOCAL_PD.into(),
            name: LOCAL_POOL.into(),
            extent_size_bytes: tessera_core::DEFAULT_EXTENT_SIZE_BYTES,
            pg_count: tessera_core::DEFAULT_PG_COUNT,
            spare_percent,
        })
        .await?;
    for n in 1..=layout.sds_count {
        let name = format!("sds-{n}");
        let address = format!("{}:{}", layout.ip, sds_port(layout, n));
        control
            .execute(Command::AddSds {
                name: name.clone(),
                pd: LOCAL_PD.into(),
                fault_set: None,
                data_address: address,
            })
            .await?;
        let sds_dir = dir.join(&name);
        std::fs::create_dir_all(&sds_dir)?;
        let device = sds_dir.join("disk0.img");
        // Sparse: the file takes space only where extents are written.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&device)?
            .set_len(layout.device_size_bytes)?;
        control
            .execute(Command::AddDevice { sds: name, pool: LOCAL_POOL.into(), path: device.display().to_string() })
            .await?;
    }
    eprintln!(
        "created protection domain {LOCAL_PD}, pool {LOCAL_POOL}, {} SDS(s) with a {} file-backed device each",
        layout.sds_count,
        format_size(layout.device_size_bytes)
    );
    Ok(())
}

async fn wait_for<F, Fut>(dir: &Path, pids: &[(String, i32)], what: &str, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        for (role, pid) in pids {
            if !pid_alive(*pid) {
                bail!(
                    "{role} exited during start-up; last lines of {}:\n{}",
                    dir.join(format!("{role}.log")).display(),
                    log_tail(dir, role)
                );
            }
        }
        if ready().await {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("timed out after {READY_TIMEOUT:?} waiting for {what}; see the logs in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the local cluster in `dir`: first the volume service's mounts and attachments are
/// released while the SDC still serves them (a FUSE file whose SDC is gone would hang its
/// readers), then every daemon.
pub async fn stop(dir: &Path) -> anyhow::Result<usize> {
    // A local cluster's config, or an agent's node config (`tessera agent` with a volume
    // service); the agent is stopped first so it does not restart what this releases.
    let _ = stop_agent(dir);
    for path in [config_path(dir), dir.join("node.toml")] {
        let Ok(cfg) = ClientConfig::load(&path) else { continue };
        if cfg.volumes.is_some() {
            match crate::volumes::service(&cfg) {
                Ok(svc) => {
                    for problem in svc.release_all_local().await {
                        eprintln!("warning: releasing a volume: {problem}");
                    }
                }
                Err(e) => eprintln!("warning: volume service: {e:#}"),
            }
        }
    }
    down(dir)
}

/// Stops the agent whose state is in `dir`, if one runs there.
fn stop_agent(dir: &Path) -> Option<()> {
    let pid_file = dir.join("agent.pid");
    let pid = live_daemon_pid(&pid_file)?;
    process::stop_pid(pid);
    let _ = std::fs::remove_file(pid_file);
    Some(())
}

/// Stops every daemon of the local cluster in `dir`: SDC first, then SDSs, then the MDM.
pub fn down(dir: &Path) -> anyhow::Result<usize> {
    process::stop_all(dir)
}
