//! The region's desired state on etcd (feature `store`; docs/control-plane.md): connect;
//! read the whole region (`vpcd apply`, `vpcd get`) or one host's share at one revision;
//! write an apply's keys in one compare-and-swap transaction; follow a host's share (a watch
//! on its share key and its scopes' marks, with catch-up after an outage); report what a
//! daemon applied. What to write is decided in [`crate::desired`] and [`crate::layout`].

mod follow;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    TlsOptions, Txn, TxnOp,
};
use tracing::{info, warn};

use crate::desired::{Plan, StoreOpts, Stored};
use crate::layout::{self, GENERATION_KEY};

pub use follow::{first_read, follow};

/// The largest answer vpcd reads: a whole region of 100,000 instances is about 25 MB.
const MAX_MESSAGE: usize = 512 << 20;

/// The state read, and the store's revision at the read.
#[derive(Debug, Clone)]
pub struct Read {
    /// The desired state; `None` when nothing was ever applied (for a host: when no apply
    /// has given it a share).
    pub stored: Option<Stored>,
    /// The store's revision when it was read (watch from the next one).
    pub revision: i64,
    /// A host's share: its scopes (empty for a whole-region read).
    pub scopes: BTreeSet<String>,
}

impl Read {
    /// Where a watch resumes after this read.
    pub fn follow_from(&self) -> crate::desired::FollowFrom {
        crate::desired::FollowFrom {
            next: self.revision + 1,
            last: self.stored.as_ref().map_or(0, |s| s.revision),
            scopes: self.scopes.clone(),
            keys: self
                .stored
                .as_ref()
                .map(|s| s.keys.clone())
                .unwrap_or_default(),
        }
    }
}

/// Connects to the store (`--store`, with its credentials and TLS files).
pub async fn connect(o: &StoreOpts) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(30))
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

fn kv(c: &Client) -> KvClient {
    c.kv_client()
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// The keys under `prefix` at revision `at` (0: the latest), with their mod revisions, and
/// the revision of the read.
async fn range(
    c: &Client,
    prefix: &str,
    at: i64,
) -> Result<(BTreeMap<String, (String, i64)>, i64)> {
    let mut options = GetOptions::new().with_prefix();
    if at > 0 {
        options = options.with_revision(at);
    }
    let r = kv(c)
        .get(prefix, Some(options))
        .await
        .context("reading the store")?;
    // The header names the store's newest revision, also for a read at an older one.
    let revision = if at > 0 {
        at
    } else {
        r.header().map_or(0, |h| h.revision())
    };
    let mut out = BTreeMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = kv.value_str().map_err(|e| anyhow!("{key}: {e}"))?;
        out.insert(key, (value.to_string(), kv.mod_revision()));
    }
    Ok((out, revision))
}

/// Reads the whole region at one revision (`at`: that revision; 0: the latest): what `vpcd
/// apply` compares with and `vpcd get` prints.
pub async fn read(c: &mut Client, at: i64) -> Result<Read> {
    let (all, revision) = range(c, layout::PREFIX, at).await?;
    let stored = all.get(GENERATION_KEY).map(|(_, generation)| {
        let keys = all
            .iter()
            .filter(|(k, _)| {
                k.starts_with(layout::ITEM_PREFIX) || k.starts_with(layout::SHARE_PREFIX)
            })
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        Stored::from_keys(keys, *generation)
    });
    Ok(Read {
        stored,
        revision,
        scopes: BTreeSet::new(),
    })
}

/// Reads `host`'s share at one revision (`at`; 0: the latest): its share key, then the
/// items of each of its scopes at the share's revision.
pub async fn read_share(c: &Client, host: &str, at: i64) -> Result<Read> {
    let (share, revision) = range(c, &layout::share_key(host), at).await?;
    let Some((list, _)) = share.get(&layout::share_key(host)) else {
        let scopes = BTreeSet::new();
        return Ok(Read {
            stored: None,
            revision,
            scopes,
        });
    };
    let scopes: BTreeSet<String> = list.lines().map(String::from).collect();
    let mut keys = BTreeMap::new();
    for scope in &scopes {
        let (items, _) = range(c, &layout::scope_prefix(scope), revision).await?;
        keys.extend(items.into_iter().map(|(k, (v, _))| (k, v)));
    }
    Ok(Read {
        stored: Some(Stored::from_keys(keys, revision)),
        revision,
        scopes,
    })
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
        /// The generation's revision now.
        now: i64,
    },
    /// The store could not be reached, or answered an error.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

