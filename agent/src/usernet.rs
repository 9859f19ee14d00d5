//! `network: private`: an instance's own network namespace, reaching out through slirp4netns —
//! user-mode networking, as rootless podman gives its containers. The instance sees a `tap0`
//! with 10.0.2.100/24, a gateway at 10.0.2.2 and a DNS forwarder at 10.0.2.3; slirp4netns
//! turns its connections into sockets of the host's network stack, opened by an ordinary
//! process. Nothing reaches in, the host's interfaces are not in the namespace, and the host's
//! loopback is out of reach (`--disable-host-loopback`).
//!
//! slirp4netns must live in the host's network namespace and join the instance's, so the keeper
//! starts it (through `kiln-agent sandbox usernet`, which waits on its stdin) before it
//! unshares anything and lets it go once the namespace exists. It is started after the keeper
//! entered the instance's cgroup, so its processes and memory count against the instance's
//! limits and the host's clean-up finds it there. It runs as kiln's user (root for a root kiln:
//! joining a network namespace of the machine's user namespace takes CAP_SYS_ADMIN there), in
//! its own sandbox (`--enable-sandbox`: a mount namespace of its own, every capability but
//! CAP_NET_BIND_SERVICE dropped) under its own seccomp filter, and ends when the keeper does:
//! its `--exit-fd` is the read end of a pipe whose write end only the keeper holds.
//!
//! Egress policy. slirp4netns opens its sockets in the host's network namespace, so what the
//! instance reaches is what the host reaches: the cloud's metadata service (169.254.169.254),
//! the host's own addresses, its private networks. Before slirp4netns is let go, the keeper
//! installs an nftables table in the instance's namespace that refuses, on every interface but
//! loopback, link-local, private (RFC 1918, unique-local), shared (100.64/10), loopback,
//! multicast and reserved addresses and every address of the host's interfaces, except the DNS
//! forwarder and what the pipeline's `network.allow` names. A refusal is a TCP reset or an
//! ICMP "administratively prohibited": the connection fails at once instead of timing out. The
//! instance's processes hold no CAP_NET_ADMIN (see `posture::KEEP`), so they can neither change
//! the table nor the routes; a `privileged: true` instance can, and is documented so.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{pipe2, read, write};

/// The program, found on PATH.
pub const PROGRAM: &str = "slirp4netns";
/// The DNS forwarder slirp4netns answers at inside the namespace.
pub const NAMESERVER: &str = "10.0.2.3";
/// How long slirp4netns may take to set the namespace up.
const READY_WITHIN_MS: u16 = 10_000;

/// slirp4netns started and waiting for the keeper's network namespace.
#[derive(Debug)]
pub struct Waiting {
    /// One byte lets it go; closing it (the keeper's end) ends it.
    go: OwnedFd,
    ready: OwnedFd,
    child: Child,
}

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("user-mode networking: {what}: {e}")
}

/// Starts slirp4netns for the network namespace the calling process (the keeper) is about to
/// create; it waits until `Waiting::start`.
pub fn prepare() -> Result<Waiting, String> {
    // Close-on-exec: the keeper's ends must reach neither the helper nor the instance (a copy
    // of the exit pipe's write end elsewhere would keep slirp4netns alive).
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e))?;
    let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e))?;
    let exe = std::env::current_exe().map_err(|e| fail("find kiln-agent", e))?;
    let child = Command::new(exe)
        .args(["sandbox", "usernet", "--target"])
        .arg(std::process::id().to_string())
        .stdin(Stdio::from(go_r))
        .stdout(Stdio::from(ready_w))
        .spawn()
        .map_err(|e| fail("start the helper", e))?;
    Ok(Waiting {
        go: go_w,
        ready: ready_r,
        child,
    })
}

/// `kiln-agent sandbox usernet`: waits for a byte on stdin, then becomes slirp4netns for the
/// network namespace of `target`, with stdin as its exit fd and what was stdout as its ready fd.
pub fn helper(target: u32) -> Result<i32, String> {
    let mut byte = [0u8; 1];
    match std::io::stdin().read(&mut byte) {
        Ok(1) => {}
        // The keeper ended without creating the namespace.
        _ => return Ok(0),
    }
    let ready = nix::unistd::dup(std::io::stdout().as_fd()).map_err(|e| fail("dup", e))?;
    // What slirp4netns prints goes to the keeper's log, not into the ready pipe.
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(|e| fail("dup2", e))?;
    let e = Command::new(PROGRAM)
        .args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            "--exit-fd=0",
        ])
        .arg(format!("--ready-fd={}", ready.as_raw_fd()))
        .arg(target.to_string())
        .arg("tap0")
        .exec();
    Err(fail(&format!("start {PROGRAM}"), e))
}

