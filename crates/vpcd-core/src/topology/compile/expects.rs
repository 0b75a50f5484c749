//! Expectations: what `vpcd lab check` verifies with real traffic.

use std::net::Ipv4Addr;

use super::super::file;
use super::super::model::*;
use super::Scope;
use super::diagnostics::Diagnostics;
use crate::policy::rules::Protocol;

impl Scope<'_> {
    pub(super) fn check_expects(&self, d: &mut Diagnostics) -> Vec<Option<Expect>> {
        self.f
            .expects
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let line = d.line(&e.span());
                let e = e.get_ref();
                let item = format!(
                    "expect #{} ({} -> {})",
                    n + 1,
                    e.from.get_ref(),
                    e.to.get_ref()
                );
                let from = self.expect_source(d, e, &item);
                let to = self.expect_target(d, e, &item);
                let (protocol, port) = expect_protocol_and_port(d, e, &item);
                Some(Expect {
                    from: from?,
                    to: to?,
                    protocol: protocol?,
                    port: port?,
                    reach: e.reach,
                    line,
                })
            })
            .collect()
    }

    /// Where an expectation's traffic starts: an instance, or the internet (when the file
    /// has one and no instance is named "internet").
    fn expect_source(
        &self,
        d: &mut Diagnostics,
        e: &file::Expect,
        item: &str,
    ) -> Option<ExpectSource> {
        let instance_names = &self.names.instance;
        if e.from.get_ref() == "internet"
            && self.internet.is_some()
            && !instance_names.contains_key("internet")
        {
            Some(ExpectSource::Internet)
        } else {
            d.resolve(instance_names, "instance", &e.from, item)
                .map(|id| ExpectSource::Instance(InstanceId(id)))
        }
    }

    /// Where an expectation's traffic goes: an instance, or an address.
    fn expect_target(
        &self,
        d: &mut Diagnostics,
        e: &file::Expect,
        item: &str,
    ) -> Option<ExpectTarget> {
        match self.names.instance.get(e.to.get_ref()) {
            Some(&id) => Some(ExpectTarget::Instance(InstanceId(id))),
            None => match e.to.get_ref().parse::<Ipv4Addr>() {
                Ok(a) => Some(ExpectTarget::Address(a)),
                Err(_) => {
                    d.err(
                        e.to.span(),
                        item,
                        format!(
                            "to \"{}\" is neither an instance nor an address",
                            e.to.get_ref()
                        ),
                    );
                    None
                }
            },
        }
    }
}

/// An expectation's protocol and port: a port for tcp and udp, none for icmp (each `None`
/// when wrong; both are checked).
fn expect_protocol_and_port(
    d: &mut Diagnostics,
    e: &file::Expect,
    item: &str,
) -> (Option<Protocol>, Option<Option<u16>>) {
    let protocol = match e.protocol.get_ref().to_ascii_lowercase().as_str() {
        "icmp" => Some(Protocol::Icmp),
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        other => {
            d.err(
                e.protocol.span(),
                item,
                format!("protocol \"{other}\" is not one of icmp, tcp, udp"),
            );
            None
        }
    };
    let port = match (protocol, &e.port) {
        (Some(p), Some(port)) if p.has_ports() => d
            .int_in(port, item, "port", 1..65_536)
            .map(|p| Some(p as u16)),
        (Some(p), None) if p.has_ports() => {
            d.err(
                e.protocol.span(),
                item,
                format!("{} needs a port", p.word()),
            );
            None
        }
        (Some(_), Some(port)) => {
            d.err(port.span(), item, "icmp takes no port");
            None
        }
        (_, _) => Some(None),
    };
    (protocol, port)
}
