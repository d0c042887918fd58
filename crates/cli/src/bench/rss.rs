//! Resident memory of the gatekeeper and worker processes on this machine (Linux `/proc`).

/// The pid of the first process named `name`.
pub fn pid_of(name: &str) -> Option<u32> {
    pids_of(name).into_iter().next()
}

/// The pids of every process named `name`.
pub fn pids_of(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(pid)
        })
        .collect()
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`; whether it was delivered.
pub fn signal(pid: u32, signal: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// `(current, peak)` resident set of the first process named `name`, in MiB.
pub fn of(name: &str) -> Option<(f64, f64)> {
    let pid = pid_of(name)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}
