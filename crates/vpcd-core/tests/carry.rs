//! Property: a topology change keeps only the cached decisions it cannot affect, and every
//! one it keeps is the decision the full path takes in the new topology.
//!
//! Each case draws a topology of either mix of `properties.rs` (tests/model/topo.rs: the VPC
//! mix, whose security groups are shared by the instances of every VPC, and the cloud mix),
//! a packet sequence (tests/model/ops.rs), an edit of the topology file and a second
//! sequence. Two pipelines of "this host" decide the first sequence on the old topology
//! (warming their flow caches); both install the edited topology, and the reference then
//! forgets every cached decision (what a change did before: the full path for every flow).
//! Both decide the first sequence's packets again (instances renumbered by name) and the
//! second sequence, drawn on the new topology: every decision must be the same.
//!
//! The edits: items reordered in the file (instances, security groups, hosts, VPCs,
//! subnets, route tables), a rule of one ACL or security group flipped or one added before
//! the others, an instance removed, added or moved to another host, an instance's groups
//! changed, a route or a peering added, an Elastic IP or a subnet's ACL removed, a VPC's key
//! changed, a global setting changed, nothing changed. An edit the topology refuses (a
//! duplicate, a dangling name) is counted and skipped.
//!
//! Environment: `VPCD_CARRY_CASES`, cases of each mix (default 3,000); `VPCD_PROP_SEED` as
//! in properties.rs. Run: `cargo test --release -p vpcd-core --test carry -- --nocapture`.

mod model;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use vpcd_core::topology::HostId;
use vpcd_core::{Ingress, Pipeline, Timestamp, Topology};

use model::eval::instance_mtu;
use model::ops::{self, Op, Resolver, Sent, Step};
use model::topo;

/// Per edit: cases, packets compared, entries carried, hits the reference did not have.
#[derive(Default)]
struct Tally {
    by_edit: BTreeMap<&'static str, [u64; 4]>,
    refused: u64,
}

/// The file's blocks (tables), as the generators write them: separated by blank lines.
fn blocks(text: &str) -> Vec<String> {
    text.split("\n\n").map(str::to_string).collect()
}

fn of_kind(b: &[String], head: &str) -> Vec<usize> {
    (0..b.len())
        .filter(|&i| b[i].trim_start().starts_with(head))
        .collect()
}

/// The value of `field = "..."` in a block.
fn field<'a>(block: &'a str, field: &str) -> Option<&'a str> {
    let line = block
        .lines()
        .find(|l| l.starts_with(&format!("{field} = \"")))?;
    line.split('"').nth(1)
}

fn names(b: &[String], head: &str) -> Vec<String> {
    let of = of_kind(b, head);
    of.iter()
        .filter_map(|&i| field(&b[i], "name").map(str::to_string))
        .collect()
}

/// Rotates the blocks of one kind among their places.
fn permute(b: &mut [String], head: &str, a: usize) -> bool {
    let at = of_kind(b, head);
    if at.len() < 2 {
        return false;
    }
    let r = 1 + a % (at.len() - 1);
    let mut contents: Vec<String> = at.iter().map(|&i| b[i].clone()).collect();
    contents.rotate_left(r);
    for (i, c) in at.iter().zip(contents) {
        b[*i] = c;
    }
    true
}

/// Replaces line `n` (of those `pick` selects) of a block of kind `head` with `f`'s result.
fn edit_line(
    b: &mut [String],
    head: &str,
    (a, n): (usize, usize),
    pick: impl Fn(&str) -> bool,
    f: impl Fn(&str) -> Option<String>,
) -> bool {
    let at = of_kind(b, head);
    if at.is_empty() {
        return false;
    }
    let i = at[a % at.len()];
    let mut lines: Vec<String> = b[i].lines().map(str::to_string).collect();
    let cands: Vec<usize> = (0..lines.len()).filter(|&j| pick(&lines[j])).collect();
    if cands.is_empty() {
        return false;
    }
    let j = cands[n % cands.len()];
    match f(&lines[j]) {
        Some(new) => lines[j] = new,
        None => {
            lines.remove(j);
        }
    }
    b[i] = lines.join("\n");
    true
}

fn flip(line: &str) -> Option<String> {
    Some(if line.contains("\"accept\"") {
        line.replace("\"accept\"", "\"drop\"")
    } else {
        line.replace("\"drop\"", "\"accept\"")
    })
}

/// A rule inserted first in a block's ingress list.
fn add_rule(b: &mut [String], head: &str, peer_key: &str, a: usize, n: usize) -> bool {
    let rule = [
        "{ action = \"drop\", protocol = \"tcp\", port = 22, PEER = \"10.0.0.0/8\" },",
        "{ action = \"accept\", protocol = \"udp\", PEER = \"0.0.0.0/0\" },",
        "{ action = \"drop\", protocol = \"icmp\", PEER = \"0.0.0.0/0\" },",
    ][n % 3]
        .replace("PEER", peer_key);
    edit_line(
        b,
        head,
        (a, 0),
        |l| l.starts_with("ingress = ["),
        |l| Some(format!("{l}\n  {rule}")),
    )
}

