"""ledger: a customer's account, as the Rust `ledger` job keeps it (the bucket is the customer).

Input: a JSON transaction {"description", "other", "amount" (integer cents), "date"?}, a list of
them, or nothing (just report); `date` defaults to the day of the job's timestamp (UTC). Output:
{"balance": <sum of amounts>, "count": <records>}. The records are kept in the item
`transactions` as JSON, as the JavaScript ledger keeps them (the Rust job keeps them as bincode:
the two do not share buckets). Input "spin" spins until the node stops it: a job's deadline
holds for Python too.
"""

import datetime
import json

from grex_sdk import get_json, job, put_json, text, timestamp_ms

FIELDS = {"description", "other", "amount", "date"}


def check(t):
    ok = (
        isinstance(t, dict)
        and set(t) <= FIELDS
        and isinstance(t.get("description"), str)
        and isinstance(t.get("other"), str)
        and type(t.get("amount")) is int
        and isinstance(t.get("date", ""), str)
    )
    if not ok:
        raise ValueError('input must be a JSON transaction {"description","other","amount","date"?} or a list of them')
    return t


def ledger(input: bytes):
    given = text(input).strip()
    if given == "spin":
        while True:
            pass
    added = []
    if given:
        try:
            parsed = json.loads(given)
        except ValueError as e:
            raise ValueError(f"input is not JSON: {e}") from None
        added = [check(t) for t in (parsed if isinstance(parsed, list) else [parsed])]
    records = get_json("transactions") or []
    if added:
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        today = (epoch + datetime.timedelta(milliseconds=timestamp_ms())).date().isoformat()
        for t in added:
            records.append({"description": t["description"], "other": t["other"], "amount": t["amount"], "date": t.get("date", today)})
        put_json("transactions", records)
    balance = sum(t["amount"] for t in records)
    if abs(balance) >= 1 << 63:
        raise ValueError("the balance overflows")
    return {"balance": balance, "count": len(records)}


WitWorld = job(ledger)
