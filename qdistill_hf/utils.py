"""Small helpers shared by the data, labelling, report and training layers (none of them owns these).

Besides small I/O helpers this module holds the two checks every reader of a data folder goes through:

* :func:`read_csv_rows` / :func:`read_keyed_csv` -- the one CSV reader (``metadata.csv``, the pseudo-report index,
  ``priority_metadata.csv``, the MIMIC-CXR and IU side files): UTF-8 with or without a byte-order mark, optional gzip,
  errors naming the file and the line.
* :func:`resolve_data_path` -- a path read from a data file (``image_path``, ``report_path``...) is resolved against
  the data folder and refused when it leaves it (``..``, an absolute path, a symlink pointing outside), unless the
  caller opts in with ``allow_external=True``.
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsync'ed temporary file and ``os.replace``.

    A reader (or a rerun after a kill) sees either the old file or the complete new one, never a torn file.

    Args:
        path: destination file (its folder must exist).
        text: UTF-8 content.

    Raises:
        OSError: the write failed (disk full, read-only folder...); the message names ``path`` and the previous
            file, if any, is left unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise named_os_error(exc, path, "write", "the previous file, if any, is unchanged") from exc
    return path


def named_os_error(exc: OSError, path: str | os.PathLike, action: str, hint: str = "") -> OSError:
    """An ``OSError`` of the same type and errno whose message names ``path`` (and says "disk full" for ENOSPC/EDQUOT).

    Args:
        exc: the original error.
        path: the file being written or read.
        action: verb for the message, e.g. ``"write"`` or ``"append to"``.
        hint: text appended to the message (e.g. what state was kept).
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = f"{reason} (disk full or quota exceeded: free space and rerun)"
    message = f"cannot {action} {path}: {reason}{'; ' + hint if hint else ''}"
    return type(exc)(exc.errno, message) if exc.errno else OSError(message)


