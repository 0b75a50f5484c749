//! Diagnostics: the errors of a file, each with its line, column and item, and the checks of
//! single values (names, references, addresses, CIDRs, numbers) that report into them.

use std::fmt::Display;
use std::net::Ipv4Addr;
use std::ops::Range;

use hashbrown::HashMap;
use ipnet::Ipv4Net;
use toml::Spanned;

use super::super::error::TopologyError;
use super::super::file::Text;

/// Names of one kind of item, mapped to their index.
pub(super) type Names = HashMap<String, u32>;

/// Where errors go, and how a byte offset becomes a line and column.
pub(super) struct Diagnostics<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    pub errors: Vec<TopologyError>,
}

impl<'a> Diagnostics<'a> {
    pub fn new(text: &'a str, file: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Diagnostics {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// The file's name.
    pub fn file(&self) -> &str {
        self.file
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line.saturating_sub(1)];
        // Columns count characters, as editors do, not bytes.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line.max(1), column)
    }

    /// The line a span starts on.
    pub fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    /// Reports an error at `span` about `item`.
    pub fn err(&mut self, span: Range<usize>, item: impl Display, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(TopologyError {
            file: self.file.to_string(),
            line,
            column,
            item: item.to_string(),
            message: message.into(),
        });
    }

    /// Registers the names of one kind; duplicates and bad names are errors.
    pub fn names<T>(
        &mut self,
        kind: &str,
        items: &[Spanned<T>],
        name: impl Fn(&T) -> &Text,
    ) -> Names {
        let mut names = Names::new();
        for (i, item) in items.iter().enumerate() {
            let n = name(item.get_ref());
            if n.get_ref().trim().is_empty() {
                self.err(n.span(), format!("{kind} #{}", i + 1), "name is empty");
                continue;
            }
            // The first definition keeps the name: references must not move to a duplicate.
            if names.contains_key(n.get_ref()) {
                let message = format!("duplicate {kind} name \"{}\"", n.get_ref());
                self.err(n.span(), label(kind, n), message);
            } else {
                names.insert(n.get_ref().clone(), i as u32);
            }
        }
        names
    }

    /// The index a reference names; an unknown name is an error.
    pub fn resolve(&mut self, names: &Names, kind: &str, r: &Text, item: &str) -> Option<u32> {
        let found = names.get(r.get_ref()).copied();
        if found.is_none() {
            let message = format!("unknown {kind} \"{}\"", r.get_ref());
            self.err(r.span(), item, message);
        }
        found
    }

    /// An IPv4 address.
    pub fn address(&mut self, t: &Text, item: &str, what: &str) -> Option<Ipv4Addr> {
        match t.get_ref().trim().parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let message = format!("{what} \"{}\" is not an IPv4 address", t.get_ref());
                self.err(t.span(), item, message);
                None
            }
        }
    }

    /// A CIDR with its host bits clear; with `bare_address`, a plain address means /32.
    pub fn cidr(
        &mut self,
        t: &Text,
        item: &str,
        what: &str,
        bare_address: bool,
    ) -> Option<Ipv4Net> {
        let s = t.get_ref().trim();
        let parsed = if bare_address && !s.contains('/') {
            s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
        } else {
            s.parse::<Ipv4Net>().ok()
        };
        match parsed {
            None => {
                let form = if bare_address {
                    "a CIDR or an address"
                } else {
                    "a CIDR"
                };
                let message = format!("{what} \"{s}\" is not {form}, like 10.0.0.0/16");
                self.err(t.span(), item, message);
                None
            }
            Some(n) if n.trunc() != n => {
                let message = format!(
                    "{what} \"{s}\" has host bits set: did you mean {}?",
                    n.trunc()
                );
                self.err(t.span(), item, message);
                None
            }
            Some(n) => Some(n),
        }
    }

    /// An integer in `range`.
    pub fn int_in(
        &mut self,
        v: &Spanned<i64>,
        item: &str,
        what: &str,
        range: Range<i64>,
    ) -> Option<i64> {
        let x = *v.get_ref();
        if range.contains(&x) {
            return Some(x);
        }
        let message = format!(
            "{what} {x} is out of range {}..={}",
            range.start,
            range.end - 1
        );
        self.err(v.span(), item, message);
        None
    }
}

/// An item as errors name it: `kind "name"`.
pub(super) fn label(kind: &str, name: &Text) -> String {
    format!("{kind} \"{}\"", name.get_ref())
}
