//! The agent's loop. Every tick it reads the node's attributes and disks, reports the node
//! when anything changed, plans the whole cluster with the pure planner, and carries out
//! the changes that concern its own node (plus any missing domain, pool or fault set),
//! then keeps one SDS process per domain it serves and an SDC running.
//!
//! Every step is idempotent and driven by the replicated state, so a crashed or restarted
//! agent (or a second one racing to create the same pool) picks up where things are.
//! Removals never cut a copy: a device or SDS that holds data is drained first (its copies
//! move elsewhere) and removed only when the MDM accepts the removal.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tessera_core::deploy::attributes::Problem;
use tessera_core::deploy::plan::{diff, plan_layout, Change, Layout};
use tessera_core::deploy::{split_sds_name, DiskUsage, Node, PoolRef};
use tessera_core::{ClusterState, Command, CoreError, DeviceState, SdsState};
use tessera_proto::control::{ClientError, ControlClient, ControlError, ControlRequest, ControlResponse};
use tessera_proto::ClusterSecret;

use crate::attributes::read_attributes;
use crate::disks::{discover, DiscoveryOptions};
use crate::mdm::{next_step, planned_nodes, MdmStep};
use crate::process::{live_daemon_pid, spawn_daemon, stop_pid};

/// How long reading the attribute files may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one disk inventory may take (probes run one after another, each bounded).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long clearing an old superblock (4 KiB write and fsync) may take.
const WIPE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub hostname: String,
    pub address: IpAddr,
    /// State directory: pid and log files of the node's daemons, `agent.json`.
    pub dir: PathBuf,
    /// Attribute directories (or Mesos attribute files), read in order.
    pub attribute_sources: Vec<PathBuf>,
    /// `name=value` flags; they override files.
    pub attribute_flags: Vec<String>,
    pub discovery: DiscoveryOptions,
    /// Where unused disks go under the single-global-pool method; `None` disables it.
    pub global_pool: Option<PoolRef>,
    /// The `tessera` binary and the config file its daemons are started with.
    pub exe: PathBuf,
    pub config_path: PathBuf,
    /// SDS data ports are taken from here upwards, one per domain the node serves.
    pub sds_base_port: u16,
    pub run_sdc: bool,
    /// The node's volume service, when it runs one (it needs the SDC).
    pub volumes: Option<VolumeServiceSetup>,
    /// Port of the MDM this node runs when the MDM plan places one here.
    pub mdm_port: u16,
    /// The cluster secret, to reach an MDM directly (asking it to take the lead).
    pub secret: ClusterSecret,
    /// How often attributes are re-read and the plan checked.
    pub interval: Duration,
    /// How often disks are probed again when the agent changed nothing on them.
    pub disk_rescan: Duration,
}

/// How to run the node's volume service (`daemon volumes`).
#[derive(Debug, Clone)]
pub struct VolumeServiceSetup {
    /// Its config: the cluster's, with this node's SDC, mount path, records and socket.
    pub config_path: PathBuf,
    /// Its Docker plugin socket, to tell whether something else already serves it.
    pub plugin_socket: PathBuf,
}

/// What the agent remembers between restarts: which port each of its SDSs uses.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentState {
    sds_ports: BTreeMap<String, u16>,
}

pub struct Agent {
    cfg: AgentConfig,
    control: ControlClient,
    /// Problems last logged, so each is logged once rather than every tick.
    logged_problems: Vec<Problem>,
    /// Why the MDM placement waits, last logged.
    mdm_wait: Option<String>,
    /// The last disk inventory and when it was taken.
    disks: Option<(std::time::Instant, Vec<tessera_core::deploy::Disk>)>,
    /// Another process serves the plugin socket (logged once).
    volumes_socket_busy: bool,
    reported_once: bool,
}

/// Why the loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// `tessera node remove` finished: the node was drained and forgotten.
    Removed,
}

