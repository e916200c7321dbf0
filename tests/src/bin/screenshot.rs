//! `screenshot URL OUT.png [SECONDS]`: loads URL in headless Chromium at 1280 × 1100, lets it run
//! for SECONDS (default 60) of real time, and writes a PNG of it (scripts/dashboard-screenshot.sh).

use std::time::Duration;

use grex_tests::browser::Browser;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, out, rest @ ..] = args.as_slice() else {
        eprintln!("usage: screenshot URL OUT.png [SECONDS]");
        std::process::exit(2);
    };
    let seconds: u64 = rest.first().map_or(60, |s| s.parse().expect("SECONDS is a whole number"));
    let mut browser = Browser::launch();
    browser.open(url, 1280, 1100);
    std::thread::sleep(Duration::from_secs(seconds));
    std::fs::write(out, browser.screenshot()).unwrap_or_else(|e| panic!("cannot write {out}: {e}"));
}
