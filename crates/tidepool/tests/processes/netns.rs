//! Several hosts on one machine: each host is a network namespace with one address on a shared
//! /24, joined by a bridge that lives in a namespace of its own; the test process reaches them
//! through one more veth from its own namespace. Everything is made with `ip` (iproute2) and
//! removed on drop, processes inside first. Needs root (`CAP_NET_ADMIN`); without it the test
//! fails with the command that was refused, it is never skipped.

use std::process::Command;

/// Runs `ip args…` and fails loudly if it does not succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` (Debian's iproute2 package): {e}");
    });
    assert!(
        out.status.success(),
        "`ip {}` failed (the multi-host test needs root to make network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network of hosts. Addresses are `10.231.<subnet>.<n>`: `.1` is the test process.
pub(crate) struct Net {
    /// Prefix of every namespace and interface name of this network (unique per run).
    tag: String,
    subnet: u8,
    switch: String,
    hosts: Vec<String>,
}

impl Net {
    /// A new network with only the switch and the test process's own address on it.
    pub(crate) fn new() -> Self {
        // Unique enough among concurrent runs on one machine: the pid picks the subnet.
        let subnet = u8::try_from(std::process::id() % 200 + 20).unwrap();
        let tag = format!("tp{subnet}");
        let switch = format!("{tag}sw");
        // A namespace left by an earlier run that was killed goes first.
        Self::remove_leftovers(&tag);
        ip(&["netns", "add", &switch]);
        let mut net = Self {
            tag,
            subnet,
            switch,
            hosts: Vec::new(),
        };
        let sw = net.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        // The test process's leg: `<tag>r` here, `<tag>rp` on the bridge.
        let (root_if, peer) = (format!("{}r", net.tag), format!("{}rp", net.tag));
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &sw]);
        ip(&["-n", &sw, "link", "set", &peer, "master", "br0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.address(1)),
            "dev",
            &root_if,
        ]);
        ip(&["link", "set", &root_if, "up"]);
        net.hosts.clear();
        net
    }

    fn remove_leftovers(tag: &str) {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let Ok(out) = out else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(tag) {
                kill_all_in(name);
                drop(Command::new("ip").args(["netns", "del", name]).status());
            }
        }
        drop(
            Command::new("ip")
                .args(["link", "del", &format!("{tag}r")])
                .stderr(std::process::Stdio::null())
                .status(),
        );
    }

    /// `10.231.<subnet>.<n>`.
    pub(crate) fn address(&self, n: u8) -> String {
        format!("10.231.{}.{n}", self.subnet)
    }

    /// Adds host `name` at `.n`; returns its namespace.
    pub(crate) fn host(&mut self, name: &str, n: u8) -> String {
        let netns = format!("{}{name}", self.tag);
        ip(&["netns", "add", &netns]);
        self.hosts.push(netns.clone());
        let (inside, outside) = (format!("{}h{n}", self.tag), format!("{}s{n}", self.tag));
        ip(&[
            "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ]);
        ip(&["link", "set", &outside, "netns", &self.switch]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &outside,
            "master",
            "br0",
            "up",
        ]);
        ip(&["link", "set", &inside, "netns", &netns]);
        ip(&["-n", &netns, "link", "set", &inside, "name", "eth0"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", self.address(n)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }
}

/// SIGKILL to every process in `netns` (so deleting it leaves nothing running).
fn kill_all_in(netns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        drop(Command::new("kill").args(["-9", pid]).status());
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for netns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            kill_all_in(netns);
            drop(Command::new("ip").args(["netns", "del", netns]).status());
        }
        // The root leg goes with its peer; this is for a half-built network.
        drop(
            Command::new("ip")
                .args(["link", "del", &format!("{}r", self.tag)])
                .stderr(std::process::Stdio::null())
                .status(),
        );
    }
}
