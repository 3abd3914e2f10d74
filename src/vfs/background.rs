//! Background duties run by the daemon besides uploads: namespace
//! publication and repair of degraded versions.

use super::*;

impl Vfs {
    /// Publishes the namespace to the grid if it changed since the last
    /// publication and snapshots are still published
    /// (`namespace::snapshots_due`); returns its sequence number if it did.
    pub async fn publish_namespace(self: &Arc<Self>) -> VfsResult<Option<u64>> {
        let _one = self.publishing.lock().await;
        let grid_err = |e: crate::namespace::NamespaceError| VfsError::Grid(e.into());
        // Under the lock only the last batch's commit and a few reads; the
        // whole catalog is read through a second connection, on a blocking
        // thread, while the drive goes on.
        let last = self
            .blocking(move |vfs| {
                let st = vfs.lock();
                st.catalog.commit()?;
                match crate::namespace::snapshots_due(&st.catalog).map_err(grid_err)? {
                    true => crate::namespace::last_published(&st.catalog)
                        .map(Some)
                        .map_err(grid_err),
                    false => Ok(None),
                }
            })
            .await?;
        let Some(last) = last else {
            return Ok(None);
        };
        let prepared = self
            .blocking(move |vfs| {
                vfs.read_catalog(|reader| crate::namespace::prepare_from(last, reader).map_err(grid_err))
            })
            .await?;
        let Some(pending) = prepared else {
            self.blocking(move |vfs| crate::namespace::up_to_date(&vfs.lock().catalog).map_err(grid_err))
                .await?;
            return Ok(None);
        };
        let published = crate::namespace::upload(&self.grid, self.params, self.happy, pending)
            .await
            .map_err(grid_err)?;
        let published = self
            .blocking(move |vfs| {
                crate::namespace::record(&vfs.lock().catalog, &published).map_err(grid_err)?;
                Ok(published)
            })
            .await?;
        tracing::info!(
            seq = published.namespace.seq,
            bytes = published.bytes,
            "published the namespace"
        );
        Ok(Some(published.namespace.seq))
    }

    /// Repairs committed versions that were uploaded without every server,
    /// once those servers answer again. Returns how many became healthy.
    pub async fn repair_degraded(self: &Arc<Self>) -> VfsResult<usize> {
        // A scan of every version: read beside the core, not under `state`.
        let degraded = self
            .blocking(|vfs| vfs.read_catalog(|reader| Ok(reader.degraded_versions()?)))
            .await?;
        let mut healed = 0;
        // Files in one pack share its shares: repair it once.
        let mut repaired: HashMap<StorageIndex, bool> = HashMap::new();
        for v in degraded {
            let Some(cap) = v.cap.as_deref().and_then(|c| c.parse::<FileCap>().ok()) else {
                continue;
            };
            let stored = cap.stored().clone();
            if let Some(&healthy) = repaired.get(&stored.storage_index()) {
                if healthy {
                    self.healed(v.ino, v.num).await?;
                    healed += 1;
                }
                continue;
            }
            let result = crate::repair::repair(self.grid.clone(), stored.clone()).await;
            repaired.insert(stored.storage_index(), matches!(&result, Ok(r) if r.healthy));
            match result {
                Ok(report) if report.healthy => {
                    self.healed(v.ino, v.num).await?;
                    tracing::info!(ino = v.ino, num = v.num, placed = ?report.placed, "repaired");
                    healed += 1;
                }
                Ok(report) => tracing::debug!(ino = v.ino, num = v.num, failures = ?report.failures, "repair: not yet"),
                Err(e) => tracing::warn!(ino = v.ino, num = v.num, error = %e, "repair failed"),
            }
        }
        Ok(healed)
    }

    async fn healed(self: &Arc<Self>, ino: Ino, num: i64) -> VfsResult<()> {
        self.blocking(move |vfs| Ok(vfs.lock().catalog.set_degraded(ino, num, false)?))
            .await
    }
}
