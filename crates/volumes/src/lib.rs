//! The volume service: what container users see. It turns a volume name into a mounted
//! filesystem on this node (attach, probe, format only a volume that was never written, mount,
//! reference-count) and serves that through the faces REX-Ray, dvdcli and mesos-module-dvdi
//! had: the Docker volume plugin protocol, a dvdcli-compatible command and a `DVDI_VOLUME_*`
//! launcher.

pub mod api;
pub mod attach;
pub mod config;
pub mod dvdcli;
pub mod exec;
pub mod fs;
pub mod http;
pub mod launcher;
pub mod plugin;
pub mod refs;
pub mod service;
