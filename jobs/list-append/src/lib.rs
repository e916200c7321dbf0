//! `list-append`: the workload of the fault tests (an Elle-style list-append register). Input
//! `append V` appends the decimal value `V` to the bucket's item `list` and returns the whole list;
//! `read` returns it unchanged. The list is decimal values separated by single spaces, oldest
//! first, so `grex item get BUCKET list` prints it as it is.
//!
//! Each value a client appends is unique, so a checker can tell from the lists it got back
//! whether an acknowledged append was lost, applied twice or reordered.

use grex_sdk::{Bucket, Error};

grex_sdk::job!(list_append);

/// The item the list lives in.
pub const LIST_ITEM: &str = "list";

/// What the input asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// Append this value and return the list.
    Append(u64),
    /// Return the list.
    Read,
}

fn list_append(bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
    let list = bucket.get_text(LIST_ITEM)?.unwrap_or_default();
    match parse_op(input)? {
        Op::Read => Ok(list),
        Op::Append(value) => {
            let list = if list.is_empty() { value.to_string() } else { format!("{list} {value}") };
            bucket.put_text(LIST_ITEM, &list);
            Ok(list)
        }
    }
}

/// Parses `append V` or `read`.
pub fn parse_op(input: &[u8]) -> Result<Op, Error> {
    let text = std::str::from_utf8(input).map_err(|_| Error::msg("the input must be UTF-8 text"))?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("read"), None, None) => Ok(Op::Read),
        (Some("append"), Some(value), None) => value
            .parse()
            .map(Op::Append)
            .map_err(|_| Error::msg(format!("the value to append must be a decimal integer, got `{value}`"))),
        _ => Err(Error::msg(format!("the input must be `append VALUE` or `read`, got `{text}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_read_parse() {
        assert_eq!(parse_op(b"append 17").unwrap(), Op::Append(17));
        assert_eq!(parse_op(b" read\n").unwrap(), Op::Read);
    }

    #[test]
    fn anything_else_is_refused_with_the_accepted_forms() {
        for bad in [&b"append"[..], b"append x", b"append 1 2", b"write 3", b"", &[0xff]] {
            let e = parse_op(bad).unwrap_err().to_string();
            assert!(e.contains("append") || e.contains("UTF-8"), "{e}");
        }
    }
}
