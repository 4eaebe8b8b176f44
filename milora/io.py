"""Files: atomic writes, record files, and the guards that keep milora from losing anyone's data.

- `atomic_write_text` / `atomic_write_json`: a reader sees the old file or the new one, never half.
- `staged_directory`: build a directory next to its target and rename it into place, so a
  failure (or a kill) never leaves a half-written output; stale staging directories of dead
  processes are removed on the next write to the same place.
- `read_records`: the records of a .json / .jsonl / .parquet file, with errors naming the file.
- `check_replaceable`: whether an existing output may be replaced (only something milora wrote).
- `RunLock`: one run per output directory, held for the run's lifetime (stale locks detected).

New files and directories get the usual permissions (0666 / 0777 minus the umask), not the
private ones of `tempfile`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from milora.constants import ADAPTER_FILES, MILORA_CONFIG, TRAIN_CONFIG_FILE
from milora.errors import ConfigError, DataError, OutputError, OutputExistsError, OutputInUseError, shown

LOCK_FILE = ".milora.lock"
_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^/]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _staging_name(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=_staging_name(path), dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """`atomic_write_text` of ``value`` as indented JSON (numpy/torch scalars as numbers, other values as text)."""
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return str(value)


@contextmanager
def staged_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it becomes ``target``.

    ``replace``: an existing ``target`` is removed just before the rename (callers check first
    that it may be, see `check_replaceable`); otherwise an existing non-empty target is an error.
    On any exception the staging directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=_staging_name(target), dir=target.parent))
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        _ordinary_permissions(staging)
        if target.is_dir() and replace:
            shutil.rmtree(target)
        elif target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise OutputExistsError(f"{target} appeared while it was being written; nothing was replaced.")
        elif target.is_dir():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _ordinary_permissions(root: Path) -> None:
    """Files 0666 and directories 0777 minus the umask (some writers, e.g. safetensors, create 0600 files)."""
    mask = _umask()
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def remove_stale_staging(directory: Path) -> None:
    """Remove staging files/directories in ``directory`` left by processes of this host that died."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---------------------------------------------------------------- record files


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a file; a file in another encoding is a `DataError` naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start:error.start + 1]!r}): "
            "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from error


def read_records(path: str | os.PathLike, single_object: bool = False) -> list[dict[str, Any]]:
    """The records (JSON objects) of a ``.json`` list, a ``.jsonl`` file (or JSON Lines in a
    ``.json`` file) or a ``.parquet`` file. ``single_object``: a ``.json`` file holding one
    object is one record (Hendrycks MATH ships a file per problem); otherwise it is an error.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix == ".jsonl":
        records = _parse_json_lines(path, read_text(path))
    elif suffix == ".json":
        records = _parse_json(path, read_text(path), single_object)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet.")
    bad = next((i for i, record in enumerate(records) if not isinstance(record, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} is a {type(records[bad]).__name__}, not an object with named fields.")
    return records


def _read_parquet(path: Path) -> list:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Parquet file: {error}") from error


def _parse_json(path: Path, text: str, single_object: bool) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # a .json file holding JSON Lines is common (and what datasets accepts)
            raise DataError(f"{path} is not valid JSON: {error}") from error
        return _parse_json_lines(path, text)
    if isinstance(data, dict) and single_object:
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records (or JSON Lines), not a {type(data).__name__}.")
    return data


def _parse_json_lines(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028, U+0085 are valid in strings
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error}).") from error
    return records


MAX_YAML_NODES = 100_000  # values a config may expand to, aliases counted at each use


def _expanded_size(node, sizes: dict) -> int:
    """How many values a composed YAML node stands for once every alias is expanded (memoised by
    node identity: an alias is the same node object, so this is linear in the file, not the expansion)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias counts once
        children = node.value if isinstance(node.value, list) else []
        flat = [item for child in children for item in (child if isinstance(child, tuple) else (child,))]
        sizes[id(node)] = 1 + sum(min(_expanded_size(child, sizes), MAX_YAML_NODES + 1) for child in flat)
    return sizes[id(node)]


def read_yaml_mapping(path: str | os.PathLike, needs: str = "") -> dict[str, Any]:
    """The mapping of a YAML config file; a key given twice is a `ConfigError` (YAML would keep the last).

    ``needs`` completes the message for an empty file (what the file must at least hold).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}.")
    values = load_yaml(read_text(path), str(path))
    if values is None:
        raise ConfigError(f"{path} is empty" + (f": {needs}." if needs else "."))
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(values).__name__}.")
    return values


def load_yaml(text: str, where: str) -> Any:
    """The value of one YAML document (safe loading), ``where`` naming it in errors (a file, an override):
    a key given twice, or aliases expanding to more than `MAX_YAML_NODES` values (an alias bomb,
    counted before anything is built), is a `ConfigError`."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(
                        f"{where}: key {shown(key)} is given twice "
                        f"(lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                        "YAML would silently keep the last one: remove one of them."
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    loader = UniqueKeyLoader(text)  # safe: a SafeLoader subclass
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: its aliases (*name) expand to more than {MAX_YAML_NODES} values (an alias "
                              "bomb?): write the values out, or use fewer nested aliases.")
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}") from error
    finally:
        loader.dispose()


