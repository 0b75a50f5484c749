//! `vpcd apply` and `vpcd get` against a real etcd (Debian's etcd-server), started here on
//! 127.0.0.1 with free ports and a temporary data directory, and killed by its pid when the
//! test ends (also on a panic). Without etcd the tests skip (and fail under
//! `VPCD_REQUIRE_E2E=1`, as the end-to-end tests do).

#![cfg(feature = "store")]

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vpcd::Topology;
use vpcd::desired::{StoreOpts, plan};
use vpcd::topology::Allocations;

const VPCD: &str = env!("CARGO_BIN_EXE_vpcd");
const LAB: &str = include_str!("../../../examples/lab.toml");
/// A VPC without a written key (its key is derived) and a basic-network instance.
const CAROL: &str = "\n[[vpc]]\nname = \"vpc-carol\"\ntenant = \"carol\"\ncidr = \"10.9.0.0/16\"\n\n[[instance]]\nname = \"carol-classic\"\nhost = \"host-b\"\nnetwork = \"basic\"\ntenant = \"carol\"\nsecurity_groups = [\"sg-classic\"]\n";

/// A running etcd; killed by its pid, and its directory removed, when dropped.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
    /// What `vpcd apply` and `vpcd get` add to reach it (https: the CA and a client's pair).
    flags: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

/// Starts etcd, or skips (`None`) when it is not installed.
fn etcd(test: &str) -> Option<Etcd> {
    etcd_with(test, "http", &[], Vec::new())
}

