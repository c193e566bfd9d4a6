//! `tessera agent`, `tessera node …` and `tessera deploy …`: deployment from node
//! attributes. The planning is `tessera_core::deploy`; the agent loop is `tessera_agent`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tessera_agent::agent::{Agent, AgentConfig};
use tessera_agent::attributes::DEFAULT_ATTRIBUTE_DIRS;
use tessera_agent::disks::DiscoveryOptions;
use tessera_agent::mdm::{next_step, planned_nodes};
use tessera_agent::process::{live_daemon_pid, log_tail, pid_alive, spawn_daemon};
use tessera_core::deploy::plan::{diff, plan_layout, Layout};
use tessera_core::deploy::spec::DeploySpec;
use tessera_core::deploy::{split_sds_name, validate_node_name, PoolRef};
use tessera_core::units::{format_size, parse_size_bytes};
use tessera_core::{ClusterState, Command, DeviceState, SdsState};
use tessera_proto::control::ControlClient;

use crate::cli::{AgentArgs, DeployCmd, NodeCmd};
use crate::config::ClientConfig;
use crate::table;

/// How long `agent --detach` waits for the node to appear in the cluster.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);

fn short_hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    h.trim().split('.').next().unwrap_or_default().to_string()
}

/// The node name when none is given: the short host name (made a valid name), plus the
/// address when one was given, so agents sharing a machine differ.
fn default_node_name(address: Option<std::net::IpAddr>) -> String {
    let mut host: String = short_hostname()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .collect();
    if host.is_empty() || !host.as_bytes()[0].is_ascii_alphanumeric() {
        host = format!("node{host}");
    }
    match address {
        None => host.chars().take(20).collect(),
        Some(a) => {
            let a: String = a.to_string().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
            let keep = 20usize.saturating_sub(a.len() + 1).max(1);
            format!("{}-{a}", host.chars().take(keep).collect::<String>())
        }
    }
}

/// The local address this machine reaches the first reachable MDM from.
fn address_towards(mdms: &[String]) -> anyhow::Result<std::net::IpAddr> {
    for m in mdms {
        let Ok(addr) = m.parse::<std::net::SocketAddr>() else { continue };
        let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        if let Ok(sock) = std::net::UdpSocket::bind(bind) {
            if sock.connect(addr).is_ok() {
                if let Ok(local) = sock.local_addr() {
                    return Ok(local.ip());
                }
            }
        }
    }
    bail!("cannot tell this node's address from the MDM addresses; pass --address")
}