def resolve_device_dtype(device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """Defaults for inference: CUDA when available, bfloat16 on CUDA and float32 on CPU.

    Args:
        device: explicit torch device (or its name), or None.
        dtype: explicit torch dtype, or None.

    Returns:
        ``(torch.device, torch.dtype)``.
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


# ----------------------------------------------------------------------------------------------------- splits

SPLITS = ("train", "validation", "test")
# Accepted spellings in data files: MIMIC-CXR writes "validate", some tools "val".
SPLIT_ALIASES = {"train": "train", "validation": "validation", "test": "test", "validate": "validation", "val": "validation"}


def normalise_split(value: str, where: str) -> str:
    """The canonical split name (``train``, ``validation``, ``test``) of a split value read from a data file.

    Args:
        value: the value as written (``validate`` and ``val`` mean ``validation``).
        where: text naming the file and row, for the error.

    Raises:
        ValueError: an unknown split value, naming ``where`` and the allowed values.
    """
    split = SPLIT_ALIASES.get(value)
    if split is None:
        raise ValueError(f"{where}: unknown split {value!r}; allowed: {list(SPLIT_ALIASES)}")
    return split


# ----------------------------------------------------------------------------------------------------- paths


def resolve_data_path(
    data_dir: str | os.PathLike,
    value: str,
    where: str,
    field: str,
    allow_external: bool = False,
    base: str | os.PathLike | None = None,
) -> Path:
    """Resolve a path read from a data file against ``data_dir``, refusing one that leaves the folder.

    A path is refused when it is absolute, when ``..`` components take it out of ``data_dir``, or when it (or a
    folder on the way) is a symlink resolving outside ``data_dir``. Paths are compared after ``os.path.realpath``,
    so a ``data_dir`` that is itself a symlink is fine.

    Args:
        data_dir: the data folder the path is relative to.
        value: the path as written in the file (stripped by the caller).
        where: text naming the file and row, e.g. ``"metadata.csv line 4 (study_id 's3')"``.
        field: the column name, e.g. ``"image_path"``.
        allow_external: accept absolute paths and paths outside ``data_dir`` (explicit opt-in).
        base: folder the value is relative to when it is not ``data_dir`` itself (e.g. the pseudo-report folder);
            the result must still lie inside ``data_dir``.

    Returns:
        ``base / value`` (not resolved, so messages keep the user's spelling), or ``value`` when it is absolute
        and ``allow_external`` is set.

    Raises:
        ValueError: the value is empty, holds a NUL byte, or leaves ``data_dir``; the message names ``where``,
            ``field`` and the value.
    """
    if not value:
        raise ValueError(f"{where}: empty {field}")
    if "\x00" in value:
        raise ValueError(f"{where}: {field} {value!r} contains a NUL byte")
    root = Path(data_dir)
    candidate = Path(value).expanduser() if allow_external else Path(value)
    if candidate.is_absolute():
        if allow_external:
            return candidate
        raise ValueError(
            f"{where}: {field} {value!r} is an absolute path; paths must be relative to the data folder {root} "
            "(pass allow_external_paths=True to accept paths outside it)"
        )
    joined = Path(base if base is not None else root) / candidate
    if allow_external:
        return joined
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(joined))
    if real != real_root and real_root not in real.parents:
        how = "through a symlink " if os.path.realpath(os.path.abspath(joined)) != os.path.normpath(
            os.path.abspath(joined)) else ""
        raise ValueError(
            f"{where}: {field} {value!r} resolves {how}to {real}, outside the data folder {real_root}; "
            "paths must stay inside it (pass allow_external_paths=True to accept paths outside it)"
        )
    return joined


# ------------------------------------------------------------------------------------------------------- CSV


def _decode_text(data: bytes, path: Path) -> str:
    """UTF-8 text of ``data`` (a leading byte-order mark dropped); undecodable bytes name the file and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path} line {line}: not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def read_csv_rows(
    path: str | os.PathLike,
    required: tuple[str, ...] = (),
    require_rows: bool = True,
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a (optionally gzipped, ``.gz``) UTF-8 CSV: the one CSV reader of the package.

    A byte-order mark (as Excel writes) is dropped, header names and values are stripped, blank lines are skipped
    and line numbers are those where each row starts (a quoted field may span lines).

    Args:
        path: the CSV file.
        required: column names that must be present in the header.
        require_rows: raise when the file has a header but no data row.

    Returns:
        ``(header, rows)`` where ``rows`` is a list of ``(line number, {column: value})``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the path is a folder, the file is empty, not UTF-8 or not parseable, the header has an empty or
            repeated column name, a required column is missing, a row has more or fewer fields than the header,
            or (``require_rows``) there is no data row. Every message names the file and, where there is one, the
            line.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a CSV file")
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    text = _decode_text(data, path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (expected a header line with the column names)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
        missing_names = [i + 1 for i, h in enumerate(header) if not h]
        if missing_names:
            raise ValueError(f"{path} line 1: header column(s) {missing_names} have no name; header is {header}")
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise ValueError(f"{path} line 1: column(s) {repeated} appear more than once in the header {header}")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {missing}; found {header}")
        rows: list[tuple[int, dict[str, str]]] = []
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip() and len(header) > 1):
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path} line {start}: {len(fields)} fields, but the header has {len(header)}")
            rows.append((start, {k: v.strip() for k, v in zip(header, fields)}))
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num}: not parseable as CSV ({exc})") from None
    if require_rows and not rows:
        raise ValueError(f"{path}: no data rows after the header {header}")
    return header, rows


def read_keyed_csv(
    path: str | os.PathLike,
    required: tuple[str, ...] = (),
    key: str = "study_id",
    require_rows: bool = True,
) -> dict[str, tuple[int, dict[str, str]]]:
    """:func:`read_csv_rows` rows by ``key`` in file order; an empty or repeated key is an error naming the line.

    Args:
        path: the CSV file.
        required: columns that must be present besides ``key``.
        key: the id column.
        require_rows: see :func:`read_csv_rows`.

    Returns:
        ``{key value: (line number, row)}``.
    """
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    _, table = read_csv_rows(path, (key, *required), require_rows=require_rows)
    for line, row in table:
        value = row[key]
        if not value:
            raise ValueError(f"{path} line {line}: empty {key}")
        if value in rows:
            raise ValueError(f"{path} line {line} ({key} {value!r}): duplicate {key}, first seen on line {rows[value][0]}")
        rows[value] = (line, row)
    return rows


def read_text_file(path: str | os.PathLike, where: str = "", what: str = "text", allow_empty: bool = False) -> str:
    """Stripped UTF-8 text of a report file, with errors naming the file (and ``where``, e.g. the CSV row).

    Args:
        path: the file.
        where: text naming the row that points at the file, prefixed to messages.
        what: what the file is, for messages (``"report"``, ``"pseudo-report"``).
        allow_empty: accept a file with only whitespace (returns ``""``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the path is a folder, the file is not valid UTF-8 (never replaced), or it is empty.
    """
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if path.is_dir():
        raise ValueError(f"{prefix}{what} path is a directory, not a text file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}{what} file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{prefix}{what} file is not valid UTF-8: {path} (line {line}, byte {data[exc.start]:#04x}); "
            "save it as UTF-8"
        ) from None
    if not text and not allow_empty:
        raise ValueError(f"{prefix}{what} file is empty: {path}")
    return text


