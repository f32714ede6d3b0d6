"""Output folders and files that insitu owns: it never deletes or overwrites what it did not write.

Every folder a command writes into is *claimed* first. A new or empty folder gets an ownership
record (``.insitu-owned.json``: the command and the top-level entries it wrote). A non-empty
folder without that record belongs to someone else and is refused, whatever the flags. A folder
with the record holds an earlier insitu run: it is refused unless the caller passes
``overwrite``, and then only the entries the record lists are removed; anything a person put
there beside them stays. A run folder is also locked while a run writes into it, so two runs
can never interleave their files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError

OWNER_FILE = ".insitu-owned.json"
LOCK_FILE = ".insitu.lock"
_HIDDEN = {OWNER_FILE, LOCK_FILE}


class OutputExistsError(ConfigError):
    """An output path is in the way: it holds earlier results, or files insitu did not write."""


class RunLockedError(ConfigError):
    """Another insitu process is writing into the same run folder."""


def is_secondary_rank() -> bool:
    """True in a non-zero rank of a distributed launch (Lightning's launcher, torchrun, SLURM)."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return any(os.environ.get(k, "0").strip() not in ("", "0") for k in keys)


class OwnedFolder:
    """A folder insitu may write into, with the record of what it wrote there."""

    def __init__(self, path: Path, command: str, entries: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.command = command
        self.entries: set[str] = set(entries)
        self._before = self._listing()
        self._lock_fd: int | None = None

    def _listing(self) -> set[str]:
        return {p.name for p in self.path.iterdir()} - _HIDDEN if self.path.is_dir() else set()

    def forget_listing(self) -> None:
        """Treat the folder's current entries as pre-existing (not insitu's)."""
        self._before = self._listing()

    def record(self, *names: str) -> None:
        """Add ``names`` and every top-level entry created since the claim to the ownership record."""
        self.entries |= set(names) | (self._listing() - self._before)
        atomic_write_text(
            self.path / OWNER_FILE, json.dumps({"created_by": "insitu", "command": self.command, "entries": sorted(self.entries)}, indent=2)
        )

    def lock(self) -> None:
        """Hold an exclusive lock on the folder until :meth:`unlock` or the process ends."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): the lock file's presence is the lock
            os.close(fd)
            try:
                fd = os.open(self.path / (LOCK_FILE + ".pid"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as exc:
                raise self._locked() from exc
        except OSError as exc:
            os.close(fd)
            raise self._locked() from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _locked(self) -> RunLockedError:
        return RunLockedError(
            f"{self.path} is in use by another insitu run (lock {LOCK_FILE}). Wait for it to finish, "
            "or pick another run folder (--set name=... / --out ...)."
        )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
            (self.path / (LOCK_FILE + ".pid")).unlink(missing_ok=True)


def read_owner(path: Path) -> dict[str, Any] | None:
    """The ownership record of ``path``, or None when insitu did not create it."""
    try:
        record = json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("created_by") == "insitu" else None


def claim_folder(path: Path, command: str, overwrite: bool = False, flag: str = "--overwrite", lock: bool = False) -> OwnedFolder:
    """Make ``path`` an insitu output folder, refusing anything that would delete others' files.

    * missing or empty: created and recorded as insitu's;
    * not empty, no ownership record: refused (it is not insitu's to fill or clear);
    * insitu's, with earlier results: refused unless ``overwrite``; then only the entries the
      record lists are removed.

    With ``lock`` the folder is locked (:meth:`OwnedFolder.lock`) before anything is removed, so a
    run still writing there is never disturbed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a folder; pass a folder path that does not exist yet.")
    record = read_owner(path) if path.exists() else None
    contents = {p.name for p in path.iterdir()} - _HIDDEN if path.exists() else set()
    if contents and record is None:
        raise OutputExistsError(
            f"{path} is not empty and was not written by insitu; insitu never deletes or writes into a folder it did not "
            f"create. Pick another folder that does not exist yet ({flag} only replaces insitu's own earlier results)."
        )
    if contents and not overwrite:
        raise OutputExistsError(
            f"{path} holds earlier results of `insitu {record.get('command', '?')}`. Pass {flag} to replace them "
            "(only the files insitu wrote there are removed), or pick another folder."
        )
    path.mkdir(parents=True, exist_ok=True)
    folder = OwnedFolder(path, command)
    if lock:
        folder.lock()
    if contents:
        _remove_entries(path, record.get("entries", []))
        folder.forget_listing()  # what is left is someone else's and stays unrecorded
    folder.record()
    return folder


def add_files(path: Path, names: Iterable[str], command: str, overwrite: bool = False) -> OwnedFolder:
    """Claim ``names`` inside ``path``: a new or empty folder, or one insitu wrote (a run folder).

    A folder insitu did not write is refused as in :func:`claim_folder`; an existing file of those
    names is replaced only with ``overwrite``. Call ``record()`` on the result after writing.
    """
    path = Path(path)
    record = read_owner(path) if path.is_dir() else None
    if record is None:
        return claim_folder(path, command, overwrite)
    for name in names:
        check_output_file(path / name, overwrite)
    return OwnedFolder(path, record.get("command", command), record.get("entries", []))


def _remove_entries(path: Path, entries: Iterable[str]) -> None:
    for name in entries:
        if not isinstance(name, str) or not name or name in _HIDDEN or Path(name).name != name or name in (".", ".."):
            continue  # a tampered record never reaches outside the folder
        target = path / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)


def check_output_file(path: Path, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse to replace an existing file unless ``overwrite`` (the user named it and asked)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass {flag} to replace it, or pick another path.")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; pass a file path.")
    return path


def read_capped(path: Path, cap: int) -> bytes | None:
    """The file's bytes, or None when it holds more than ``cap`` (never reads more than ``cap + 1`` bytes)."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data if len(data) <= cap else None


@contextmanager
def atomic_path(path: Path, sync: bool = True) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write through; renamed onto ``path`` when the block succeeds.

    For libraries that write to a path themselves (safetensors, PIL, numpy, zipfile, torch): a
    reader sees the old file or the whole new one, never a half-written one; after an exception the
    temporary file is removed and ``path`` is untouched. The suffix is kept (some libraries pick the
    format from it). ``sync=False`` skips the fsync: for caches, where a file lost to a power cut
    is only redone, and thousands of syncs would slow a scan.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` through a (synced) temporary file and a rename (never a half-written file)."""
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, sync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), sync)


