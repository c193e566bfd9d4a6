//! Command-line grammar. Admin verbs follow `scli`'s objects: protection domains, fault
//! sets, pools, SDSs, devices, volumes, SDCs, mappings.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Pooled, mirrored block storage from the nodes' own disks")]
pub struct Cli {
    /// Client config (MDM addresses, cluster secret). Default: $TESSERA_CONFIG, then ./tessera.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Subcommand)]
pub enum Top {
    /// Start a local cluster (MDM, SDSs with file-backed devices, SDC) on loopback.
    Up(UpArgs),
    /// Stop a local cluster started by `up`.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run the main job end to end in a temporary directory.
    Demo {
        /// Keep the cluster directory afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Run one daemon in the foreground.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Run this node's agent: report attributes and disks, run the SDSs and SDC the
    /// deployment gives the node.
    Agent(AgentArgs),
    /// Nodes reported by agents.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Declarative deployment: `plan` shows what a spec would change, `apply` does it.
    #[command(subcommand)]
    Deploy(DeployCmd),
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// MDM cluster members (managers, tiebreakers, standbys).
    #[command(subcommand)]
    Mdm(MdmCmd),
    /// Protection domains.
    #[command(subcommand, name = "pd")]
    Pd(PdCmd),
    #[command(subcommand, name = "fault-set")]
    FaultSet(FaultSetCmd),
    #[command(subcommand)]
    Pool(PoolCmd),
    #[command(subcommand)]
    Sds(SdsCmd),
    #[command(subcommand)]
    Device(DeviceCmd),
    #[command(subcommand)]
    Volume(VolumeCmd),
    #[command(subcommand)]
    Sdc(SdcCmd),
    /// dvdcli-compatible volume commands against any Docker volume plugin (also run as
    /// `dvdcli` through a link named so).
    Dvdcli {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a task with the volumes its environment names (mesos-module-dvdi's
    /// `DVDI_VOLUME_NAME[1-9]`, `_DRIVER`, `_OPTS`, `_CONTAINERPATH`, `_EXPLICITCREATE`):
    /// mount all or none, run, forward signals, unmount, exit with the task's code.
    Run {
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args)]
pub struct UpArgs {
    #[arg(long)]
    pub dir: PathBuf,
    /// SDSs to start (first start only; a restart reuses the recorded layout).
    #[arg(long)]
    pub sds: Option<u32>,
    /// Size of each SDS's file-backed device.
    #[arg(long, default_value = "4GiB")]
    pub device_size: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// MDM n on base+n-1, SDS n on base+10+n.
    #[arg(long, default_value_t = 7610)]
    pub base_port: u16,
    /// MDMs to start (first start only): 1, 3 (two managers and a tiebreaker) or 5 (three
    /// managers and two tiebreakers).
    #[arg(long)]
    pub mdm: Option<u32>,
    /// Return once the cluster is ready instead of staying in the foreground.
    #[arg(long)]
    pub detach: bool,
    /// Docker volume plugin socket of the local volume service (first start only; its file
    /// name is the driver name).
    #[arg(long, default_value = tessera_volumes::config::DEFAULT_PLUGIN_SOCKET)]
    pub plugin_socket: std::path::PathBuf,
}

#[derive(Args)]
pub struct AgentArgs {
    /// State directory of this agent: its daemons' pid and log files.
    #[arg(long)]
    pub dir: PathBuf,
    /// Join with a token from `tessera cluster join-token` instead of a config file; the
    /// agent writes the config (mode 0600) into --dir for the daemons it starts. Prefer the
    /// environment variable: a flag shows in the process list.
    #[arg(long, env = "TESSERA_JOIN_TOKEN", hide_env_values = true)]
    pub join: Option<String>,
    /// Node name (letters, digits, '_', '-'). Default: the short host name, followed by the
    /// address when --address is given (so several agents can share a test machine).
    #[arg(long)]
    pub name: Option<String>,
    /// Address this node's daemons listen on. Default: the one it reaches the MDM from.
    #[arg(long)]
    pub address: Option<std::net::IpAddr>,
    /// Attribute directories (one file per attribute) or Mesos attribute files; repeatable.
    /// Default: /etc/mesos-slave/attributes and /etc/tessera/attributes.
    #[arg(long = "attributes-dir")]
    pub attributes_dirs: Vec<PathBuf>,
    /// `name=value`; repeatable; overrides the files.
    #[arg(long = "attribute")]
    pub attributes: Vec<String>,
    /// Only these devices: comma-separated paths or globs (`/dev/loop3,/dev/sd?`).
    /// Default: every block device of the node.
    #[arg(long)]
    pub disk_candidates: Option<String>,
    /// Smaller disks are never taken.
    #[arg(long, default_value = "1GiB")]
    pub min_disk_size: String,
    /// Protection domain and pool of the single global pool.
    #[arg(long, default_value = "default")]
    pub global_domain: String,
    #[arg(long, default_value = "default")]
    pub global_pool: String,
    /// Never put unused disks into the global pool.
    #[arg(long)]
    pub no_global_pool: bool,
    /// First SDS data port (one per protection domain the node serves).
    #[arg(long, default_value_t = 7720)]
    pub sds_base_port: u16,
    /// Port of this node's MDM, when the MDM placement puts one here.
    #[arg(long, default_value_t = 7730)]
    pub mdm_port: u16,
    /// Do not run the volume service (Docker volume plugin, dvdcli) on this node.
    #[arg(long)]
    pub no_volumes: bool,
    /// The volume service's Docker plugin socket (its file name is the driver name).
    #[arg(long, default_value = tessera_volumes::config::DEFAULT_PLUGIN_SOCKET)]
    pub plugin_socket: PathBuf,
    /// Where the volume service mounts volumes and keeps its records (`DIR/volumes`,
    /// `DIR/state`). Default: /var/lib/tessera/volumes and /var/lib/tessera/volume-service.
    #[arg(long)]
    pub volumes_dir: Option<PathBuf>,
    /// Do not run an SDC on this node (nor, then, the volume service).
    #[arg(long)]
    pub no_sdc: bool,
    /// Re-read attributes and check the plan this often.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Probe disks again this often (probing an unused disk reads it).
    #[arg(long, default_value_t = 10_000)]
    pub disk_rescan_ms: u64,
    /// Return once the node is reported instead of staying in the foreground.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Every node: address, method, SDSs, devices, problems.
    #[command(alias = "ls")]
    List,
    /// One node: attributes, disks and what each is used for, its plan.
    Show { name: String },
    /// Drain the node's SDSs, remove them, and forget the node.
    Remove {
        name: String,
        /// Return at once instead of waiting until the node is gone.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
pub enum DeployCmd {
    /// Print the difference between the cluster and the layout the spec (or, without one,
    /// the current attributes and spec) asks for.
    Plan { spec: Option<PathBuf> },
    /// Set the spec and wait until the cluster matches it.
    Apply {
        spec: PathBuf,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Drop the declarative spec (nodes go back to their attributes or the global pool) and
    /// wait until the cluster matches.
    Clear {
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Print the spec in effect.
    Show,
}

#[derive(Subcommand)]
pub enum DaemonCmd {
    Mdm {
        #[arg(long)]
        dir: PathBuf,
        /// Unique among the cluster's MDMs, for the life of the cluster.
        #[arg(long, default_value_t = 1)]
        id: u64,
        #[arg(long)]
        listen: SocketAddr,
        /// `manager` (may become primary) or `tiebreaker` (votes only).
        #[arg(long, default_value = "manager")]
        role: String,
        /// Wait to be added to an existing cluster (`tessera mdm add`) instead of creating one.
        #[arg(long)]
        standby: bool,
    },
    Sds {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Back-fill bandwidth per source device, MiB/s.
        #[arg(long, env = "TESSERA_REBUILD_MIB_PER_SEC", default_value_t = 256)]
        rebuild_mib_per_sec: u64,
    },
    /// The volume service of this node: the Docker volume plugin (settings: `[volumes]`).
    Volumes {
        /// Pool for volumes created without `volumetype`, overriding `[volumes.create]`
        /// (the agent passes the pool its node consumes).
        #[arg(long)]
        default_pool: Option<String>,
    },
    Sdc {
        #[arg(long)]
        name: String,
        /// Unix socket for NBD exports.
        #[arg(long)]
        socket: PathBuf,
        /// Also export over TCP (NBD has no authentication: only on trusted networks).
        #[arg(long)]
        nbd_tcp: Option<SocketAddr>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// MDM members, SDS states, PG health, rebuild progress.
    Status {
        /// Redraw every second until no PG is re-mirroring.
        #[arg(long)]
        watch: bool,
    },
    /// Print a join token: `tessera agent --join TOKEN` needs nothing else (it holds the
    /// cluster secret).
    JoinToken,
    /// Switch the MDM cluster mode (`scli --switch_cluster_mode`). Members not named are
    /// chosen among the current voters and standbys of each role; members that leave the
    /// mode stay as standbys.
    SwitchMode {
        /// 1_node, 3_node or 5_node.
        mode: String,
        /// Manager ids, comma separated (3_node: 2, 5_node: 3).
        #[arg(long, value_delimiter = ',')]
        managers: Option<Vec<u64>>,
        /// Tiebreaker ids, comma separated (3_node: 1, 5_node: 2).
        #[arg(long, value_delimiter = ',')]
        tiebreakers: Option<Vec<u64>>,
    },
}

#[derive(Subcommand)]
pub enum MdmCmd {
    /// Members with role, status and reachability (`scli --query_cluster`).
    #[command(alias = "ls")]
    List,
    /// Add a running standby MDM (`tessera daemon mdm --standby`) to the cluster. Its id and
    /// role are its own; it catches up with the log before this returns.
    Add {
        /// host:port of the standby MDM.
        #[arg(long)]
        address: String,
        /// Refuse unless the MDM at that address has this id.
        #[arg(long)]
        id: Option<u64>,
    },
    /// Remove a standby member (voters leave by switching mode first).
    #[command(alias = "rm")]
    Remove {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
pub enum PdCmd {
    Create {
        name: String,
    },
    #[command(alias = "ls")]
    List,
    Show {
        name: String,
    },
    #[command(alias = "rm")]
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum FaultSetCmd {
    Create {
        #[arg(long)]
        pd: String,
        name: String,
    },
    #[command(alias = "ls")]
    List,
    #[command(alias = "rm")]
    Remove {
        #[arg(long)]
        pd: String,
        name: String,
    },
}

#[derive(Subcommand)]
pub enum PoolCmd {
    Create {
        name: String,
        #[arg(long)]
        pd: String,
        #[arg(long, default_value = "1MiB")]
        extent_size: String,
        #[arg(long, default_value_t = tessera_core::DEFAULT_PG_COUNT)]
        pg_count: u32,
        #[arg(long, default_value_t = tessera_core::DEFAULT_SPARE_PERCENT)]
        spare_percent: u8,
    },
    #[command(alias = "ls")]
    List,
    Show {
        name: String,
    },
    /// PG health, capacity and rebuild progress of one pool.
    Status {
        name: String,
    },
    #[command(alias = "rm")]
    Remove {
        name: String,
    },
    SetSpare {
        name: String,
        #[arg(long)]
        spare_percent: u8,
    },
}

#[derive(Subcommand)]
pub enum SdsCmd {
    Add {
        name: String,
        #[arg(long)]
        pd: String,
        /// host:port of its data service.
        #[arg(long)]
        address: String,
        #[arg(long)]
        fault_set: Option<String>,
    },
    #[command(alias = "ls")]
    List,
    Show {
        name: String,
    },
    /// Move every copy off the SDS (before removing it).
    Drain {
        name: String,
    },
    #[command(alias = "rm")]
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    Add {
        #[arg(long)]
        sds: String,
        #[arg(long)]
        pool: String,
        #[arg(long)]
        path: String,
    },
    #[command(alias = "ls")]
    List,
    /// Move every copy off the device (before removing it).
    Drain {
        #[arg(long)]
        sds: String,
        #[arg(long)]
        path: String,
    },
    #[command(alias = "rm")]
    Remove {
        #[arg(long)]
        sds: String,
        #[arg(long)]
        path: String,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    #[command(visible_alias = "c", alias = "n", alias = "new")]
    Create {
        name: String,
        #[arg(long)]
        size: String,
        /// Default: the only pool, if there is exactly one.
        #[arg(long)]
        pool: Option<String>,
        /// Reserve the full size now (default: thin).
        #[arg(long)]
        thick: bool,
        #[arg(long)]
        allow_multi_map: bool,
    },
    #[command(alias = "ls", alias = "l")]
    List,
    #[command(alias = "inspect")]
    Show { name: String },
    #[command(alias = "rm", alias = "r", alias = "delete", alias = "del")]
    Remove { name: String },
    /// Attach (map to this node and give it a block device), format if blank, and mount at
    /// `<mount path>/NAME`; prints the path handed to tasks (REX-Ray `volume mount`).
    #[command(alias = "m")]
    Mount {
        name: String,
        /// Creation options if the volume must be created: size, iops, bandwidth,
        /// volumetype, newfstype, overwritefs, thick (`-o size=5 -o newfstype=xfs`).
        #[arg(short = 'o', long = "opt")]
        opts: Vec<String>,
        /// Fail if the volume does not exist instead of creating it.
        #[arg(long)]
        explicit_create: bool,
        /// Caller id the reference is counted under.
        #[arg(long, default_value = "cli")]
        id: String,
    },
    /// Drop a reference; at the last one unmount, detach and unmap.
    #[command(alias = "u", alias = "umount")]
    Unmount {
        name: String,
        #[arg(long, default_value = "cli")]
        id: String,
        /// Unmount whatever the count (REX-Ray ignoreUsedCount).
        #[arg(long)]
        force: bool,
    },
    /// The path of a volume mounted on this node (nothing if it is not).
    Path { name: String },
    /// Map to this node and give the host a block device; prints its path.
    #[command(alias = "a")]
    Attach {
        name: String,
        /// Take the volume from another node (that node can no longer write to it).
        #[arg(long)]
        preempt: bool,
    },
    /// Undo `attach` (the volume must not be mounted).
    #[command(alias = "d")]
    Detach { name: String },
    /// Reference counts of the volumes mounted on this node.
    Refs,
    /// Grow a volume (it never shrinks).
    Grow {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Map to an SDC; prints the NBD URI.
    Map {
        name: String,
        #[arg(long)]
        sdc: Option<String>,
        #[arg(long)]
        allow_multi_map: bool,
        /// Take the volume from whatever SDC holds it (REX-Ray's preempt): that SDC can no
        /// longer write to it.
        #[arg(long, conflicts_with = "allow_multi_map")]
        preempt: bool,
    },
    Unmap {
        name: String,
        #[arg(long)]
        sdc: Option<String>,
    },
    /// Compare both copies of every allocated extent (exit 1 on any difference).
    Verify { name: String },
    /// Limit the IO each SDC sends to the volume (ScaleIO's per-SDC volume limits). A limit
    /// not given is kept; 0 clears it. Applies within moments on every SDC.
    SetQos {
        name: String,
        /// Requests per second (at least 10; 0 for no limit).
        #[arg(long, value_name = "N")]
        iops: Option<String>,
        /// Bytes per second, e.g. 10MiB or 10MiB/s (at least 1MiB; 0 for no limit).
        #[arg(long, value_name = "SIZE/s")]
        bandwidth: Option<String>,
        /// Clear both limits.
        #[arg(long, conflicts_with_all = ["iops", "bandwidth"])]
        unlimited: bool,
    },
}

#[derive(Subcommand)]
pub enum SdcCmd {
    #[command(alias = "ls")]
    List,
    #[command(alias = "rm")]
    Remove { name: String },
}
