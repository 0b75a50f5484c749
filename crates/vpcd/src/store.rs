//! The region's desired state on etcd (feature `store`; docs/control-plane.md): connect, read
//! both keys at one revision, write them in one compare-and-swap transaction, and follow
//! them (watch, with catch-up after an outage). What to write is decided in
//! [`crate::desired`].

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::desired::{ALLOCATIONS_KEY, PREFIX, Plan, StoreOpts, Stored, TOPOLOGY_KEY};

/// The state read, and the store's revision at the read.
#[derive(Debug, Clone)]
pub struct Read {
    /// The desired state; `None` when nothing was ever applied.
    pub stored: Option<Stored>,
    /// The store's revision when it was read (watch from the next one).
    pub revision: i64,
}

/// Connects to the store (`--store`, with its credentials and TLS files).
pub async fn connect(o: &StoreOpts) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    if let Some(user) = &o.user {
        options = options.with_user(user, o.password.clone().unwrap_or_default());
    }
    if o.url.starts_with("https://") {
        options = options.with_tls(tls(o)?);
    }
    Client::connect([o.url.as_str()], Some(options))
        .await
        .with_context(|| format!("store {}", o.url))
}

fn tls(o: &StoreOpts) -> Result<TlsOptions> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| p.display().to_string());
    let mut tls = TlsOptions::new();
    if let Some(ca) = &o.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&o.cert, &o.key) {
        (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
        (None, None) => {}
        _ => anyhow::bail!("--store-cert and --store-key go together"),
    }
    Ok(tls)
}

/// Reads both keys at one revision (`at`: that revision; 0: the latest).
pub async fn read(c: &mut Client, at: i64) -> Result<Read> {
    let mut options = GetOptions::new().with_prefix();
    if at > 0 {
        options = options.with_revision(at);
    }
    let r = c
        .get(PREFIX, Some(options))
        .await
        .context("reading the store")?;
    let revision = r.header().map_or(0, |h| h.revision());
    let (mut topology, mut allocations) = (None, String::new());
    for kv in r.kvs() {
        let value = kv
            .value_str()
            .map_err(|e| anyhow!("{}: {e}", String::from_utf8_lossy(kv.key())))?;
        match kv.key() {
            k if k == TOPOLOGY_KEY.as_bytes() => {
                topology = Some((value.to_string(), kv.mod_revision()))
            }
            k if k == ALLOCATIONS_KEY.as_bytes() => allocations = value.to_string(),
            _ => {}
        }
    }
    let stored = topology.map(|(topology, revision)| Stored {
        topology,
        allocations,
        revision,
    });
    Ok(Read { stored, revision })
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another apply wrote first: the store is no longer at the revision the plan was made
    /// from.
    #[error(
        "the store changed since it was read (revision {read}, now {now}): another apply won; nothing was written, apply again"
    )]
    Lost {
        /// The revision the plan was made from.
        read: i64,
        /// The topology's revision now.
        now: i64,
    },
    /// The store could not be reached, or answered an error.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

/// Writes `plan` in one transaction, if the topology key still has the revision the plan was
/// read at. Returns the new revision (the new generation).
pub async fn write(c: &mut Client, plan: &Plan) -> Result<i64, WriteError> {
    let txn = Txn::new()
        .when([Compare::mod_revision(
            TOPOLOGY_KEY,
            CompareOp::Equal,
            plan.base,
        )])
        .and_then([
            TxnOp::put(TOPOLOGY_KEY, plan.topology.as_str(), None),
            TxnOp::put(ALLOCATIONS_KEY, plan.allocations.as_str(), None),
        ])
        .or_else([TxnOp::get(TOPOLOGY_KEY, None)]);
    let r = c
        .txn(txn)
        .await
        .context("writing the store")
        .map_err(WriteError::Store)?;
    if r.succeeded() {
        return Ok(r.header().map_or(0, |h| h.revision()));
    }
    let now = r.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => {
            Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
        }
        _ => None,
    });
    Err(WriteError::Lost {
        read: plan.base,
        now: now.unwrap_or(0),
    })
}

/// Reads the state once, retrying with backoff while the store is unreachable (a daemon
/// starting); the outage is logged once.
pub async fn first_read(o: &StoreOpts) -> Read {
    let mut backoff = Backoff::default();
    loop {
        let attempt = async { read(&mut connect(o).await?, 0).await };
        match attempt.await {
            Ok(r) => {
                backoff.recovered(o);
                return r;
            }
            Err(e) => backoff.failed(o, &e).await,
        }
    }
}

/// Follows the store from revision `next` and sends each new state (a revision other than
/// `last`, the one applied) to `tx`, until `tx` closes. An outage is logged
/// once and retried with backoff; afterwards the watch resumes at the last revision seen,
/// or the state is read whole again when that revision was compacted.
pub async fn follow(o: StoreOpts, mut next: i64, mut last: i64, tx: mpsc::Sender<Stored>) {
    let mut backoff = Backoff::default();
    while !tx.is_closed() {
        match watch(&o, &mut next, &mut last, &tx, &mut backoff).await {
            Ok(()) => return,
            Err(e) => backoff.failed(&o, &e).await,
        }
    }
}

/// One connection's watch; `Ok` when `tx` has closed.
async fn watch(
    o: &StoreOpts,
    next: &mut i64,
    last: &mut i64,
    tx: &mpsc::Sender<Stored>,
    backoff: &mut Backoff,
) -> Result<()> {
    let mut c = connect(o).await?;
    let options = WatchOptions::new().with_prefix().with_start_revision(*next);
    let mut stream = c
        .watch(PREFIX, Some(options))
        .await
        .context("watching the store")?;
    backoff.recovered(o);
    while let Some(m) = stream.message().await.context("watching the store")? {
        if m.compact_revision() > 0 || m.canceled() {
            // Compacted past what we saw: read it whole, and watch from there.
            let r = read(&mut c, 0).await?;
            *next = r.revision + 1;
            send(r.stored, last, tx).await?;
            let options = WatchOptions::new().with_prefix().with_start_revision(*next);
            stream = c
                .watch(PREFIX, Some(options))
                .await
                .context("watching the store")?;
            continue;
        }
        let Some(at) = m
            .events()
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| kv.mod_revision())
            .max()
        else {
            continue;
        };
        let r = read(&mut c, at).await?;
        *next = at + 1;
        send(r.stored, last, tx).await?;
    }
    Err(anyhow!("the store closed the watch"))
}

async fn send(stored: Option<Stored>, last: &mut i64, tx: &mpsc::Sender<Stored>) -> Result<()> {
    let Some(s) = stored.filter(|s| s.revision != *last) else {
        return Ok(());
    };
    *last = s.revision;
    tx.send(s).await.map_err(|_| anyhow!("the daemon stopped"))
}

/// Exponential backoff (0.5 s doubling to 10 s); the outage logged once, and its end.
#[derive(Default)]
struct Backoff {
    delay: Option<Duration>,
}

impl Backoff {
    async fn failed(&mut self, o: &StoreOpts, e: &anyhow::Error) {
        let delay = match self.delay {
            None => {
                warn!(store = %o.url, error = %format!("{e:#}"), "store unreachable: forwarding goes on with the last applied state; retrying");
                Duration::from_millis(500)
            }
            Some(d) => (d * 2).min(Duration::from_secs(10)),
        };
        self.delay = Some(delay);
        tokio::time::sleep(delay).await;
    }

    fn recovered(&mut self, o: &StoreOpts) {
        if self.delay.take().is_some() {
            info!(store = %o.url, "store reachable again");
        }
    }
}
