//! Docs made from sources stay in step with them.

use std::process::Command;

/// docs/guest-contract.md is what scripts/wit-docs.py renders guest-sdk/wit/job.wit to.
#[test]
fn the_guest_contract_reference_is_rendered_from_the_wit() {
    let root = grex_tests::workspace_root();
    let checked =
        Command::new("python3").arg(root.join("scripts/wit-docs.py")).arg("--check").output().expect("python3");
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
}