/// An instance like another, at another address, named `added`.
fn add_instance(b: &mut Vec<String>, a: usize, n: usize) -> bool {
    let at = of_kind(b, "[[instance]]");
    if at.is_empty() {
        return false;
    }
    let old = &b[at[a % at.len()]];
    let new: Vec<String> = old
        .lines()
        .filter(|l| !l.starts_with("eip") && !l.starts_with("name"))
        .map(|l| match l.strip_prefix("ip = \"") {
            Some(ip) => {
                let parts: Vec<&str> = ip.trim_end_matches('"').split('.').collect();
                format!(
                    "ip = \"{}.{}.{}.{}\"",
                    parts[0],
                    parts[1],
                    parts[2],
                    200 + n % 50
                )
            }
            None => l.to_string(),
        })
        .collect();
    let mut block = new.join("\n");
    block = block.replacen("[[instance]]", "[[instance]]\nname = \"added\"", 1);
    let place = if n.is_multiple_of(2) { at[0] } else { b.len() };
    b.insert(place, block);
    true
}

/// Applies edit `kind` (with `a`, `n` choosing where); returns the new text and the edit's
/// name, or `None` when the topology has nothing to edit that way.
fn edit(text: &str, kind: usize, a: usize, n: usize) -> Option<(String, &'static str)> {
    let mut b = blocks(text);
    let name = match kind % 20 {
        k @ 0..=8 => edit_order_or_rule(&mut b, k, a, n)?,
        k => edit_item(&mut b, k, a, n)?,
    };
    Some((b.join("\n\n"), name))
}

/// Edits 0 to 8: items reordered, a rule flipped or added.
fn edit_order_or_rule(b: &mut [String], kind: usize, a: usize, n: usize) -> Option<&'static str> {
    match kind {
        0 => permute(b, "[[instance]]", a).then_some("reorder instances"),
        1 => permute(b, "[[security_group]]", a).then_some("reorder security groups"),
        2 => permute(b, "[[host]]", a).then_some("reorder hosts"),
        3 => permute(b, "[[vpc]]", a).then_some("reorder VPCs"),
        4 => {
            let s = permute(b, "[[subnet]]", a);
            let r = permute(b, "[[route_table]]", n);
            (s || r).then_some("reorder subnets and route tables")
        }
        5 => edit_line(b, "[[acl]]", (a, n), |l| l.contains("action = "), flip)
            .then_some("flip an ACL rule"),
        6 => edit_line(
            b,
            "[[security_group]]",
            (a, n),
            |l| l.contains("action = "),
            flip,
        )
        .then_some("flip a security-group rule"),
        7 => add_rule(b, "[[acl]]", "cidr", a, n).then_some("add an ACL rule"),
        8 => {
            add_rule(b, "[[security_group]]", "source", a, n).then_some("add a security-group rule")
        }
        _ => None,
    }
}

/// Edits 9 to 14: an instance removed, added, moved or regrouped, a route or a peering added.
fn edit_item(b: &mut Vec<String>, kind: usize, a: usize, n: usize) -> Option<&'static str> {
    match kind {
        9 => {
            let at = of_kind(b, "[[instance]]");
            (!at.is_empty()).then(|| b.remove(at[a % at.len()]));
            (!at.is_empty()).then_some("remove an instance")
        }
        10 => add_instance(b, a, n).then_some("add an instance"),
        11 => {
            let hosts = names(b, "[[host]]");
            let h = hosts[n % hosts.len()].clone();
            let to = move |_: &str| Some(format!("host = \"{h}\""));
            edit_line(b, "[[instance]]", (a, 0), |l| l.starts_with("host = "), to)
                .then_some("move an instance")
        }
        12 => {
            let sgs = names(b, "[[security_group]]");
            let g = sgs.get(n % sgs.len().max(1)).cloned()?;
            let to = move |_: &str| Some(format!("security_groups = [\"{g}\"]"));
            let pick = |l: &str| l.starts_with("security_groups = ");
            edit_line(b, "[[instance]]", (a, 0), pick, to).then_some("change an instance's groups")
        }
        13 => {
            let dest = [
                "10.99.0.0/16",
                "192.168.77.0/24",
                "0.0.0.0/0",
                "10.0.9.0/24",
            ][n % 4];
            let hop = ["drop", "internet"][a % 2];
            let route = format!("  {{ destination = \"{dest}\", next_hop = \"{hop}\" }},");
            let to = move |l: &str| Some(format!("{l}\n{route}"));
            edit_line(
                b,
                "[[route_table]]",
                (a, 0),
                |l| l.starts_with("routes = ["),
                to,
            )
            .then_some("add a route")
        }
        14 => {
            let vpcs = names(b, "[[vpc]]");
            if vpcs.len() < 2 {
                return None;
            }
            let (x, y) = (a % vpcs.len(), (a + 1 + n % (vpcs.len() - 1)) % vpcs.len());
            let p = format!(
                "[[peering]]\nname = \"added\"\nvpcs = [\"{}\", \"{}\"]",
                vpcs[x], vpcs[y]
            );
            b.insert(b.len() - 1, p);
            Some("add a peering")
        }
        k => edit_setting(b, k, a, n),
    }
}

