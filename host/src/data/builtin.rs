//! Built-in bucket operations: the Redis hash commands (HSET, HGET, DEL, ...) as native code that
//! runs in place of a module.
//!
//! A built-in travels the same path as a job: it is named by a reserved module name
//! (`builtin:hset`; user module names cannot contain `:`), routed to the flock's leader, run by the
//! bucket's executor against the cached bucket through a [`JobView`] (so item and change-set limits
//! hold), and its change set is committed and replicated like any job's. Arguments and replies are
//! bincode ([`encode_args`], [`BuiltinReply`]).

use serde::{Deserialize, Serialize};

use super::{JobView, ViewError};
use crate::error::{ErrorCode, RemoteError, error};

/// The module-name prefix that selects a built-in.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// A built-in operation on one bucket (Redis: the key is the bucket, a hash field is an item).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// `HSET key field value [field value ...]`: the number of fields that were new.
    HSet,
    /// `HDEL key field [field ...]`: the number of fields deleted.
    HDel,
    /// `DEL key`: deletes every item; 1 if there were any.
    Del,
    /// `HGET key field`.
    HGet,
    /// `HMGET key field [field ...]`.
    HMGet,
    /// `HGETALL key`: every field and value.
    HGetAll,
    /// `HKEYS key`.
    HKeys,
    /// `HLEN key`.
    HLen,
    /// `HEXISTS key field`.
    HExists,
    /// `EXISTS key`: 1 if the bucket has any item.
    Exists,
}

/// What a built-in returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuiltinReply {
    /// A count or flag.
    Int(i64),
    /// One value, or none.
    Value(Option<Vec<u8>>),
    /// Several values in the order asked for.
    Values(Vec<Option<Vec<u8>>>),
    /// Field names.
    Fields(Vec<String>),
    /// Fields with their values.
    Pairs(Vec<(String, Vec<u8>)>),
}

const ALL: [Builtin; 10] = [
    Builtin::HSet,
    Builtin::HDel,
    Builtin::Del,
    Builtin::HGet,
    Builtin::HMGet,
    Builtin::HGetAll,
    Builtin::HKeys,
    Builtin::HLen,
    Builtin::HExists,
    Builtin::Exists,
];

impl Builtin {
    /// The built-in a module name selects, if it is one.
    pub fn from_module(name: &str) -> Option<Builtin> {
        let op = name.strip_prefix(BUILTIN_PREFIX)?;
        ALL.into_iter().find(|b| b.op() == op)
    }

    /// The reserved module name that runs it.
    pub fn module_name(self) -> String {
        format!("{BUILTIN_PREFIX}{}", self.op())
    }

    fn op(self) -> &'static str {
        match self {
            Builtin::HSet => "hset",
            Builtin::HDel => "hdel",
            Builtin::Del => "del",
            Builtin::HGet => "hget",
            Builtin::HMGet => "hmget",
            Builtin::HGetAll => "hgetall",
            Builtin::HKeys => "hkeys",
            Builtin::HLen => "hlen",
            Builtin::HExists => "hexists",
            Builtin::Exists => "exists",
        }
    }

    /// True if it never writes (so it may run on any herder with the bucket warm).
    pub fn read_only(self) -> bool {
        !matches!(self, Builtin::HSet | Builtin::HDel | Builtin::Del)
    }

    /// Runs against a bucket's view; the caller commits the view's writes if this succeeds.
    pub fn run(self, view: &mut JobView, args: &[&[u8]]) -> Result<BuiltinReply, RemoteError> {
        let all = |view: &JobView| view.list("", None, usize::MAX);
        Ok(match self {
            Builtin::HSet => {
                if args.is_empty() || !args.len().is_multiple_of(2) {
                    return Err(error(ErrorCode::BadRequest, "HSET takes field value pairs"));
                }
                let mut added = 0;
                for pair in args.chunks(2) {
                    let existed = view.set(field(pair[0])?, pair[1].to_vec()).map_err(view_error)?;
                    added += i64::from(!existed);
                }
                BuiltinReply::Int(added)
            }
            Builtin::HDel => {
                let mut deleted = 0;
                for f in args {
                    deleted += i64::from(view.delete(field(f)?).map_err(view_error)?);
                }
                BuiltinReply::Int(deleted)
            }
            Builtin::Del => {
                let fields = all(view);
                for f in &fields {
                    view.delete(f).map_err(view_error)?;
                }
                BuiltinReply::Int(i64::from(!fields.is_empty()))
            }
            Builtin::HGet => {
                let [f] = args else { return Err(error(ErrorCode::BadRequest, "HGET takes one field")) };
                BuiltinReply::Value(view.get(field(f)?).map_err(view_error)?.map(<[u8]>::to_vec))
            }
            Builtin::HMGet => {
                let mut values = Vec::with_capacity(args.len());
                for f in args {
                    values.push(view.get(field(f)?).map_err(view_error)?.map(<[u8]>::to_vec));
                }
                BuiltinReply::Values(values)
            }
            Builtin::HGetAll => {
                let pairs = all(view)
                    .into_iter()
                    .filter_map(|f| {
                        let value = view.get(&f).ok().flatten()?.to_vec();
                        Some((f, value))
                    })
                    .collect();
                BuiltinReply::Pairs(pairs)
            }
            Builtin::HKeys => BuiltinReply::Fields(all(view)),
            Builtin::HLen => BuiltinReply::Int(all(view).len() as i64),
            Builtin::HExists => {
                let [f] = args else { return Err(error(ErrorCode::BadRequest, "HEXISTS takes one field")) };
                BuiltinReply::Int(i64::from(view.get(field(f)?).map_err(view_error)?.is_some()))
            }
            Builtin::Exists => BuiltinReply::Int(i64::from(!view.list("", None, 1).is_empty())),
        })
    }
}

