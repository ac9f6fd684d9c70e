"""Loading task data from local files, with errors that say where the problem is.

A split is given as a file or a folder:

* ``.jsonl``: one JSON object per line (blank lines skipped);
* ``.json``: an array of objects, a single object (the original MATH layout:
  one problem per file, in sub-folders per subject), an object with one
  array-of-objects field (``{"data": [...]}``), or JSON lines;
* ``.parquet``: read with pyarrow (``pip install pyarrow``);
* a folder: every such file below it, in sorted path order.

Every problem is reported as a :class:`DataError` (a ``ValueError``) whose
message and attributes name the file, the row (``line N``, 1-based, for JSON
lines; ``row N``, 0-based, for arrays and parquet) and the column; a missing
path raises ``FileNotFoundError`` naming the parameter.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A dataset problem, located: ``file``, ``row`` (None for file-level) and ``column``."""

    def __init__(self, message: str, *, file: str | Path | None = None, row: str | None = None,
                 column: str | None = None) -> None:
        where = ", ".join(
            part for part in (str(file) if file is not None else None, row,
                              f"column {column!r}" if column else None) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file = None if file is None else str(file)
        self.row = row
        self.column = column


def data_files(path: str | Path, parameter: str = "path") -> list[Path]:
    """The data files of a split (a file, or the supported files below a folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{parameter}: {str(path)!r} does not exist")
    if p.is_file():
        if not p.name.endswith(SUFFIXES):
            raise DataError(f"unsupported file type; expected one of {', '.join(SUFFIXES)}", file=p)
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
    if not files:
        raise DataError(f"folder has no {', '.join(SUFFIXES)} files (empty split)", file=p)
    return files


def _json_lines(file: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except ValueError as exc:
            raise DataError(f"invalid JSON ({exc})", file=file, row=f"line {number}") from None


def iter_records(file: Path) -> Iterator[tuple[str, Any]]:
    """(row label, raw record) for every record of one file."""
    name = file.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure, located
            raise DataError(f"cannot read parquet ({type(exc).__name__}: {exc})", file=file) from None
        for i, row in enumerate(rows):
            yield f"row {i}", row
        return
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc})", file=file) from None
    if name.endswith(".jsonl"):
        yield from _json_lines(file, text)
        return
    try:
        obj = json.loads(text)
    except ValueError as exc:
        if "Extra data" in str(exc):  # JSON lines in a .json file
            yield from _json_lines(file, text)
            return
        raise DataError(f"invalid JSON ({exc})", file=file) from None
    if isinstance(obj, list):
        for i, row in enumerate(obj):
            yield f"row {i}", row
    elif isinstance(obj, dict):
        arrays = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(obj) == 1 and len(arrays) == 1:
            for i, row in enumerate(obj[arrays[0]]):
                yield f"row {i}", row
        else:
            yield "row 0", obj
    else:
        raise DataError(f"expected a JSON array or object, got {type(obj).__name__}", file=file)


Validator = Callable[[Any], Any]


def load_rows(
    path: str | Path,
    columns: Mapping[str, Validator],
    optional: Mapping[str, Validator] | None = None,
    parameter: str = "path",
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Read and validate every row of a split.

    Args:
        path: a file or a folder (see the module docstring).
        columns: required column -> validator; a validator returns the
            cleaned value or raises ``ValueError``/``TypeError`` with a reason.
        optional: columns validated when present.
        parameter: the constructor parameter that named ``path`` (for errors).
        check: a row-level hook returning the final record; a ``DataError``
            without a file raised there is located at the row.

    Returns:
        The records (extra columns kept as they are).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: unreadable file, missing column, bad value, or no rows.
    """
    optional = optional or {}
    out: list[dict[str, Any]] = []
    for file in data_files(path, parameter):
        for row, record in iter_records(file):
            if not isinstance(record, dict):
                raise DataError(f"expected an object, got {type(record).__name__}", file=file, row=row)
            _check_text(record, file, row)
            clean = dict(record)
            for column, validate in columns.items():
                if column not in record:
                    raise DataError(
                        f"missing column (present: {sorted(map(str, record))})", file=file, row=row, column=column
                    )
                clean[column] = _validated(validate, record[column], file, row, column)
            for column, validate in optional.items():
                if column in record and record[column] is not None:
                    clean[column] = _validated(validate, record[column], file, row, column)
            if check is not None:
                try:
                    clean = check(clean)
                except DataError as exc:
                    if exc.file is None:
                        raise DataError(str(exc), file=file, row=row, column=exc.column) from None
                    raise
            out.append(clean)
    if not out:
        raise DataError("no rows (empty split)", file=path)
    return out


def _bad_text(value: Any) -> str | None:
    """The first string inside ``value`` (nested lists / objects) that is not valid Unicode text, or None.

    JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer
    (and no UTF-8 file) accepts.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    if isinstance(value, Mapping):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        for item in value:
            if (bad := _bad_text(item)) is not None:
                return bad
    return None


def _check_text(record: Mapping[str, Any], file: Path, row: str) -> None:
    """Refuse a record with a string that is not valid Unicode text, naming its column."""
    for column, value in record.items():
        bad = _bad_text([column, value])
        if bad is None:
            continue
        at = next(i for i, ch in enumerate(bad) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise DataError(f"not valid text: a lone surrogate {bad[at]!r} at character {at} (JSON escapes "
                        "\\ud800-\\udfff must come in pairs)", file=file, row=row,
                        column=str(column).encode("utf-8", "backslashreplace").decode())


def _validated(validate: Validator, value: Any, file: Path, row: str, column: str) -> Any:
    try:
        return validate(value)
    except (ValueError, TypeError) as exc:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise DataError(f"{exc} (value: {shown})", file=file, row=row, column=column) from None


# --------------------------------------------------------------------------- validators
def nonempty_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("empty string")
    return value


def any_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def integer(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        return integer(value.item())
    raise TypeError(f"expected an integer, got {type(value).__name__}")


def int_list(value: Any) -> list[int]:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of integers, got {type(value).__name__}")
    if not value:
        raise ValueError("empty list")
    return [integer(v) for v in value]


# --------------------------------------------------------------------------- selection
def subsample(rows: Sequence[Any], size: int | None, seed: int, what: str) -> list[Any]:
    """At most ``size`` rows, drawn without replacement with ``seed`` (original order kept).

    ``size=None`` keeps every row; a split with fewer rows than ``size`` is
    used whole, with a warning.
    """
    if size is None or size >= len(rows):
        if size is not None and size > len(rows):
            log.warning("%s: asked for %d rows, the data has %d; using all of them", what, size, len(rows))
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [rows[i] for i in keep]


def disjoint_split(rows: Sequence[Any], train_size: int | None, val_size: int | None, seed: int,
                   what: str) -> tuple[list[Any], list[Any]]:
    """Disjoint random train / val subsets of one pool of rows (seeded).

    ``val_size=None`` means "all rows not used for training"; ``train_size=None``
    means "all rows not used for validation".
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = len(rows)
    if train_size is None and val_size is None:
        raise ValueError(f"{what}: a single file for both splits needs train_size or val_size")
    n_val = val_size if val_size is not None else n - min(train_size or 0, n)
    n_train = train_size if train_size is not None else n - min(n_val, n)
    if n_train + n_val > n:
        raise DataError(
            f"train_size + val_size = {n_train + n_val} exceeds the {n} rows available for disjoint splits",
            file=what,
        )
    train = sorted(order[:n_train])
    val = sorted(order[n_train : n_train + n_val])
    return [rows[i] for i in train], [rows[i] for i in val]