impl Waiting {
    /// Lets slirp4netns join the namespace that now exists and waits until it has configured
    /// `tap0`. slirp4netns ends when the calling process does.
    pub fn start(self) -> Result<(), String> {
        let Waiting {
            go,
            ready,
            mut child,
        } = self;
        write(&go, b"g").map_err(|e| fail("release slirp4netns", e))?;
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(READY_WITHIN_MS))
            .map_err(|e| fail("wait for slirp4netns", e))?;
        if n == 0 {
            let _ = child.kill();
            return Err(fail(
                "slirp4netns",
                format!("not ready within {} s", READY_WITHIN_MS / 1000),
            ));
        }
        let mut byte = [0u8; 1];
        if !matches!(read(&ready, &mut byte), Ok(1) if byte[0] == b'1') {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(fail(
                "slirp4netns",
                format!("it ended ({status}) before the network was up; its messages are above"),
            ));
        }
        // The keeper's end stays open while the keeper lives; when it closes, slirp4netns ends.
        std::mem::forget(go);
        Ok(())
    }
}

/// The gateway slirp4netns answers at: the host's loopback seen from inside, refused
/// (`--disable-host-loopback`) and inside 10.0.0.0/8 besides.
pub const GATEWAY: &str = "10.0.2.2";

/// What a private network refuses by default, IPv4: "this" network, private (RFC 1918),
/// shared/CGNAT (RFC 6598; a provider's internal services live there), loopback, link-local
/// (the metadata service), multicast and reserved.
const DENIED_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// IPv6: unspecified, loopback, IPv4-mapped (the IPv4 ranges again), unique-local,
/// link-local, multicast.
const DENIED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

/// A destination the pipeline allowed: addresses, and one port of them or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
}

/// The egress policy of one private instance, computed in the host's network namespace (its
/// addresses, its resolver) and installed in the instance's.
#[derive(Debug)]
pub struct Policy {
    nft: PathBuf,
    rules: String,
}

/// The addresses of the calling process's network namespace (the host's, before the keeper
/// unshares): IPv4 from the kernel's local routes, IPv6 from its interface list.
pub fn host_addresses() -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last: Option<Ipv4Addr> = None;
    for line in trie.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("|-- ") {
            last = a.parse().ok();
        } else if let (Some(a), Some(rest)) = (last, t.strip_prefix('/')) {
            // `/32 host LOCAL`: an address of this machine (`/8 host LOCAL`: all of 127/8).
            let mut words = rest.split_whitespace();
            let prefix = words.next().and_then(|p| p.parse::<u8>().ok());
            if words.last() == Some("LOCAL") {
                if let Some(p) = prefix {
                    let entry = (IpAddr::V4(a), p);
                    if !out.contains(&entry) {
                        out.push(entry);
                    }
                }
            }
        }
    }
    let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    for line in inet6.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        if let Ok(n) = u128::from_str_radix(hex, 16) {
            let entry = (IpAddr::V6(Ipv6Addr::from(n)), 128);
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

/// The pipeline's `allow` entries as addresses; names are resolved now, by the host's resolver.
pub fn openings(allow: &[String]) -> Result<Vec<Opening>, String> {
    use kiln::model::pipeline::Allowed;
    let mut out = Vec::new();
    for entry in allow {
        match Allowed::parse(entry).map_err(|e| fail("network.allow", e))? {
            Allowed::Net(addr, prefix) => out.push(Opening {
                addr,
                prefix,
                port: None,
            }),
            Allowed::Port(host, port) => {
                let addrs: Vec<IpAddr> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| fail(&format!("network.allow `{entry}`: resolve {host}"), e))?
                    .map(|a| a.ip())
                    .collect();
                if addrs.is_empty() {
                    return Err(fail(
                        &format!("network.allow `{entry}`"),
                        format!("{host} has no address"),
                    ));
                }
                for addr in addrs {
                    let prefix = if addr.is_ipv4() { 32 } else { 128 };
                    let o = Opening {
                        addr,
                        prefix,
                        port: Some(port),
                    };
                    if !out.contains(&o) {
                        out.push(o);
                    }
                }
            }
        }
    }
    Ok(out)
}

fn family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

