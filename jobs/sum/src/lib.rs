//! `sum`: a reduce module that adds decimal outputs, such as `counter`'s:
//! `grex job scan counter --input 0 --reduce sum` prints the total of every bucket's count.

use grex_sdk::fold::Fold;
use grex_sdk::{Bucket, Error};

grex_sdk::job!(sum);

fn sum(_bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
    let fold = Fold::decode(input)?;
    let mut total = match fold.acc {
        None => 0,
        Some(acc) => decimal(acc).map_err(|_| Error::msg("the accumulator is not a decimal integer"))?,
    };
    for output in fold.outputs {
        let value = decimal(output).map_err(|text| Error::msg(format!("`sum` adds decimal integers, not `{text}`")))?;
        total = total.checked_add(value).ok_or(Error::msg("the sum overflows a 64-bit integer"))?;
    }
    Ok(total.to_string())
}

/// A decimal integer (surrounding spaces ignored), or the text that is not one.
fn decimal(bytes: &[u8]) -> Result<i64, String> {
    let text = String::from_utf8_lossy(bytes);
    text.trim().parse().map_err(|_| text.chars().take(40).collect())
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn decimals_parse_and_others_are_named() {
        assert_eq!(decimal(b" 42\n"), Ok(42));
        assert_eq!(decimal(b"-7"), Ok(-7));
        assert_eq!(decimal(b"forty"), Err("forty".to_owned()));
    }
}