# ---------------------------------------------------------------------------------------------------- images


def open_image_file(path: str | os.PathLike, load: bool = True) -> Any:
    """Open an image file with errors that name it; PIL's decompression-bomb warning becomes an error.

    PIL warns above ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels by default, about 9459 x 9459) and refuses
    twice that; a chest film is far below (a 4k x 4k film is 16.8 M pixels), so anything above the limit is refused
    here. Raise ``PIL.Image.MAX_IMAGE_PIXELS`` yourself for genuine larger images.

    Args:
        path: the image file.
        load: decode the pixels now (and close the file), so a truncated file fails here, naming it.

    Returns:
        The ``PIL.Image.Image`` (loaded when ``load``; otherwise lazily opened with only the header read).

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: the path is a folder.
        PIL.UnidentifiedImageError: the file is not an image PIL can read (PIL's message names the file).
        ValueError: the image is above the decompression-bomb limit.
        OSError: decoding failed (truncated or corrupt file); the message names the file.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"image path {path} is a directory, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"image file not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ValueError(
                f"{path}: {exc} Films are far below this limit; if the image is genuine, raise "
                "PIL.Image.MAX_IMAGE_PIXELS."
            ) from None
        except UnidentifiedImageError:
            raise
        except OSError as exc:
            raise OSError(f"{path}: cannot read the image header ({exc}); the file is truncated or corrupt") from exc
    if load:
        try:
            with image:
                image.load()
        except OSError as exc:
            raise OSError(
                f"{path}: cannot decode the image ({exc}); the file is truncated or corrupt (was it changed or "
                "still being copied?)"
            ) from exc
    return image


# ---------------------------------------------------------------------------------------------------- models


def check_local_model_dir(name_or_path: str | os.PathLike, what: str) -> str:
    """Say plainly when a model argument names a local folder that does not exist, before ``from_pretrained``.

    ``from_pretrained`` treats anything that is not an existing folder as a Hub repo id, so a mistyped local path
    ends in "couldn't connect to huggingface.co" (offline) or "is not a valid model identifier". A value that
    cannot be a Hub id (absolute, starting with ``.``/``~``, more than one ``/``, a trailing ``/``) or that
    exists as a file is reported here instead.

    Args:
        name_or_path: the folder or Hub id given by the user.
        what: the argument's name for the message, e.g. ``"--vision_model"``.

    Returns:
        ``str(name_or_path)``.

    Raises:
        FileNotFoundError: it looks like a local path and no such folder exists.
        NotADirectoryError: it is an existing file, not a folder.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return text
    if path.exists():
        raise NotADirectoryError(f"{what} {text!r} is a file; expected a model folder (config.json + weights)")
    looks_local = (
        isinstance(name_or_path, Path)
        or path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or text.endswith(("/", os.sep))
        or (os.sep != "/" and os.sep in text)
    )
    if looks_local:
        raise FileNotFoundError(f"{what} folder not found: {text} (no such directory)")
    return text


def load_pretrained(loader: Any, name_or_path: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name_or_path, **kwargs)`` whose errors say whether a local folder was missing.

    Args:
        loader: a class with ``from_pretrained`` (``AutoProcessor``, ``CLIPVisionModel``...).
        name_or_path: local folder or Hub id.
        what: the argument's name for messages.
        kwargs: forwarded to ``from_pretrained``.

    Raises:
        FileNotFoundError / NotADirectoryError: see :func:`check_local_model_dir`.
        OSError: loading failed; the message says that no local folder of that name exists when that is the case.
    """
    text = check_local_model_dir(name_or_path, what)
    try:
        return loader.from_pretrained(text, **kwargs)
    except OSError as exc:
        if Path(text).expanduser().is_dir():
            raise
        raise OSError(
            f"{what} {text!r}: there is no local folder of that name, and loading it as a Hub repo id failed "
            f"({exc})"
        ) from exc


__all__ = [
    "atomic_write_text",
    "check_local_model_dir",
    "load_pretrained",
    "SPLITS",
    "SPLIT_ALIASES",
    "named_os_error",
    "normalise_split",
    "open_image_file",
    "read_csv_rows",
    "read_keyed_csv",
    "read_text_file",
    "resolve_data_path",
    "resolve_device_dtype",
]
