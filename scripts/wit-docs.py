#!/usr/bin/env python3
"""Renders the guest contract, guest-sdk/wit/job.wit, as reference docs: docs/guest-contract.md.

Usage: scripts/wit-docs.py          writes docs/guest-contract.md
       scripts/wit-docs.py --check  fails if docs/guest-contract.md is not what the WIT renders to

The page is made from the WIT's own doc comments (`///`), so the contract has one source; each
function also names what each language's SDK calls it.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIT = ROOT / "guest-sdk/wit/job.wit"
OUT = ROOT / "docs/guest-contract.md"

# What each SDK calls a WIT function: Rust (guest-sdk), JavaScript (guest-sdk-js), Python (guest-sdk-py).
SDK_NAMES = {
    "bucket.get": ("`Bucket::get_bytes`, `get_text`, `get` (bincode)", "`getBytes`, `getText`, `getJson`", "`get_bytes`, `get_text`, `get_json`"),
    "bucket.put": ("`Bucket::put_bytes`, `put_text`, `put` (bincode)", "`putBytes`, `putText`, `putJson`", "`put_bytes`, `put_text`, `put_json`"),
    "bucket.delete": ("`Bucket::delete`", "`deleteItem`", "`delete_item`"),
    "bucket.list-keys": ("`Bucket::list_page`, `list` (every page)", "`listKeys`, `keys` (every page)", "`list_keys`, `keys` (every page)"),
    "context.bucket-key": ("`Bucket::key`", "`bucketKey`", "`bucket_key`"),
    "context.timestamp-ms": ("`grex_sdk::timestamp_ms`", "`timestampMs`", "`timestamp_ms`"),
    "context.log": ("`grex_sdk::log`", "`log`", "`log`"),
    "job.run": ("`grex_sdk::job!(fn)`", "`export const run = job(fn)`", "`WitWorld = job(fn)`"),
}


def parse(text):
    """The package, its doc, and its items in order: (kind, scope, name, signature, doc)."""
    doc, items, scope, package, package_doc = [], [], None, None, ""
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if line.startswith("///"):
            doc.append(line[3:].removeprefix(" "))
            continue
        if not line:
            continue
        text_doc, doc = "\n".join(doc), []
        if m := re.fullmatch(r"package ([\w:.@-]+);", line):
            package, package_doc = m[1], text_doc
        elif m := re.fullmatch(r"(interface|world) ([\w-]+) \{", line):
            scope = m[2]
            items.append((m[1], None, m[2], "", text_doc))
        elif m := re.fullmatch(r"enum ([\w-]+) \{(.*)\}", line):
            items.append(("enum", scope, m[1], "{ " + m[2].strip() + " }", text_doc))
        elif m := re.fullmatch(r"([\w-]+): (func\(.*\)( -> .*)?);", line):
            items.append(("func", scope, m[1], m[2], text_doc))
        elif m := re.fullmatch(r"import ([\w-]+);", line):
            items.append(("import", scope, m[1], "", text_doc))
        elif m := re.fullmatch(r"export ([\w-]+): (func\(.*\)( -> .*)?);", line):
            items.append(("export", scope, m[1], m[2], text_doc))
        elif line == "}":
            scope = None
        else:
            raise SystemExit(f"{WIT}: a line this renderer does not know: {raw!r}")
    if package is None:
        raise SystemExit(f"{WIT}: no package line")
    return package, package_doc, items


def render(text):
    package, package_doc, items = parse(text)
    out = [
        "# The guest contract: `grex:job`",
        "",
        "Rendered from [`guest-sdk/wit/job.wit`](../guest-sdk/wit/job.wit) by `scripts/wit-docs.py` (a",
        "test fails when the two differ). The WIT is the contract; every SDK is a thin layer over it, and",
        "a component built by any toolchain for this world runs as it is.",
        "",
        f"Package `{package}`.",
        "",
        package_doc,
    ]
    for kind, scope, name, signature, doc in items:
        if kind in ("interface", "world"):
            out += ["", f"## {kind.capitalize()} `{name}`", "", doc]
            if kind == "world":
                out += ["", "| | Rust | JavaScript | Python |", "|---|---|---|---|"]
            continue
        if kind == "import":
            out += [f"| imports `{name}` | | | |"]
            continue
        key = f"{scope}.{name}"
        heading = f"### `{name}`" if kind != "export" else ""
        code = f"```wit\n{'enum ' + name + ' ' + signature if kind == 'enum' else name + ': ' + signature}\n```"
        if kind == "export":
            rust, js, py = SDK_NAMES.get(f"job.{name}", ("", "", ""))
            out += [f"| exports `{name}`: `{signature}` | {rust} | {js} | {py} |", "", doc]
            continue
        out += ["", heading, "", code, "", doc]
        if key in SDK_NAMES:
            rust, js, py = SDK_NAMES[key]
            out += ["", f"In the SDKs: Rust {rust}; JavaScript {js}; Python {py}."]
    out += [
        "",
        "## Reduce modules",
        "",
        "A scan's reduce module (`grex job scan MODULE --reduce REDUCER`) is a job of this same world,",
        "run read-only on an empty bucket with an empty key. Its input is the accumulator so far and a",
        "batch of outputs: a flag byte (1 when an accumulator follows, 0 on the first call), then the",
        "accumulator and each output as a 4-byte little-endian length and the bytes. Its output is the",
        "new accumulator. Batches are folded in any grouping and order, so the fold must be associative",
        "and commutative (a sum, a count, a maximum, a union). The SDKs read the input: Rust",
        "`grex_sdk::fold::Fold::decode`, Python `grex_sdk.fold`; `jobs/sum` is an example.",
    ]
    return "\n".join(out).rstrip() + "\n"


def main():
    rendered = render(WIT.read_text())
    if sys.argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != rendered:
            print(f"{OUT.relative_to(ROOT)} is not what {WIT.relative_to(ROOT)} renders to: run scripts/wit-docs.py", file=sys.stderr)
            return 1
        return 0
    if sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(rendered)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
