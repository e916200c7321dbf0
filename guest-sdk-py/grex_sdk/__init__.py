"""Write Grex jobs in Python.

A job is one function over the bucket it runs against and the input bytes; ``job(fn)`` makes it
the component's ``run`` export, which componentize-py looks for as the class ``WitWorld`` of the
app module. The node runs it once per request in a fresh sandbox, against the bucket's latest
committed state: what it writes commits atomically when it returns, and is dropped when it raises
or breaks a limit::

    from grex_sdk import job, get_text, put_text

    def counter(input: bytes) -> str:
        count = int(get_text("count") or "0") + 1
        put_text("count", str(count))
        return str(count)

    WitWorld = job(counter)

Build with ``python sdk/build.py job.py job.wasm`` (componentize-py over guest-sdk/wit/job.wit),
upload with ``grex module put job.wasm --name NAME``. The contract is the same as a Rust job's.
The bindings (``wit_world``) exist only inside the component: import this module's functions in
the job, and keep the parts you test natively in modules of their own.
"""

import json

try:
    # Imported here, while componentize-py pre-initializes the app at build time: an import at
    # run time would search the file system, which a job does not have (it traps).
    from componentize_py_types import Err
    from wit_world.imports import bucket as _bucket_api
    from wit_world.imports import context as _context_api
except ImportError:  # Natively (a project's unit tests): the bindings exist only in the component.
    Err = _bucket_api = _context_api = None

LIST_PAGE_MAX = 1000
"""Item keys a page of ``list_keys`` holds at most."""


def _bucket():
    if _bucket_api is None:
        raise RuntimeError("the bucket exists only inside a job's component (build it with sdk/build.py)")
    return _bucket_api


def _context():
    if _context_api is None:
        raise RuntimeError("the context exists only inside a job's component (build it with sdk/build.py)")
    return _context_api


def get_bytes(item: str):
    """An item's bytes, or None if the bucket has no such item."""
    return _bucket().get(item)


def put_bytes(item: str, value: bytes) -> None:
    """Sets an item to bytes."""
    _bucket().put(item, bytes(value))


def get_text(item: str):
    """An item's value as UTF-8 text, or None."""
    value = _bucket().get(item)
    return None if value is None else value.decode("utf-8")


def put_text(item: str, text: str) -> None:
    """Sets an item to UTF-8 text."""
    _bucket().put(item, text.encode("utf-8"))


def get_json(item: str):
    """An item's value as JSON, or None."""
    text = get_text(item)
    return None if text is None else json.loads(text)


def put_json(item: str, value) -> None:
    """Sets an item to a value as JSON (compact)."""
    put_text(item, json.dumps(value, separators=(",", ":")))


def delete_item(item: str) -> bool:
    """Removes an item; returns whether it existed."""
    return _bucket().delete(item)


def list_keys(prefix: str = "", start_after=None, limit: int = LIST_PAGE_MAX):
    """Item keys starting with ``prefix``, in byte order, after ``start_after``, at most ``limit``."""
    return _bucket().list_keys(prefix, start_after, limit)


def keys(prefix: str = ""):
    """Every item key starting with ``prefix``, a page at a time."""
    after = None
    while True:
        page = _bucket().list_keys(prefix, after, LIST_PAGE_MAX)
        yield from page
        if len(page) < LIST_PAGE_MAX:
            return
        after = page[-1]


def bucket_key() -> bytes:
    """The key of the bucket the job runs against."""
    return _context().bucket_key()


def timestamp_ms() -> int:
    """Milliseconds since the Unix epoch, as the node assigned them before the job started."""
    return _context().timestamp_ms()


def log(level: str, message) -> None:
    """Writes a line to the node's log: level is 'debug', 'info', 'warn' or 'error'."""
    context = _context()
    levels = {"debug": context.Level.DEBUG, "info": context.Level.INFO, "warn": context.Level.WARN, "error": context.Level.ERROR}
    if level not in levels:
        raise ValueError(f"log level must be one of {', '.join(levels)}, not {level!r}")
    context.log(levels[level], str(message))


def text(input: bytes) -> str:
    """The input as UTF-8 text."""
    return bytes(input).decode("utf-8")


def fold(input: bytes):
    """A reduce module's input (``grex job scan --reduce``): the accumulator so far (None on the
    first call) and the list of outputs to fold in."""
    data = bytes(input)
    if not data or data[0] not in (0, 1):
        raise ValueError("a fold's input does not start with a valid flag; is this a reduce module?")
    parts, at = [], 1
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("a fold's input ends inside a length")
        size = int.from_bytes(data[at : at + 4], "little")
        if at + 4 + size > len(data):
            raise ValueError("a fold's input ends inside a part")
        parts.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    if data[0] == 1:
        if not parts:
            raise ValueError("a fold's input flags an accumulator but holds none")
        return parts[0], parts[1:]
    return None, parts


def _output(result) -> bytes:
    if result is None:
        return b""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    if isinstance(result, str):
        return result.encode("utf-8")
    return json.dumps(result, separators=(",", ":")).encode("utf-8")


def job(fn):
    """Makes ``fn(input)`` the job: assign the result to ``WitWorld`` in the app module.

    ``input`` is bytes. The result is the output: bytes as they are, a str as UTF-8, None as
    nothing, anything else as JSON. An exception is the job's error (its message goes to the
    client; nothing the job wrote is kept).
    """

    class WitWorld:
        def run(self, input: bytes) -> bytes:
            try:
                return _output(fn(bytes(input)))
            except Exception as e:  # noqa: BLE001 (every error is the job's answer)
                raise Err(str(e) or type(e).__name__)

    return WitWorld
