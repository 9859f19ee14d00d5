//! kiln-probe: what a process may do where it runs, tried for real and printed as `key=value`
//! lines on stdout, one per line, in a fixed order. The escape tests run it inside kiln's
//! instances (unprivileged and `privileged: true`) and on the host; a comparison against another
//! runtime can run the same binary there.
//!
//! Usage: `kiln-probe [--pid N]`. `pid1_*` keys probe process N (default 1, the instance's init;
//! on a host, give an ordinary process of your own).
//!
//! Values: `OK(<result>)` when the call succeeded (a file descriptor, a serial, a link's target),
//! `ERR(<errno name>)` when it failed, e.g. `ERR(EPERM)`; plain numbers or words for the facts:
//!
//! | key | what was tried |
//! |---|---|
//! | `sid`, `tty_nr` | getsid(0) (0: the session's leader is outside this PID namespace), and field 7 of /proc/self/stat (0: no controlling terminal) |
//! | `dev_tty_open` | open("/dev/tty", O_RDWR) |
//! | `tiocsti_fd0` … `tiocsti_fd2`, `tiocsti_dev_tty` | ioctl(fd, TIOCSTI) of each byte of [`INJECTED`] into stdin/stdout/stderr and the /dev/tty just opened (or -1) |
//! | `tioclinux_fd0` | ioctl(0, TIOCLINUX, TIOCL_GETSHIFTSTATE) |
//! | `tiocsti_own_pty`, `tiocsti_own_pty_high`, `tioclinux_own_pty` | in a child with a session of its own and a new pty as its controlling terminal (where the kernel lets TIOCSTI through): TIOCSTI with the request as 0x5412 and as 0xffffffff00005412 (the kernel reads 32 bits), TIOCLINUX; `own_pty` says why not when the pty could not be made |
//! | `keyctl_user_keyring` | keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, create) |
//! | `add_key` | add_key("user", "kiln-probe", …, KEY_SPEC_PROCESS_KEYRING) |
//! | `request_key` | request_key("user", "kiln-probe-absent", NULL, 0): ERR(ENOKEY) when the kernel answered |
//! | `socket_vsock` | socket(AF_VSOCK, SOCK_STREAM, 0) |
//! | `pid1_exe_readlink`, `pid1_exe_open` | readlink and open(O_RDONLY) of /proc/N/exe |
//! | `pid1_fd1_readlink`, `pid1_fd1_open` | the same for /proc/N/fd/1 |
//! | `ptrace_seize_pid1` | ptrace(PTRACE_SEIZE, N) (let go when the probe exits) |
//! | `masked:<path>` | `masked` (a file that is /dev/null, or an empty tmpfs folder), `open`, or `absent`, for Docker's and podman's masked paths |
//! | `readonly:<path>` | `ro`, `rw` or `absent`, for their read-only paths |
//! | `status:CapInh` … `status:CapAmb`, `status:NoNewPrivs`, `status:Seccomp` | those lines of /proc/self/status (hex masks, numbers) |
//! | `socket_af_0` … `socket_af_45` | socket(family, t, 0) for t in DGRAM, STREAM, SEQPACKET, RAW: `OK(<type>)` for the first that opens, else EPERM/EACCES if any try said so, else the first error |
//! | `sys_<name>` | a call Docker's default seccomp profile denies, with arguments that make success impossible (a missing path, a bad descriptor, a wrong magic or flags), so only its errno is seen; `sys_unshare_newns_newuser` runs in a child |
//! | `dev:<path>` | `c<major>:<minor>` or `b<major>:<minor>` for each device node in /dev and its folders |
//!
//! Nothing it does outlives it: the key it adds goes to its own process keyring, the bytes it
//! pushes into its own pty go nowhere. What it pushes into a terminal it was given is the point.

// The probe is raw system calls, as a hostile program makes them.
#![allow(unsafe_code)]
// libc's ioctl request type is u64 here and a c_int elsewhere: the casts are for the others.
#![allow(clippy::unnecessary_cast)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The line TIOCSTI pushes: a shell comment, so that a terminal that takes it runs nothing.
pub const INJECTED: &str = "#kiln-probe-tiocsti\n";

