//! A daemon's side: its share read once at start, then followed.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, anyhow};
use etcd_client::{Client, WatchOptions, WatchStream};
use tokio::sync::mpsc;

use super::{Backoff, MAX_MESSAGE, Read, connect, range, read_share};
use crate::desired::{FollowFrom, StoreOpts, Stored};
use crate::layout;

/// Reads `host`'s share once, retrying with backoff while the store is unreachable (a daemon
/// starting); the outage is logged once.
pub async fn first_read(o: &StoreOpts, host: &str) -> Read {
    let mut backoff = Backoff::default();
    loop {
        let attempt = async { read_share(&connect(o).await?, host, 0).await };
        match attempt.await {
            Ok(r) => {
                backoff.recovered(o);
                return r;
            }
            Err(e) => backoff.failed(o, &e).await,
        }
    }
}

/// Follows `host`'s share from `from` (what the first read found), and sends each new state (a revision
/// other than the one applied) to `tx`, until `tx` closes.
///
/// It watches the host's share key and the mark of each scope in it (an apply rewrites the
/// mark of every scope it changes), all from the revision after the last one seen; an
/// event at revision R reads the share again at R, so the host sees each apply whole. A
/// changed share (a scope gained or lost) restarts the watches on the new scopes. An
/// outage is logged once and retried with backoff; the watches then resume after the last
/// revision seen, or, when that revision was compacted, the share is read whole again.
pub async fn follow(o: StoreOpts, host: String, from: FollowFrom, tx: mpsc::Sender<Stored>) {
    let mut f = Follower {
        next: from.next,
        last: from.last,
        scopes: from.scopes,
        keys: from.keys,
        o,
        host,
        tx,
    };
    let mut backoff = Backoff::default();
    while !f.tx.is_closed() {
        match f.session(&mut backoff).await {
            Ok(Session::Closed) => return,
            Ok(Session::Restart) => {}
            Err(e) => backoff.failed(&f.o, &e).await,
        }
    }
}

struct Follower {
    o: StoreOpts,
    host: String,
    /// The revision to watch from.
    next: i64,
    /// The revision last sent.
    last: i64,
    /// The scopes watched.
    scopes: BTreeSet<String>,
    /// The share's items as last read.
    keys: BTreeMap<String, String>,
    tx: mpsc::Sender<Stored>,
}

enum Session {
    /// The daemon stopped.
    Closed,
    /// Watch again (the share changed, or was read whole after a compaction).
    Restart,
}

impl Follower {
    /// One connection's watches, until the share changes or the connection fails.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Session> {
        let c = connect(&self.o).await?;
        let mut stream = self.watch(&c).await?;
        backoff.recovered(&self.o);
        while let Some(m) = stream.message().await.context("watching the store")? {
            if m.compact_revision() > 0 || m.canceled() {
                // Compacted past what we saw: read it whole, and watch from there.
                let r = read_share(&c, &self.host, 0).await?;
                return self.take(r).await.map(|()| Session::Restart);
            }
            let kvs: Vec<_> = m.events().iter().filter_map(|e| e.kv()).collect();
            let at = kvs.iter().map(|kv| kv.mod_revision()).max();
            let Some(at) = at.filter(|at| *at >= self.next) else {
                continue;
            };
            // Only scopes' marks moved: read those scopes again. Else the share itself
            // changed: read it whole, and watch its new scopes.
            let marks: Option<BTreeSet<String>> = kvs
                .iter()
                .map(|kv| {
                    let key = String::from_utf8_lossy(kv.key());
                    key.strip_prefix(layout::MARK_PREFIX).map(layout::unescape)
                })
                .collect();
            let r = match &marks {
                Some(scopes) => self.reread(&c, scopes, at).await?,
                None => read_share(&c, &self.host, at).await?,
            };
            let moved = r.scopes != self.scopes;
            self.take(r).await?;
            if moved {
                return Ok(Session::Restart);
            }
        }
        if self.tx.is_closed() {
            return Ok(Session::Closed);
        }
        Err(anyhow!("the store closed the watch"))
    }

    /// One watch stream: the share key and the marks of the scopes, from `next`.
    async fn watch(&self, c: &Client) -> Result<WatchStream> {
        let from = || WatchOptions::new().with_start_revision(self.next);
        let mut w = c.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let mut stream = w
            .watch(layout::share_key(&self.host), Some(from()))
            .await
            .context("watching the store")?;
        for s in &self.scopes {
            stream
                .watch(layout::mark_key(s), Some(from()))
                .await
                .context("watching the store")?;
        }
        Ok(stream)
    }

    /// The share at revision `at`, reading again only the `changed` scopes (their marks
    /// moved): one range read per changed scope, whatever the share's size.
    async fn reread(&self, c: &Client, changed: &BTreeSet<String>, at: i64) -> Result<Read> {
        let mut keys = self.keys.clone();
        for scope in changed.intersection(&self.scopes) {
            let prefix = layout::scope_prefix(scope);
            keys.retain(|k, _| !k.starts_with(&prefix));
            let (items, _) = range(c, &prefix, at).await?;
            keys.extend(items.into_iter().map(|(k, (v, _))| (k, v)));
        }
        Ok(Read {
            stored: Some(Stored::from_keys(keys, at)),
            revision: at,
            scopes: self.scopes.clone(),
        })
    }

    /// Takes what a read found: watches go on after it, and a new state goes to the daemon.
    async fn take(&mut self, r: Read) -> Result<()> {
        self.next = r.revision + 1;
        self.scopes = r.scopes;
        if let Some(s) = &r.stored {
            self.keys = s.keys.clone();
        }
        let Some(s) = r.stored.filter(|s| s.revision != self.last) else {
            return Ok(());
        };
        self.last = s.revision;
        self.tx
            .send(s)
            .await
            .map_err(|_| anyhow!("the daemon stopped"))
    }
}
