//! Storage that refuses writes, on SQLite: the worker's database on a small file system the
//! test mounts (tmpfs, as root), filled to the last byte while jobs keep coming, then freed.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::refusal::storage_refuses_writes;
use super::*;

/// A tmpfs of `size_mib` mounted on a new folder; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "this test mounts a small tmpfs for the worker's database: run it as root");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the file system is full; answers it.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0x5a_u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..512]).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The disk under the worker's SQLite fills up while jobs keep coming: the worker says so once,
/// turns `/readyz` to 503, takes no jobs but answers status reads of decided ones from its read
/// connection, and when space comes back resumes, truncates its log (grown while no checkpoint
/// could run), and applies every job once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_pauses_the_worker_quietly_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let disk = SmallDisk::mount(24);
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        sqlite_dir: Some(disk.path().to_owned()),
        ..Options::default()
    })
    .await;
    let filler = std::sync::Mutex::new(None);
    let wal = disk.path().join("worker.sqlite-wal");
    let wal_full = std::sync::atomic::AtomicU64::new(0);
    let refuse = async {
        *filler.lock().unwrap() = Some(disk.fill());
    };
    let restore = async {
        wal_full.store(std::fs::metadata(&wal).map_or(0, |m| m.len()), std::sync::atomic::Ordering::Relaxed);
        std::fs::remove_file(filler.lock().unwrap().take().expect("filled")).expect("free the disk");
    };
    let seen =
        storage_refuses_writes(&sys, "full disk (SQLite on a 24 MiB tmpfs, filled)", refuse, restore).await;
    report(&format!(
        "FAULT full disk: WAL {} bytes when space came back, {} at the end",
        wal_full.load(std::sync::atomic::Ordering::Relaxed),
        std::fs::metadata(&wal).map_or(0, |m| m.len())
    ));
    seen.assert_held();
    let (_, reason) = seen.readyz_during.clone().expect("checked");
    assert_eq!(reason, "storage refuses writes: disk full");
    assert!(seen.log.contains("log copied back and truncated"), "the log was not truncated:\n{}", seen.log);
    sys.stop().await;
}
