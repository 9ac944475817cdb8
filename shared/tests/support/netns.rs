//! Hosts made of Linux network namespaces, for the topology tests of this crate and of the
//! gateway (which includes this file by path): the namespaces and the processes started in
//! them are removed on drop, whatever happens. Needs root and iproute2.

// Each test binary that includes this uses part of it.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

/// Namespaces and processes, removed on drop whatever happens.
#[derive(Default)]
pub(crate) struct Hosts {
    pub(crate) namespaces: Vec<String>,
    pub(crate) children: Vec<Child>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Runs `ip` with `args`; a failure fails the test.
pub(crate) fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2 is installed");
    assert!(
        status.success(),
        "ip {} failed (this test needs root)",
        args.join(" ")
    );
}

/// Whether this process may create network namespaces.
pub(crate) fn can_make_namespaces() -> bool {
    let probe = format!("pm-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let _ = Command::new("ip")
            .args(["netns", "delete", &probe])
            .status();
    }
    made
}
