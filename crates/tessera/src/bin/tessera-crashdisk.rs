//! The crash disk daemon, built with the `tessera` package so that its
//! integration tests find it as `env!("CARGO_BIN_EXE_tessera-crashdisk")`.
fn main() {
    tessera_crashdisk::main_entry()
}
