//! One drive on several machines (issue 20, docs/SEVERAL_MACHINES.md).
//!
//! The merge rules ([`merge`]), a pure function from every machine's logged
//! operations to one tree, checked by the reference model in
//! tests/sync_merge.rs; each machine's identity ([`device`]) and what it
//! writes on the servers ([`log`]: records, heads, the doorbell); the pure
//! rule of what to log ([`publish`]); the catalog's sync tables
//! ([`store`]); reading other devices' logs ([`remote`]); and applying the
//! merged tree to the catalog ([`apply`]). The room that runs them in a
//! mount is `vfs::sync`.

pub mod apply;
pub mod checkpoint;
pub mod device;
pub mod log;
pub mod merge;
pub mod publish;
pub mod remote;
pub mod store;
