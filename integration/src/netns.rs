//! Network namespaces a test makes for itself (and removes, even when it
//! fails), so that only loopback and the test's own namespaces carry
//! traffic.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

/// Runs `command`, failing with its output if it does not succeed.
fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

impl Namespace {
    /// Makes namespace `name` (one left by an earlier run is removed
    /// first), with its loopback up.
    pub fn new(name: &str) -> Result<Namespace> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let namespace = Namespace {
            name: name.to_owned(),
        };
        namespace.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves interface `interface` of this process's namespace into this
    /// one.
    pub fn take(&self, interface: &str) -> Result<()> {
        run(Command::new("ip").args(["link", "set", interface, "netns", &self.name]))?;
        Ok(())
    }

    /// `program` and its arguments, to run inside the namespace.
    pub fn command(&self, program_and_args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .args(program_and_args);
        command
    }

    /// Runs `program_and_args` inside the namespace; its output, or an
    /// error with it if it failed.
    pub fn run(&self, program_and_args: &[&str]) -> Result<Output> {
        run(&mut self.command(program_and_args))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
