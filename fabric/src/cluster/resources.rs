//! What this node offers the pool: CPU cores, memory, disk capacity and
//! free space of its data directory, network interfaces.
//!
//! Reading happens at the edge ([`local_resources`]); the parsers are pure
//! and tested on their own.

use std::path::Path;

use super::metadata::Resources;

/// Parses `MemTotal` from `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Network interfaces worth reporting: everything but loopback, sorted.
pub fn interesting_interfaces(mut names: Vec<String>) -> Vec<String> {
    names.retain(|name| name != "lo");
    names.sort();
    names
}

/// Capacity and free space of the filesystem holding `path`, in bytes.
pub fn filesystem_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stat points to
    // writable memory of the right size; statvfs writes nothing else.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let stat = unsafe { stat.assume_init() };
    let fragment = stat.f_frsize;
    Ok((stat.f_blocks * fragment, stat.f_bavail * fragment))
}

/// Reads this node's resources. Parts that cannot be read are reported
/// as zero (or empty) and logged, rather than failing the report.
pub fn local_resources(data_dir: &Path) -> Resources {
    let cpu_cores = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
        .unwrap_or_else(|| {
            tracing::warn!("cannot read total memory from /proc/meminfo");
            0
        });
    let (disk_bytes, disk_free_bytes) = filesystem_space(data_dir).unwrap_or_else(|error| {
        tracing::warn!(path = %data_dir.display(), %error, "cannot read the data directory's filesystem space");
        (0, 0)
    });
    let names = std::fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    Resources {
        cpu_cores,
        memory_bytes,
        disk_bytes,
        disk_free_bytes,
        interfaces: interesting_interfaces(names),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 5 MB\n"), None);
    }

    #[test]
    fn interfaces_skip_loopback() {
        let names = vec!["lo".to_string(), "eth1".into(), "eth0".into()];
        assert_eq!(
            interesting_interfaces(names),
            vec!["eth0".to_string(), "eth1".to_string()]
        );
    }

    #[test]
    fn this_machine_reports_something() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resources = local_resources(dir.path());
        assert!(resources.cpu_cores >= 1);
        assert!(resources.memory_bytes > 0);
        assert!(resources.disk_bytes >= resources.disk_free_bytes && resources.disk_bytes > 0);
    }
}