/// [`etcd`] with `scheme` for its clients, `extra` arguments, and the `flags` that its
/// clients need.
fn etcd_with(test: &str, scheme: &str, extra: &[String], flags: Vec<String>) -> Option<Etcd> {
    if which("etcd").is_none() {
        skip(test, "etcd is not installed", "apt-get install etcd-server");
        return None;
    }
    let (client, peer) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("vpcd-etcd-{}-{client}", std::process::id()));
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(which("etcd").unwrap_or_else(|| "/usr/bin/etcd".into()))
        .args(["--name", "vpcd-test", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("vpcd-test={peer_url}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd starts");
    let e = Etcd {
        child,
        dir,
        url,
        flags,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not listen on {client}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Listening is not yet serving: wait for a read to answer.
    while !get(&e, &[]).status.success()
        && !String::from_utf8_lossy(&get(&e, &[]).stderr).contains("no state")
    {
        assert!(Instant::now() < deadline, "etcd did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(e)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// As tests/e2e/common.rs `skip`: say so and record it, or fail under VPCD_REQUIRE_E2E=1.
fn skip(test: &str, reason: &str, install: &str) {
    if std::env::var("VPCD_REQUIRE_E2E").is_ok_and(|v| v == "1") {
        panic!("VPCD_REQUIRE_E2E=1, but `{test}` cannot run: {reason}; {install}");
    }
    eprintln!("\n!!!!!!!! SKIPPED test `{test}`: {reason}; {install} !!!!!!!!\n");
    let skips = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vpcd-skips.txt");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skips)
        .and_then(|mut f| f.write_all(format!("{test}: {reason}\n").as_bytes()));
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vpcd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch directory");
        Scratch(d)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vpcd(args: &[&str]) -> Output {
    Command::new(VPCD)
        .args(args)
        .env_remove("VPCD_STORE")
        .output()
        .expect("vpcd runs")
}

fn apply(e: &Etcd, file: &Path, extra: &[&str]) -> Output {
    let f = file.to_str().expect("utf-8 path");
    let mut args = vec!["apply", f, "--store", &e.url];
    args.extend(e.flags.iter().map(String::as_str));
    args.extend_from_slice(extra);
    vpcd(&args)
}

fn get(e: &Etcd, extra: &[&str]) -> Output {
    let mut args = vec!["get", "--store", &e.url];
    args.extend(e.flags.iter().map(String::as_str));
    args.extend_from_slice(extra);
    vpcd(&args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The store's state: (revision, topology text, allocations text).
fn state(e: &Etcd) -> (i64, String, String) {
    let o = get(e, &["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    (
        v["revision"].as_i64().expect("revision"),
        v["topology"].as_str().expect("topology").to_string(),
        v["allocations"].as_str().expect("allocations").to_string(),
    )
}

#[test]
fn apply_then_get_round_trips_and_check_accepts_it() {
    let Some(e) = etcd("apply_then_get_round_trips_and_check_accepts_it") else {
        return;
    };
    let s = Scratch::new("round-trip");
    let file = s.file("lab.toml", LAB);
    let started = Instant::now();
    let o = apply(&e, &file, &[]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("apply of examples/lab.toml: {took:?}");
    assert!(text(&o).contains("applied: revision"), "{}", text(&o));
    let (revision, topology, allocations) = state(&e);
    // The items as written, grouped by kind (the store keeps items, not the file's order).
    assert!(
        vpcd::desired::item_changes(LAB, &topology).is_empty(),
        "{topology}"
    );
    for line in LAB.lines() {
        assert!(topology.contains(line), "{line:?} missing from {topology}");
    }
    let lock = Allocations::parse(&allocations, "store").expect("stored allocations parse");
    assert!(!lock.is_empty(), "the lab's basic instances got addresses");
    // `get --out` writes the file and its lock: `check --locked` finds nothing to record.
    let out = s.0.join("got.toml");
    let o = get(&e, &["--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = vpcd(&["check", "--locked", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // Plain `get`: a topology file `vpcd check` accepts, with the allocations in it.
    let o = get(&e, &[]);
    let printed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        printed.contains(&format!("revision {revision}")),
        "{printed}"
    );
    assert!(printed.contains("#| [[basic]]"), "{printed}");
    let printed = s.file("printed.toml", &printed);
    let o = vpcd(&["check", printed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // Applying the same file again changes nothing.
    let o = apply(&e, &file, &[]);
    assert!(text(&o).contains("up to date"), "{}", text(&o));
    assert_eq!(state(&e).0, revision);
}

#[test]
fn allocations_never_move_when_another_item_changes() {
    let Some(e) = etcd("allocations_never_move_when_another_item_changes") else {
        return;
    };
    let s = Scratch::new("stable");
    let first = format!("{LAB}{CAROL}");
    let file = s.file("lab.toml", &first);
    assert!(apply(&e, &file, &[]).status.success());
    let (rev1, _, alloc1) = state(&e);
    let load = |text: &str, alloc: &str| {
        Topology::parse_locked(text, "t", &Allocations::parse(alloc, "a").unwrap()).unwrap()
    };
    let t1 = load(&first, &alloc1);
    // A new basic instance listed before carol's (a fresh allocation would give it carol's
    // address) and an unrelated change (a VPC goes).
    let second = format!("{LAB}{CAROL}")
        .replace(
            "[[instance]]\nname = \"carol-classic\"",
            "[[instance]]\nname = \"dave-classic\"\nhost = \"host-a\"\nnetwork = \"basic\"\ntenant = \"dave\"\nsecurity_groups = [\"sg-classic\"]\n\n[[instance]]\nname = \"carol-classic\"",
        );
    let file = s.file("lab.toml", &second);
    let o = apply(&e, &file, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("+ instance \"dave-classic\""),
        "{}",
        text(&o)
    );
    let (rev2, _, alloc2) = state(&e);
    assert!(rev2 > rev1);
    let (a1, a2) = (
        Allocations::parse(&alloc1, "a").unwrap(),
        Allocations::parse(&alloc2, "a").unwrap(),
    );
    assert_eq!(a1.basic["carol-classic"], a2.basic["carol-classic"]);
    assert_ne!(
        a2.basic["dave-classic"].address,
        a1.basic["carol-classic"].address
    );
    let t2 = load(&second, &alloc2);
    let key = |t: &Topology| t.vpcs.iter().find(|v| v.name == "vpc-carol").unwrap().key;
    assert_eq!(key(&t1), key(&t2));
}

#[test]
fn a_stale_apply_loses_and_writes_nothing() {
    let Some(e) = etcd("a_stale_apply_loses_and_writes_nothing") else {
        return;
    };
    let s = Scratch::new("stale");
    let file = s.file("lab.toml", LAB);
    assert!(apply(&e, &file, &[]).status.success());
    let o = StoreOpts {
        url: e.url.clone(),
        ..StoreOpts::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // This apply reads, then another one writes first.
    let mut c = rt.block_on(vpcd::store::connect(&o)).unwrap();
    let read = rt.block_on(vpcd::store::read(&mut c, 0)).unwrap();
    let mine = format!("{LAB}{CAROL}");
    let p = plan(
        &mine,
        "mine.toml",
        &Allocations::none(),
        read.stored.as_ref(),
    )
    .unwrap();
    let theirs = s.file(
        "theirs.toml",
        &LAB.replace("key = 2002", "key = 2002\n# theirs"),
    );
    assert!(apply(&e, &theirs, &[]).status.success());
    let before = state(&e);
    let err = rt.block_on(vpcd::store::write(&mut c, &p)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("another apply won; nothing was written"),
        "{msg}"
    );
    assert!(msg.contains(&format!("revision {}", p.base)), "{msg}");
    assert_eq!(state(&e), before);
}

#[test]
fn a_refused_change_is_the_reload_error_and_writes_nothing() {
    let Some(e) = etcd("a_refused_change_is_the_reload_error_and_writes_nothing") else {
        return;
    };
    let s = Scratch::new("refused");
    let file = s.file("lab.toml", LAB);
    assert!(apply(&e, &file, &[]).status.success());
    let before = state(&e);
    let moved = s.file("lab.toml", &LAB.replace("192.0.2.2", "192.0.2.99"));
    let o = apply(&e, &moved, &[]);
    assert!(!o.status.success());
    let old = Topology::parse(LAB, "t").unwrap();
    let new = Topology::parse(&LAB.replace("192.0.2.2", "192.0.2.99"), "t").unwrap();
    let refusals = vpcd::topology::live_refusals(&old, &new);
    assert!(!refusals.is_empty());
    for r in &refusals {
        assert!(text(&o).contains(r.as_str()), "{} lacks {r}", text(&o));
    }
    assert_eq!(state(&e), before);
    // An invalid file: `vpcd check`'s errors, word for word.
    let bad = s.file("bad.toml", &format!("{LAB}\n[[vpc]]\nname = \"vpc-bob\"\n"));
    let o = apply(&e, &bad, &[]);
    let check = vpcd(&["check", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(state(&e), before);
}

#[test]
fn a_dry_run_lists_the_changes_and_writes_nothing() {
    let Some(e) = etcd("a_dry_run_lists_the_changes_and_writes_nothing") else {
        return;
    };
    let s = Scratch::new("dry-run");
    let file = s.file("lab.toml", LAB);
    let o = apply(&e, &file, &["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing written"), "{}", text(&o));
    assert!(text(&o).contains("+ host \"host-a\""), "{}", text(&o));
    assert!(!get(&e, &[]).status.success(), "the store stays empty");
    assert!(apply(&e, &file, &[]).status.success());
    let before = state(&e);
    let file = s.file("lab.toml", &format!("{LAB}{CAROL}"));
    let o = apply(&e, &file, &["--dry-run"]);
    let out = text(&o);
    assert!(out.contains("+ vpc \"vpc-carol\""), "{out}");
    assert!(out.contains("+ instance \"carol-classic\""), "{out}");
    assert!(
        out.contains("+ allocation: basic instance carol-classic"),
        "{out}"
    );
    assert_eq!(state(&e), before);
}

#[test]
fn a_follower_reads_the_whole_state_after_compaction_then_watches() {
    let Some(e) = etcd("a_follower_reads_the_whole_state_after_compaction_then_watches") else {
        return;
    };
    let s = Scratch::new("follow");
    let file = s.file("lab.toml", LAB);
    assert!(apply(&e, &file, &[]).status.success());
    let first = state(&e).0;
    for extra in [CAROL, "\n# a comment\n"] {
        let file = s.file("lab.toml", &format!("{LAB}{extra}"));
        assert!(apply(&e, &file, &[]).status.success());
    }
    let latest = state(&e).0;
    let o = StoreOpts {
        url: e.url.clone(),
        ..StoreOpts::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt.block_on(vpcd::store::connect(&o)).unwrap();
    // host-b's share as its daemon read it at `first`.
    let at_first = rt
        .block_on(vpcd::store::read_share(&c, "host-b", first))
        .unwrap();
    assert_eq!(at_first.stored.as_ref().map(|s| s.revision), Some(first));
    rt.block_on(c.compact(latest, None)).expect("compaction");
    // A daemon that applied `first` and was away while the history was compacted.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let from = at_first.follow_from();
    rt.spawn(vpcd::store::follow(o, "host-b".into(), from, tx));
    let next = |rx: &mut tokio::sync::mpsc::Receiver<vpcd::desired::Stored>| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.recv()).await })
            .expect("a state within 10 s")
            .expect("the follower runs")
    };
    // The latest apply removed carol-classic, of host-b's share: the follower reads it.
    let got = next(&mut rx);
    assert_eq!(got.revision, latest);
    assert!(!got.topology.contains("carol-classic"));
    assert!(got.topology.contains("alice-db"), "host-b runs alice-db");
    // Then it watches: the next apply arrives, once.
    let file = s.file("lab.toml", &format!("{LAB}{CAROL}"));
    assert!(apply(&e, &file, &[]).status.success());
    let got = next(&mut rx);
    assert_eq!(got.revision, state(&e).0);
    // carol-classic runs on host-b; vpc-carol has no instance, so no host's share holds it.
    assert!(got.topology.contains("carol-classic"));
    assert!(!got.topology.contains("vpc-carol"));
    assert!(got.topology().is_ok());
}

#[test]
fn credentials_come_from_the_flag_and_the_environment() {
    let Some(e) = etcd("credentials_come_from_the_flag_and_the_environment") else {
        return;
    };
    let etcdctl = |args: &[&str]| {
        let o = Command::new(which("etcdctl").unwrap_or_else(|| "/usr/bin/etcdctl".into()))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &e.url])
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(o.status.success(), "etcdctl {args:?}: {}", text(&o));
    };
    etcdctl(&["user", "add", "root:s3cret"]);
    etcdctl(&["user", "grant-role", "root", "root"]);
    etcdctl(&["auth", "enable"]);
    let s = Scratch::new("auth");
    let file = s.file("lab.toml", LAB);
    let f = file.to_str().unwrap();
    let o = vpcd(&["apply", f, "--store", &e.url]);
    assert!(!o.status.success(), "no credentials: refused");
    assert!(text(&o).contains("vpcd apply: "), "{}", text(&o));
    let with = |password: &str, args: &[&str]| {
        Command::new(VPCD)
            .args(args)
            .env_remove("VPCD_STORE")
            .env("VPCD_STORE_USER", "root")
            .env("VPCD_STORE_PASSWORD", password)
            .output()
            .expect("vpcd runs")
    };
    assert!(
        !with("wrong", &["apply", f, "--store", &e.url])
            .status
            .success()
    );
    let o = with("s3cret", &["apply", f, "--store", &e.url]);
    assert!(o.status.success(), "{}", text(&o));
    // The flag names the user as well as the environment does.
    let o = Command::new(VPCD)
        .args(["get", "--json", "--store", &e.url, "--store-user", "root"])
        .env("VPCD_STORE_PASSWORD", "s3cret")
        .output()
        .expect("vpcd runs");
    assert!(o.status.success(), "{}", text(&o));
    // And the address from $VPCD_STORE.
    let o = Command::new(VPCD)
        .args(["get", "--json"])
        .env("VPCD_STORE", &e.url)
        .env("VPCD_STORE_USER", "root")
        .env("VPCD_STORE_PASSWORD", "s3cret")
        .output()
        .expect("vpcd runs");
    assert!(o.status.success(), "{}", text(&o));
}

/// A CA, and a server and a client certificate it signed (for 127.0.0.1), made by openssl.
fn certificates(dir: &Path) -> bool {
    let sh = format!(
        "set -e; cd {}\n\
         openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=vpcd-test-ca -keyout ca.key -out ca.pem\n\
         for who in server client; do\n\
           openssl req -newkey rsa:2048 -nodes -subj /CN=$who -keyout $who.key -out $who.csr\n\
           printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > $who.ext\n\
           openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile $who.ext -out $who.pem\n\
         done",
        dir.display()
    );
    let o = Command::new("sh").args(["-c", &sh]).output();
    o.is_ok_and(|o| o.status.success())
}

#[test]
fn https_with_a_client_certificate() {
    let test = "https_with_a_client_certificate";
    if which("openssl").is_none() {
        skip(test, "openssl is not installed", "apt-get install openssl");
        return;
    }
    let certs = Scratch::new("tls");
    assert!(certificates(&certs.0), "openssl made the certificates");
    let p = |name: &str| certs.0.join(name).display().to_string();
    let server = [
        "--cert-file",
        &p("server.pem"),
        "--key-file",
        &p("server.key"),
        "--trusted-ca-file",
        &p("ca.pem"),
        "--client-cert-auth",
    ]
    .map(String::from);
    let client = [
        "--store-ca",
        &p("ca.pem"),
        "--store-cert",
        &p("client.pem"),
        "--store-key",
        &p("client.key"),
    ]
    .map(String::from);
    let Some(e) = etcd_with(test, "https", &server, client.to_vec()) else {
        return;
    };
    let s = Scratch::new("tls-apply");
    let file = s.file("lab.toml", LAB);
    let o = apply(&e, &file, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(vpcd::desired::item_changes(LAB, &state(&e).1).is_empty());
    // Without the client's certificate the store refuses.
    let o = vpcd(&["get", "--store", &e.url, "--store-ca", &p("ca.pem")]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = vpcd(&[
        "get",
        "--store",
        &e.url,
        "--store-ca",
        &p("ca.pem"),
        "--store-cert",
        &p("client.pem"),
    ]);
    assert!(
        text(&o).contains("--store-cert and --store-key go together"),
        "{}",
        text(&o)
    );
}
