//! A VM's definition as a JSON file (`vmrun --config FILE`), what
//! `fabricd` writes for each VM it runs:
//!
//! ```json
//! {"kernel": "/srv/vmlinux", "vcpus": 2, "memory_bytes": 268435456,
//!  "initramfs": "/srv/initrd", "cmdline": "console=ttyS0",
//!  "disks": ["/run/fabric/vhost/disk1.sock"],
//!  "nics": [{"socket": "/run/fabric/vhost/port-a.sock", "mac": "52:54:00:12:34:56"}]}
//! ```
//!
//! Unknown fields are refused, so a misspelt one is not silently ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vm::{NicConfig, VmConfig};

/// A VM's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub kernel: PathBuf,
    #[serde(default = "one")]
    pub vcpus: u8,
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    #[serde(default)]
    pub nics: Vec<NicDefinition>,
}

/// A NIC: its vhost-user-net socket and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDefinition {
    pub socket: PathBuf,
    pub mac: String,
}

fn one() -> u8 {
    1
}

impl Definition {
    /// Reads a definition, with an error that names the file and the
    /// problem (line and column for bad JSON).
    pub fn load(path: &Path) -> Result<Definition, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the VM definition {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("the VM definition {} is not valid: {e}", path.display()))
    }

    /// The runner's configuration (MACs parsed).
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let nics = self
            .nics
            .iter()
            .map(|nic| {
                Ok(NicConfig {
                    socket: nic.socket.clone(),
                    mac: parse_mac(&nic.mac)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(VmConfig {
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            initramfs: self.initramfs.clone(),
            disks: self.disks.clone(),
            nics,
            dirty_log: crate::vm::DirtyLogMode::Off,
        })
    }
}

/// A MAC address written like 52:54:00:12:34:56.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let wrong = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut bytes {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(wrong)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| wrong())?;
    }
    if parts.next().is_some() {
        return Err(wrong());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_or_say_what_is_wrong() {
        let text = r#"{"kernel": "/k", "memory_bytes": 16777216,
            "nics": [{"socket": "/s", "mac": "52:54:00:00:00:0a"}]}"#;
        let definition: Definition = serde_json::from_str(text).expect("valid");
        let config = definition.to_config().expect("config");
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.nics[0].mac, [0x52, 0x54, 0, 0, 0, 0x0a]);
        let misspelt = r#"{"kernel": "/k", "memory_bytes": 1, "vcpu": 2}"#;
        let error = serde_json::from_str::<Definition>(misspelt).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `vcpu`"),
            "{error}"
        );
        for bad in [
            "52:54:00:00:00",
            "52:54:00:00:00:0g",
            "52:54:00:00:00:00:01",
            "",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
