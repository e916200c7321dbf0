#!/usr/bin/env node
// grex-build-js ENTRY.js OUT.wasm: builds a JavaScript job into a component of the `grex:job`
// world with componentize-js. The job's imports are only the bucket and the context: the features
// that would import WASI (clocks, randomness, stdio, HTTP) are left out, as a job has none.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const [entry, out] = process.argv.slice(2);
if (!entry || !out) {
  console.error('usage: grex-build-js ENTRY.js OUT.wasm');
  process.exit(2);
}
const witPath = path.join(path.dirname(fileURLToPath(import.meta.url)), 'wit');
try {
  const { component } = await componentize({
    sourcePath: entry,
    witPath,
    worldName: 'job',
    disableFeatures: ['random', 'stdio', 'clocks', 'http', 'fetch-event'],
  });
  await writeFile(out, component);
  console.error(`built ${out} (${component.length} bytes)`);
} catch (e) {
  console.error(`building ${entry} failed: ${e.message ?? e}`);
  process.exit(1);
}