impl Agent {
    pub fn new(cfg: AgentConfig, control: ControlClient) -> Agent {
        Agent {
            cfg,
            control,
            logged_problems: Vec::new(),
            mdm_wait: None,
            disks: None,
            volumes_socket_busy: false,
            reported_once: false,
        }
    }

    pub async fn run(mut self) -> anyhow::Result<Exit> {
        std::fs::create_dir_all(&self.cfg.dir).with_context(|| format!("creating {}", self.cfg.dir.display()))?;
        loop {
            match self.tick().await {
                Ok(Some(exit)) => return Ok(exit),
                Ok(None) => {}
                Err(e) => tracing::warn!("reconcile: {e:#}"),
            }
            tokio::time::sleep(self.cfg.interval).await;
        }
    }

    /// The node as the agent sees it now.
    /// Attributes are read every tick (cheap); disks are probed again only every
    /// `disk_rescan` or after the agent changed something on them, since probing an unused
    /// disk reads it (`blkid -p` bypasses the cache).
    async fn observe(&mut self) -> anyhow::Result<Node> {
        // Off the async worker and bounded: an attribute directory on a hung filesystem must
        // not stall the agent.
        let (sources, flags) = (self.cfg.attribute_sources.clone(), self.cfg.attribute_flags.clone());
        let attrs =
            tokio::time::timeout(READ_TIMEOUT, tokio::task::spawn_blocking(move || read_attributes(&sources, &flags)))
                .await
                .map_err(|_| anyhow!("reading the attribute files did not finish within {READ_TIMEOUT:?}"))??;
        let disks = match &self.disks {
            Some((at, disks)) if at.elapsed() < self.cfg.disk_rescan => disks.clone(),
            _ => {
                // Each probe is bounded inside `discover`; this bounds the whole inventory.
                let opts = self.cfg.discovery.clone();
                let disks =
                    tokio::time::timeout(DISCOVERY_TIMEOUT, tokio::task::spawn_blocking(move || discover(&opts)))
                        .await
                        .map_err(|_| anyhow!("disk discovery did not finish within {DISCOVERY_TIMEOUT:?}"))??;
                self.disks = Some((std::time::Instant::now(), disks.clone()));
                disks
            }
        };
        Ok(Node {
            name: self.cfg.name.clone(),
            hostname: self.cfg.hostname.clone(),
            address: self.cfg.address.to_string(),
            attributes: attrs.values,
            disks,
            global_pool: self.cfg.global_pool.clone(),
            removing: false,
            errors: attrs.errors,
            mdm_id: None,
            mdm_port: Some(self.cfg.mdm_port),
        })
    }

