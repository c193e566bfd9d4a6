//! Tessera's wire formats. Every TCP connection — control or data — starts with a mutual
//! challenge–response on the cluster secret ([`auth`]), then carries length-prefixed,
//! versioned frames ([`frame`]) tagged with request ids so many requests are in flight at
//! once ([`rpc`]). Data requests are fixed binary headers ([`data`]); control requests are
//! JSON ([`control`]): they are rare, small, and easier to evolve and debug as text.

pub mod auth;
pub mod control;
pub mod data;
pub mod frame;
pub mod join;
pub mod rpc;

pub use auth::ClusterSecret;
