//! What a process inside an embedded instance may do: podman's default capability set, no new
//! privileges, and a seccomp filter compiled from containers-common's default profile
//! (`data/seccomp.json`, see `data/NOTICE.md`) with Docker's namespace rules on top, and kiln's
//! own refusals of what reaches past the namespaces: TIOCSTI and TIOCLINUX, the keyring calls,
//! vsock sockets (EPERM, as a refusal, not ENOSYS, as a missing feature).
//!
//! Every process of an unprivileged instance goes through [`harden`] before it runs anything of
//! the image: `init` after it mounted /proc, and `sandbox exec` after it joined the instance.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use caps::{CapSet, Capability};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

/// containers-common's `seccomp.json` as Debian ships it.
const PROFILE: &str = include_str!("../data/seccomp.json");

/// Podman's default capabilities (smaller than Docker's: no MKNOD, NET_RAW, AUDIT_WRITE).
pub const KEEP: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETUID,
    Capability::CAP_SYS_CHROOT,
];

/// The namespace flags of clone(2) (Docker refuses them without CAP_SYS_ADMIN).
const CLONE_NAMESPACES: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// ioctl requests that act on a terminal from afar: TIOCSTI types into it (into the operator's
/// shell, when an instance process reaches kiln's terminal), TIOCLINUX drives the console (it
/// can paste a selection as input). Bubblewrap and Flatpak refuse both.
const TERMINAL_INPUT: &[u64] = &[
    0x5412, // TIOCSTI
    0x541C, // TIOCLINUX
];
/// `socket(AF_VSOCK, …)`: vsock is not in the network namespace; on a VM host it reaches the
/// hypervisor's agents whatever the instance's network.
const AF_VSOCK: u64 = 40;
/// The kernel's keyrings are not namespaced: a root instance would read and change the host
/// root's user keyring (Docker's profile refuses these three).
const KEYRING_CALLS: &[&str] = &["keyctl", "add_key", "request_key"];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_errno_ret: Option<u32>,
    syscalls: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Group {
    names: Vec<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u8,
    value: u64,
    value_two: u64,
    op: String,
}

/// The profile's name for this machine's architecture.
fn arch() -> (&'static str, TargetArch) {
    #[cfg(target_arch = "x86_64")]
    return ("amd64", TargetArch::x86_64);
    #[cfg(target_arch = "aarch64")]
    return ("arm64", TargetArch::aarch64);
    #[cfg(target_arch = "riscv64")]
    return ("riscv64", TargetArch::riscv64);
}

fn condition(a: &Arg) -> Result<SeccompCondition, String> {
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, a.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, a.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, a.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, a.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, a.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, a.value),
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        other => return Err(format!("seccomp profile: unknown operator {other}")),
    };
    SeccompCondition::new(a.index, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| format!("seccomp profile: {e}"))
}

/// Rules by action: `None` allows, `Some(errno)` fails the call with it.
type Rules = BTreeMap<Option<u32>, BTreeMap<i64, Vec<SeccompRule>>>;

/// The filters for a process that keeps `kept` capabilities: one that allows what the profile
/// allows (everything else fails with ENOSYS, as the profile says), then one per errno that
/// fails what the profile, Docker's namespace rules and [`deny_host_reach`] refuse.
pub fn filters(kept: &BTreeSet<String>) -> Result<Vec<BpfProgram>, String> {
    let profile: Profile =
        serde_json::from_str(PROFILE).map_err(|e| format!("seccomp profile: {e}"))?;
    let (arch_name, target) = arch();
    let mut rules: Rules = BTreeMap::new();
    let mut unconditional_allow: BTreeSet<i64> = BTreeSet::new();
    for g in &profile.syscalls {
        if !g.includes.arches.is_empty() && !g.includes.arches.iter().any(|a| a == arch_name) {
            continue;
        }
        if g.excludes.arches.iter().any(|a| a == arch_name) {
            continue;
        }
        if !g.includes.caps.iter().all(|c| kept.contains(c)) {
            continue;
        }
        if g.excludes.caps.iter().any(|c| kept.contains(c)) {
            continue;
        }
        let action = match g.action.as_str() {
            "SCMP_ACT_ALLOW" => None,
            "SCMP_ACT_ERRNO" => Some(g.errno_ret.unwrap_or(EPERM)),
            other => return Err(format!("seccomp profile: unsupported action {other}")),
        };
        let conditions = g
            .args
            .iter()
            .flatten()
            .map(condition)
            .collect::<Result<Vec<_>, _>>()?;
        for name in &g.names {
            // Names of other architectures (and of calls this one lacks) are skipped, as
            // libseccomp does.
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                continue;
            };
            let nr = i64::from(sysno.id());
            if conditions.is_empty() {
                if action.is_none() {
                    unconditional_allow.insert(nr);
                }
                rules.entry(action).or_default().insert(nr, Vec::new());
            } else {
                let rule =
                    SeccompRule::new(conditions.clone()).map_err(|e| format!("seccomp: {e}"))?;
                let chain = rules.entry(action).or_default().entry(nr).or_default();
                if !(action.is_none() && unconditional_allow.contains(&nr)) {
                    chain.push(rule);
                }
            }
        }
    }
    if !kept.contains("CAP_SYS_ADMIN") {
        // Docker's rules: no new namespaces, no joining others; clone3 looks absent so that the C
        // library falls back to clone, whose flags a filter can read.
        let deny = rules.entry(Some(EPERM)).or_default();
        for name in ["unshare", "setns"] {
            if let Ok(s) = syscalls::Sysno::from_str(name) {
                deny.insert(i64::from(s.id()), Vec::new());
            }
        }
        let clone = i64::from(syscalls::Sysno::clone.id());
        let chain = deny.entry(clone).or_default();
        for bit in CLONE_NAMESPACES {
            let c = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(*bit),
                *bit,
            )
            .map_err(|e| format!("seccomp: {e}"))?;
            chain.push(SeccompRule::new(vec![c]).map_err(|e| format!("seccomp: {e}"))?);
        }
        if let Ok(s) = syscalls::Sysno::from_str("clone3") {
            rules
                .entry(Some(ENOSYS))
                .or_default()
                .insert(i64::from(s.id()), Vec::new());
        }
    }
    deny_host_reach(rules.entry(Some(EPERM)).or_default())?;
    let default_errno = profile.default_errno_ret.unwrap_or(ENOSYS);
    let mut out = Vec::new();
    for (action, chains) in rules {
        let (mismatch, matched) = match action {
            None => (SeccompAction::Errno(default_errno), SeccompAction::Allow),
            Some(errno) => (SeccompAction::Allow, SeccompAction::Errno(errno)),
        };
        let filter = SeccompFilter::new(chains, mismatch, matched, target)
            .map_err(|e| format!("seccomp: {e}"))?;
        out.push(BpfProgram::try_from(filter).map_err(|e| format!("seccomp: {e}"))?);
    }
    Ok(out)
}

