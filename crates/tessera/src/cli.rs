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
    #[command(alias = "ls")]
    List,
    #[command(alias = "inspect")]
    Show { name: String },
    #[command(alias = "rm")]
    Remove { name: String },
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
}

#[derive(Subcommand)]
pub enum SdcCmd {
    #[command(alias = "ls")]
    List,
    #[command(alias = "rm")]
    Remove { name: String },
}
