//! Serves one in-memory export on a unix socket, for `bench.sh` and manual
//! poking with NBD clients. Usage: `mem_server <socket> <size_mib> [multi_conn]`.
//! Uses the test fixtures' RAM disk (a single mutex), so it measures the
//! protocol path, not a storage engine. Reads at the fixture's `PANIC_OFFSET`
//! (an unaligned offset no benchmark touches) panic on purpose.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{MemBackend, MemRegistry};
use tessera_nbd::ServerConfig;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(size_mib)) = (args.next(), args.next()) else {
        eprintln!("usage: mem_server <socket> <size_mib> [multi_conn]");
        std::process::exit(2);
    };
    let Ok(size_mib) = size_mib.parse::<usize>() else {
        eprintln!("size_mib must be an integer");
        std::process::exit(2);
    };
    let multi_conn = args.next().is_some_and(|a| a == "multi_conn");
    let registry = MemRegistry::new().with("disk", MemBackend::new(size_mib << 20)).with_default("disk");
    let _ = std::fs::remove_file(&socket);
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {socket}: {e}");
            std::process::exit(1);
        }
    };
    let cfg = ServerConfig { multi_conn, ..ServerConfig::default() };
    let _never = tessera_nbd::serve_unix(listener, Arc::new(registry), cfg).await;
}
