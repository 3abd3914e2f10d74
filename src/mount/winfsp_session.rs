//! The WinFsp side of `cairn mount`: WinFsp is loaded first (a clear error
//! names the fix when it is missing), then the drive is served until
//! Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use cairn::vfs::Vfs;
use cairn::winfsp::{ffi, volume};

use super::SessionOptions;

/// Loads WinFsp and checks the mount point: a free drive letter (`X:`) or a
/// directory that does not exist yet (WinFsp creates it).
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    ffi::load_winfsp().map_err(|e| anyhow!(e))?;
    let text = dir.to_string_lossy();
    let drive = text.len() == 2 && text.ends_with(':') && text.as_bytes()[0].is_ascii_alphabetic();
    if !drive && dir.exists() {
        bail!(
            "{} exists; mount on a free drive letter (cairn mount X:) or on a directory that does not exist yet",
            dir.display()
        );
    }
    Ok(dir.to_owned())
}

pub fn serve(
    runtime: &tokio::runtime::Runtime,
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    options: &SessionOptions,
) -> Result<()> {
    if options.allow_other {
        tracing::warn!(
            "--allow-other has no effect on Windows: the drive's ACL names its owner, SYSTEM and Administrators"
        );
    }
    let mode = if options.network {
        volume::Mode::Network
    } else {
        volume::Mode::Disk
    };
    let spec = volume::spec(mode, options.home.to_string_lossy().as_bytes());
    let mut params = ffi::volume_params(&spec).map_err(|e| anyhow!(e))?;
    params.volume_params.set_read_only_volume(options.read_only);
    let fs = ffi::CairnWinFs::new(vfs, &spec.label, options.home.clone()).map_err(|e| anyhow!(e))?;
    let mounted = ffi::start(fs, params, &mountpoint.to_string_lossy()).map_err(|e| anyhow!(e))?;
    eprintln!("cairn: mounted at {} (Ctrl-C to stop)", mountpoint.display());
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    tracing::info!("Ctrl-C received; unmounting");
    mounted.stop();
    Ok(())
}
