//! `ledger`: a customer's account. The bucket is the customer; the item `transactions` holds every
//! transaction record, in order, encoded with serde + bincode.
//!
//! Input: a JSON transaction, a JSON array of them, or nothing (just report). A transaction is
//! `{"description": "rent", "other": "ACME Ltd", "amount": -120000, "date": "2026-11-01"}`, with
//! `amount` in the smallest unit of the currency (cents) and `date` optional (default: the day of
//! the job's timestamp, UTC). Output: `{"balance": <sum of amounts>, "count": <records>}`.

use grex_sdk::{Bucket, Error};
use serde::{Deserialize, Serialize};

grex_sdk::job!(ledger);

/// The item holding the records.
pub const TRANSACTIONS_ITEM: &str = "transactions";

/// One transaction record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// What it was for.
    pub description: String,
    /// The counterparty.
    pub other: String,
    /// Signed amount in cents.
    pub amount: i64,
    /// `YYYY-MM-DD`.
    pub date: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTransaction {
    description: String,
    other: String,
    amount: i64,
    date: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(NewTransaction),
    Many(Vec<NewTransaction>),
}

fn ledger(bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
    let new = parse_input(input)?;
    let mut records: Vec<Transaction> = bucket.get(TRANSACTIONS_ITEM)?.unwrap_or_default();
    if !new.is_empty() {
        let today = civil_date(grex_sdk::timestamp_ms());
        records.extend(new.into_iter().map(|t| Transaction {
            description: t.description,
            other: t.other,
            amount: t.amount,
            date: t.date.unwrap_or_else(|| today.clone()),
        }));
        bucket.put(TRANSACTIONS_ITEM, &records)?;
    }
    let balance = records
        .iter()
        .try_fold(0i64, |sum, t| sum.checked_add(t.amount))
        .ok_or_else(|| Error::msg("the balance overflows a 64-bit number of cents"))?;
    Ok(format!("{{\"balance\":{balance},\"count\":{}}}", records.len()))
}

fn parse_input(input: &[u8]) -> Result<Vec<NewTransaction>, Error> {
    if input.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let parsed: Input = serde_json::from_slice(input).map_err(|e| {
        Error::msg(format!(
            "input must be a JSON transaction {{\"description\",\"other\",\"amount\",\"date\"?}} or an array of them: {e}"
        ))
    })?;
    Ok(match parsed {
        Input::One(t) => vec![t],
        Input::Many(ts) => ts,
    })
}

/// `YYYY-MM-DD` (UTC) of a Unix time in milliseconds (Howard Hinnant's civil-from-days).
pub fn civil_date(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_date_matches_known_days() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(951_782_400_000), "2000-02-29");
        assert_eq!(civil_date(1_795_219_200_000), "2026-11-21");
    }

    #[test]
    fn input_is_one_record_many_or_none() {
        assert_eq!(parse_input(b"").unwrap().len(), 0);
        let one = br#"{"description":"rent","other":"ACME","amount":-5,"date":"2026-01-01"}"#;
        assert_eq!(parse_input(one).unwrap().len(), 1);
        let many = br#"[{"description":"a","other":"b","amount":1},{"description":"c","other":"d","amount":2}]"#;
        assert_eq!(parse_input(many).unwrap().len(), 2);
        assert!(parse_input(b"{\"amount\":1}").unwrap_err().to_string().contains("JSON transaction"));
    }
}
