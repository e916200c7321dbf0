//! `hostile`: misbehaves on purpose, so tests can check that each limit holds and the node keeps
//! serving. The input names the misbehaviour:
//!
//! | input | does |
//! |---|---|
//! | `loop` | spins forever (deadline or fuel) |
//! | `balloon` | allocates until memory runs out (memory limit) |
//! | `panic` | panics (trap) |
//! | `big-output N` | returns N bytes (output limit) |
//! | `big-changeset N` | writes N bytes into items of 1 MiB (change-set limit) |
//! | `fail` | writes an item, then returns an error (nothing commits) |
//! | `big-item N` | writes one item of N bytes (item limit) |
//! | `big-error N` | returns an error message of N bytes (error messages are cut) |
//! | `recurse N` | recurses N calls deep, with a stack array in each (stack exhaustion) |
//! | `host-calls` | calls the host without end (deadline) |
//! | `log` | logs a line at debug, info and warn (log filters) |

use grex_sdk::{Bucket, Error, Level};

grex_sdk::job!(hostile);

fn hostile(bucket: &mut Bucket, input: &[u8]) -> Result<Vec<u8>, Error> {
    let text = std::str::from_utf8(input).map_err(|_| Error::msg("input must be UTF-8"))?;
    let mut words = text.split_whitespace();
    let what = words.next().unwrap_or("");
    let size: usize = words.next().map(str::parse).transpose()?.unwrap_or(0);
    match what {
        "loop" => spin(),
        "balloon" => balloon(),
        "panic" => panic!("the hostile job panicked on purpose"),
        "big-output" => Ok(vec![b'x'; size]),
        "big-changeset" => {
            let chunk = vec![7u8; 1 << 20];
            for i in 0..size.div_ceil(chunk.len()) {
                bucket.put_bytes(&format!("chunk/{i}"), &chunk);
            }
            Ok(Vec::new())
        }
        "big-item" => {
            bucket.put_bytes("big", &vec![1u8; size]);
            Ok(Vec::new())
        }
        "big-error" => Err(Error::msg("e".repeat(size))),
        "recurse" => Ok(recurse(size as u64).to_le_bytes().to_vec()),
        "host-calls" => loop {
            std::hint::black_box(bucket.get_bytes("missing"));
        },
        "log" => {
            for (level, name) in [(Level::Debug, "debug"), (Level::Info, "info"), (Level::Warn, "warn")] {
                grex_sdk::log(level, &format!("hostile logs at {name}"));
            }
            Ok(Vec::new())
        }
        "fail" => {
            bucket.put_text("written-before-failing", "should never commit");
            Err(Error::msg("the hostile job failed on purpose"))
        }
        other => Err(Error::msg(format!("unknown misbehaviour `{other}`"))),
    }
}

fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Recursion the optimizer cannot flatten: each call keeps an array on the stack.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 32]);
    if depth == 0 { 0 } else { recurse(depth - 1).wrapping_add(frame[depth as usize % 32]) }
}

fn balloon() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        block[0] = 1;
        kept.push(std::hint::black_box(block));
    }
}
