//! The `grex` command line as a user meets it: help, and clear errors when no node is reachable.

use std::process::Command;

fn grex(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_grex")).args(args).env_remove("GREX_NODE").output().expect("run grex")
}

#[test]
fn help_lists_the_commands_of_the_design() {
    let out = grex(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["serve", "dev", "module", "job", "item", "canary", "status"] {
        assert!(help.contains(command), "`{command}` missing from:\n{help}");
    }
}

#[test]
fn a_client_command_without_a_node_fails_on_stderr_with_a_non_zero_exit() {
    let out = grex(&["status", "--node", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the node"), "{err}");
}

#[test]
fn a_node_url_without_a_known_scheme_is_refused_with_an_example() {
    let out = grex(&["status", "--node", "127.0.0.1:7070"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://127.0.0.1:7070"));
}

#[test]
fn a_quic_url_without_a_ca_file_says_where_to_find_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_grex"))
        .args(["status", "--node", "quic://127.0.0.1:9"])
        .env_remove("GREX_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.pem"));
}
