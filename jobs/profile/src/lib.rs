//! `profile`: one customer's contacts, orders and favourites under one bucket.
//!
//! Each entry is an item `<kind>/<id>` holding JSON text, where kind is `contact`, `order` or
//! `favourite`. Input is one JSON command:
//!
//! - `{"op": "add", "kind": "contact", "id": "bob", "value": {"email": "bob@example.com"}}`
//!   adds or replaces an entry; returns `{"added": "contact/bob"}`.
//! - `{"op": "remove", "kind": "contact", "id": "bob"}` returns `{"removed": true|false}`.
//! - `{"op": "list", "kind": "contact"}` returns `{"contact": {"bob": {...}, ...}}`; leave out
//!   `kind` to list all three kinds.

use grex_sdk::{Bucket, Error};
use serde::Deserialize;
use serde_json::{Map, Value, json};

grex_sdk::job!(profile);

/// The kinds of entry a profile holds.
pub const KINDS: [&str; 3] = ["contact", "order", "favourite"];

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Add { kind: String, id: String, value: Value },
    Remove { kind: String, id: String },
    List { kind: Option<String> },
}

fn profile(bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
    let command: Command = serde_json::from_slice(input).map_err(|e| {
        Error::msg(format!(
            "input must be a JSON command such as {{\"op\":\"add\",\"kind\":\"contact\",\"id\":\"bob\",\"value\":{{}}}}: {e}"
        ))
    })?;
    let reply = match command {
        Command::Add { kind, id, value } => {
            let item = item_key(&kind, &id)?;
            bucket.put_text(&item, &value.to_string());
            json!({ "added": item })
        }
        Command::Remove { kind, id } => json!({ "removed": bucket.delete(&item_key(&kind, &id)?) }),
        Command::List { kind } => {
            let kinds = match &kind {
                Some(k) => vec![checked_kind(k)?],
                None => KINDS.to_vec(),
            };
            let mut all = Map::new();
            for kind in kinds {
                all.insert(kind.to_owned(), Value::Object(entries(bucket, kind)?));
            }
            Value::Object(all)
        }
    };
    Ok(reply.to_string())
}

fn entries(bucket: &Bucket, kind: &str) -> Result<Map<String, Value>, Error> {
    let prefix = format!("{kind}/");
    let mut out = Map::new();
    for item in bucket.list(&prefix) {
        let text = bucket.get_text(&item)?.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        out.insert(item[prefix.len()..].to_owned(), value);
    }
    Ok(out)
}

fn checked_kind(kind: &str) -> Result<&'static str, Error> {
    KINDS
        .into_iter()
        .find(|k| *k == kind)
        .ok_or_else(|| Error::msg(format!("kind must be one of contact, order, favourite; got `{kind}`")))
}

fn item_key(kind: &str, id: &str) -> Result<String, Error> {
    let kind = checked_kind(kind)?;
    if id.is_empty() || id.contains('/') {
        return Err(Error::msg("id must be non-empty and contain no `/`"));
    }
    Ok(format!("{kind}/{id}"))
}
