//! The control plane at region scale, against a real etcd on this machine
//! (docs/control-plane.md, "Scale"): a generated region is applied, then N simulated hosts
//! in this process each read their share and follow it with their own watch, and one-rule
//! changes are applied while they follow.
//!
//! ```sh
//! cargo run --release --features vpcd/store --example store-sim -- --instances 10000 --hosts 100
//! ```
//!
//! Starts its own etcd (`/usr/bin/etcd`, free ports on 127.0.0.1, a temporary directory;
//! killed by its pid at the end) unless `--store URL` names one. The simulated hosts share
//! one thread: each reads and compiles its share after the ones before it, so the times from
//! a change to "applied" are an upper bound of what hosts with cores of their own see.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use vpcd::desired::{StoreOpts, plan};
use vpcd::layout::generated::{Shape, region};
use vpcd::store;
use vpcd::topology::Allocations;

struct Args {
    instances: usize,
    hosts: usize,
    changes: usize,
    store: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        instances: 10_000,
        hosts: 100,
        changes: 20,
        store: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--instances" => a.instances = value.parse()?,
            "--hosts" => a.hosts = value.parse()?,
            "--changes" => a.changes = value.parse()?,
            "--store" => a.store = Some(value),
            _ => bail!("unknown flag {flag}: --instances N --hosts N --changes N --store URL"),
        }
    }
    Ok(a)
}

