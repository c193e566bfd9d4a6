//! The volume service's faces in the binary: `tessera volume mount|unmount|path|attach|
//! detach|refs`, the `volumes` daemon (Docker volume plugin), and `dvdcli`.

use std::sync::Arc;

use anyhow::{anyhow, bail};
use tessera_proto::control::ControlClient;
use tessera_volumes::api::{Opts, VolumeApi};
use tessera_volumes::config::VolumeServiceConfig;
use tessera_volumes::service::{CreateOptions, VolumeService};

use crate::cli::VolumeCmd;
use crate::config::ClientConfig;

/// The service of this node, as the config describes it.
pub fn service(cfg: &ClientConfig) -> anyhow::Result<VolumeService> {
    let vcfg = cfg.volumes.clone().unwrap_or_default();
    let sdc = vcfg
        .sdc
        .clone()
        .or_else(|| cfg.sdc.clone())
        .ok_or_else(|| anyhow!("no SDC for this node: set `sdc` (or `[volumes] sdc`) in the config"))?;
    let secret = cfg.secret()?;
    let control = ControlClient::new(cfg.mdm.clone(), secret.clone());
    VolumeService::new(control, secret, sdc, vcfg).map_err(|e| anyhow!("volume service config: {e}"))
}

/// `k=v` pairs; the value may itself contain `=`.
pub fn parse_opts(pairs: &[String]) -> anyhow::Result<Opts> {
    let mut opts = Opts::new();
    for pair in pairs.iter().flat_map(|p| p.split(',')).filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| anyhow!("option {pair:?} is not key=value"))?;
        opts.insert(k.trim().to_string(), v.to_string());
    }
    Ok(opts)
}

/// Handles the volume verbs that act on this node; `None` for the others (admin verbs).
pub async fn node_verb(cfg: &ClientConfig, cmd: &VolumeCmd, json: bool) -> Option<anyhow::Result<()>> {
    let run = async {
        let svc = service(cfg)?;
        match cmd {
            VolumeCmd::Mount { name, opts, explicit_create, id } => {
                let opts = CreateOptions::parse(&parse_opts(opts)?)?;
                let path = svc.mount_with(name, id, &opts, *explicit_create).await?;
                println!("{path}");
            }
            VolumeCmd::Unmount { name, id, force } => svc.unmount_with(name, id, *force).await?,
            VolumeCmd::Path { name } => {
                if let Some(path) = svc.path(name).await? {
                    println!("{path}");
                }
            }
            VolumeCmd::Attach { name, preempt } => println!("{}", svc.attach_only(name, *preempt).await?.display()),
            VolumeCmd::Detach { name } => svc.detach_only(name).await?,
            VolumeCmd::Refs => {
                let refs = svc.references()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&refs)?);
                } else {
                    for (volume, callers) in refs {
                        println!("{volume}: {}", callers.join(", "));
                    }
                }
            }
            _ => unreachable!("only node verbs are routed here"),
        }
        Ok(())
    };
    match cmd {
        VolumeCmd::Mount { .. }
        | VolumeCmd::Unmount { .. }
        | VolumeCmd::Path { .. }
        | VolumeCmd::Attach { .. }
        | VolumeCmd::Detach { .. }
        | VolumeCmd::Refs => Some(run.await),
        _ => None,
    }
}

/// The Docker volume plugin of this node, until the process is stopped.
pub async fn run_daemon(cfg: &ClientConfig) -> anyhow::Result<()> {
    let svc = Arc::new(service(cfg)?);
    let socket = svc.config().plugin_socket.clone();
    tracing::info!(socket = %socket.display(), "volume service: Docker volume plugin listening");
    tessera_volumes::plugin::serve(&socket, svc).await.map_err(|e| anyhow!("{e}"))
}

/// `dvdcli ARGS`: prints what dvdcli prints, exits as it does.
pub async fn dvdcli(args: &[String]) -> anyhow::Result<()> {
    let out = tessera_volumes::dvdcli::run(args).await;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    if out.exit_code != 0 {
        std::process::exit(out.exit_code);
    }
    Ok(())
}

/// `tessera run -- CMD`: exits with the task's exit code (or the launcher's, if the task
/// never ran).
pub async fn run_task(command: &[String]) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = tessera_volumes::dvdcli::Config::from_env();
    let code = match tessera_volumes::launcher::run(&env, command, &config).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code)
}

/// The `[volumes]` table `up` writes for a local cluster: everything under its directory
/// except the plugin socket.
pub fn local_config(dir: &std::path::Path, plugin_socket: &std::path::Path) -> VolumeServiceConfig {
    VolumeServiceConfig {
        mount_path: dir.join("volumes"),
        state_dir: dir.join("volume-service"),
        plugin_socket: plugin_socket.to_path_buf(),
        ..VolumeServiceConfig::default()
    }
}

pub fn check_local_socket(path: &std::path::Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "a volume plugin already listens on {} (another cluster?); choose another with --plugin-socket",
            path.display()
        );
    }
    Ok(())
}