/// Docker's and podman's masked paths (moby's `oci/defaults.go`, containers-common's
/// `DefaultMaskedPaths`), besides the per-CPU `thermal_throttle` folders the probe lists itself.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
    "/sys/fs/selinux",
];

/// Their read-only paths.
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
const AF_VSOCK: libc::c_int = 40;
const TIOCL_GETSHIFTSTATE: libc::c_char = 6;
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(e))
}

/// `OK(ret)` or `ERR(<errno>)` for a call that returns -1 and sets errno on failure.
fn outcome(ret: libc::c_long) -> String {
    if ret >= 0 {
        format!("OK({ret})")
    } else {
        format!("ERR({})", errno_name(errno()))
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// TIOCSTI of every byte of [`INJECTED`] into `fd` with `request`; stops at the first refusal.
fn inject(fd: libc::c_int, request: u64) -> String {
    for b in INJECTED.bytes() {
        let c = b as libc::c_char;
        // SAFETY: TIOCSTI reads one byte at the pointer, which lives through the call.
        let ret = unsafe { libc::syscall(libc::SYS_ioctl, fd, request, &c as *const libc::c_char) };
        if ret < 0 {
            return outcome(ret);
        }
    }
    format!("OK({})", INJECTED.len())
}

fn tioclinux(fd: libc::c_int) -> String {
    let mut sub: libc::c_char = TIOCL_GETSHIFTSTATE;
    // SAFETY: TIOCLINUX reads and writes one byte at the pointer.
    outcome(unsafe { libc::ioctl(fd, libc::TIOCLINUX, &mut sub as *mut libc::c_char) }.into())
}

/// Field 7 of /proc/self/stat: the controlling terminal's device number, 0 for none.
fn tty_nr() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(4))
        .unwrap_or("?")
        .to_string()
}

