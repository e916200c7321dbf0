//! `counter`: adds a decimal increment (default 1) to the bucket's item `count` and returns the
//! new value as decimal text. The item holds decimal text too, so `grex item get BUCKET count`
//! prints it as it is. An increment of 0 only reads the count, so `counter` with input `0` runs
//! read-only (`grex job scan counter --input 0` lists every bucket's count).

use grex_sdk::{Bucket, Error};

grex_sdk::job!(counter);

/// The item the count lives in.
pub const COUNT_ITEM: &str = "count";

fn counter(bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
    let step = parse_increment(input)?;
    let count = match bucket.get_text(COUNT_ITEM)? {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| Error::msg(format!("item `{COUNT_ITEM}` holds `{text}`, not a decimal integer")))?,
    };
    let count = count
        .checked_add(step)
        .ok_or_else(|| Error::msg(format!("adding {step} to {count} overflows a 64-bit count")))?;
    let text = count.to_string();
    if step != 0 {
        bucket.put_text(COUNT_ITEM, &text);
    }
    Ok(text)
}

/// The increment in `input`: empty means 1, otherwise a decimal integer (surrounding spaces ignored).
pub fn parse_increment(input: &[u8]) -> Result<i64, Error> {
    let text = std::str::from_utf8(input).map_err(|_| Error::msg("the increment must be UTF-8 decimal text"))?;
    match text.trim() {
        "" => Ok(1),
        t => t
            .parse()
            .map_err(|_| Error::msg(format!("the increment must be a decimal integer such as 5 or -2, got `{t}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_increment;

    #[test]
    fn empty_input_increments_by_one() {
        assert_eq!(parse_increment(b"").unwrap(), 1);
        assert_eq!(parse_increment(b" \n").unwrap(), 1);
    }

    #[test]
    fn decimal_input_is_the_increment() {
        assert_eq!(parse_increment(b"42").unwrap(), 42);
        assert_eq!(parse_increment(b" -7\n").unwrap(), -7);
    }

    #[test]
    fn non_decimal_input_is_refused() {
        assert!(parse_increment(b"four").unwrap_err().to_string().contains("decimal integer"));
        assert!(parse_increment(&[0xff]).is_err());
    }
}
