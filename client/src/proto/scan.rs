//! Scans: a read-only job run on every bucket (or every bucket whose key starts with a prefix),
//! flock by flock, its results streamed back as they arrive, optionally folded into one output by
//! a second module.
//!
//! Over QUIC a scan is one request and a stream of [`ScanEvent`] frames; over HTTP
//! (`POST /v1/scan?module=NAME`) the same events, one JSON object per line. Byte strings (bucket
//! keys, outputs) are JSON strings when they are UTF-8 and `{"hex": "..."}` otherwise.
//!
//! A reduce module folds outputs in batches: each call's input is [`encode_fold`]'s, the
//! accumulator so far (none on the first call) then a batch of outputs, and its output is the new
//! accumulator. Batches are folded in any grouping and order, so the fold must be associative and
//! commutative.

use serde::{Deserialize, Serialize};

use super::RemoteError;

/// What a scan runs, and on which buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// The module run read-only on every bucket (a name or `sha256:HEX`).
    pub module: String,
    /// The input every job gets.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// Only buckets whose key starts with these bytes (all of them when empty).
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
    /// A module that folds the outputs into one ([`ScanSummary::reduced`]); the outputs are then
    /// not streamed, only the buckets whose job failed.
    pub reduce: Option<String>,
}

/// One bucket's job in a scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanItem {
    /// The bucket's key.
    #[serde(with = "text_or_hex")]
    pub bucket: Vec<u8>,
    /// What the job returned (`None` if it failed).
    #[serde(with = "text_or_hex::option")]
    pub output: Option<Vec<u8>>,
    /// Why the job failed.
    pub error: Option<RemoteError>,
}

/// One flock, scanned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockScanned {
    /// The flock.
    pub flock: u32,
    /// The flock's applied log index its buckets were read at (all of them at this one).
    pub version: u64,
    /// The node that ran its jobs.
    pub node: String,
    /// Buckets scanned.
    pub buckets: u64,
    /// Of which the job failed.
    pub failed: u64,
}

/// How a scan ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    /// Flocks scanned (every flock of the cluster).
    pub flocks: u32,
    /// Buckets scanned.
    pub buckets: u64,
    /// Of which the job failed.
    pub failed: u64,
    /// The reduce module's last output (with a reduce module, and at least one output).
    #[serde(with = "text_or_hex::option")]
    pub reduced: Option<Vec<u8>>,
}

/// What a scan streams. It ends with `done` or `failed`, never with neither: a stream that breaks
/// before either did not finish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanEvent {
    /// Results of some of a flock's buckets.
    Results {
        /// The flock.
        flock: u32,
        /// The buckets' results, in key order within the flock.
        items: Vec<ScanItem>,
    },
    /// Every bucket of a flock has been sent.
    Flock(FlockScanned),
    /// Every flock has been scanned.
    Done(ScanSummary),
    /// The scan stopped before every flock was scanned: the error says which and why. Results
    /// already sent are right, but some buckets were not scanned.
    Failed(RemoteError),
}

/// A reduce module's input: a flag byte (1 when an accumulator follows), then the accumulator and
/// each output as a 4-byte little-endian length and the bytes (the guest SDK's `fold::Fold`
/// reads it).
pub fn encode_fold(acc: Option<&[u8]>, outputs: &[Vec<u8>]) -> Vec<u8> {
    let size = 1 + acc.map_or(0, |a| 4 + a.len()) + outputs.iter().map(|o| 4 + o.len()).sum::<usize>();
    let mut input = Vec::with_capacity(size);
    input.push(u8::from(acc.is_some()));
    for part in acc.into_iter().chain(outputs.iter().map(Vec::as_slice)) {
        input.extend_from_slice(&(part.len() as u32).to_le_bytes());
        input.extend_from_slice(part);
    }
    input
}

/// Byte strings as bytes in bincode, and in JSON as a string when they are UTF-8, else as
/// `{"hex": "..."}`.
pub mod text_or_hex {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Text {
        Utf8(String),
        Hex { hex: String },
    }

    fn to_text(bytes: &[u8]) -> Text {
        match std::str::from_utf8(bytes) {
            Ok(text) => Text::Utf8(text.to_owned()),
            Err(_) => Text::Hex { hex: bytes.iter().map(|b| format!("{b:02x}")).collect() },
        }
    }

    fn from_text<E: serde::de::Error>(text: Text) -> Result<Vec<u8>, E> {
        match text {
            Text::Utf8(text) => Ok(text.into_bytes()),
            Text::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err(E::custom("hex text of odd length"));
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| E::custom("invalid hex text")))
                    .collect()
            }
        }
    }

    /// Serializes bytes.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            to_text(bytes).serialize(serializer)
        } else {
            serde_bytes::serialize(bytes, serializer)
        }
    }

    /// Deserializes bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        if deserializer.is_human_readable() {
            from_text(Text::deserialize(deserializer)?)
        } else {
            serde_bytes::deserialize(deserializer)
        }
    }

    /// The same, for optional bytes (`null` in JSON).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        /// Serializes optional bytes.
        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
            if serializer.is_human_readable() {
                bytes.as_deref().map(super::to_text).serialize(serializer)
            } else {
                serde_bytes::serialize(bytes, serializer)
            }
        }

        /// Deserializes optional bytes.
        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
            if deserializer.is_human_readable() {
                Option::<super::Text>::deserialize(deserializer)?.map(super::from_text).transpose()
            } else {
                serde_bytes::deserialize(deserializer)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_inputs_are_a_flag_then_length_prefixed_parts() {
        // The same bytes as the guest SDK's `fold` tests decode.
        assert_eq!(encode_fold(None, &[b"3".to_vec(), Vec::new()]), [0, 1, 0, 0, 0, b'3', 0, 0, 0, 0]);
        assert_eq!(encode_fold(Some(b"42"), &[b"7".to_vec()]), [1, 2, 0, 0, 0, b'4', b'2', 1, 0, 0, 0, b'7']);
    }

    #[test]
    fn byte_strings_are_text_in_json_when_they_can_be_and_bytes_in_frames() {
        let item = ScanItem { bucket: b"user-1".to_vec(), output: Some(vec![0xff, 0x00]), error: None };
        let json = serde_json::to_string(&item).unwrap();
        assert_eq!(json, r#"{"bucket":"user-1","output":{"hex":"ff00"},"error":null}"#);
        assert_eq!(serde_json::from_str::<ScanItem>(&json).unwrap(), item);
        let frame = super::super::encode_frame(&ScanEvent::Results { flock: 3, items: vec![item.clone()] }).unwrap();
        let back: ScanEvent = super::super::decode_frame(&frame).unwrap();
        assert_eq!(back, ScanEvent::Results { flock: 3, items: vec![item] });
    }
}
