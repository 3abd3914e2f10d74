//! One drive on several machines (issue 20, docs/SEVERAL_MACHINES.md).
//!
//! Landed so far: the merge rules ([`merge`]), a pure function from every
//! machine's logged operations to one tree, checked by the reference model
//! in tests/sync_merge.rs; each machine's identity ([`device`]) and what it
//! writes on the servers ([`log`]: records, heads, the doorbell). Publishing
//! and pulling come next; nothing in the mount calls this yet.

pub mod apply;
pub mod device;
pub mod log;
pub mod merge;
pub mod publish;
pub mod remote;
pub mod store;