/// Edits 15 to 19: an Elastic IP or a subnet's ACL removed, a key or a global setting
/// changed, nothing.
fn edit_setting(b: &mut [String], kind: usize, a: usize, n: usize) -> Option<&'static str> {
    match kind {
        15 => edit_line(
            b,
            "[[instance]]",
            (a, 0),
            |l| l.starts_with("eip = "),
            |_| None,
        )
        .then_some("remove an Elastic IP"),
        16 => edit_line(
            b,
            "[[subnet]]",
            (a, 0),
            |l| l.starts_with("acl = "),
            |_| None,
        )
        .then_some("remove a subnet's ACL"),
        17 => {
            let to = move |l: &str| {
                let k: u64 = l.trim_start_matches("key = ").parse().ok()?;
                Some(format!("key = {}", k + 1 + (n % 3) as u64))
            };
            edit_line(b, "[[vpc]]", (a, 0), |l| l.starts_with("key = "), to)
                .then_some("change a VPC's key")
        }
        18 => {
            let to = |l: &str| Some(l.replace("true", "FALSE").replace("false", "true"));
            let to = move |l: &str| to(l).map(|x| x.replace("FALSE", "false"));
            edit_line(
                b,
                "[underlay]",
                (0, 0),
                |l| l.starts_with("checksum = "),
                to,
            )
            .then_some("change a global setting")
        }
        _ => Some("nothing"),
    }
}

/// One case's two phases and edit.
struct Case<'a> {
    text: &'a str,
    this: Option<usize>,
    before: &'a [Step],
    edit: (usize, usize, usize),
    after: &'a [Step],
}

/// The two pipelines: the one under test and the reference that forgets at every change.
struct Pair {
    got: Pipeline,
    want: Pipeline,
    now: u64,
}

impl Pair {
    /// Both decide `sent`; they must agree.
    fn decide(&mut self, sent: &Sent, what: &str) -> Result<vpcd_core::Decision, TestCaseError> {
        let at = Timestamp::from_millis(self.now);
        let got = self.got.decide(&sent.bytes, sent.ingress, at);
        let want = self.want.decide(&sent.bytes, sent.ingress, at);
        if got != want {
            return Err(TestCaseError::fail(format!(
                "{what}: {} at {} ms: carried {got:?}, full path {want:?}\n{}",
                sent.what,
                self.now,
                hex(&sent.bytes)
            )));
        }
        Ok(got)
    }

    /// Both install `topo`; the reference forgets every cached decision.
    fn install(&mut self, topo: &Arc<Topology>) {
        self.got.set_topology(topo.clone());
        self.want.set_topology(topo.clone());
        self.want.forget_cached_decisions();
    }