    /// One pass. Returns `Some` when the agent should stop.
    pub async fn tick(&mut self) -> anyhow::Result<Option<Exit>> {
        let node = self.observe().await?;
        let mut state = self.control.state().await?.state;
        match state.nodes.get(&self.cfg.name) {
            None if self.reported_once => {
                // Forgotten after `node remove`: nothing of ours is left in the cluster.
                tracing::info!("node {} was removed from the cluster; stopping its daemons", self.cfg.name);
                self.stop_daemons(|_| true);
                return Ok(Some(Exit::Removed));
            }
            Some(known) if same_report(known, &node) => {}
            _ => {
                self.execute(Command::ReportNode { node: node.clone() }).await?;
                state = self.control.state().await?.state;
            }
        }
        self.reported_once = true;
        let layout = plan_layout(&state);
        self.log_problems(&layout.problems);
        let mut acted = false;
        for change in diff(&state, &layout) {
            if change.node().is_some_and(|n| n != self.cfg.name) {
                continue;
            }
            match self.carry_out(&change, &state, &node).await {
                Ok(true) if matches!(change, Change::ForgetNode { .. }) => {
                    tracing::info!("{change}");
                    return Ok(Some(Exit::Removed));
                }
                Ok(true) => {
                    tracing::info!("{change}");
                    acted = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("{change}: {e:#}"),
            }
        }
        if acted {
            state = self.control.state().await?.state;
            self.disks = None; // what we did (formatting, clearing) shows on the next probe
        }
        self.ensure_daemons(&state, &layout)?;
        if let Err(e) = self.reconcile_mdm(&state, &layout).await {
            if self.mdm_wait.as_deref() != Some(e.as_str()) {
                tracing::warn!("MDM placement: {e}");
                self.mdm_wait = Some(e);
            }
        }
        Ok(None)
    }

    /// Runs this node's MDM when the plan places one here; the agent of the plan's first
    /// manager also moves the MDM cluster one step towards the plan.
    async fn reconcile_mdm(&mut self, state: &ClusterState, layout: &Layout) -> Result<(), String> {
        let Some(plan) = layout.mdm.as_ref().filter(|p| p.complete) else { return Ok(()) };
        let me = &self.cfg.name;
        let role = if plan.managers.contains(me) {
            "manager"
        } else if plan.tiebreakers.contains(me) {
            "tiebreaker"
        } else {
            return Ok(());
        };
        let Some(id) = state.nodes.get(me).and_then(|n| n.mdm_id) else {
            self.execute(Command::AssignMdmId { node: me.clone() }).await.map_err(|e| e.to_string())?;
            return Ok(());
        };
        let dir = &self.cfg.dir;
        if live_daemon_pid(&dir.join("mdm.pid")).is_none() {
            let listen = std::net::SocketAddr::new(self.cfg.address, self.cfg.mdm_port).to_string();
            let mdm_dir = dir.join("mdm").display().to_string();
            let args = [
                "daemon",
                "mdm",
                "--dir",
                &mdm_dir,
                "--id",
                &id.to_string(),
                "--listen",
                &listen,
                "--role",
                role,
                "--standby",
            ]
            .map(String::from);
            let pid =
                spawn_daemon(&self.cfg.exe, dir, "mdm", &self.cfg.config_path, &args).map_err(|e| format!("{e:#}"))?;
            tracing::info!(pid, "started MDM {id} ({role}) on {listen}");
        }
        if plan.managers.first() != Some(me) {
            return Ok(());
        }
        let nodes = planned_nodes(plan, state);
        let status = self.control.status().await.map_err(|e| e.to_string())?;
        let Some(step) = next_step(plan, &nodes, &status.mdm)? else {
            self.mdm_wait = None;
            return Ok(());
        };
        tracing::info!("MDM placement: {step:?}");
        let (client, request) = match &step {
            MdmStep::Add { id, address } => {
                (None, ControlRequest::AddMdm { address: address.clone(), expect_id: Some(*id) })
            }
            MdmStep::Switch { mode, managers, tiebreakers } => (
                None,
                ControlRequest::SwitchClusterMode {
                    mode: mode.clone(),
                    managers: Some(managers.clone()),
                    tiebreakers: Some(tiebreakers.clone()),
                },
            ),
            MdmStep::Campaign { address, .. } => {
                (Some(ControlClient::new(vec![address.clone()], self.cfg.secret.clone())), ControlRequest::Campaign)
            }
        };
        let reply = match &client {
            Some(c) => c.request(&request).await,
            None => self.control.request(&request).await,
        };
        match reply {
            Ok(ControlResponse::Members(_) | ControlResponse::Done) => Ok(()),
            Ok(other) => Err(format!("{step:?}: unexpected answer {other:?}")),
            Err(e) => Err(format!("{step:?}: {e}")),
        }
    }

    fn log_problems(&mut self, problems: &[Problem]) {
        let mine: Vec<Problem> =
            problems.iter().filter(|p| p.node.as_deref().is_none_or(|n| n == self.cfg.name)).cloned().collect();
        if mine != self.logged_problems {
            for p in &mine {
                tracing::warn!("{p}");
            }
            self.logged_problems = mine;
        }
    }

    async fn execute(&self, cmd: Command) -> Result<(), ClientError> {
        self.control.execute(cmd).await.map(|_| ())
    }

    /// Runs a command that another agent may have run first: "already exists" is success.
    async fn execute_idempotent(&self, cmd: Command) -> anyhow::Result<bool> {
        match self.control.execute(cmd).await {
            Ok(_) => Ok(true),
            Err(ClientError::Control(ControlError::Refused(CoreError::AlreadyExists { .. }))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Carries out one change (or its next step). Returns whether anything was done.
    async fn carry_out(&mut self, change: &Change, state: &ClusterState, node: &Node) -> anyhow::Result<bool> {
        match change {
            Change::CreateDomain { domain } => {
                self.execute_idempotent(Command::CreateProtectionDomain { name: domain.clone() }).await
            }
            Change::CreateFaultSet { domain, fault_set } => {
                self.execute_idempotent(Command::CreateFaultSet { pd: domain.clone(), name: fault_set.clone() }).await
            }
            Change::CreatePool { domain, pool, spare_percent } => {
                self.execute_idempotent(Command::CreatePool {
                    pd: domain.clone(),
                    name: pool.clone(),
                    extent_size_bytes: tessera_core::DEFAULT_EXTENT_SIZE_BYTES,
                    pg_count: tessera_core::DEFAULT_PG_COUNT,
                    spare_percent: *spare_percent,
                })
                .await
            }
            Change::AddSds { sds, domain, fault_set, .. } => {
                let port = self.port_for(domain, state)?;
                let data_address = std::net::SocketAddr::new(self.cfg.address, port).to_string();
                self.execute_idempotent(Command::AddSds {
                    name: sds.clone(),
                    pd: domain.clone(),
                    fault_set: fault_set.clone(),
                    data_address,
                })
                .await
            }
            Change::AddDevice { sds, path, pool, .. } => {
                // A disk that carries one of our old superblocks left the cluster (drained and
                // removed): clear it so the SDS formats it afresh under its new device id.
                if let Some(DiskUsage::Tessera { device_id }) = node.disk(path).map(|d| &d.usage) {
                    if state.devices.contains_key(device_id) {
                        return Err(anyhow!("{path} is still device {device_id} in the cluster; waiting"));
                    }
                    let p = PathBuf::from(path);
                    // A dead disk can hang the write: the agent gives up and tries next tick.
                    tokio::time::timeout(WIPE_TIMEOUT, tokio::task::spawn_blocking(move || wipe_superblock(&p)))
                        .await
                        .map_err(|_| anyhow!("clearing {path} did not finish within {WIPE_TIMEOUT:?}"))???;
                    tracing::info!("cleared the old Tessera superblock of {path} (device {device_id}, removed)");
                }
                self.execute_idempotent(Command::AddDevice { sds: sds.clone(), pool: pool.clone(), path: path.clone() })
                    .await
            }
            // A move is a removal now and an addition once the disk is free (next ticks).
            Change::MoveDevice { from_sds: sds, path, .. } | Change::RemoveDevice { sds, path, .. } => {
                self.remove_device(state, sds, path).await
            }
            Change::RemoveSds { sds, .. } => {
                match self.control.execute(Command::RemoveSds { name: sds.clone() }).await {
                    Ok(_) => {
                        let domain = split_sds_name(sds).map(|(_, d)| d.to_string()).unwrap_or_default();
                        self.stop_daemons(|role| role == format!("sds-{domain}"));
                        Ok(true)
                    }
                    Err(ClientError::Control(ControlError::Refused(CoreError::InUse { .. }))) => {
                        let draining = state.sds_by_name(sds).is_some_and(|s| s.state != SdsState::Normal);
                        if draining {
                            return Ok(false);
                        }
                        self.execute(Command::DrainSds { name: sds.clone() }).await?;
                        tracing::info!("draining SDS {sds} before removing it");
                        Ok(true)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Change::ForgetNode { node } => {
                // An MDM here leaves the MDM cluster first: never while it votes (the MDM
                // placement, which no longer counts this node, moves the vote first), and as
                // a standby it is removed, its id retired.
                if let Some(id) = state.nodes.get(node).and_then(|n| n.mdm_id) {
                    let status = self.control.status().await?;
                    match status.mdm.members.iter().find(|m| m.id == id) {
                        Some(m) if m.voter => {
                            return Err(anyhow!(
                                "this node's MDM {id} still votes; waiting for the MDM placement to move"
                            ))
                        }
                        Some(_) => match self.control.request(&ControlRequest::RemoveMdm { id }).await? {
                            ControlResponse::Members(_) => tracing::info!("removed this node's standby MDM {id}"),
                            other => return Err(anyhow!("removing MDM {id}: {other:?}")),
                        },
                        None => {}
                    }
                }
                // The SDC goes with the node, but never under a mapped volume: the MDM refuses
                // while one is mapped, and the node stays (removing) until it is unmapped.
                match self.control.execute(Command::RemoveSdc { name: node.clone() }).await {
                    Ok(_) | Err(ClientError::Control(ControlError::Refused(CoreError::NotFound { .. }))) => {}
                    Err(e) => return Err(anyhow!("removing SDC {node}: {e}")),
                }
                self.execute(Command::ForgetNode { name: node.clone() }).await?;
                self.stop_daemons(|_| true);
                Ok(true)
            }
        }
    }

    /// Removes a device, draining it first when it holds copies.
    async fn remove_device(&self, state: &ClusterState, sds: &str, path: &str) -> anyhow::Result<bool> {
        match self.control.execute(Command::RemoveDevice { sds: sds.to_string(), path: path.to_string() }).await {
            Ok(_) => Ok(true),
            Err(ClientError::Control(ControlError::Refused(CoreError::InUse { .. }))) => {
                let normal = state
                    .sds_by_name(sds)
                    .and_then(|s| state.devices_of_sds(s.id).find(|d| d.path == path))
                    .is_some_and(|d| d.state == DeviceState::Normal);
                if !normal {
                    return Ok(false); // draining (or failed): its copies are moving
                }
                self.execute(Command::DrainDevice { sds: sds.to_string(), path: path.to_string() }).await?;
                tracing::info!("draining {path} before removing it");
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The data port of this node's SDS in `domain`: remembered across restarts, else the
    /// lowest port from the base that none of the node's SDSs uses.
    fn port_for(&self, domain: &str, state: &ClusterState) -> anyhow::Result<u16> {
        let path = self.cfg.dir.join("agent.json");
        let mut saved: AgentState = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if let Some(p) = saved.sds_ports.get(domain) {
            return Ok(*p);
        }
        let ip = self.cfg.address.to_string();
        let taken = |port: u16| {
            saved.sds_ports.values().any(|p| *p == port)
                || state
                    .sdss
                    .values()
                    .any(|s| s.data_address == std::net::SocketAddr::new(self.cfg.address, port).to_string())
        };
        let port = (self.cfg.sds_base_port..u16::MAX)
            .find(|p| !taken(*p))
            .ok_or_else(|| anyhow!("no free SDS port on {ip} above {}", self.cfg.sds_base_port))?;
        saved.sds_ports.insert(domain.to_string(), port);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&saved)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(port)
    }

    /// One SDS process per SDS of this node in the cluster, an SDC if asked; processes of
    /// SDSs that left the cluster are stopped.
    fn ensure_daemons(&mut self, state: &ClusterState, layout: &Layout) -> anyhow::Result<()> {
        let dir = &self.cfg.dir;
        let mut wanted = Vec::new();
        for sds in state.sdss.values() {
            let Some((owner, domain)) = split_sds_name(&sds.name) else { continue };
            if owner != self.cfg.name {
                continue;
            }
            let role = format!("sds-{domain}");
            wanted.push(role.clone());
            if live_daemon_pid(&dir.join(format!("{role}.pid"))).is_none() {
                // On the node's address as it is now (the SDS tells the MDM if it moved), on
                // the port the cluster knows.
                let port =
                    sds.data_address.parse::<std::net::SocketAddr>().map_or(self.cfg.sds_base_port, |a| a.port());
                let listen = std::net::SocketAddr::new(self.cfg.address, port).to_string();
                let args = ["daemon", "sds", "--name", &sds.name, "--listen", &listen].map(String::from);
                let pid = spawn_daemon(&self.cfg.exe, dir, &role, &self.cfg.config_path, &args)?;
                tracing::info!(pid, "started SDS {} on {listen}", sds.name);
            }
        }
        if self.cfg.run_sdc && live_daemon_pid(&dir.join("sdc.pid")).is_none() {
            let socket = dir.join("sdc.sock");
            let _ = std::fs::remove_file(&socket);
            let args = [
                "daemon".to_string(),
                "sdc".into(),
                "--name".into(),
                self.cfg.name.clone(),
                "--socket".into(),
                socket.display().to_string(),
            ];
            let pid = spawn_daemon(&self.cfg.exe, dir, "sdc", &self.cfg.config_path, &args)?;
            tracing::info!(pid, "started SDC {}", self.cfg.name);
        }
        self.stop_daemons(|role| role.starts_with("sds-") && !wanted.iter().any(|w| w == role));
        if self.cfg.run_sdc {
            self.ensure_volume_service(layout)?;
        }
        Ok(())
    }

    /// The volume service, creating volumes in the pool the node consumes (its first
    /// `*-sdc-<domain>` pool, as REX-Ray served one pool); restarted when that changes.
    fn ensure_volume_service(&mut self, layout: &Layout) -> anyhow::Result<()> {
        let Some(setup) = self.cfg.volumes.clone() else { return Ok(()) };
        let pool = layout.nodes.get(&self.cfg.name).and_then(|p| p.consumes.first()).map(|c| c.pool.clone());
        let pid_file = self.cfg.dir.join("volumes.pid");
        if let Some(pid) = live_daemon_pid(&pid_file) {
            if daemon_arg(pid, "--default-pool") == pool {
                return Ok(());
            }
            tracing::info!(pid, "restarting the volume service: default pool now {pool:?}");
            stop_pid(pid);
        } else if std::os::unix::net::UnixStream::connect(&setup.plugin_socket).is_ok() {
            if !self.volumes_socket_busy {
                tracing::warn!(
                    "another volume service serves {}; not starting this node's (--plugin-socket names another)",
                    setup.plugin_socket.display()
                );
                self.volumes_socket_busy = true;
            }
            return Ok(());
        }
        let mut args = vec!["daemon".to_string(), "volumes".into()];
        if let Some(p) = &pool {
            args.extend(["--default-pool".to_string(), p.clone()]);
        }
        let _ = std::fs::remove_file(&setup.plugin_socket);
        let pid = spawn_daemon(&self.cfg.exe, &self.cfg.dir, "volumes", &setup.config_path, &args)?;
        tracing::info!(pid, "started the volume service on {}", setup.plugin_socket.display());
        Ok(())
    }

    /// Stops this node's daemons whose role (pid file stem) `which` selects.
    fn stop_daemons(&self, which: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(role) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
            if path.extension().is_none_or(|e| e != "pid") || role == "agent" || !which(&role) {
                continue;
            }
            if let Some(pid) = live_daemon_pid(&path) {
                tracing::info!(pid, "stopping {role}");
                stop_pid(pid);
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The value after `flag` on a running process's command line.
fn daemon_arg(pid: i32, flag: &str) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned())
}

/// True when the cluster already holds this report (the removal mark and the MDM id are the
/// cluster's, not the agent's, and do not count).
fn same_report(known: &Node, now: &Node) -> bool {
    let mut k = known.clone();
    k.removing = false;
    k.mdm_id = None;
    k == *now
}

/// Zeroes the first 4 KiB (the Tessera superblock) of a disk that left the cluster. Opened
/// exclusively: while an SDS still has it open, this fails and is retried next tick.
fn wipe_superblock(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .with_context(|| format!("opening {} exclusively to clear it", path.display()))?;
    f.write_all(&[0u8; 4096])?;
    f.sync_all()?;
    Ok(())
}