def write_json(path: Path, data: Any, indent: int | None = 2, sync: bool = True, **dumps: Any) -> Path:
    """``data`` as JSON, written atomically; ``dumps`` go to :func:`json.dumps` (e.g. ``default=str``)."""
    atomic_write_text(path, json.dumps(data, indent=indent, **dumps), sync)
    return Path(path)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> str:
    """CSV text: ``header`` then ``rows`` (sequences in header order, or mappings keyed by it; extra keys ignored)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(k) for k in header] if isinstance(row, Mapping) else row)
    return text.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> Path:
    """A CSV file (see :func:`csv_text`), written atomically; returns ``path``."""
    atomic_write_text(path, csv_text(header, rows))
    return Path(path)


@contextmanager
def replace_folder(path: Path, members: Iterable[str]) -> Iterator[Path]:
    """Build a folder's new ``members`` in a temporary sibling, then swap it in for ``path``.

    Nothing is visible at ``path`` until the block succeeds: an exception removes the temporary
    folder and leaves ``path`` (an earlier version, or nothing) as it was. Entries of an existing
    ``path`` other than ``members`` (files a person put there, an ownership record) are copied into
    the new folder before the swap, so they survive; earlier ``members`` not written again do not.
    The swap is two renames; a crash between them leaves the old folder in ``.<name>.old<pid>``
    and nothing half-written at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _keep_other_entries(path, tmp, set(members) | {LOCK_FILE, LOCK_FILE + ".pid"})
        if path.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _keep_other_entries(src: Path, dst: Path, skip: set[str]) -> None:
    if not src.is_dir():
        return
    for entry in src.iterdir():
        if entry.name in skip or (dst / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, dst / entry.name, follow_symlinks=False)