    /// Decides `steps` resolved on `topo` (this host `this`); a re-installation installs
    /// `topo` again.
    fn run(
        &mut self,
        topo: &Arc<Topology>,
        this: HostId,
        steps: &[Step],
        what: &str,
    ) -> Result<Vec<Sent>, TestCaseError> {
        let resolver = Resolver {
            topo,
            this: this.index(),
            mtu: instance_mtu(topo),
        };
        let mut hist: Vec<Sent> = Vec::new();
        for step in steps {
            self.now += step.dt;
            if let Op::Retopo = step.op {
                self.install(topo);
                continue;
            }
            let mut sent = resolver.resolve(&step.op, &hist, self.now);
            sent.decision = Some(self.decide(&sent, what)?);
            hist.push(sent);
        }
        Ok(hist)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn parse(text: &str) -> Option<Arc<Topology>> {
    Topology::parse(text, "generated.toml").ok().map(Arc::new)
}

/// An instance's ingress in the new topology (by name), or `None` when it is gone (a port
/// that never was one stays as it was).
fn renumbered(old: &Topology, new: &Topology, i: Ingress) -> Option<Ingress> {
    match i {
        Ingress::Instance(id) if id.index() < old.instances.len() => new
            .instance_named(&old.instance(id).name)
            .map(Ingress::Instance),
        other => Some(other),
    }
}

fn run_case(c: &Case, tally: &RefCell<Tally>) -> Result<(), TestCaseError> {
    let old =
        parse(c.text).ok_or_else(|| TestCaseError::fail(format!("generator bug\n{}", c.text)))?;
    let Some((new_text, name)) = edit(c.text, c.edit.0, c.edit.1, c.edit.2) else {
        return Ok(());
    };
    let Some(new) = parse(&new_text) else {
        tally.borrow_mut().refused += 1;
        return Ok(());
    };
    let this = c.this.map_or(old.instances[0].host, |h| HostId(h as u32));
    let mut pair = Pair {
        got: Pipeline::new(old.clone(), this),
        want: Pipeline::new(old.clone(), this),
        now: 0,
    };
    let warm = pair.run(&old, this, c.before, "before the change")?;
    pair.install(&new);
    let carried = pair.got.cached_decisions() as u64;
    let new_this = new.host_named(&old.host(this).name).unwrap_or(this);
    let hits = |p: &Pair| (p.got.counters().cache_hits, p.want.counters().cache_hits);
    let (g0, w0) = hits(&pair);
    let mut packets = 0u64;
    for sent in &warm {
        let Some(ingress) = renumbered(&old, &new, sent.ingress) else {
            continue;
        };
        let again = Sent {
            ingress,
            ..sent.clone()
        };
        pair.decide(&again, &format!("again after \"{name}\""))?;
        packets += 1;
    }
    // The generators draw from this host's instances: none left (the edit removed or moved
    // them), no second sequence.
    let here = |t: &Topology, h: HostId| t.instances_on(h).next().is_some();
    if here(&new, new_this) || !here(&old, this) {
        let after = pair.run(&new, new_this, c.after, &format!("after \"{name}\""))?;
        packets += after.len() as u64;
    }
    let (g1, w1) = hits(&pair);
    let mut t = tally.borrow_mut();
    let e = t.by_edit.entry(name).or_default();
    let gained = (g1 - g0).saturating_sub(w1 - w0);
    for (x, v) in e.iter_mut().zip([1, packets, carried, gained]) {
        *x += v;
    }
    Ok(())
}

fn config(cases: u32) -> Config {
    let seed = match std::env::var("VPCD_PROP_SEED").ok().as_deref() {
        Some("random") => RngSeed::Random,
        Some(s) => RngSeed::Fixed(s.parse().expect("VPCD_PROP_SEED: a number or `random`")),
        None => RngSeed::Fixed(0x6361_7272),
    };
    Config {
        cases,
        failure_persistence: None,
        rng_seed: seed,
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

fn edits() -> impl Strategy<Value = (usize, usize, usize)> {
    (0..20usize, any::<usize>(), any::<usize>())
}

fn run_all() {
    let cases: u32 = std::env::var("VPCD_CARRY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let tally = RefCell::new(Tally::default());
    let vpc = (topo::topo(), ops::steps(), edits(), ops::steps());
    TestRunner::new(config(cases))
        .run(&vpc, |(spec, before, edit, after)| {
            let (text, _) = topo::render(&spec);
            let c = Case {
                text: &text,
                this: None,
                before: &before,
                edit,
                after: &after,
            };
            run_case(&c, &tally)
        })
        .unwrap_or_else(|e| panic!("VPC mix: {e}"));
    let cloud = (
        topo::cloud(),
        ops::cloud_steps(),
        edits(),
        ops::cloud_steps(),
    );
    TestRunner::new(config(cases))
        .run(&cloud, |(spec, before, edit, after)| {
            let text = topo::render_cloud(&spec);
            let c = Case {
                text: &text,
                this: Some(spec.this_host()),
                before: &before,
                edit,
                after: &after,
            };
            run_case(&c, &tally)
        })
        .unwrap_or_else(|e| panic!("cloud mix: {e}"));
    report(&tally.borrow());
}

/// Prints the tally, and checks that the edits that leave some spaces alone carried entries
/// and that global ones carried none.
fn report(t: &Tally) {
    println!("edit: cases, packets compared, entries carried, hits gained");
    let mut total = [0u64; 4];
    for (name, v) in &t.by_edit {
        println!("  {name}: {} {} {} {}", v[0], v[1], v[2], v[3]);
        for (x, y) in total.iter_mut().zip(v) {
            *x += y;
        }
    }
    println!(
        "total: {} cases, {} packets agreed, {} entries carried, {} hits gained; {} edits refused",
        total[0], total[1], total[2], total[3], t.refused
    );
    let carried = |n: &str| t.by_edit.get(n).map_or(0, |v| v[2]);
    assert_eq!(carried("change a global setting"), 0);
    for n in [
        "nothing",
        "reorder instances",
        "reorder hosts",
        "flip an ACL rule",
    ] {
        assert!(carried(n) > 0, "{n}: nothing carried");
    }
}

#[test]
fn a_change_keeps_exactly_the_decisions_it_cannot_affect() {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(run_all)
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}
