// Write Grex jobs in JavaScript. A job is one function over the bucket it runs against and the
// input bytes; `job(fn)` makes it the component's `run` export. The node runs it once per request
// in a fresh sandbox, against the bucket's latest committed state: what it writes commits
// atomically when it returns, and is dropped when it throws or breaks a limit.
//
//   import { job, getText, putText } from './sdk/index.js';
//   export const run = job((input) => {
//     const count = Number(getText('count') ?? '0') + 1;
//     putText('count', String(count));
//     return String(count);
//   });
//
// Build with `grex-build-js job.js job.wasm` (componentize-js over guest-sdk/wit/job.wit), upload
// with `grex module put job.wasm --name NAME`. The contract is the same as a Rust job's.

import * as bucket from 'grex:job/bucket@0.1.0';
import * as context from 'grex:job/context@0.1.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** Item keys a page of `listKeys` holds at most. */
export const LIST_PAGE_MAX = 1000;

/** An item's bytes (a Uint8Array), or undefined if the bucket has no such item. */
export function getBytes(item) {
  return bucket.get(item);
}

/** Sets an item to bytes (a Uint8Array). */
export function putBytes(item, bytes) {
  bucket.put(item, bytes);
}

/** An item's value as UTF-8 text, or undefined. */
export function getText(item) {
  const bytes = bucket.get(item);
  return bytes === undefined ? undefined : decoder.decode(bytes);
}

/** Sets an item to UTF-8 text. */
export function putText(item, text) {
  bucket.put(item, encoder.encode(text));
}

/** An item's value as JSON, or undefined. */
export function getJson(item) {
  const text = getText(item);
  return text === undefined ? undefined : JSON.parse(text);
}

/** Sets an item to a value as JSON. */
export function putJson(item, value) {
  putText(item, JSON.stringify(value));
}

/** Removes an item; returns whether it existed. */
export function deleteItem(item) {
  return bucket.delete(item);
}

/** Item keys starting with `prefix`, in byte order, after `startAfter` (if given), at most `limit`. */
export function listKeys(prefix = '', startAfter = undefined, limit = LIST_PAGE_MAX) {
  return bucket.listKeys(prefix, startAfter, limit);
}

/** Every item key starting with `prefix`, a page at a time. */
export function* keys(prefix = '') {
  let after;
  for (;;) {
    const page = bucket.listKeys(prefix, after, LIST_PAGE_MAX);
    yield* page;
    if (page.length < LIST_PAGE_MAX) return;
    after = page[page.length - 1];
  }
}

/** The key of the bucket the job runs against (a Uint8Array). */
export function bucketKey() {
  return context.bucketKey();
}

/** Milliseconds since the Unix epoch, as the node assigned them before the job started (a BigInt). */
export function timestampMs() {
  return context.timestampMs();
}

/** Writes a line to the node's log: level is 'debug', 'info', 'warn' or 'error'. */
export function log(level, message) {
  context.log(level, String(message));
}

/** The input as UTF-8 text. */
export function text(input) {
  return decoder.decode(input);
}

/**
 * Makes `fn(input)` the job. `input` is a Uint8Array. Its result is the output: a Uint8Array as it
 * is, a string as UTF-8, undefined as nothing, anything else as JSON. A throw is the job's error
 * (its message goes to the client; nothing it wrote is kept).
 */
export function job(fn) {
  return (input) => {
    let result;
    try {
      result = fn(input);
    } catch (e) {
      throw e instanceof Error ? e.message : String(e);
    }
    if (result instanceof Uint8Array) return result;
    if (result === undefined) return new Uint8Array();
    if (typeof result === 'string') return encoder.encode(result);
    return encoder.encode(JSON.stringify(result));
  };
}