/// Writes `plan` in one transaction, if the generation key still has the revision the plan
/// was read at: its puts and deletes, the marks of the scopes it touches, and the
/// generation. Returns the new revision (the new generation).
pub async fn write(c: &mut Client, plan: &Plan) -> Result<i64, WriteError> {
    let w = &plan.writes;
    let mut ops: Vec<TxnOp> =
        Vec::with_capacity(w.puts.len() + w.deletes.len() + w.scopes.len() + 1);
    ops.extend(
        w.puts
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None)),
    );
    ops.extend(w.deletes.iter().map(|k| TxnOp::delete(k.as_str(), None)));
    ops.extend(
        w.scopes
            .iter()
            .map(|s| TxnOp::put(layout::mark_key(s), s.as_str(), None)),
    );
    let scopes: Vec<&str> = w.scopes.iter().map(String::as_str).collect();
    ops.push(TxnOp::put(GENERATION_KEY, scopes.join("\n"), None));
    let count = ops.len();
    let txn = Txn::new()
        .when([Compare::mod_revision(
            GENERATION_KEY,
            CompareOp::Equal,
            plan.base,
        )])
        .and_then(ops)
        .or_else([TxnOp::get(GENERATION_KEY, None)]);
    let r = kv(c).txn(txn).await.map_err(|e| {
        let hint = if e.to_string().contains("too many operations") {
            format!(" ({count} operations in one transaction: start etcd with --max-txn-ops {count} or more)")
        } else {
            String::new()
        };
        WriteError::Store(anyhow!("writing the store: {e}{hint}"))
    })?;
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

/// Records that `host`'s daemon applied `revision` (`/vpcd/v2/applied/HOST`), for `vpcd get
/// --hosts`. A failure is logged: forwarding does not depend on it.
pub async fn report(o: StoreOpts, host: String, revision: i64) {
    let put = async {
        let c = connect(&o).await?;
        kv(&c)
            .put(layout::applied_key(&host), revision.to_string(), None)
            .await
            .context("reporting the applied revision")
    };
    if let Err(e) = put.await {
        warn!(store = %o.url, error = %format!("{e:#}"), "could not report the applied revision");
    }
}

/// One host's convergence: the revision its daemon reported, and the newest change to its
/// share (its share key, or a mark of one of its scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// The host.
    pub host: String,
    /// The revision its daemon last reported applying (`None`: never).
    pub applied: Option<i64>,
    /// The newest revision that changed its share.
    pub needs: i64,
}

impl HostState {
    /// Its daemon has applied every change to its share.
    pub fn current(&self) -> bool {
        self.applied.is_some_and(|a| a >= self.needs)
    }
}

/// Every host's convergence, and the generation.
pub async fn convergence(c: &Client) -> Result<(Vec<HostState>, i64)> {
    let (all, _) = range(c, layout::PREFIX, 0).await?;
    let generation = all.get(GENERATION_KEY).map_or(0, |(_, r)| *r);
    let rev = |key: &str| all.get(key).map_or(0, |(_, r)| *r);
    let mut out = Vec::new();
    for (key, (list, share_rev)) in all.range(layout::SHARE_PREFIX.to_string()..) {
        let Some(host) = key.strip_prefix(layout::SHARE_PREFIX) else {
            break;
        };
        let host = layout::unescape(host);
        let needs = list
            .lines()
            .map(|s| rev(&layout::mark_key(s)))
            .fold(*share_rev, i64::max);
        let applied = all
            .get(&layout::applied_key(&host))
            .and_then(|(v, _)| v.parse().ok());
        out.push(HostState {
            host,
            applied,
            needs,
        });
    }
    Ok((out, generation))
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
