//! The data volume's free space, measured every second (and reported as
//! `orderflow_data_free_bytes`), against the floor `--min-free-space` sets.
//!
//! Below the floor the receiver turns new orders away with `RESOURCE_EXHAUSTED` before the volume
//! is actually full, so that the stages after it — which must still commit everything already
//! accepted — keep room to drain. The other stages only report it.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How often the free space is measured.
const INTERVAL: Duration = Duration::from_secs(1);

/// `--min-free-space`: an amount (`64MiB`, `2GB`, `0`) or a share of the volume (`1%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFreeSpace {
    Bytes(u64),
    Percent(f64),
}

/// The floor unless `--min-free-space` says otherwise.
pub const DEFAULT_MIN_FREE_SPACE: &str = "64MiB";

impl MinFreeSpace {
    /// The floor in bytes on a volume of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFreeSpace::Bytes(bytes) => bytes,
            MinFreeSpace::Percent(percent) => (total as f64 * percent / 100.0) as u64,
        }
    }
}

impl FromStr for MinFreeSpace {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(percent) = s.strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MinFreeSpace::Percent(p)),
                _ => Err("expected a share from 0% to 100%".into()),
            };
        }
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(digits);
        let number: u64 = number
            .parse()
            .map_err(|_| "expected an amount such as 64MiB or 1GB, or a share such as 1%")?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown unit {other:?}: use B, KB, MB, GB, KiB, MiB, GiB or %"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(MinFreeSpace::Bytes)
            .ok_or_else(|| "too large".into())
    }
}

/// Bytes available to this process on the volume of `dir`, if it can be measured.
pub fn available_bytes(dir: &Path) -> Option<u64> {
    volume(dir).map(|(free, _)| free)
}

/// `(bytes available to this process, bytes in all)` of the volume of `dir`.
fn volume(dir: &Path) -> Option<(u64, u64)> {
    let stats = nix::sys::statvfs::statvfs(dir).ok()?;
    let unit = stats.fragment_size();
    Some((
        stats.blocks_available().saturating_mul(unit),
        stats.blocks().saturating_mul(unit),
    ))
}

/// The free space of one stage's data volume, as last measured.
#[derive(Debug)]
pub struct FreeSpace {
    dir: PathBuf,
    floor: MinFreeSpace,
    free: AtomicU64,
    low: AtomicBool,
}

impl FreeSpace {
    /// Measures `dir`'s volume once now.
    pub fn new(dir: &Path, floor: MinFreeSpace) -> Arc<Self> {
        let space = Arc::new(FreeSpace {
            dir: dir.to_owned(),
            floor,
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
        });
        space.measure();
        space
    }

    /// Whether the volume had less free space than the floor when last measured.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Bytes free when last measured.
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// The floor, as configured.
    pub fn floor(&self) -> MinFreeSpace {
        self.floor
    }

    /// Measures now; a volume that cannot be measured is never called low.
    fn measure(&self) -> Option<(u64, u64)> {
        let (free, total) = volume(&self.dir)?;
        let was_low = self.is_low();
        let low = free < self.floor.bytes(total);
        self.free.store(free, Ordering::Relaxed);
        self.low.store(low, Ordering::Relaxed);
        if low != was_low {
            if low {
                tracing::warn!(free_bytes = free, floor = ?self.floor, "free space on the data volume is below --min-free-space");
            } else {
                tracing::info!(
                    free_bytes = free,
                    "free space on the data volume is above --min-free-space again"
                );
            }
        }
        Some((free, total))
    }

    /// Measures every second until `shutdown`, reporting the free bytes as a metric.
    pub async fn monitor(self: Arc<Self>, stage: &'static str, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let space = self.clone();
            if let Ok(Some((free, _))) = tokio::task::spawn_blocking(move || space.measure()).await
            {
                metrics::gauge!(crate::metrics::DATA_FREE_BYTES, "stage" => stage).set(free as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn floors_parse_as_amounts_or_shares() {
        let cases = [
            ("64MiB", MinFreeSpace::Bytes(64 << 20)),
            ("2GB", MinFreeSpace::Bytes(2_000_000_000)),
            ("0", MinFreeSpace::Bytes(0)),
            ("512 KiB", MinFreeSpace::Bytes(512 << 10)),
            ("1%", MinFreeSpace::Percent(1.0)),
            ("2.5%", MinFreeSpace::Percent(2.5)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<MinFreeSpace>().unwrap(), want, "{text}");
        }
        for bad in ["", "lots", "5 parsecs", "101%", "-1%", "99999999999999TiB"] {
            assert!(bad.parse::<MinFreeSpace>().is_err(), "{bad:?}");
        }
        assert_eq!(MinFreeSpace::Percent(1.0).bytes(1000), 10);
    }

    #[test]
    fn a_floor_above_the_volume_is_low() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!FreeSpace::new(dir.path(), MinFreeSpace::Bytes(0)).is_low());
        assert!(FreeSpace::new(dir.path(), MinFreeSpace::Percent(100.0)).is_low());
        assert!(FreeSpace::new(dir.path(), MinFreeSpace::Bytes(0)).free_bytes() > 0);
    }
}
