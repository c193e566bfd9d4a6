//! The crash disk daemon; see `tessera_crashdisk` for what it does.
fn main() {
    tessera_crashdisk::main_entry()
}
