//! Reduce modules: a scan (`grex job scan MODULE --reduce REDUCER`) folds its jobs' outputs with a
//! second module, in batches. Each call's input is the accumulator so far (none on the first call)
//! and a batch of outputs; its output is the new accumulator. Batches may be folded in any
//! grouping and order, so the fold must be associative and commutative (a sum, a count, a maximum,
//! a union of sets).
//!
//! ```no_run
//! use grex_sdk::{Bucket, Error, fold::Fold};
//!
//! grex_sdk::job!(sum);
//!
//! /// Adds decimal outputs.
//! fn sum(_bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
//!     let fold = Fold::decode(input)?;
//!     let mut total: i64 = fold.acc.map_or(Ok(0), |acc| std::str::from_utf8(acc).unwrap_or("").parse())
//!         .map_err(|_| Error::msg("the accumulator is not a decimal integer"))?;
//!     for output in fold.outputs {
//!         total += std::str::from_utf8(output).unwrap_or("").trim().parse::<i64>().unwrap_or(0);
//!     }
//!     Ok(total.to_string())
//! }
//! ```
//!
//! The bytes: a flag byte (1 when an accumulator follows), then the accumulator and each output as
//! a 4-byte little-endian length and the bytes.

use crate::Error;

/// A reduce call's input, decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Fold<'a> {
    /// The accumulator so far: the last call's output (`None` on the first call).
    pub acc: Option<&'a [u8]>,
    /// The outputs to fold in, in no particular order.
    pub outputs: Vec<&'a [u8]>,
}

impl<'a> Fold<'a> {
    /// Reads a reduce call's input.
    pub fn decode(input: &'a [u8]) -> Result<Fold<'a>, Error> {
        let (&flag, mut rest) =
            input.split_first().ok_or(Error::msg("a fold's input is empty; is this a reduce module?"))?;
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_at_checked(4).ok_or(Error::msg("a fold's input ends inside a length"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let (part, tail) = tail.split_at_checked(len).ok_or(Error::msg("a fold's input ends inside a part"))?;
            parts.push(part);
            rest = tail;
        }
        match flag {
            0 => Ok(Fold { acc: None, outputs: parts }),
            1 if !parts.is_empty() => {
                let acc = parts.remove(0);
                Ok(Fold { acc: Some(acc), outputs: parts })
            }
            _ => Err(Error::msg("a fold's input does not start with a valid flag; is this a reduce module?")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Fold;

    #[test]
    fn inputs_with_and_without_an_accumulator_decode() {
        let first = [0, 1, 0, 0, 0, b'3', 0, 0, 0, 0];
        assert_eq!(Fold::decode(&first).unwrap(), Fold { acc: None, outputs: vec![&b"3"[..], b""] });
        let later = [1, 2, 0, 0, 0, b'4', b'2', 1, 0, 0, 0, b'7'];
        assert_eq!(Fold::decode(&later).unwrap(), Fold { acc: Some(&b"42"[..]), outputs: vec![&b"7"[..]] });
        assert!(Fold::decode(&[]).is_err());
        assert!(Fold::decode(&[1]).is_err());
        assert!(Fold::decode(&[0, 9, 0, 0, 0, 1]).is_err());
    }
}
