//! A client application: runs the `ledger` job for a customer over QUIC, going straight to the
//! node the canary names.
//!
//! `cargo run -p grex-examples --bin client -- quic://127.0.0.1:7071 grex-data-dev/ca.pem`
//! against `scripts/dev.sh`.

use anyhow::Context;
use grex_client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "quic://127.0.0.1:7071".into());
    let ca = args.next().unwrap_or_else(|| "grex-data-dev/ca.pem".into());
    let client = Client::connect(&url, Some(ca.as_ref())).await.context("connecting")?;

    let canary = client.canary(b"customer-7").await?;
    println!("best node for customer-7: {} (flock {}, {})", canary.url, canary.flock, canary.role);
    let client = match &canary.quic {
        Some(quic) if quic != &url => Client::connect(quic, Some(ca.as_ref())).await?,
        _ => client,
    };

    let record = br#"{"description":"coffee beans","other":"Roastery","amount":-1450}"#;
    let out = client.run_job(b"customer-7", "ledger", record, false).await?;
    println!("ledger: {}", String::from_utf8_lossy(&out.output));
    Ok(())
}
