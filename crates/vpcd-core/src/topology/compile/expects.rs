//! Expectations: what `vpcd lab check` verifies with real traffic.

use std::net::Ipv4Addr;

use super::super::model::*;
use super::Scope;
use super::diagnostics::Diagnostics;
use crate::policy::rules::Protocol;

impl Scope<'_> {
    pub(super) fn check_expects(&self, d: &mut Diagnostics) -> Vec<Option<Expect>> {
        let (f, instance_names) = (self.f, &self.names.instance);
        let internet = self.internet.is_some();
        f.expects
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
                let from = if e.from.get_ref() == "internet"
                    && internet
                    && !instance_names.contains_key("internet")
                {
                    Some(ExpectSource::Internet)
                } else {
                    d.resolve(instance_names, "instance", &e.from, &item)
                        .map(|id| ExpectSource::Instance(InstanceId(id)))
                };
                let to = match instance_names.get(e.to.get_ref()) {
                    Some(&id) => Some(ExpectTarget::Instance(InstanceId(id))),
                    None => match e.to.get_ref().parse::<Ipv4Addr>() {
                        Ok(a) => Some(ExpectTarget::Address(a)),
                        Err(_) => {
                            d.err(
                                e.to.span(),
                                &item,
                                format!(
                                    "to \"{}\" is neither an instance nor an address",
                                    e.to.get_ref()
                                ),
                            );
                            None
                        }
                    },
                };
                let protocol = match e.protocol.get_ref().to_ascii_lowercase().as_str() {
                    "icmp" => Some(Protocol::Icmp),
                    "tcp" => Some(Protocol::Tcp),
                    "udp" => Some(Protocol::Udp),
                    other => {
                        d.err(
                            e.protocol.span(),
                            &item,
                            format!("protocol \"{other}\" is not one of icmp, tcp, udp"),
                        );
                        None
                    }
                };
                let port = match (protocol, &e.port) {
                    (Some(p), Some(port)) if p.has_ports() => d
                        .int_in(port, &item, "port", 1..65_536)
                        .map(|p| Some(p as u16)),
                    (Some(p), None) if p.has_ports() => {
                        d.err(
                            e.protocol.span(),
                            &item,
                            format!("{} needs a port", p.word()),
                        );
                        None
                    }
                    (Some(_), Some(port)) => {
                        d.err(port.span(), &item, "icmp takes no port");
                        None
                    }
                    (_, _) => Some(None),
                };
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
}
