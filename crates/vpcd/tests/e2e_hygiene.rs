//! End-to-end tests of process hygiene: what the daemons look like to `ps` and `pidof`, the
//! lock files they leave (none, once stopped), their logs (no colours in a file), the
//! commands' output to a reader that goes away (`| head`), and the error of a host started
//! where its underlay address is not.
//!
//! Like `tests/e2e.rs`, each test builds a lab of its own with the real `vpcd` binary and
//! needs root; it skips otherwise, recorded as the others are.

#[path = "e2e/common.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Two hosts, one VPC, instance `{tag}a` on host-a and `{tag}b` on host-b, in namespaces
/// `hy-{tag}a` and `hy-{tag}b`, and two expectations.
fn pair(tag: &str, transport: &str, n: u8) -> String {
    format!(
        r#"
[underlay]
transport = "{transport}"

[[host]]
name = "host-a"
address = "192.0.2.1"

[[host]]
name = "host-b"
address = "192.0.2.2"

[[vpc]]
name = "vpc-{tag}"
tenant = "t-{tag}"
cidr = "10.{n}.0.0/16"

[[subnet]]
name = "net-{tag}"
vpc = "vpc-{tag}"
cidr = "10.{n}.1.0/24"

[[security_group]]
name = "sg-{tag}"
ingress = [ {{ action = "accept", protocol = "all", source = "10.{n}.0.0/16" }} ]
egress  = [ {{ action = "accept", protocol = "all", destination = "0.0.0.0/0" }} ]

[[instance]]
name = "{tag}a"
host = "host-a"
subnet = "net-{tag}"
ip = "10.{n}.1.10"
security_groups = ["sg-{tag}"]
netns = "hy-{tag}a"

[[instance]]
name = "{tag}b"
host = "host-b"
subnet = "net-{tag}"
ip = "10.{n}.1.20"
security_groups = ["sg-{tag}"]
netns = "hy-{tag}b"

[[expect]]
from = "{tag}a"
to = "{tag}b"
protocol = "icmp"
reach = true

[[expect]]
from = "{tag}b"
to = "{tag}a"
protocol = "udp"
port = 53
reach = true
"#
    )
}

/// The lock file of `host`'s daemon in namespace `ns` (its name carries the namespace's
/// identity, read from inside it).
fn lock_of(ns: &str, host: &str) -> PathBuf {
    in_ns(ns, {
        let host = host.to_string();
        move || vpcd::daemon::lock_path(&host)
    })
}

fn gone_within(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    !path.exists()
}

/// The lab's daemons are `vpcd` to ps and pidof (their comm and their argv[0], though the
/// lab starts them as /proc/self/exe), hold their lock files while they run and remove them
/// when they stop, and write logs without ANSI colours (their stderr is a file).
#[test]
fn daemons_are_named_vpcd_lock_while_running_and_clean_up() {
    let test = "daemons_are_named_vpcd_lock_while_running_and_clean_up";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("hyg", &pair("hg", "gre", 40));
    let daemons = lab.lab.daemons();
    assert_eq!(daemons.len(), 2, "{daemons:?}");
    let mut locks = Vec::new();
    for (host, pid) in &daemons {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim_end(), "vpcd", "host {host}: comm of {pid}");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(argv0),
            "vpcd",
            "host {host}: argv[0] of {pid}"
        );
        let lock = lock_of(&lab.ns(host), host);
        assert!(lock.exists(), "host {host}: no lock {}", lock.display());
        // Locked: a second daemon for that host in that namespace is refused.
        let again = in_ns(&lab.ns(host), {
            let host = host.clone();
            move || {
                vpcd::daemon::lock(&host)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        });
        assert!(
            again.as_ref().is_err_and(|e| e.contains("already running")),
            "host {host}: {again:?}"
        );
        locks.push(lock);
    }
    if let Some(pidof) = on_path("pidof") {
        let o = Command::new(pidof).arg("vpcd").output().unwrap();
        let found: Vec<u32> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for (host, pid) in &daemons {
            assert!(
                found.contains(pid),
                "pidof vpcd ({found:?}) misses host {host}'s daemon {pid}"
            );
        }
    } else {
        // Part of the test skipped: recorded (a failure under VPCD_REQUIRE_E2E=1).
        skip(
            &format!("{test} (its pidof part)"),
            "missing pidof, only /proc/PID/comm and argv[0] checked",
            "install with `apt-get install sysvinit-utils` (procps on newer releases)",
        );
    }
    for h in ["host-a", "host-b"] {
        let log = std::fs::read(lab.lab.log_path(h)).unwrap();
        assert!(!log.is_empty(), "{h}: empty log");
        assert!(
            !log.contains(&0x1b),
            "{h}'s log has escape sequences:\n{}",
            String::from_utf8_lossy(&log)
        );
    }
    drop(lab);
    for lock in &locks {
        assert!(
            gone_within(lock, Duration::from_secs(5)),
            "{} left behind by a daemon that stopped",
            lock.display()
        );
    }
}