/// A throw-away etcd, killed by its pid when dropped.
struct Etcd(Child, std::path::PathBuf);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_etcd() -> Result<(Etcd, String)> {
    let (client, peer) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("vpcd-sim-{}", std::process::id()));
    let url = format!("http://127.0.0.1:{client}");
    let peer = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "sim", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("sim={peer}")])
        .args([
            "--max-txn-ops",
            "1000000",
            "--max-request-bytes",
            "134217728",
        ])
        .args(["--quota-backend-bytes", "8589934592"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (Debian: apt-get install etcd-server)")?;
    Ok((Etcd(child, dir), url))
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// One apply as `vpcd apply` makes it: read, plan, write. Returns the revision and the
/// time of each step.
async fn apply(o: &StoreOpts, text: &str) -> Result<(i64, [Duration; 3], usize)> {
    let t0 = Instant::now();
    let mut c = store::connect(o).await?;
    let read = store::read(&mut c, 0).await?;
    let t1 = Instant::now();
    let p = plan(
        text,
        "region.toml",
        &Allocations::none(),
        read.stored.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t2 = Instant::now();
    let ops = p.writes.puts.len() + p.writes.deletes.len();
    let revision = store::write(&mut c, &p).await?;
    Ok((revision, [t1 - t0, t2 - t1, t2.elapsed()], ops))
}

/// A simulated host: its share's size and compile time, then what it applies.
struct Host {
    name: String,
    scopes: usize,
    bytes: usize,
    instances: usize,
    compile: Duration,
}

/// Reads and compiles `name`'s share, then follows it, sending `(host, revision, applied
/// at)` for every new state.
async fn host(
    o: StoreOpts,
    name: String,
    done: mpsc::UnboundedSender<(usize, i64, Instant)>,
    id: usize,
) -> Result<Host> {
    let read = store::first_read(&o, &name).await;
    let stored = read.stored.clone().context("no share")?;
    let t0 = Instant::now();
    let topo = stored.topology()?;
    let compile = t0.elapsed();
    let h = Host {
        name: name.clone(),
        scopes: read.scopes.len(),
        bytes: stored.keys.values().map(String::len).sum(),
        instances: topo.instances.len(),
        compile,
    };
    let (tx, mut rx) = mpsc::channel(4);
    tokio::spawn(store::follow(o, name, read.follow_from(), tx));
    tokio::spawn(async move {
        while let Some(s) = rx.recv().await {
            let ok = s.topology().is_ok();
            if ok && done.send((id, s.revision, Instant::now())).is_err() {
                return;
            }
        }
    });
    Ok(h)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn report_hosts(hosts: &[Host], whole: Duration) {
    let mut c: Vec<Duration> = hosts.iter().map(|h| h.compile).collect();
    c.sort();
    let n = hosts.len().max(1);
    let avg = |f: &dyn Fn(&Host) -> usize| hosts.iter().map(f).sum::<usize>() / n;
    println!(
        "per host (of {}): share {} scopes, {} instances, {:.2} MB of items on average; the largest {} instances",
        hosts.len(),
        avg(&|h| h.scopes),
        avg(&|h| h.instances),
        mb(avg(&|h| h.bytes)),
        hosts.iter().map(|h| h.instances).max().unwrap_or(0),
    );
    println!(
        "  compile median {}, p99 {}, max {}; the whole region (as the file mode compiles it on every host): {}",
        ms(percentile(&c, 0.5)),
        ms(percentile(&c, 0.99)),
        ms(percentile(&c, 1.0)),
        ms(whole)
    );
}

/// The text with tenant `k`'s database group admitting `port` instead of 5432.
fn one_rule(text: &str, k: usize, port: u16) -> String {
    let from = format!(
        "name = \"sg-db-{k}\"\ningress = [ {{ action = \"accept\", protocol = \"tcp\", port = \"5432\""
    );
    let to = from.replace("5432", &port.to_string());
    text.replacen(&from, &to, 1)
}

/// `--measure HOST|whole URL`, in a process of its own: the memory a host's share (or the
/// whole region) takes once compiled, as the peak resident memory above the start's.
async fn measure(what: &str, url: &str) -> Result<()> {
    let status = || std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |field: &str| -> usize {
        let s = status();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap_or("");
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let o = StoreOpts {
        url: url.into(),
        ..StoreOpts::default()
    };
    let mut c = store::connect(&o).await?;
    let base = kb("VmRSS:");
    let read = if what == "whole" {
        store::read(&mut c, 0).await?
    } else {
        store::read_share(&c, what, 0).await?
    };
    let stored = read.stored.context("nothing stored")?;
    let topo = stored.topology()?;
    println!(
        "{} {}",
        kb("VmHWM:").saturating_sub(base) * 1024,
        topo.instances.len()
    );
    Ok(())
}

/// Runs [`measure`] in a child process: (bytes, instances).
fn measured(what: &str, url: &str) -> Result<(usize, usize)> {
    let o = Command::new(std::env::current_exe()?)
        .args(["--measure", what, url])
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    let mut it = out.split_whitespace().map(|v| v.parse().unwrap_or(0));
    Ok((it.next().unwrap_or(0), it.next().unwrap_or(0)))
}

fn report_memory(url: &str, hosts: &[Host]) -> Result<()> {
    let mut by_size: Vec<&Host> = hosts.iter().filter(|h| h.name != "h0").collect();
    by_size.sort_by_key(|h| h.instances);
    let typical = by_size.get(by_size.len() / 2).map(|h| h.name.clone());
    let largest = by_size.last().map(|h| h.name.clone());
    let picks = [
        ("typical host", typical),
        ("largest host", largest),
        ("gateway", Some("h0".into())),
        ("whole region", Some("whole".into())),
    ];
    for (label, what) in picks {
        let Some(what) = what else { continue };
        let (bytes, instances) = measured(&what, url)?;
        println!(
            "  memory, {label} ({what}): {:.1} MB for {instances} instances (read + compiled, peak RSS)",
            mb(bytes)
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--measure") && argv.len() == 4 {
        return measure(&argv[2], &argv[3]).await;
    }
    let a = args()?;
    let (_etcd, url) = match &a.store {
        Some(u) => (None, u.clone()),
        None => {
            let (e, u) = start_etcd()?;
            (Some(e), u)
        }
    };
    let o = StoreOpts {
        url,
        ..StoreOpts::default()
    };
    wait_for_store(&o).await?;
    let shape = Shape::new(a.instances, a.hosts);
    let text = region(&shape);
    println!(
        "region: {} tenants, {} instances, {} hosts, {:.1} MB of topology",
        shape.tenants(),
        shape.tenants() * (shape.per_vpc + shape.per_basic),
        a.hosts,
        mb(text.len())
    );
    let (rev, [read, planned, write], ops) = apply(&o, &text).await?;
    println!(
        "first apply: {} (read {}, validate + allocate + cut {}, one txn of {ops} keys {}), revision {rev}",
        ms(read + planned + write),
        ms(read),
        ms(planned),
        ms(write)
    );
    let t0 = Instant::now();
    vpcd::Topology::parse(&text, "region.toml")?;
    let whole = t0.elapsed();
    let (done, mut applied) = mpsc::unbounded_channel();
    let mut hosts = Vec::new();
    for i in 0..a.hosts {
        hosts.push(host(o.clone(), format!("h{i}"), done.clone(), i).await?);
    }
    report_hosts(&hosts, whole);
    report_memory(&o.url, &hosts)?;
    changes(&a, &o, &text, &shape, &mut applied, &hosts).await
}

async fn wait_for_store(o: &StoreOpts) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let up = async { store::read(&mut store::connect(o).await?, 0).await };
        match up.await {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Applies `a.changes` one-rule changes, each to another tenant, and measures how long each
/// affected host took to apply it.
async fn changes(
    a: &Args,
    o: &StoreOpts,
    text: &str,
    shape: &Shape,
    applied: &mut mpsc::UnboundedReceiver<(usize, i64, Instant)>,
    hosts: &[Host],
) -> Result<()> {
    let (mut lat, mut from_start, mut applies) = (Vec::new(), Vec::new(), Vec::new());
    let mut touched = Vec::new();
    let mut current = text.to_string();
    for c in 0..a.changes {
        let k = (c * 37) % shape.tenants();
        let next = one_rule(&current, k, 5433 + (c % 2) as u16);
        let start = Instant::now();
        let (rev, _, _) = apply(o, &next).await?;
        let committed = Instant::now();
        applies.push(committed - start);
        let want = affected(o, rev).await?;
        let mut got: BTreeMap<usize, Instant> = BTreeMap::new();
        while got.len() < want {
            let (id, r, at) = tokio::time::timeout(Duration::from_secs(60), applied.recv())
                .await
                .context("hosts did not apply the change within 60 s")?
                .context("the hosts stopped")?;
            if r >= rev {
                got.entry(id).or_insert(at);
            }
        }
        for at in got.values() {
            lat.push(at.saturating_duration_since(committed));
            from_start.push(at.saturating_duration_since(start));
        }
        touched.push(want);
        current = next;
    }
    summary(
        &mut lat,
        &mut from_start,
        &mut applies,
        &touched,
        hosts.len(),
    );
    Ok(())
}

/// How many hosts' shares the revision `rev` changed (their share key or a scope's mark).
async fn affected(o: &StoreOpts, rev: i64) -> Result<usize> {
    let (states, _) = store::convergence(&store::connect(o).await?).await?;
    Ok(states.iter().filter(|h| h.needs == rev).count())
}

fn summary(
    lat: &mut [Duration],
    from_start: &mut [Duration],
    applies: &mut [Duration],
    touched: &[usize],
    hosts: usize,
) {
    lat.sort();
    from_start.sort();
    applies.sort();
    let avg = touched.iter().sum::<usize>() as f64 / touched.len().max(1) as f64;
    println!(
        "one-rule changes: {}; each reached {avg:.1} of {hosts} hosts (watch events per change); apply median {}, max {}",
        touched.len(),
        ms(percentile(applies, 0.5)),
        ms(percentile(applies, 1.0)),
    );
    println!(
        "  commit -> host applied: median {}, p99 {}, max {} ({} host applies)",
        ms(percentile(lat, 0.5)),
        ms(percentile(lat, 0.99)),
        ms(percentile(lat, 1.0)),
        lat.len()
    );
    println!(
        "  apply started -> host applied: median {}, p99 {}",
        ms(percentile(from_start, 0.5)),
        ms(percentile(from_start, 0.99)),
    );
}