pub async fn agent(cfg: &ClientConfig, config_path: &Path, args: AgentArgs) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_else(|| default_node_name(args.address));
    validate_node_name(&name).map_err(|e| anyhow!("--name: {e}"))?;
    let address = match args.address {
        Some(a) => a,
        None => address_towards(&cfg.mdm)?,
    };
    let min_size_bytes = parse_size_bytes(&args.min_disk_size).map_err(|e| anyhow!("--min-disk-size: {e}"))?;
    let global_pool = if args.no_global_pool {
        None
    } else {
        tessera_core::names::validate_name(&args.global_domain).map_err(|e| anyhow!("--global-domain: {e}"))?;
        tessera_core::names::validate_name(&args.global_pool).map_err(|e| anyhow!("--global-pool: {e}"))?;
        Some(PoolRef { domain: args.global_domain.clone(), pool: args.global_pool.clone() })
    };
    let candidates: Vec<String> = match &args.disk_candidates {
        None => Vec::new(),
        Some(list) => {
            let items: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
            if items.iter().any(|s| !s.starts_with('/')) {
                bail!("--disk-candidates: {list:?} must be a comma list of absolute paths or globs");
            }
            items
        }
    };
    let dir = absolute(&args.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = absolute(config_path)?;
    if args.detach {
        return detach(cfg, &config_path, &dir, &name).await;
    }
    if let Some(pid) = live_daemon_pid(&dir.join("agent.pid")).filter(|p| *p != std::process::id() as i32) {
        bail!("an agent already runs in {} (pid {pid})", dir.display());
    }
    std::fs::write(dir.join("agent.pid"), format!("{}\n", std::process::id()))?;
    let volumes =
        if args.no_volumes || args.no_sdc { None } else { Some(volume_service_setup(cfg, &dir, &name, &args)?) };
    let attribute_sources: Vec<PathBuf> = if args.attributes_dirs.is_empty() {
        DEFAULT_ATTRIBUTE_DIRS.iter().map(PathBuf::from).collect()
    } else {
        args.attributes_dirs.clone()
    };
    let agent_cfg = AgentConfig {
        name: name.clone(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        address,
        dir: dir.clone(),
        attribute_sources,
        attribute_flags: args.attributes.clone(),
        discovery: DiscoveryOptions { candidates, min_size_bytes, cluster_id: cfg.cluster_id()? },
        global_pool,
        exe: std::env::current_exe()?,
        config_path,
        sds_base_port: args.sds_base_port,
        run_sdc: !args.no_sdc,
        volumes,
        mdm_port: args.mdm_port,
        secret: cfg.secret()?,
        interval: Duration::from_millis(args.interval_ms.max(100)),
        disk_rescan: Duration::from_millis(args.disk_rescan_ms.max(100)),
    };
    tracing::info!("agent for node {name} on {address}, state in {}", dir.display());
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);
    let agent = Agent::new(agent_cfg, control);
    tokio::select! {
        exit = agent.run() => {
            let exit = exit?;
            tracing::info!("agent stopping: {exit:?}");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("agent stopping (signal); its daemons keep running"),
        _ = sigterm() => tracing::info!("agent stopping (SIGTERM); its daemons keep running"),
    }
    let _ = std::fs::remove_file(dir.join("agent.pid"));
    Ok(())
}

/// Writes the node's volume service config (`DIR/node.toml`, mode 0600): the cluster's
/// connection and `[volumes]` settings (preempt, root path, create defaults), with this
/// node's SDC, socket, mount path and records — never another service's.
fn volume_service_setup(
    cfg: &ClientConfig,
    dir: &Path,
    name: &str,
    args: &AgentArgs,
) -> anyhow::Result<tessera_agent::agent::VolumeServiceSetup> {
    let mut volumes = cfg.volumes.clone().unwrap_or_default();
    let defaults = tessera_volumes::config::VolumeServiceConfig::default();
    (volumes.mount_path, volumes.state_dir) = match &args.volumes_dir {
        Some(d) => (absolute(d)?.join("volumes"), absolute(d)?.join("state")),
        None => (defaults.mount_path, defaults.state_dir),
    };
    volumes.plugin_socket = absolute(&args.plugin_socket)?;
    volumes.sdc = Some(name.to_string());
    volumes.validate().map_err(|e| anyhow!("volume service settings: {e}"))?;
    if let Some(parent) = volumes.plugin_socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let node_cfg = ClientConfig {
        cluster_id: cfg.cluster_id.clone(),
        secret: cfg.secret.clone(),
        mdm: cfg.mdm.clone(),
        sdc: Some(name.to_string()),
        local: None,
        volumes: Some(volumes.clone()),
    };
    let config_path = dir.join("node.toml");
    node_cfg.save(&config_path)?;
    Ok(tessera_agent::agent::VolumeServiceSetup { config_path, plugin_socket: volumes.plugin_socket })
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

/// Starts the agent in the background (same arguments without `--detach`) and waits until
/// its node is in the cluster.
async fn detach(cfg: &ClientConfig, config_path: &Path, dir: &Path, name: &str) -> anyhow::Result<()> {
    if let Some(pid) = live_daemon_pid(&dir.join("agent.pid")) {
        bail!("an agent already runs in {} (pid {pid})", dir.display());
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    // `--config` comes first so the child reads the same file whatever the environment says.
    let args: Vec<String> = strip_config_flag(&args);
    let pid = spawn_daemon(&std::env::current_exe()?, dir, "agent", config_path, &args)?;
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    loop {
        if !pid_alive(pid) {
            bail!("the agent exited; last lines of {}:\n{}", dir.join("agent.log").display(), log_tail(dir, "agent"));
        }
        if let Ok(view) = control.state().await {
            if view.state.nodes.contains_key(name) {
                println!("agent for node {name} running (pid {pid}); log: {}", dir.join("agent.log").display());
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "node {name} did not appear in the cluster within {AGENT_READY_TIMEOUT:?}; see {}",
                dir.join("agent.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drops `--config X` / `--config=X` (spawn_daemon passes its own) and `--join X` (the
/// config it made is in the state directory; the token holds the secret and would show in
/// the process list).
fn strip_config_flag(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--config" || a == "--join" {
            skip = true;
            continue;
        }
        if a.starts_with("--config=") || a.starts_with("--join=") {
            continue;
        }
        out.push(a.clone());
    }
    out
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn node_rows(state: &ClusterState, layout: &Layout) -> Vec<serde_json::Value> {
    state
        .nodes
        .values()
        .map(|n| {
            let plan = layout.nodes.get(&n.name);
            let sdss: Vec<&str> = state
                .sdss
                .values()
                .filter(|s| split_sds_name(&s.name).is_some_and(|(o, _)| o == n.name))
                .map(|s| s.name.as_str())
                .collect();
            let devices = state
                .devices
                .values()
                .filter(|d| state.sdss.get(&d.sds_id).is_some_and(|s| sdss.contains(&s.name.as_str())))
                .count();
            let problems: Vec<String> = layout
                .problems
                .iter()
                .filter(|p| p.node.as_deref() == Some(n.name.as_str()))
                .map(|p| p.to_string())
                .collect();
            json!({
                "name": n.name,
                "hostname": n.hostname,
                "address": n.address,
                "method": plan.map_or("blocked", |p| p.method.as_str()),
                "fault_set": plan.and_then(|p| p.fault_set.clone()),
                "persona": plan.and_then(|p| p.persona),
                "removing": n.removing,
                "sds": sdss,
                "devices": devices,
                "disks": n.disks.len(),
                "problems": problems,
            })
        })
        .collect()
}

pub async fn node(cfg: &ClientConfig, cmd: NodeCmd, as_json: bool) -> anyhow::Result<()> {
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);
    match cmd {
        NodeCmd::List => {
            let state = control.state().await?.state;
            let layout = plan_layout(&state);
            let rows = node_rows(&state, &layout);
            if as_json {
                return print_json(&rows);
            }
            table::print(
                &["name", "address", "method", "fault set", "sds", "devices", "problems"],
                rows.iter()
                    .map(|r| {
                        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                        vec![
                            s("name"),
                            s("address"),
                            if r["removing"].as_bool() == Some(true) { "removing".into() } else { s("method") },
                            s("fault_set"),
                            r["sds"].as_array().map_or(0, |a| a.len()).to_string(),
                            r["devices"].to_string(),
                            r["problems"].as_array().map_or(0, |a| a.len()).to_string(),
                        ]
                    })
                    .collect(),
            );
            for p in &layout.problems {
                println!("! {p}");
            }
            Ok(())
        }
        NodeCmd::Show { name } => {
            let state = control.state().await?.state;
            let n = state.nodes.get(&name).ok_or_else(|| anyhow!("node {name:?} not found"))?;
            let layout = plan_layout(&state);
            if as_json {
                return print_json(&json!({ "node": n, "plan": layout.nodes.get(&name) }));
            }
            println!("node {} ({}) on {}", n.name, n.hostname, n.address);
            println!("attributes:");
            for (k, v) in &n.attributes {
                println!("  {k} = {v:?}");
            }
            println!("disks:");
            table::print(
                &["path", "size", "media", "usage"],
                n.disks
                    .iter()
                    .map(|d| {
                        let usage = match &d.usage {
                            tessera_core::deploy::DiskUsage::Unused => "unused".to_string(),
                            tessera_core::deploy::DiskUsage::Tessera { device_id } => {
                                format!("tessera device {device_id}")
                            }
                            tessera_core::deploy::DiskUsage::InUse { reason } => format!("in use: {reason}"),
                            tessera_core::deploy::DiskUsage::Missing { reason } => format!("missing: {reason}"),
                        };
                        vec![d.path.clone(), format_size(d.size_bytes), d.media.as_str().into(), usage]
                    })
                    .collect(),
            );
            for p in layout.problems.iter().filter(|p| p.node.as_deref() == Some(name.as_str())) {
                println!("! {p}");
            }
            Ok(())
        }
        NodeCmd::Remove { name, no_wait, timeout_secs } => {
            control.execute(Command::RemoveNode { name: name.clone() }).await?;
            println!("node {name}: draining, then removing");
            if no_wait {
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs(timeout_secs);
            loop {
                let state = control.state().await?.state;
                if !state.nodes.contains_key(&name) {
                    println!("node {name} removed");
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("node {name} still in the cluster after {timeout_secs} s; is its agent running?");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A spec larger than this is refused: it is replicated into the cluster state.
const MAX_SPEC_BYTES: u64 = 256 * 1024;

fn read_spec(path: &Path) -> anyhow::Result<DeploySpec> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if len > MAX_SPEC_BYTES {
        bail!("{}: {len} bytes; a deploy spec is at most {MAX_SPEC_BYTES}", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: DeploySpec = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    spec.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

/// The MDM part of a plan, as text lines.
fn mdm_lines(layout: &Layout) -> Vec<String> {
    let Some(m) = &layout.mdm else { return Vec::new() };
    vec![format!(
        "MDM placement for {}: managers {} (first is the preferred primary), tiebreakers {}",
        m.mode,
        if m.managers.is_empty() { "-".into() } else { m.managers.join(", ") },
        if m.tiebreakers.is_empty() { "-".into() } else { m.tiebreakers.join(", ") },
    )]
}

/// Work still under way that a diff does not show: devices being formatted or drained,
/// SDSs draining.
fn in_flight(state: &ClusterState) -> Vec<String> {
    let mut out = Vec::new();
    for d in state.devices.values() {
        let sds = state.sdss.get(&d.sds_id).map_or("?", |s| s.name.as_str());
        match d.state {
            DeviceState::New => out.push(format!("device {sds}:{} being formatted", d.path)),
            DeviceState::Draining => out.push(format!("device {sds}:{} draining", d.path)),
            _ => {}
        }
    }
    for s in state.sdss.values().filter(|s| s.state == SdsState::Draining) {
        out.push(format!("SDS {} draining", s.name));
    }
    out
}

pub async fn deploy(cfg: &ClientConfig, cmd: DeployCmd, as_json: bool) -> anyhow::Result<()> {
    let control = ControlClient::new(cfg.mdm.clone(), cfg.secret()?);
    match cmd {
        DeployCmd::Plan { spec } => {
            let mut state = control.state().await?.state;
            if let Some(path) = spec {
                state.deploy_spec = Some(read_spec(&path)?);
            }
            let layout = plan_layout(&state);
            let changes = diff(&state, &layout);
            if as_json {
                return print_json(&json!({
                    "changes": changes,
                    "problems": layout.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "mdm": layout.mdm,
                    "in_flight": in_flight(&state),
                }));
            }
            for p in &layout.problems {
                println!("! {p}");
            }
            if changes.is_empty() {
                println!("no changes: the cluster matches the plan");
            }
            for c in &changes {
                println!("{c}");
            }
            for l in in_flight(&state) {
                println!("… {l}");
            }
            for l in mdm_lines(&layout) {
                println!("{l}");
            }
            Ok(())
        }
        DeployCmd::Apply { spec, no_wait, timeout_secs } => {
            let spec = read_spec(&spec)?;
            set_spec(&control, Some(spec), no_wait, timeout_secs).await
        }
        DeployCmd::Clear { no_wait, timeout_secs } => set_spec(&control, None, no_wait, timeout_secs).await,
        DeployCmd::Show => {
            let state = control.state().await?.state;
            match state.deploy_spec {
                None => println!("no declarative spec is set"),
                Some(s) if as_json => print_json(&s)?,
                Some(s) => print!("{}", toml::to_string(&s)?),
            }
            Ok(())
        }
    }
}

/// Sets (or clears) the spec unless the plan it makes has problems, then waits until the
/// agents carried it out.
async fn set_spec(
    control: &ControlClient,
    spec: Option<DeploySpec>,
    no_wait: bool,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let mut state = control.state().await?.state;
    state.deploy_spec = spec.clone();
    let layout = plan_layout(&state);
    if !layout.problems.is_empty() {
        for p in &layout.problems {
            eprintln!("! {p}");
        }
        bail!("the plan has {} problem(s); nothing was changed", layout.problems.len());
    }
    let set = spec.is_some();
    control.execute(Command::SetDeploySpec { spec }).await?;
    println!("{}; the agents carry it out", if set { "spec set" } else { "spec cleared" });
    if no_wait {
        return Ok(());
    }
    wait_converged(control, Duration::from_secs(timeout_secs)).await
}

/// Waits until nothing is left to do: no change in the diff, nothing formatting or draining.
async fn wait_converged(control: &ControlClient, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last: Vec<String> = Vec::new();
    loop {
        let state = control.state().await?.state;
        let layout = plan_layout(&state);
        let mut left: Vec<String> = diff(&state, &layout).iter().map(|c| c.to_string()).collect();
        left.extend(in_flight(&state));
        if let Some(plan) = layout.mdm.as_ref().filter(|p| p.complete) {
            let status = control.status().await?;
            match next_step(plan, &planned_nodes(plan, &state), &status.mdm) {
                Ok(None) => {}
                Ok(Some(step)) => left.push(format!("MDM placement: {step:?}")),
                Err(why) => left.push(format!("MDM placement waits: {why}")),
            }
        }
        if left.is_empty() {
            println!("the cluster matches the plan");
            return Ok(());
        }
        if left != last {
            println!("{} step(s) left: {}", left.len(), left.first().map_or("", String::as_str));
            last = left.clone();
        }
        if Instant::now() > deadline {
            bail!("still {} step(s) left after {timeout:?}: {}", left.len(), left.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
