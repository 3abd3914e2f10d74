//! The volume WinFsp is given, as data: checked by tests on every
//! platform, applied field by field by the Windows layer.

/// How the drive appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A local disk (`X:`): what Explorer, Word and robocopy treat best.
    Disk,
    /// A network drive (`\\cairn\vol`): Explorer shows it under Network
    /// locations and some programs cache less.
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub sector_size: u16,
    pub sectors_per_allocation_unit: u16,
    pub max_component_length: u16,
    pub volume_serial_number: u32,
    pub file_info_timeout_ms: u32,
    pub irp_timeout_ms: u32,
    pub case_sensitive_search: bool,
    pub case_preserved_names: bool,
    pub unicode_on_disk: bool,
    pub persistent_acls: bool,
    /// Every Cleanup reaches the adapter, written or not: it counts handles.
    pub post_cleanup_when_modified_only: bool,
    /// Cached writes are flushed before the last Cleanup, so what is sealed
    /// there is everything written.
    pub flush_and_purge_on_cleanup: bool,
    pub named_streams: bool,
    pub extended_attributes: bool,
    pub reparse_points: bool,
    pub hard_links: bool,
    /// Empty in disk mode; `\cairn\vol` in network mode.
    pub prefix: String,
    pub file_system_name: String,
    pub label: String,
}

/// The volume for a mount. `identity` is stable per drive (its root
/// capability's id), so the serial number Windows and backup tools key on
/// does not change between mounts.
pub fn spec(mode: Mode, identity: &[u8]) -> VolumeSpec {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(identity);
    VolumeSpec {
        sector_size: 4096,
        sectors_per_allocation_unit: 1,
        max_component_length: super::names::MAX_COMPONENT_UTF16 as u16,
        volume_serial_number: u32::from_le_bytes(digest[..4].try_into().expect("4 bytes")),
        // Attributes and names may be cached for a second (as FUSE's TTL);
        // data caching needs INFINITE plus change notifications: not yet.
        file_info_timeout_ms: 1000,
        // Reads of data not yet local must finish within this; the grid's
        // own time-outs are shorter.
        irp_timeout_ms: 300_000,
        case_sensitive_search: false,
        case_preserved_names: true,
        unicode_on_disk: true,
        persistent_acls: true,
        post_cleanup_when_modified_only: false,
        flush_and_purge_on_cleanup: true,
        named_streams: false,
        extended_attributes: false,
        reparse_points: false,
        hard_links: false,
        prefix: match mode {
            Mode::Disk => String::new(),
            Mode::Network => r"\cairn\vol".into(),
        },
        file_system_name: "cairn".into(),
        label: "cairn".into(),
    }
}

/// Total and free bytes Windows is told (Explorer checks free space before
/// a copy): the grid's capacity in file bytes, and at most what the local
/// staging disk can still take, since every write is staged there first.
pub fn sizes(grid_total: u64, grid_free: u64, staging_free: u64) -> (u64, u64) {
    let free = grid_free.min(staging_free).min(grid_total);
    (grid_total.max(free), free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_mode_defaults() {
        let v = spec(Mode::Disk, b"root");
        assert!(v.prefix.is_empty());
        assert!(!v.case_sensitive_search && v.case_preserved_names && v.unicode_on_disk);
        assert!(
            !v.post_cleanup_when_modified_only,
            "every Cleanup must reach the handle count"
        );
        assert!(v.flush_and_purge_on_cleanup, "cached writes land before the seal");
        assert_eq!(v.file_info_timeout_ms, 1000);
        assert_eq!(v.max_component_length, 255);
        assert!(!v.named_streams && !v.reparse_points && !v.extended_attributes && !v.hard_links);
    }

    #[test]
    fn network_mode_has_a_prefix_and_serial_is_stable() {
        let v = spec(Mode::Network, b"root");
        assert_eq!(v.prefix, r"\cairn\vol");
        assert_eq!(v.volume_serial_number, spec(Mode::Disk, b"root").volume_serial_number);
        assert_ne!(v.volume_serial_number, spec(Mode::Disk, b"other").volume_serial_number);
    }

    #[test]
    fn free_space_is_bounded_by_staging() {
        assert_eq!(sizes(1000, 600, 100), (1000, 100));
        assert_eq!(sizes(1000, 50, 100), (1000, 50));
        assert_eq!(sizes(0, 0, 100), (0, 0));
    }
}
