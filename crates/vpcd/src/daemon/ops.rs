//! The daemon's operator surface: the control socket's answers (`vpcd ctl`), the counters
//! summed over the workers, and the Prometheus endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::info;

use super::flows::{self, FlowsAnswer};
use super::tap::{self, Point, Tap};
use super::worker::{Msg, TraceAsk};
use super::{Daemon, Totals};
use crate::control::{self, Reply, Request};
use crate::metrics;
use crate::pipeline::{self, trace::Hop};
use crate::topology::{HostId, Topology, Transport};
use crate::trace::{self, TraceArgs};
use crate::{Ingress, Timestamp};
use vpcd_core::policy::balance::{BackendName, HEALTH_SOURCE, backend_names};

/// A request from the control socket with the way back to its client.
pub(super) type Asked = (Request, crossbeam_channel::Sender<Reply>);

/// What `status` reports beyond the topology.
pub(super) struct Status {
    started: Instant,
    /// 1 at start, one more for each reload that took effect.
    generation: u64,
    /// A hash of the topology text in force (FNV-1a 64, hex).
    topology_hash: String,
    last_reload: Option<(Instant, Result<(), String>)>,
    /// With `--store`: the store revision in force.
    store_revision: Option<i64>,
}

impl Status {
    pub(super) fn new(text: &str, store_revision: Option<i64>) -> Status {
        Status {
            started: Instant::now(),
            generation: 1,
            topology_hash: fnv64(text),
            last_reload: None,
            store_revision,
        }
    }

    /// Records a reload's result; `text` is the topology as it is now, `store_revision` the
    /// store revision it came from.
    pub(super) fn reloaded(
        &mut self,
        result: &Result<(), String>,
        text: &str,
        store_revision: Option<i64>,
    ) {
        if result.is_ok() {
            self.generation += 1;
            self.topology_hash = fnv64(text);
            self.store_revision = store_revision.or(self.store_revision);
        }
        self.last_reload = Some((Instant::now(), result.clone()));
    }
}

