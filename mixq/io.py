"""Files that are never left half-written: write to a temporary sibling, then rename."""

from __future__ import annotations

import copy
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from mixq.errors import ConfigError

TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path):
    """Yields a temporary path in the same folder; on success it replaces `path` atomically."""
    with temporary_sibling(path) as tmp:
        yield tmp
        publish(tmp, path)


@contextmanager
def temporary_sibling(path):
    """Yields a fresh temporary file beside `path` (".<name>.*.tmp"); removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp, path):
    """Rename the finished `tmp` to `path` in one step.

    The file gets the mode the user's umask gives new files, set after the write: writers such as
    safetensors recreate the file with mode 0600, and results are meant to be shared."""
    apply_umask(tmp)
    sync_file(tmp)
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


def apply_umask(path):
    os.chmod(path, 0o666 & ~_umask())


def sync_file(path):
    """Flush the file to disk, so a rename never publishes a file the disk does not hold yet."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder):
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# libyaml's emitter where PyYAML has it: 4x faster, the same bytes for numbers and short plain strings
# (it wraps long escaped strings differently), so only for tables rewritten often (TableText).
_FastSafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write_yaml_atomic(path, data):
    """`data` as YAML, atomically."""
    write_text_atomic(path, yaml.dump(data, Dumper=yaml.SafeDumper, sort_keys=False))


class TableText:
    """The YAML of {**head, key: rows} (libyaml's emitter where present), for a table rewritten after
    every new row: each row's text is emitted once and reused while the row is unchanged (emitting every
    row at every write grows with the square of the rows: 202 rewrites of a 202-row table took 1.8 s,
    now 0.03 s). Rows hold names and numbers; a nested row is its own text indented one level."""

    def __init__(self, key: str = "layers"):
        self.key = key
        self._rows: dict[str, tuple[dict, str]] = {}  # name -> (the row as emitted, its text)

    def row_text(self, name: str, row) -> str:
        cached = self._rows.get(name)
        if cached is None or cached[0] != row:
            text = yaml.dump({name: row}, Dumper=_FastSafeDumper, sort_keys=False)
            cached = self._rows[name] = (copy.deepcopy(row), "".join("  " + line for line in text.splitlines(True)))
        return cached[1]

    def text(self, head: dict, rows: dict) -> str:
        if not rows:
            return yaml.dump({**head, self.key: {}}, Dumper=_FastSafeDumper, sort_keys=False)
        head_text = yaml.dump(head, Dumper=_FastSafeDumper, sort_keys=False) if head else ""
        return f"{head_text}{self.key}:\n" + "".join(self.row_text(name, row) for name, row in rows.items())


# libyaml's parser where PyYAML has it (10x faster on large files), with the same safe constructors.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """safe_load that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return _SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path, error: type[Exception] = ConfigError, max_bytes: int | None = None):
    """The YAML document at `path` (safe types only, duplicate keys refused); bad files raise `error`.
    `max_bytes`: a larger file is refused before it is parsed (parsing is the slow part)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{path} has {path.stat().st_size:,} bytes, more than such a mixq file ever needs ({max_bytes:,} "
                    "at most): it is not the file you meant, or it is damaged")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text ({err}): save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}; fix the file or write it again") from err
    except RecursionError as err:
        raise error(f"{path} is nested too deeply to be a mixq file; write it again") from err


def require_utf8_path(path: Path, error: type[Exception]):
    """safetensors opens files by UTF-8 path only: refuse other names before anything is written."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{os.fsencode(path)!r} is not a valid UTF-8 path, which safetensors needs: use a folder name in "
                    "UTF-8") from None


@contextmanager
def storage_errors(path):
    """safetensors reports a failed write (a full disk, an I/O error) with its own exception type:
    raise it as mixq's StorageError, an OSError, naming the file."""
    from safetensors import SafetensorError

    from mixq.errors import StorageError

    try:
        yield
    except SafetensorError as err:
        raise StorageError(f"could not write {path} ({err}); any earlier version of it is unchanged: free disk "
                           "space or choose another folder") from err