/// Kiln's own refusals, on top of the profile's, for every unprivileged instance: the calls
/// that reach past the instance's namespaces to the host's terminal, keyrings and hypervisor.
/// `deny` holds the calls that fail with EPERM.
fn deny_host_reach(deny: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), String> {
    let nr = |name: &str| {
        syscalls::Sysno::from_str(name)
            .map(|s| i64::from(s.id()))
            .map_err(|_| format!("seccomp: no system call {name} here"))
    };
    // The request and the address family are C ints: the kernel reads 32 bits, so the filter
    // compares 32 bits (a request with high bits set is still TIOCSTI to the kernel).
    let arg_is = |index: u8, value: u64| -> Result<SeccompRule, String> {
        let c = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .map_err(|e| format!("seccomp: {e}"))?;
        SeccompRule::new(vec![c]).map_err(|e| format!("seccomp: {e}"))
    };
    let ioctl = nr("ioctl")?;
    for request in TERMINAL_INPUT {
        push_rule(deny, ioctl, arg_is(1, *request)?);
    }
    push_rule(deny, nr("socket")?, arg_is(0, AF_VSOCK)?);
    for name in KEYRING_CALLS {
        deny.insert(nr(name)?, Vec::new());
    }
    Ok(())
}

/// Adds `rule` to the conditions under which `call` is refused, unless it is refused outright
/// already (an empty chain), which a condition would narrow.
fn push_rule(deny: &mut BTreeMap<i64, Vec<SeccompRule>>, call: i64, rule: SeccompRule) {
    match deny.get_mut(&call) {
        Some(chain) if chain.is_empty() => {}
        Some(chain) => chain.push(rule),
        None => {
            deny.insert(call, vec![rule]);
        }
    }
}

/// Drops to [`KEEP`], sets no_new_privs and installs the seccomp filters; for the calling
/// process and everything it starts.
pub fn harden() -> Result<(), String> {
    let keep: caps::CapsHashSet = KEEP.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
    }
    let _ = caps::clear(None, CapSet::Ambient);
    let have =
        caps::read(None, CapSet::Permitted).map_err(|e| format!("read capabilities: {e}"))?;
    let kept: caps::CapsHashSet = have.intersection(&keep).copied().collect();
    // Inheritable stays empty, as in podman and Docker since CVE-2022-29162: a program whose
    // file carries inheritable capabilities gains nothing from it on exec.
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| format!("clear the inheritable capabilities: {e}"))?;
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &kept).map_err(|e| format!("set {set:?} capabilities: {e}"))?;
    }
    let names: BTreeSet<String> = kept.iter().map(|c| c.to_string()).collect();
    let programs = filters(&names)?;
    // apply_filter sets no_new_privs first.
    for p in &programs {
        seccompiler::apply_filter(p).map_err(|e| format!("install the seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_compiles_for_this_machine_with_and_without_sys_admin() {
        let kept: BTreeSet<String> = KEEP.iter().map(|c| c.to_string()).collect();
        let programs = filters(&kept).unwrap();
        // allow, EPERM, EINVAL (audit sockets), ENOSYS (clone3)
        assert_eq!(programs.len(), 4, "{}", programs.len());
        assert!(programs[0].len() > 300, "{}", programs[0].len());
        let mut admin = kept.clone();
        admin.insert("CAP_SYS_ADMIN".into());
        assert_eq!(filters(&admin).unwrap().len(), 3);
    }
}
