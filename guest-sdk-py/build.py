#!/usr/bin/env python3
"""grex-build-py APP.py OUT.wasm: builds a Python job into a component of the `grex:job` world with
componentize-py (run it with the Python whose environment has componentize-py installed). The
interpreter's WASI imports are stubbed out (`--stub-wasi`: they trap if called), so the job imports
only the bucket and the context: a job has no files, clock or randomness."""

import subprocess
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: grex-build-py APP.py OUT.wasm", file=sys.stderr)
        return 2
    app, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    sdk = Path(__file__).resolve().parent
    tool = Path(sys.executable).parent / "componentize-py"
    if not tool.exists():
        print(f"componentize-py is not installed beside {sys.executable}: pip install -r requirements.txt", file=sys.stderr)
        return 1
    command = [str(tool), "-d", str(sdk / "wit"), "-w", "job", "componentize", "--stub-wasi",
               "-p", str(app.parent), "-p", str(sdk), app.stem, "-o", str(out)]
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:
        print(f"building {app} failed (above)", file=sys.stderr)
        return 1
    print(f"built {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
