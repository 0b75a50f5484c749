//! End-to-end tests of `vpcd lab` itself: a lab that never reports a false result. Labs of
//! one topology side by side, dead and stale daemons, pids that are not the lab's, reloads,
//! root, empty topologies, the hints it prints and the README's `lab exec` examples, each
//! with real daemons and real traffic. Root and iproute2 needed (they skip loudly otherwise).

#[path = "e2e/common.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vpcd::lab::DEFAULT_TOPOLOGY;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn signal(pid: u32, s: Signal) {
    kill(Pid::from_raw(pid as i32), s).unwrap_or_else(|e| panic!("{s} to {pid}: {e}"));
}

fn kill9_and_wait(pid: u32) {
    signal(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(pid), "{pid} survived SIGKILL");
}

const ALICE_WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

/// Two labs of the same topology at once, and `lab demo` beside them: each has its own
/// namespaces (every one prefixed), traffic flows in both, the demo passes, and each comes
/// down without touching the other. Every hint `lab up --name X` prints carries `--name X`.
#[test]
fn two_labs_of_one_topology_run_side_by_side() {
    if !can_run(
        "two_labs_of_one_topology_run_side_by_side",
        &[Tool::Ip, Tool::Ping],
    ) {
        return;
    }
    let first = LabUp::start("sidea", DEFAULT_TOPOLOGY);
    let second = LabUp::start("sideb", DEFAULT_TOPOLOGY);
    for lab in [&first, &second] {
        let prefix = format!("vpcd-{}-", lab.name());
        for i in &lab.topo.instances {
            let ns = lab.ns(&i.name);
            assert!(ns.starts_with(&prefix), "{}: {ns}", i.name);
            assert!(netns_list().contains(&ns), "{ns} missing");
        }
        assert!(lab.ns("internet").starts_with(&prefix));
    }
    // The same addresses in both labs, at the same time.
    for lab in [&first, &second] {
        assert_eq!(ping(&lab.ns("alice-db"), ALICE_WEB, 3), 3, "{}", lab.name());
    }
    let demo = vpcd(&["lab", "demo"]);
    assert!(
        demo.status.success(),
        "lab demo beside two labs: {}",
        text(&demo)
    );
    assert!(stdout(&demo).contains("16 of 16 expectations hold"));
    for lab in [&first, &second] {
        let o = vpcd(&["lab", "check", "--name", lab.name()]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(stdout(&o).contains("16 of 16 expectations hold"));
    }
    // The first comes down; the second still forwards, then comes down too.
    lab_down("sidea");
    assert!(!netns_list().iter().any(|n| n.starts_with("vpcd-sidea-")));
    assert_eq!(
        ping(&second.ns("bob-web"), Ipv4Addr::new(10, 0, 2, 20), 2),
        2
    );
    lab_down("sideb");
    assert!(
        !netns_list()
            .iter()
            .any(|n| n.starts_with("vpcd-sideb-") || n.starts_with("vpcd-demo-"))
    );
    drop((first, second));

    // The hints.
    let o = vpcd(&["lab", "up", "--name", "hints"]);
    let again = vpcd(&["lab", "up", "--name", "hints"]);
    lab_down("hints");
    assert!(o.status.success(), "{}", text(&o));
    assert!(!again.status.success(), "a second up of one lab must fail");
    let all = format!("{}{}", text(&o), text(&again));
    let hints: Vec<&str> = all.split('`').skip(1).step_by(2).collect();
    assert!(hints.len() >= 5, "{all}");
    for h in hints.iter().filter(|h| h.starts_with("vpcd lab")) {
        assert!(
            h.contains("--name hints"),
            "hint `{h}` without --name:\n{all}"
        );
    }
}

/// After kill -9 of a daemon, `lab status` says it is dead, shows none of its (old)
/// counters and exits 1; `lab check` refuses to report anything; `lab list` shows it.
#[test]
fn a_dead_daemon_is_reported() {
    if !can_run("a_dead_daemon_is_reported", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let lab = LabUp::start("dead", DEFAULT_TOPOLOGY);
    assert_eq!(ping(&lab.ns("alice-db"), ALICE_WEB, 2), 2);
    let o = vpcd(&["lab", "status", "--name", "dead"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("host-b: running"), "{}", text(&o));
    let pid = lab.lab.daemon_pid("host-b").expect("host-b's pid");
    kill9_and_wait(pid);

    let o = vpcd(&["lab", "status", "--name", "dead"]);
    assert!(
        !o.status.success(),
        "status after kill -9 exits 0: {}",
        text(&o)
    );
    let out = stdout(&o);
    assert!(
        out.contains(&format!("host-b: DEAD (pid {pid} is gone)")),
        "{out}"
    );
    let host_b = out.split("== host-b").nth(1).expect("host-b's part");
    assert!(!host_b.contains("delivered"), "stale counters shown: {out}");

    let o = vpcd(&["lab", "check", "--name", "dead"]);
    assert!(
        !o.status.success(),
        "check with a dead daemon passes: {}",
        text(&o)
    );
    assert!(!stdout(&o).contains("expectations hold"), "{}", text(&o));
    assert!(!stdout(&o).contains(" ok"), "{}", text(&o));
    assert!(text(&o).contains("host-b: DEAD"), "{}", text(&o));

    let o = vpcd(&["lab", "list"]);
    assert!(!o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    let ours = out.split("dead: ").nth(1).expect("lab dead listed");
    assert!(ours.starts_with("UNHEALTHY"), "{out}");
    assert!(
        ours.contains("host-a: running") && ours.contains("host-b: DEAD"),
        "{out}"
    );
}

/// A stopped daemon (SIGSTOP) is alive but does not answer: stale, exit 1; once it runs
/// again, `lab status` is clean.
#[test]
fn a_stale_daemon_is_reported() {
    if !can_run("a_stale_daemon_is_reported", &[Tool::Ip]) {
        return;
    }
    let lab = LabUp::start("stale", DEFAULT_TOPOLOGY);
    let pid = lab.lab.daemon_pid("host-a").expect("host-a's pid");
    signal(pid, Signal::SIGSTOP);
    let o = vpcd(&["lab", "status", "--name", "stale"]);
    let checked = vpcd(&["lab", "check", "--name", "stale"]);
    signal(pid, Signal::SIGCONT);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("host-a: STALE"), "{}", text(&o));
    assert!(!checked.status.success(), "{}", text(&checked));
    assert!(
        text(&checked).contains("host-a: STALE"),
        "{}",
        text(&checked)
    );
    let o = vpcd(&["lab", "status", "--name", "stale"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("host-a: running"), "{}", text(&o));
}

/// A pid in the journal that is not the lab's daemon (its daemon died, the pid went to
/// another program that even names the lab's directory) is never signalled: the decoy
/// survives `lab status`, `lab check`, `lab list` and `lab reload`, which all say the host is
/// dead, and `lab restart`, which starts the host's daemon again.
#[test]
fn status_never_signals_a_pid_that_is_not_its_daemon() {
    if !can_run(
        "status_never_signals_a_pid_that_is_not_its_daemon",
        &[Tool::Ip],
    ) {
        return;
    }
    let lab = LabUp::start("decoy", DEFAULT_TOPOLOGY);
    let topology = lab.lab.topology_path();
    // `sh` ends on SIGUSR1 or SIGHUP; its command line names the lab's directory.
    let mut decoy = Command::new("sh")
        .args(["-c", "sleep 60", "vpcd"])
        .arg(&topology)
        .spawn()
        .expect("sh");
    let real = lab.lab.daemon_pid("host-b").expect("host-b's pid");
    kill9_and_wait(real);
    // As if the pid had been reused: the journal's last pid of host-b is the decoy's.
    let journal = lab.lab.dir().join("journal");
    let mut j = std::fs::read_to_string(&journal).unwrap();
    j += &format!("pid host-b {}\n", decoy.id());
    std::fs::write(&journal, j).unwrap();
    for cmd in ["status", "check", "list", "reload"] {
        let args: Vec<&str> = match cmd {
            "list" => vec!["lab", "list"],
            _ => vec!["lab", cmd, "--name", "decoy"],
        };
        let o = vpcd(&args);
        assert!(!o.status.success(), "lab {cmd}: {}", text(&o));
        assert!(
            decoy.try_wait().unwrap().is_none(),
            "lab {cmd} signalled the decoy: {}",
            text(&o)
        );
        if cmd != "reload" {
            assert!(text(&o).contains("host-b: DEAD"), "lab {cmd}: {}", text(&o));
        }
    }
    // `lab restart` leaves it alone too, and starts host-b's daemon again.
    let o = vpcd(&["lab", "restart", "--name", "decoy", "host-b"]);
    assert!(o.status.success(), "lab restart: {}", text(&o));
    assert!(
        decoy.try_wait().unwrap().is_none(),
        "lab restart signalled the decoy: {}",
        text(&o)
    );
    let o = vpcd(&["lab", "status", "--name", "decoy"]);
    assert!(o.status.success(), "host-b runs again: {}", text(&o));
    let _ = decoy.kill();
    let _ = decoy.wait();
}

/// `lab reload` reports each host's answer: both reload; a new FILE is put in force and the
/// traffic it admits flows; a FILE every host refuses changes nothing, and the previous
/// topology stays in force; a dead host is reported as not reloaded.
#[test]
fn reload_reports_each_host() {
    if !can_run("reload_reports_each_host", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let lab = LabUp::start("reload", DEFAULT_TOPOLOGY);
    let o = vpcd(&["lab", "reload", "--name", "reload"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    assert!(
        out.contains("host-a: reloaded") && out.contains("host-b: reloaded"),
        "{out}"
    );
    assert!(out.contains("2 of 2 hosts reloaded"), "{out}");

    // sg-admin admits nothing inbound: alice-web cannot ping alice-admin, until it does.
    let admin = Ipv4Addr::new(10, 0, 2, 30);
    assert_eq!(ping(&lab.ns("alice-web"), admin, 1), 0);
    let open = DEFAULT_TOPOLOGY.replace(
        "name = \"sg-admin\"\n",
        "name = \"sg-admin\"\ningress = [ { action = \"accept\", protocol = \"icmp\", source = \"0.0.0.0/0\" } ]\n",
    );
    assert_ne!(open, DEFAULT_TOPOLOGY);
    let file = std::env::temp_dir().join("vpcd-e2e-lab-reload.toml");
    std::fs::write(&file, &open).unwrap();
    let o = vpcd(&["lab", "reload", file.to_str().unwrap(), "--name", "reload"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ping(&lab.ns("alice-web"), admin, 3), 3);
    let in_force = std::fs::read_to_string(lab.lab.topology_path()).unwrap();
    assert!(in_force.contains("vpcd-reload-alice-admin"), "{in_force}");

    // A new MTU: every host refuses it, and the file in force is the one they run.
    std::fs::write(&file, open.replace("mtu = 1500", "mtu = 1400")).unwrap();
    let o = vpcd(&["lab", "reload", file.to_str().unwrap(), "--name", "reload"]);
    assert!(!o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    assert!(
        out.contains("host-a: REFUSED") && out.contains("host-b: REFUSED"),
        "{out}"
    );
    assert!(
        out.contains("the underlay (transport, mtu, instance_mtu, checksum) cannot change"),
        "{out}"
    );
    assert!(out.contains("0 of 2 hosts reloaded"), "{out}");
    assert_eq!(
        std::fs::read_to_string(lab.lab.topology_path()).unwrap(),
        in_force
    );
    assert_eq!(ping(&lab.ns("alice-web"), admin, 2), 2);

    kill9_and_wait(lab.lab.daemon_pid("host-a").expect("host-a's pid"));
    let o = vpcd(&["lab", "reload", "--name", "reload"]);
    assert!(!o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    assert!(
        out.contains("host-a: not reloaded, its daemon is Dead"),
        "{out}"
    );
    assert!(
        out.contains("host-b: reloaded") && out.contains("1 of 2 hosts reloaded"),
        "{out}"
    );
    let _ = std::fs::remove_file(&file);
}

/// Without root, every lab command says so before doing anything: `lab up` makes nothing,
/// `lab down` stops nothing and claims nothing; without `ip` on PATH, `lab exec` says what
/// to install.
#[test]
fn root_and_tools_are_checked_first() {
    if !can_run("root_and_tools_are_checked_first", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let as_nobody = |args: &[&str]| {
        Command::new(VPCD)
            .args(args)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .output()
            .expect("vpcd as nobody")
    };
    let o = as_nobody(&["lab", "up", "--name", "noroot"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("must run as root"), "{}", text(&o));
    assert!(!std::path::Path::new("/run/vpcd-lab/noroot").exists());
    assert!(!netns_list().iter().any(|n| n.starts_with("vpcd-noroot-")));

    let lab = LabUp::start("noroot", DEFAULT_TOPOLOGY);
    let o = as_nobody(&["lab", "down", "--name", "noroot"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("must run as root"), "{}", text(&o));
    assert!(!text(&o).contains("stopped"), "{}", text(&o));
    assert_eq!(
        ping(&lab.ns("alice-db"), ALICE_WEB, 2),
        2,
        "the lab still runs"
    );

    let o = Command::new(VPCD)
        .args(["lab", "exec", "--name", "noroot", "alice-db", "--", "true"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("ip is not on PATH"), "{}", text(&o));
}

/// The README's `lab exec` examples, run exactly as written (`vpcd` being this build) in the
/// default lab: each one's pings all come back.
#[test]
fn the_readme_exec_examples_work() {
    if !can_run("the_readme_exec_examples_work", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let examples: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("vpcd lab exec "))
        .map(|l| l.split(" #").next().unwrap().trim())
        .collect();
    assert_eq!(examples.len(), 2, "{examples:?}");
    let _lab = LabUp::start("lab", DEFAULT_TOPOLOGY);
    for ex in examples {
        let words: Vec<&str> = ex.split_whitespace().collect();
        let o = Command::new(VPCD)
            .args(&words[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{ex}: {}", text(&o));
        assert!(stdout(&o).contains(" 0% packet loss"), "{ex}: {}", text(&o));
    }
}

/// An empty topology is refused, making nothing; a lab without expectations comes up, and
/// `lab check` refuses to report "0 of 0".
#[test]
fn an_empty_topology_is_refused() {
    if !can_run("an_empty_topology_is_refused", &[Tool::Ip, Tool::Ping]) {
        return;
    }
    let file = std::env::temp_dir().join("vpcd-e2e-lab-empty.toml");
    std::fs::write(&file, "# nothing\n").unwrap();
    lab_down("empty");
    let o = vpcd(&["lab", "up", file.to_str().unwrap(), "--name", "empty"]);
    let _ = std::fs::remove_file(&file);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("an empty topology"), "{}", text(&o));
    assert!(!std::path::Path::new("/run/vpcd-lab/empty").exists());
    assert!(!netns_list().iter().any(|n| n.starts_with("vpcd-empty-")));

    let no_expects: String = DEFAULT_TOPOLOGY
        .split("[[expect]]")
        .next()
        .unwrap()
        .to_string();
    let lab = LabUp::start("empty", &no_expects);
    assert!(lab.topo.expects.is_empty());
    assert_eq!(ping(&lab.ns("alice-db"), ALICE_WEB, 2), 2);
    let o = vpcd(&["lab", "check", "--name", "empty"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no [[expect]]"), "{}", text(&o));
    assert!(!text(&o).contains("0 of 0"), "{}", text(&o));
}