/// The topology file's text, for its hash ("" when unreadable: the load says why).
pub(super) fn topo_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn fnv64(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

impl Totals {
    fn prometheus(&self, t: &Topology, host: HostId, name: &str, board: &[BoardRow]) -> String {
        let mut tx = metrics::Family {
            name: "vpcd_tx_errors_total",
            help: "Writes that failed, by port (an instance's device, the internet device, the underlay).",
            kind: metrics::Kind::Counter,
            samples: vec![(
                vec![("port", "underlay".to_string())],
                self.tx_errors.underlay,
            )],
        };
        if t.internet.is_some() {
            tx.samples.push((
                vec![("port", "internet".to_string())],
                self.tx_errors.internet,
            ));
        }
        for id in t.instances_on(host) {
            let n = self
                .tx_errors
                .instances
                .get(id.index())
                .copied()
                .unwrap_or(0);
            tx.samples
                .push((vec![("port", t.instance(id).name.clone())], n));
        }
        let snapshot = metrics::Snapshot {
            topology: t,
            host,
            counters: &self.counters,
            conntrack: self.conntrack,
            connections: self.connections,
        };
        let mut families = metrics::families(&snapshot);
        families.push(metrics::Family {
            name: "vpcd_handoff_waits_total",
            help: "Hand-offs that found the owning worker's inbox full and waited for room (nothing is dropped).",
            kind: metrics::Kind::Counter,
            samples: vec![(Vec::new(), self.handoff_waits)],
        });
        families.push(metrics::Family {
            name: "vpcd_handoff_packets_total",
            help: "Packets a worker handed to the worker owning their flow.",
            kind: metrics::Kind::Counter,
            samples: vec![(Vec::new(), self.handoffs)],
        });
        families.extend(metrics::underlay(&self.underlay));
        families.push(tx);
        families.extend(self.balancer_families(board));
        metrics::render(name, &families)
    }

    /// The load balancers' metrics: each backend's health and open sessions here, and the
    /// sessions this host holds.
    fn balancer_families(&self, board: &[BoardRow]) -> Vec<metrics::Family> {
        let labels = |r: &BoardRow| {
            vec![
                ("load_balancer", r.name.lb.clone()),
                (
                    "listener",
                    format!("{} {}", r.name.protocol.word(), r.name.port),
                ),
                (
                    "backend",
                    format!("{}:{}", r.name.instance, r.name.backend_port),
                ),
            ]
        };
        let healthy = metrics::Family {
            name: "vpcd_lb_backend_healthy",
            help: "1 when a load balancer's backend is healthy (its checks, or its host's reports, say so), else 0.",
            kind: metrics::Kind::Gauge,
            samples: board
                .iter()
                .map(|r| (labels(r), u64::from(r.healthy)))
                .collect(),
        };
        let open = metrics::Family {
            name: "vpcd_lb_backend_open_sessions",
            help: "Open load-balanced connections of this host's clients to a backend (what weighted least connections counts).",
            kind: metrics::Kind::Gauge,
            samples: board
                .iter()
                .map(|r| (labels(r), u64::from(r.open)))
                .collect(),
        };
        let sessions = metrics::Family {
            name: "vpcd_lb_sessions",
            help: "Load-balancing sessions this host holds (its clients' connections to VIPs).",
            kind: metrics::Kind::Gauge,
            samples: vec![(Vec::new(), self.lb_sessions as u64)],
        };
        vec![healthy, open, sessions]
    }
}

/// One backend as `vpcd ctl health` and the metrics show it.
pub(super) struct BoardRow {
    name: BackendName,
    healthy: bool,
    /// The host whose checks (or reports) say so; `None`: not checked yet.
    checked_by: Option<String>,
    last_error: Option<String>,
    /// This host's clients' open sessions to it.
    open: u32,
}

impl Daemon {
    /// Every backend of the topology, with what the health board says of it.
    pub(super) fn board_rows(&self, totals: &Totals) -> Vec<BoardRow> {
        let t = &self.topo;
        let board = self
            .health
            .as_ref()
            .map(|h| h.board.lock().unwrap().clone());
        backend_names(t)
            .into_iter()
            .map(|(lb, li, bi, name)| {
                let b = t.lb(lb).listeners[li].backends[bi];
                let open = (totals.lb_open)
                    .get(&(t.instance(b.instance).ip, b.port))
                    .copied()
                    .unwrap_or(0);
                let e = board.as_ref().and_then(|m| m.get(&name));
                BoardRow {
                    healthy: e.is_none_or(|e| e.state.healthy),
                    checked_by: e.map(|e| e.checked_by.clone()),
                    last_error: e.and_then(|e| e.last_error.clone()),
                    open,
                    name,
                }
            })
            .collect()
    }

    /// `vpcd ctl health`.
    fn health_reply(&self) -> Reply {
        let totals = self.collect(Msg::Tick);
        let rows = self.board_rows(&totals);
        let mut text = format!(
            "{:<16} {:<10} {:<22} {:<10} {:<12} {:>5}  LAST ERROR\n",
            "LOAD BALANCER", "LISTENER", "BACKEND", "HEALTH", "CHECKED BY", "OPEN"
        );
        let mut list = Vec::new();
        for r in &rows {
            let listener = format!("{} {}", r.name.protocol.word(), r.name.port);
            let backend = format!("{}:{}", r.name.instance, r.name.backend_port);
            let health = if r.healthy { "healthy" } else { "unhealthy" };
            let by = r.checked_by.clone().unwrap_or_else(|| "-".into());
            let err = r.last_error.clone().unwrap_or_else(|| "-".into());
            text.push_str(&format!(
                "{:<16} {listener:<10} {backend:<22} {health:<10} {by:<12} {:>5}  {err}\n",
                r.name.lb, r.open
            ));
            list.push(json!({
                "load_balancer": r.name.lb, "listener": listener, "backend": backend,
                "healthy": r.healthy, "checked_by": r.checked_by, "last_error": r.last_error,
                "open_sessions": r.open,
            }));
        }
        text.push_str(&format!(
            "health checks come from {} (admit it on the backend ports); {} sessions here\n",
            HEALTH_SOURCE, totals.lb_sessions
        ));
        Reply::ok(
            text,
            json!({"backends": list, "sessions": totals.lb_sessions}),
        )
    }
}

/// The servers that feed the control loop; they stop when dropped.
pub(super) struct Servers {
    _control: control::Server,
}

impl Daemon {
    /// Opens the control socket and, if asked, the metrics endpoint; their requests arrive on
    /// the returned channel, to be answered by the control loop.
    pub(super) fn open_control(&self) -> Result<(mpsc::Receiver<Asked>, Servers)> {
        let (tx, rx) = mpsc::channel::<Asked>(16);
        let path = self
            .opts
            .control
            .clone()
            .unwrap_or_else(|| control::default_path(&self.opts.host));
        let ask = tx.clone();
        let server = control::serve(&path, move |request| relay(&ask, request))
            .with_context(|| format!("control socket {}", path.display()))?;
        info!(path = %path.display(), "control socket");
        if let Some(addr) = self.opts.metrics {
            let scrape = move || relay(&tx, Request::Stats { prometheus: true }).text;
            let bound = metrics::serve(addr, std::sync::Arc::new(scrape))
                .with_context(|| format!("metrics on {addr}"))?;
            info!(%bound, "metrics");
        }
        Ok((rx, Servers { _control: server }))
    }

    /// Answers one control request on `back`: at once, or (a capture) when it is over, from
    /// the capture's writer thread, so that the control loop goes on meanwhile.
    pub(super) fn answer(&mut self, request: Request, back: crossbeam_channel::Sender<Reply>) {
        let reply = match request {
            Request::Capture {
                point,
                file,
                count,
                seconds,
            } => {
                let limits = (count, control::capture_seconds(seconds));
                match self.capture(&point, file, limits, back.clone()) {
                    Ok(()) => return,
                    Err(e) => Reply::error(format!("capture: {e:#}")),
                }
            }
            other => self.answer_now(other),
        };
        let _ = back.send(reply);
    }

    /// Answers a request that is answered at once.
    fn answer_now(&mut self, request: Request) -> Reply {
        match request {
            Request::Status {} => self.status_reply(),
            Request::Reload {} => match self.reload() {
                Ok(()) => Reply::ok(
                    format!("reloaded: generation {}", self.status.generation),
                    json!({"generation": self.status.generation}),
                ),
                Err(e) => Reply::error(format!("reload refused, the running topology stays:\n{e}")),
            },
            Request::Stats { prometheus } => {
                let totals = self.collect(Msg::Tick);
                if prometheus {
                    Reply::ok(
                        totals.prometheus(
                            &self.topo,
                            self.host,
                            &self.opts.host,
                            &self.board_rows(&totals),
                        ),
                        json!(null),
                    )
                } else {
                    let text = totals.text(&self.topo, self.host, &self.opts.host, self.stats_seq);
                    let map = super::parse_stats(&text);
                    Reply::ok(text, json!(map))
                }
            }
            Request::ClearCounters {} => {
                let totals = self.collect(Msg::ClearCounters);
                self.write_stats(&totals);
                Reply::ok("counters cleared", json!(null))
            }
            Request::Flows { instance, flush } => self.flows_reply(instance, flush),
            Request::Health {} => self.health_reply(),
            Request::Trace(args) => self.trace_reply(&args),
            Request::Capture { .. } => Reply::error("capture: answered by its writer"),
        }
    }

    /// `vpcd ctl trace`: this host's part with the live tables of the worker that owns the
    /// flow, the other hosts' with empty ones.
    fn trace_reply(&self, args: &TraceArgs) -> Reply {
        let t = self.topo.clone();
        let probe = match args.probe(&t) {
            Ok(p) => p,
            Err(e) => return Reply::error(e),
        };
        let first = self.hop(probe.host, &probe.packet, probe.from);
        let tr = pipeline::trace::follow(first, |n| self.hop(n.host, &n.packet, n.from));
        Reply::ok(trace::text(&t, &tr), trace::json(&t, &tr))
    }

    /// One host's part of a trace: live on this host (if its worker answers), else fresh.
    fn hop(&self, host: HostId, packet: &[u8], from: Ingress) -> Hop {
        let now = Timestamp::from_millis(0);
        if host != self.host {
            return trace::fresh(&self.topo, host, packet, from, now);
        }
        let ask = |reply| {
            Msg::Trace(TraceAsk {
                packet: packet.to_vec(),
                from,
                reply,
            })
        };
        let owner = self.ask_workers(ask).into_iter().flatten().next();
        owner.unwrap_or_else(|| trace::fresh(&self.topo, host, packet, from, now))
    }

    /// `vpcd ctl flows`: every worker's connections (of one instance of this host, or all),
    /// or (`flush`) how many they removed.
    fn flows_reply(&self, instance: Option<String>, flush: bool) -> Reply {
        if let Some(name) = &instance {
            let here = self.topo.instance_named(name);
            if here.is_none_or(|id| self.topo.instance(id).host != self.host) {
                return Reply::error(format!("no instance \"{name}\" on this host"));
            }
        }
        let answers = self.ask_workers(|reply| Msg::Flows {
            instance: instance.clone(),
            flush,
            reply,
        });
        if answers.len() < self.workers() {
            return Reply::error("a worker did not answer within 500 ms");
        }
        let (mut rows, mut flushed) = (Vec::new(), 0);
        for answer in answers {
            match answer {
                FlowsAnswer::Listed(r) => rows.extend(r),
                FlowsAnswer::Flushed(n) => flushed += n,
            }
        }
        if flush {
            let text = format!("flushed {flushed} connection{}", plural(flushed));
            return Reply::ok(text, json!({"flushed": flushed}));
        }
        rows.sort_by_key(|r| {
            (
                r["instance"].to_string(),
                r["src"].to_string(),
                r["sport"].as_u64(),
            )
        });
        Reply::ok(flows::text(&rows), json!({"flows": rows}))
    }

    fn status_reply(&self) -> Reply {
        let s = &self.status;
        let workers = self.workers();
        let uptime = s.started.elapsed().as_secs();
        let last = match &s.last_reload {
            None => "none".to_string(),
            Some((at, Ok(()))) => format!("ok, {} s ago", at.elapsed().as_secs()),
            Some((at, Err(e))) => format!("refused, {} s ago: {e}", at.elapsed().as_secs()),
        };
        let capture = self
            .capturing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let store = s
            .store_revision
            .map_or(String::new(), |r| format!("store revision {r}\n"));
        let text = format!(
            "host {}\ngeneration {}\ntopology {} ({})\n{store}uptime {uptime} s\nworkers {workers}\nlast reload {last}\ncapture {}\n",
            self.opts.host,
            s.generation,
            self.opts.source.name(),
            s.topology_hash,
            capture.as_deref().unwrap_or("none"),
        );
        let data = json!({
            "host": self.opts.host,
            "generation": s.generation,
            "topology": self.opts.source.name(),
            "store_revision": s.store_revision,
            "topology_hash": s.topology_hash,
            "uptime_s": uptime,
            "workers": workers,
            "capture": capture,
            "last_reload": s.last_reload.as_ref().map(|(at, r)| json!({
                "ok": r.is_ok(),
                "error": r.as_ref().err(),
                "seconds_ago": at.elapsed().as_secs(),
            })),
        });
        Reply::ok(text, data)
    }
}

impl Daemon {
    /// Starts capturing `point` into `file` for at most (count, seconds): taps in every
    /// worker, and a writer thread that answers on `back` when the capture is over. One
    /// capture at a time; an error (nothing started) when it cannot start.
    fn capture(
        &mut self,
        point: &str,
        file: PathBuf,
        (count, seconds): (Option<u64>, u64),
        back: crossbeam_channel::Sender<Reply>,
    ) -> Result<()> {
        let point = self.capture_point(point)?;
        if !file.is_absolute() {
            bail!("{}: the file must be an absolute path", file.display());
        }
        let lanes = self.lanes.clone().ok_or_else(|| anyhow!("no workers"))?;
        let mut busy = self.capturing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = &*busy {
            bail!("a capture of {other} is running on this daemon: one at a time");
        }
        let opened = std::fs::File::create(&file).with_context(|| file.display().to_string())?;
        *busy = Some(point.name().to_string());
        drop(busy);
        let (tx, rx) = crossbeam_channel::bounded(tap::QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let udp = self.topo.underlay.transport == Transport::GreUdp;
        let address = self.topo.host(self.host).address;
        let tap = Tap::new(point.clone(), address, udp, tx, lost.clone());
        let c = tap::Capture {
            point,
            file: opened,
            path: file,
            count,
            duration: Duration::from_secs(seconds),
            host: self.opts.host.clone(),
        };
        for lane in lanes.iter() {
            lane.send_blocking(Msg::Capture(Some(tap.clone())));
        }
        info!(point = c.point.name(), file = %c.path.display(), "capture started");
        let busy = self.capturing.clone();
        let spawned = std::thread::Builder::new()
            .name("vpcd-capture".into())
            .spawn(move || {
                let (name, path) = (c.point.name().to_string(), c.path.clone());
                let outcome = tap::write(c, rx, &lost, &lanes, &busy);
                let _ = back.send(capture_reply(&name, &path, outcome));
            });
        if let Err(e) = spawned {
            for lane in self.lanes.iter().flat_map(|l| l.iter()) {
                lane.send_blocking(Msg::Capture(None));
            }
            *self.capturing.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(e).context("capture thread");
        }
        Ok(())
    }

    /// Gives a capture running when the daemon stops a moment (at most 2 s) to finish its
    /// file: its taps went with the workers, so its writer sees the end of its records.
    pub(super) fn wait_for_capture(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let running = || {
            let c = self.capturing.lock();
            c.unwrap_or_else(|p| p.into_inner()).is_some()
        };
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What `vpcd ctl capture POINT` names on this host.
    fn capture_point(&self, word: &str) -> Result<Point> {
        match word {
            "underlay" => return Ok(Point::Underlay),
            "drops" => return Ok(Point::Drops),
            "internet" if self.internet.is_some() => return Ok(Point::Internet),
            "internet" => bail!("host {} is not the internet gateway", self.opts.host),
            _ => {}
        }
        let t = &self.topo;
        match t.instance_named(word) {
            Some(id) if t.instance(id).host == self.host => Ok(Point::Instance {
                name: word.to_string(),
                id: Some(id),
            }),
            _ => {
                let here: Vec<&str> = t
                    .instances_on(self.host)
                    .map(|id| t.instance(id).name.as_str())
                    .collect();
                bail!(
                    "no instance \"{word}\" on host {}: say underlay, drops{}, or one of: {}",
                    self.opts.host,
                    if self.internet.is_some() {
                        ", internet"
                    } else {
                        ""
                    },
                    here.join(", ")
                )
            }
        }
    }
}

/// The answer to a capture, once it is over.
fn capture_reply(point: &str, path: &Path, outcome: std::io::Result<tap::Outcome>) -> Reply {
    let o = match outcome {
        Ok(o) => o,
        Err(e) => return Reply::error(format!("capture: writing {}: {e}", path.display())),
    };
    info!(point, packets = o.written, lost = o.lost, "capture over");
    let mut text = format!(
        "{} packets captured on {point} in {:.1} s, written to {}",
        o.written,
        o.elapsed.as_secs_f64(),
        path.display()
    );
    if o.lost > 0 {
        text += &format!(
            "\n{} more lost: the writer fell behind (queue of {})",
            o.lost,
            tap::QUEUE
        );
    }
    let data = json!({
        "point": point,
        "file": path.display().to_string(),
        "packets": o.written,
        "lost": o.lost,
        "seconds": o.elapsed.as_secs_f64(),
    });
    Reply::ok(text, data)
}

/// Hands a request to the control loop and waits for its answer (a daemon that does not
/// answer within [`Request::answer_within`] is reported as such).
fn relay(tx: &mpsc::Sender<Asked>, request: Request) -> Reply {
    let within = request.answer_within();
    let (back, answer) = crossbeam_channel::bounded(1);
    if tx.blocking_send((request, back)).is_err() {
        return Reply::error("the daemon is stopping");
    }
    answer.recv_timeout(within).unwrap_or_else(|_| {
        Reply::error(format!(
            "the daemon did not answer within {} s",
            within.as_secs()
        ))
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