/// The own-pty checks, in a forked child that leaves its session: `key=value` lines.
fn own_pty() -> String {
    let mut fds = [0; 2];
    // SAFETY: a pipe into the two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return format!("own_pty=ERR({})\n", errno_name(errno()));
    }
    // SAFETY: the probe is single-threaded; the child calls only async-signal-safe functions and
    // ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let out = fds[1];
        let say = |line: &str| {
            // SAFETY: writes the line's bytes.
            unsafe { libc::write(out, line.as_ptr().cast(), line.len()) };
        };
        // SAFETY: plain system calls on values this child owns.
        unsafe {
            let fail = |what: &str| {
                say(&format!("own_pty=ERR({what}:{})\n", errno_name(errno())));
                libc::_exit(0)
            };
            if libc::setsid() < 0 {
                fail("setsid");
            }
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            if master < 0 {
                fail("posix_openpt");
            }
            if libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
                fail("unlockpt");
            }
            let mut name = [0 as libc::c_char; 128];
            if libc::ptsname_r(master, name.as_mut_ptr(), name.len()) != 0 {
                fail("ptsname");
            }
            // A session leader without a terminal takes the first it opens.
            let slave = libc::open(name.as_ptr(), libc::O_RDWR);
            if slave < 0 {
                fail("open");
            }
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            say(&format!(
                "tiocsti_own_pty={}\n",
                inject(slave, libc::TIOCSTI as u64)
            ));
            say(&format!(
                "tiocsti_own_pty_high={}\n",
                inject(slave, 0xffff_ffff_0000_0000 | libc::TIOCSTI as u64)
            ));
            say(&format!("tioclinux_own_pty={}\n", tioclinux(slave)));
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's copy of the write end.
    unsafe { libc::close(fds[1]) };
    if pid < 0 {
        return format!("own_pty=ERR({})\n", errno_name(errno()));
    }
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: reads into the buffer.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        text.extend_from_slice(&buf[..n as usize]);
    }
    // SAFETY: reaps the child.
    unsafe {
        libc::close(fds[0]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn readlink(path: &str) -> String {
    match std::fs::read_link(path) {
        Ok(target) => format!("OK({})", target.display()),
        Err(e) => format!("ERR({})", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

fn open_read(path: &str) -> String {
    match std::fs::File::open(path) {
        Ok(_) => "OK(opened)".to_string(),
        Err(e) => format!("ERR({})", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

/// Masked: a file that is /dev/null (char 1:3), or a folder that is an empty tmpfs.
fn masked(path: &Path) -> &'static str {
    let Ok(meta) = std::fs::metadata(path) else {
        return "absent";
    };
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if meta.is_dir() {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: statfs fills the zeroed struct.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        let tmpfs = unsafe { libc::statfs(c.as_ptr(), &mut fs) } == 0
            && fs.f_type as libc::c_long == TMPFS_MAGIC;
        let empty = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none());
        if tmpfs && empty {
            "masked"
        } else {
            "open"
        }
    } else if meta.file_type().is_char_device() && meta.rdev() == libc::makedev(1, 3) {
        "masked"
    } else {
        "open"
    }
}

fn read_only(path: &str) -> &'static str {
    let c = cstr(path);
    // SAFETY: statvfs fills the zeroed struct.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut vfs) } != 0 {
        return "absent";
    }
    if vfs.f_flag & libc::ST_RDONLY != 0 {
        "ro"
    } else {
        "rw"
    }
}

/// socket(af, …) with each common type: the first that opens, else the refusal.
fn socket_family(af: libc::c_int) -> String {
    let types = [
        ("DGRAM", libc::SOCK_DGRAM),
        ("STREAM", libc::SOCK_STREAM),
        ("SEQPACKET", libc::SOCK_SEQPACKET),
        ("RAW", libc::SOCK_RAW),
    ];
    let mut errors = Vec::new();
    for (name, ty) in types {
        // SAFETY: socket takes no pointers; the descriptor is closed at once.
        let fd = unsafe { libc::socket(af, ty | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            unsafe { libc::close(fd) };
            return format!("OK({name})");
        }
        errors.push(errno());
    }
    let refused = errors
        .iter()
        .find(|e| **e == libc::EPERM || **e == libc::EACCES);
    format!("ERR({})", errno_name(*refused.unwrap_or(&errors[0])))
}

/// Calls Docker's default profile denies, each with arguments that cannot succeed: the kernel
/// checks the capability (or seccomp refuses) before it finds the argument wrong, so the errno
/// tells which stopped it, and nothing changes either way.
fn denied_calls() -> Vec<(&'static str, String)> {
    let absent = cstr("/nonexistent-kiln-probe");
    let absent2 = cstr("/nonexistent-kiln-probe-2");
    let nofs = cstr("kiln-probe-no-such-fs");
    let module = cstr("kiln_probe_absent");
    let junk = [0u8; 64];
    let zeros = [0u64; 16];
    // Microseconds past a second: settimeofday and clock_settime refuse it as invalid.
    let bad_tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 2_000_000,
    };
    let bad_ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 2_000_000_000,
    };
    let mut out = Vec::new();
    // SAFETY: every pointer passed is to a value above that outlives the call; none of the
    // calls can succeed with these arguments.
    unsafe {
        out.push((
            "mount",
            outcome(libc::syscall(
                libc::SYS_mount,
                nofs.as_ptr(),
                absent.as_ptr(),
                nofs.as_ptr(),
                0,
                0,
            )),
        ));
        out.push((
            "umount2",
            outcome(libc::syscall(libc::SYS_umount2, absent.as_ptr(), 0)),
        ));
        out.push(("setns", outcome(libc::syscall(libc::SYS_setns, -1, 0))));
        out.push((
            "pivot_root",
            outcome(libc::syscall(
                libc::SYS_pivot_root,
                absent.as_ptr(),
                absent2.as_ptr(),
            )),
        ));
        out.push((
            "swapon",
            outcome(libc::syscall(libc::SYS_swapon, absent.as_ptr(), 0)),
        ));
        out.push((
            "swapoff",
            outcome(libc::syscall(libc::SYS_swapoff, absent.as_ptr())),
        ));
        // Wrong magic numbers: the kernel answers EINVAL once the capability is checked.
        out.push((
            "reboot",
            outcome(libc::syscall(libc::SYS_reboot, 0, 0, 0, 0)),
        ));
        // 64 zero bytes are no ELF module.
        out.push((
            "init_module",
            outcome(libc::syscall(
                libc::SYS_init_module,
                junk.as_ptr(),
                junk.len(),
                absent.as_ptr(),
            )),
        ));
        out.push((
            "finit_module",
            outcome(libc::syscall(
                libc::SYS_finit_module,
                -1,
                absent.as_ptr(),
                0,
            )),
        ));
        out.push((
            "delete_module",
            outcome(libc::syscall(
                libc::SYS_delete_module,
                module.as_ptr(),
                libc::O_NONBLOCK,
            )),
        ));
        // Flags no kernel knows and more segments than it takes (0 segments would unload).
        out.push((
            "kexec_load",
            outcome(libc::syscall(
                libc::SYS_kexec_load,
                0,
                1000,
                junk.as_ptr(),
                0xdead_0000u64,
            )),
        ));
        // BPF_MAP_CREATE of map type 0 (unspecified): EINVAL where bpf is allowed.
        out.push((
            "bpf",
            outcome(libc::syscall(libc::SYS_bpf, 0, zeros.as_ptr(), 64)),
        ));
        // Flags no kernel knows.
        out.push((
            "perf_event_open",
            outcome(libc::syscall(
                libc::SYS_perf_event_open,
                zeros.as_ptr(),
                0,
                -1,
                -1,
                0xdead_0000u64,
            )),
        ));
        let ufd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
        out.push(("userfaultfd", outcome(ufd)));
        if ufd >= 0 {
            libc::close(ufd as libc::c_int);
        }
        out.push((
            "open_by_handle_at",
            outcome(libc::syscall(
                libc::SYS_open_by_handle_at,
                -1,
                zeros.as_ptr(),
                0,
            )),
        ));
        // A file that does not exist: accounting cannot start (NULL would stop it).
        out.push((
            "acct",
            outcome(libc::syscall(libc::SYS_acct, absent.as_ptr())),
        ));
        out.push((
            "settimeofday",
            outcome(libc::syscall(
                libc::SYS_settimeofday,
                &bad_tv as *const libc::timeval,
                0,
            )),
        ));
        out.push((
            "clock_settime",
            outcome(libc::syscall(
                libc::SYS_clock_settime,
                libc::CLOCK_REALTIME,
                &bad_ts as *const libc::timespec,
            )),
        ));
        // SYSLOG_ACTION_SIZE_BUFFER: reads the kernel log's size.
        out.push(("syslog", outcome(libc::syscall(libc::SYS_syslog, 10, 0, 0))));
        out.push((
            "quotactl",
            outcome(libc::syscall(libc::SYS_quotactl, 0, absent.as_ptr(), 0, 0)),
        ));
        out.push((
            "lookup_dcookie",
            outcome(libc::syscall(libc::SYS_lookup_dcookie, 0u64, 0, 0)),
        ));
    }
    out.push((
        "unshare_newns_newuser",
        in_child(|| {
            // SAFETY: unshare takes no pointers; it changes only this child's namespaces.
            outcome(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUSER) }.into())
        }),
    ));
    out
}

/// `f` in a forked child (so what it changes ends with the child): its one-line answer.
fn in_child(f: impl FnOnce() -> String) -> String {
    let mut fds = [0; 2];
    // SAFETY: a pipe into the two ints; the probe is single-threaded, the child writes and
    // ends with _exit.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return format!("ERR({})", errno_name(errno()));
        }
        let pid = libc::fork();
        if pid == 0 {
            let line = f();
            libc::write(fds[1], line.as_ptr().cast(), line.len());
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut buf = [0u8; 128];
        let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
        libc::close(fds[0]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
    }
}

/// Device nodes under `dir` (two levels deep): path and `c`/`b` major:minor.
fn device_nodes(dir: &Path, depth: u32, out: &mut Vec<(String, String)>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let ft = meta.file_type();
        let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        if ft.is_char_device() {
            out.push((entry.path().display().to_string(), format!("c{maj}:{min}")));
        } else if ft.is_block_device() {
            out.push((entry.path().display().to_string(), format!("b{maj}:{min}")));
        } else if ft.is_dir() && depth < 1 {
            device_nodes(&entry.path(), depth + 1, out);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pid: i32 = match args.iter().position(|a| a == "--pid") {
        Some(i) => args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .expect("--pid N"),
        None => 1,
    };
    let mut out = Vec::new();
    let mut rec = |k: &str, v: String| out.push(format!("{k}={v}"));

    // The session and terminal the probe was started in.
    // SAFETY: plain system calls.
    rec("sid", unsafe { libc::getsid(0) }.to_string());
    rec("tty_nr", tty_nr());
    let tty = cstr("/dev/tty");
    // SAFETY: opens a path; the descriptor stays open until the probe exits.
    let tty_fd = unsafe { libc::open(tty.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    rec("dev_tty_open", outcome(tty_fd.into()));
    for fd in 0..3 {
        rec(&format!("tiocsti_fd{fd}"), inject(fd, libc::TIOCSTI as u64));
    }
    rec("tiocsti_dev_tty", inject(tty_fd, libc::TIOCSTI as u64));
    rec("tioclinux_fd0", tioclinux(0));
    for line in own_pty().lines() {
        if let Some((k, v)) = line.split_once('=') {
            rec(k, v.to_string());
        }
    }

    // Keyrings.
    let user = cstr("user");
    let (name, absent) = (cstr("kiln-probe"), cstr("kiln-probe-absent"));
    // SAFETY: the key calls read the strings and payload passed, which outlive them.
    unsafe {
        rec(
            "keyctl_user_keyring",
            outcome(libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_GET_KEYRING_ID,
                KEY_SPEC_USER_KEYRING,
                1,
            )),
        );
        rec(
            "add_key",
            outcome(libc::syscall(
                libc::SYS_add_key,
                user.as_ptr(),
                name.as_ptr(),
                b"x".as_ptr(),
                1usize,
                KEY_SPEC_PROCESS_KEYRING,
            )),
        );
        rec(
            "request_key",
            outcome(libc::syscall(
                libc::SYS_request_key,
                user.as_ptr(),
                absent.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            )),
        );
        // vsock: a path out of the network namespace on VM hosts.
        rec(
            "socket_vsock",
            outcome(libc::socket(AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).into()),
        );
    }

    // The process at `pid`: its program and handles, and a tracer's hold on it.
    rec("pid1_exe_readlink", readlink(&format!("/proc/{pid}/exe")));
    rec("pid1_exe_open", open_read(&format!("/proc/{pid}/exe")));
    rec("pid1_fd1_readlink", readlink(&format!("/proc/{pid}/fd/1")));
    rec("pid1_fd1_open", open_read(&format!("/proc/{pid}/fd/1")));
    // SAFETY: PTRACE_SEIZE takes no pointers; the tracee is let go when the probe exits.
    rec(
        "ptrace_seize_pid1",
        outcome(unsafe {
            libc::ptrace(
                libc::PTRACE_SEIZE,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        }),
    );

    // Masked and read-only paths.
    let mut paths: Vec<String> = MASKED.iter().map(|p| p.to_string()).collect();
    if let Ok(cpus) = std::fs::read_dir("/sys/devices/system/cpu") {
        let mut throttles: Vec<String> = cpus
            .flatten()
            .map(|e| e.path().join("thermal_throttle"))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        throttles.sort();
        paths.extend(throttles);
    }
    for p in &paths {
        rec(&format!("masked:{p}"), masked(Path::new(p)).to_string());
    }
    for p in READ_ONLY {
        rec(&format!("readonly:{p}"), read_only(p).to_string());
    }

    // What the process holds, as the kernel reports it.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if k.starts_with("Cap") || k == "NoNewPrivs" || k == "Seccomp" {
                rec(&format!("status:{k}"), v.trim().to_string());
            }
        }
    }
    for af in 0..=45 {
        rec(&format!("socket_af_{af}"), socket_family(af));
    }
    for (name, value) in denied_calls() {
        rec(&format!("sys_{name}"), value);
    }
    let mut nodes = Vec::new();
    device_nodes(Path::new("/dev"), 0, &mut nodes);
    nodes.sort();
    for (path, node) in nodes {
        rec(&format!("dev:{path}"), node);
    }
    println!("{}", out.join("\n"));
}