/// Encodes a built-in's arguments as its job input: a sequence of byte strings, each written as
/// its length and bytes in one copy.
pub fn encode_args(args: &[Vec<u8>]) -> Vec<u8> {
    let bytes = args.iter().map(|a| a.len() + 4).sum();
    let args: Vec<&serde_bytes::Bytes> = args.iter().map(|a| serde_bytes::Bytes::new(a)).collect();
    grex_client::proto::encode_frame_sized(&args, bytes).expect("byte strings always encode")
}

/// Decodes a built-in's arguments, borrowed from its input.
pub fn decode_args(input: &[u8]) -> Result<Vec<&[u8]>, RemoteError> {
    let args: Vec<&serde_bytes::Bytes> = grex_client::proto::decode_frame_borrowed(input)
        .map_err(|e| error(ErrorCode::BadRequest, format!("malformed built-in arguments: {e}")))?;
    Ok(args.into_iter().map(|a| &**a).collect())
}

/// A hash field is an item key: 1 to 256 bytes of UTF-8.
fn field(bytes: &[u8]) -> Result<&str, RemoteError> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        error(ErrorCode::InvalidItemKey, "hash fields are item keys, which must be UTF-8 text; this one is not")
    })?;
    grex_client::proto::check_item_key(text)?;
    Ok(text)
}

fn view_error(e: ViewError) -> RemoteError {
    error(e.code(), e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::data::BucketData;

    fn view(items: &[(&str, &str)]) -> JobView {
        let items: BTreeMap<String, Vec<u8>> =
            items.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        JobView::new(BucketData::new(3, items), 1024, 4096)
    }

    fn args<'a>(list: &[&'a str]) -> Vec<&'a [u8]> {
        list.iter().map(|a| a.as_bytes()).collect()
    }

    #[test]
    fn arguments_keep_the_encoding_of_a_list_of_byte_vectors() {
        // Nodes of earlier releases encode and decode built-in arguments as `Vec<Vec<u8>>`.
        let owned = vec![b"field".to_vec(), vec![0, 1, 255], Vec::new()];
        let encoded = encode_args(&owned);
        assert_eq!(encoded, grex_client::proto::encode_frame(&owned).unwrap());
        assert_eq!(decode_args(&encoded).unwrap(), owned.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let e = decode_args(&encoded[..encoded.len() - 1]).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn every_builtin_is_named_by_its_reserved_module_name() {
        for b in ALL {
            assert_eq!(Builtin::from_module(&b.module_name()), Some(b));
        }
        assert_eq!(Builtin::from_module("hset"), None, "plain names are user modules");
        assert_eq!(Builtin::from_module("builtin:nope"), None);
    }

    #[test]
    fn hset_counts_new_fields_and_the_view_holds_the_writes() {
        let mut v = view(&[("a", "1")]);
        assert_eq!(Builtin::HSet.run(&mut v, &args(&["a", "2", "b", "3"])).unwrap(), BuiltinReply::Int(1));
        assert_eq!(Builtin::HGet.run(&mut v, &args(&["a"])).unwrap(), BuiltinReply::Value(Some(b"2".to_vec())));
        assert_eq!(
            Builtin::HGetAll.run(&mut v, &[]).unwrap(),
            BuiltinReply::Pairs(vec![("a".into(), b"2".to_vec()), ("b".into(), b"3".to_vec())])
        );
        let (_, change) = v.finish(b"k", 0);
        let change = change.expect("writes");
        assert_eq!((change.version, change.writes.len()), (4, 2));
    }

    #[test]
    fn reads_deletes_and_counts() {
        let mut v = view(&[("a", "1"), ("b", "2")]);
        assert_eq!(Builtin::HLen.run(&mut v, &[]).unwrap(), BuiltinReply::Int(2));
        assert_eq!(Builtin::HExists.run(&mut v, &args(&["z"])).unwrap(), BuiltinReply::Int(0));
        assert_eq!(
            Builtin::HMGet.run(&mut v, &args(&["b", "z"])).unwrap(),
            BuiltinReply::Values(vec![Some(b"2".to_vec()), None])
        );
        assert_eq!(Builtin::HDel.run(&mut v, &args(&["a", "z"])).unwrap(), BuiltinReply::Int(1));
        assert_eq!(Builtin::HKeys.run(&mut v, &[]).unwrap(), BuiltinReply::Fields(vec!["b".into()]));
        assert_eq!(Builtin::Del.run(&mut v, &[]).unwrap(), BuiltinReply::Int(1));
        assert_eq!(Builtin::Exists.run(&mut v, &[]).unwrap(), BuiltinReply::Int(0));
        assert_eq!(Builtin::Del.run(&mut v, &[]).unwrap(), BuiltinReply::Int(0));
    }

    #[test]
    fn bad_fields_and_oversized_values_are_named_errors() {
        let mut v = view(&[]);
        let e = Builtin::HSet.run(&mut v, &[&[0xff], b"x"]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidItemKey);
        let e = Builtin::HSet.run(&mut v, &[b"f", &[0; 2000]]).unwrap_err();
        assert_eq!(e.code, ErrorCode::ItemTooLarge);
        let e = Builtin::HSet.run(&mut v, &args(&["odd"])).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}
