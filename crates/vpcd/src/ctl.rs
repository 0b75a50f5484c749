//! `vpcd ctl`: the client of a daemon's control socket.

use std::path::Path;
use std::process::ExitCode;

/// `vpcd ctl`: one request to a daemon's control socket; the reply as text, or (`json`) the
/// whole reply object. Exit 1 when the daemon refused, 2 when it could not be asked.
pub fn ctl(path: &Path, request: vpcd::control::Request, json: bool) -> ExitCode {
    let reply = match vpcd::control::ask(path, &request) {
        Ok(r) => r,
        Err(e) => {
            errln!("vpcd ctl: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
    } else if reply.ok {
        out!("{}", reply.text);
        if !reply.text.is_empty() && !reply.text.ends_with('\n') {
            outln!();
        }
    } else {
        errln!("vpcd ctl: {}", reply.error);
    }
    if reply.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
