//! A build without the `store` feature says so, and how to build it, for every command that
//! needs the store (`cargo test` without `--features vpcd/store`).

#![cfg(not(feature = "store"))]

use std::process::Command;

#[test]
fn the_store_commands_say_how_to_build_them() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/lab.toml");
    let url = "http://127.0.0.1:9";
    for args in [
        vec!["apply", file, "--store", url],
        vec!["get", "--store", url],
        vec!["run", "--store", url, "--host", "host-a"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_vpcd"))
            .args(&args)
            .output()
            .expect("vpcd runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("built without store support"),
            "{args:?}: {err}"
        );
        assert!(err.contains("--features vpcd/store"), "{args:?}: {err}");
    }
}