/// The nftables table: on every interface but loopback, the DNS forwarder and the openings go
/// through, the denied ranges and the host's addresses are refused, the rest goes out.
pub fn ruleset(host: &[(IpAddr, u8)], open: &[Opening]) -> String {
    let mut r = String::from(
        "table inet kiln {\n\tchain egress {\n\t\ttype filter hook output priority filter; policy accept;\n\t\toifname \"lo\" accept\n",
    );
    for proto in ["udp", "tcp"] {
        r.push_str(&format!(
            "\t\tip daddr {NAMESERVER} {proto} dport 53 accept\n"
        ));
    }
    for o in open {
        let to = format!("{} daddr {}/{}", family(&o.addr), o.addr, o.prefix);
        match o.port {
            None => r.push_str(&format!("\t\t{to} accept\n")),
            Some(p) => {
                for proto in ["tcp", "udp"] {
                    r.push_str(&format!("\t\t{to} {proto} dport {p} accept\n"));
                }
            }
        }
    }
    let denied = DENIED_V4
        .iter()
        .map(|(a, p)| (IpAddr::V4(*a), *p))
        .chain(DENIED_V6.iter().map(|(a, p)| (IpAddr::V6(*a), *p)))
        .chain(host.iter().copied());
    for (addr, prefix) in denied {
        r.push_str(&format!(
            "\t\t{} daddr {addr}/{prefix} goto refuse\n",
            family(&addr)
        ));
    }
    r.push_str(
        "\t}\n\tchain refuse {\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject with icmpx type admin-prohibited\n\t}\n}\n",
    );
    r
}

impl Policy {
    /// The policy for an instance started now: call in the host's network namespace. An error
    /// when nft is missing: a private network never runs unfiltered.
    pub fn for_instance(allow: &[String]) -> Result<Policy, String> {
        let nft = kiln::confine::find_program(kiln::confine::NFT).ok_or_else(|| {
            fail(
                "egress policy",
                "nft (Debian package nftables) is not installed; kiln does not run a private network unfiltered",
            )
        })?;
        Ok(Policy {
            nft,
            rules: ruleset(&host_addresses(), &openings(allow)?),
        })
    }

    /// Installs the table in the calling process's (new) network namespace.
    pub fn install(&self) -> Result<(), String> {
        let mut child = Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(&format!("egress policy: start {}", self.nft.display()), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.rules.as_bytes())
                .map_err(|e| fail("egress policy: write the rules", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail("egress policy: nft", e))?;
        if !out.status.success() {
            return Err(fail(
                "egress policy: nft refused the rules",
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        Ok(())
    }
}

/// The instance's `/etc/resolv.conf` under `network: private`: slirp4netns's forwarder, with
/// the host's search domains and options.
pub fn resolv_conf(host: &str) -> String {
    let mut text = format!("nameserver {NAMESERVER}\n");
    for line in host.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if matches!(word, "search" | "domain" | "options") {
            text.push_str(line.trim());
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_opens_allowed_destinations_before_it_refuses_the_denied_ranges() {
        // GIVEN the host's address and an allowed host:port inside a denied range
        let host = [(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 32)];
        let open = openings(&["10.213.7.1:8080".to_string()]).expect("openings");
        // WHEN the ruleset is written
        let r = ruleset(&host, &open);
        // THEN the opening comes before the refusal of 10/8, the host's address and the
        // metadata service are refused, and refusals reset instead of dropping
        let at = |needle: &str| r.find(needle).unwrap_or_else(|| panic!("{needle}: {r}"));
        assert!(
            at("ip daddr 10.213.7.1/32 tcp dport 8080 accept")
                < at("ip daddr 10.0.0.0/8 goto refuse")
        );
        at("ip daddr 192.0.2.2/32 goto refuse");
        at("ip daddr 169.254.0.0/16 goto refuse");
        at("ip6 daddr fe80::/10 goto refuse");
        at("ip daddr 10.0.2.3 udp dport 53 accept");
        at("reject with tcp reset");
        assert!(!r.contains("drop"), "{r}");
    }

    #[test]
    fn the_host_addresses_include_loopback_and_every_interface() {
        // GIVEN this machine WHEN its addresses are read THEN loopback is among them
        let all = host_addresses();
        assert!(
            all.contains(&(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8))
                || all.contains(&(IpAddr::V4(Ipv4Addr::LOCALHOST), 32)),
            "{all:?}"
        );
    }

    #[test]
    fn resolv_conf_keeps_search_and_options_and_names_the_forwarder() {
        let host =
            "# generated\nnameserver 127.0.0.53\nsearch corp.example\noptions edns0 trust-ad\n";
        assert_eq!(
            resolv_conf(host),
            "nameserver 10.0.2.3\nsearch corp.example\noptions edns0 trust-ad\n"
        );
    }
}