# ---------------------------------------------------------------- guarding outputs

# what milora itself writes into an adapter or run directory (anything else belongs to the user)
_MILORA_ENTRIES = re.compile(
    r"^(adapter_config\.json|adapter_model\.safetensors|milora_config\.json|residual_model|residual_adapter"
    r"|train_config\.yaml|metrics\.json|runs|checkpoint-\d+|README\.md|\.milora\.lock|\..+\.tmp-.*"
    r"|\.adapter-staging)$"
)


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise unless ``path`` is absent, empty, or an adapter / run directory that milora wrote.

    Never the current directory or one of its parents, never a file, never a directory with
    anything milora does not write (the user's notes, data, other results).
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a directory: choose another output path.")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(
            f"{path} is the current directory or one of its parents: milora never replaces it. "
            "Give a new sub-directory as the output, e.g. --output out/adapter."
        )
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    if not any((path / marker).exists() for marker in (MILORA_CONFIG, TRAIN_CONFIG_FILE, *ADAPTER_FILES[:2])):
        raise OutputExistsError(
            f"{path} is not empty and is not an adapter or run directory written by milora "
            f"(it holds {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); refusing to replace it: "
            "choose another output path."
        )
    foreign = [name for name in entries if not _MILORA_ENTRIES.match(name)]
    if foreign:
        raise OutputExistsError(
            f"{path} holds files milora did not write ({', '.join(foreign[:5])}); refusing to replace it: "
            "move them away or choose another output path."
        )


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, not after the work, if a result file cannot be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory: give a file path for the results, "
                                f"e.g. {path / 'results.json'}.")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, so {path} cannot be created under it: choose another path.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent} is not writable: choose another path for {path.name}.")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail now, not after the work, if the output directory ``path`` cannot be made: it is a file, a
    file stands in its way, or the directory it is made in (its nearest existing ancestor, and ``path``
    itself when it exists) takes no new file (no permission, a read-only mount): a file is created
    there and removed to find out."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a directory: choose another output path.")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, so {path} cannot be created under it: choose another output path.")
    for directory in (parent, *([path] if path.is_dir() else [])):
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as error:
            raise OutputError(f"{path} cannot be written: no new file can be made in {directory} "
                              f"({error.strerror or error}); choose another output path.") from error
    return path


class RunLock:
    """Exclusive hold of a run's output directory: ``.milora.lock`` with the holder's host and pid.

    Created with O_EXCL, so of two runs started together exactly one gets it. A lock whose
    process is gone (same host, pid not alive) is stale and taken over (takers serialised by an
    ``flock`` on the directory: exactly one of them wins); a lock of another
    host is respected (its age is shown). Released (the file removed) on `release` / exit.
    """

    def __init__(self, directory: str | os.PathLike, purpose: str = "a milora run"):
        self.path = Path(directory) / LOCK_FILE
        self.purpose = purpose
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "purpose": self.purpose}
            with os.fdopen(handle, "w") as file:
                json.dump(holder, file)
            self.held = True
            return self
        raise OutputError(f"could not lock {self.path.parent}: another run keeps taking it; try again.")

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its holder is gone; takers are serialised by an ``flock`` on the directory,
        so the holder read and the removal are one step and exactly one of N concurrent takers wins."""
        import fcntl

        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            holder = self.holder()
            if holder is None and self.path.exists():  # being written this instant, or unreadable
                time.sleep(0.05)
                holder = self.holder()
            if holder is None and not self.path.exists():
                return  # released or taken over meanwhile: try to create it again
            if holder is not None and holder.get("host") == socket.gethostname() and not _process_alive(holder["pid"]):
                self.path.unlink(missing_ok=True)  # only takers holding the flock remove a stale lock
                return
        finally:
            os.close(directory)  # releases the flock
        described = "an unreadable lock" if holder is None else (
            f"{holder.get('purpose', 'a milora run')}, pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}"
        )
        raise OutputInUseError(
            f"{self.path.parent} is in use by {described}: wait for it to finish, or choose another output "
            f"directory. If that run is gone (another machine), remove {self.path}."
        )

    def holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
