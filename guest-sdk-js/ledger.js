// ledger: a customer's account, as the Rust `ledger` job keeps it (the bucket is the customer).
// Input: a JSON transaction {"description", "other", "amount" (integer cents), "date"?}, an array
// of them, or nothing (just report); `date` defaults to the day of the job's timestamp (UTC).
// Output: {"balance": <sum of amounts>, "count": <records>}. The records are kept in the item
// `transactions` as JSON (the Rust job keeps them as bincode: the two do not share buckets).
// Input "spin" spins until the node stops it: a job's deadline holds for JavaScript too.
import { job, getJson, putJson, text, timestampMs } from './sdk/index.js';

const FIELDS = ['description', 'other', 'amount', 'date'];

function check(t) {
  const ok = t !== null && typeof t === 'object' && !Array.isArray(t)
    && Object.keys(t).every((k) => FIELDS.includes(k))
    && typeof t.description === 'string' && typeof t.other === 'string'
    && Number.isSafeInteger(t.amount) && (t.date === undefined || typeof t.date === 'string');
  if (!ok) throw new Error('input must be a JSON transaction {"description","other","amount","date"?} or an array of them');
  return t;
}

export const run = job((input) => {
  const given = text(input).trim();
  if (given === 'spin') for (;;) {}
  let added = [];
  if (given !== '') {
    let parsed;
    try {
      parsed = JSON.parse(given);
    } catch (e) {
      throw new Error(`input is not JSON: ${e.message}`);
    }
    added = (Array.isArray(parsed) ? parsed : [parsed]).map(check);
  }
  const records = getJson('transactions') ?? [];
  if (added.length > 0) {
    const today = new Date(Number(timestampMs())).toISOString().slice(0, 10);
    for (const t of added) records.push({ description: t.description, other: t.other, amount: t.amount, date: t.date ?? today });
    putJson('transactions', records);
  }
  const balance = records.reduce((sum, t) => sum + t.amount, 0);
  if (!Number.isSafeInteger(balance)) throw new Error('the balance overflows');
  return { balance, count: records.length };
});