/// A daemon started for a host whose underlay address is not in its namespace says so
/// (both transports), before it makes anything.
#[test]
fn a_host_started_away_from_its_address_says_so() {
    let test = "a_host_started_away_from_its_address_says_so";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("hygaddr", &pair("ha", "gre", 41));
    let a_ns = lab.ns("host-a");
    for transport in ["gre", "gre-udp"] {
        let file = lab.lab.dir().join(format!("away-{transport}.toml"));
        std::fs::write(&file, pair("ha", transport, 41)).unwrap();
        // host-b in host-a's namespace, where 192.0.2.2 is not.
        let o = vpcd(&[
            "run",
            "--netns",
            &a_ns,
            "--topology",
            file.to_str().unwrap(),
            "--host",
            "host-b",
            "--stats",
            lab.lab.dir().join("away.stats").to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{transport}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!(
                "vpcd: underlay ({transport}, in network namespace {a_ns}): 192.0.2.2 is not an address of this machine"
            ),
            "{transport}: {stderr}"
        );
        assert!(
            !lock_of(&a_ns, "host-b").exists(),
            "{transport}: the refused daemon left its lock"
        );
    }
}

/// 10,000 instances in 20 VPCs on 10 hosts: `vpcd check --full` prints over half a megabyte.
fn big_topology() -> String {
    let mut s = String::from(
        "[[security_group]]\nname = \"sg\"\n\
         egress = [ { action = \"accept\", protocol = \"all\", destination = \"0.0.0.0/0\" } ]\n",
    );
    for h in 0..10 {
        s += &format!(
            "\n[[host]]\nname = \"h{h}\"\naddress = \"192.0.2.{}\"\n",
            h + 1
        );
    }
    for n in 0..10_000u32 {
        let v = n / 500;
        if n % 500 == 0 {
            s += &format!(
                "\n[[vpc]]\nname = \"v{v}\"\ntenant = \"t\"\ncidr = \"10.{v}.0.0/16\"\n\n\
                 [[subnet]]\nname = \"s{v}\"\nvpc = \"v{v}\"\ncidr = \"10.{v}.0.0/20\"\n"
            );
        }
        let k = n % 500;
        s += &format!(
            "\n[[instance]]\nname = \"i{n}\"\nhost = \"h{}\"\nsubnet = \"s{v}\"\nip = \"10.{v}.{}.{}\"\nsecurity_groups = [\"sg\"]\n",
            n % 10,
            1 + k / 200,
            10 + k % 200
        );
    }
    s
}

/// The first line of `cmd`'s output, then the reader goes away (as `| head -1` does): the
/// command neither panics nor complains, and exits with its own status.
fn read_one_line_and_leave(mut cmd: Command) -> (String, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: the rest meets EPIPE.
    let o = child.wait_with_output().unwrap();
    (
        first,
        o.status,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `vpcd check FILE | head`: the summary stops where the reader left, quietly; the check
/// still happens (status 0); with `--full` (half a megabyte, so the pipe fills and the
/// writes surely meet EPIPE) too; and the summary alone fits a screen.
#[test]
fn output_to_a_reader_that_left_ends_quietly() {
    let dir = std::env::temp_dir().join(format!("vpcd-hygiene-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("big.toml");
    std::fs::write(&file, big_topology()).unwrap();

    let o = vpcd(&["check", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.lines().count() <= 60,
        "{} lines:\n{summary}",
        summary.lines().count()
    );
    assert!(
        summary.contains("… 9992 more instances (vpcd check --full)"),
        "{summary}"
    );
    let full = vpcd(&["check", "--full", file.to_str().unwrap()]);
    assert!(full.status.success());
    // Far more than a pipe holds (64 KiB).
    assert!(full.stdout.len() > 512 << 10, "{} bytes", full.stdout.len());

    for args in [vec!["check"], vec!["check", "--full"]] {
        let mut cmd = Command::new(VPCD);
        cmd.args(&args).arg(&file);
        let (first, status, stderr) = read_one_line_and_leave(cmd);
        assert_eq!(first.trim_end(), format!("{}: valid", file.display()));
        assert!(
            status.success(),
            "vpcd {args:?}: {status}; stderr: {stderr}"
        );
        assert!(stderr.is_empty(), "vpcd {args:?} said: {stderr}");
    }
    // Through a shell's pipe, as people write it.
    if let Some(bash) = on_path("bash") {
        let o = Command::new(bash)
            .args([
                "-c",
                r#"set -o pipefail; "$1" check --full "$2" | head -3"#,
                "bash",
                VPCD,
                file.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3);
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vpcd lab check | head -1` and `vpcd lab status | head -1`: no panic, no complaint, the
/// status of the check itself.
#[test]
fn lab_output_to_a_reader_that_left_ends_quietly() {
    let test = "lab_output_to_a_reader_that_left_ends_quietly";
    if !can_run(test, &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("hygpipe", &pair("hp", "gre-udp", 42));
    for args in [
        ["lab", "check", "--name", "hygpipe"],
        ["lab", "status", "--name", "hygpipe"],
    ] {
        let mut cmd = Command::new(VPCD);
        cmd.args(args);
        let (first, status, stderr) = read_one_line_and_leave(cmd);
        assert!(!first.is_empty(), "vpcd {args:?}: no output");
        assert!(
            status.success(),
            "vpcd {args:?}: {status}; stderr: {stderr}\n{}",
            lab.logs()
        );
        assert!(stderr.is_empty(), "vpcd {args:?} said: {stderr}");
    }
}
