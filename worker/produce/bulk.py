"""Bulk input of ``enqueue --from FILE``: registrations read from NDJSON or CSV, and progress.

NDJSON (``.ndjson``, ``.jsonl``, ``.json``, or any file whose first character is ``{``), one
object per line with ``customer``, ``product``, optional ``external_account`` (or
``externalAccount``) and ``details`` (an object of text); or CSV with a header row naming
``customer``, ``product``, optional ``external_account``, ``details`` (a JSON object) and/or
``detail.<KEY>`` columns (an empty cell leaves the key out). A bad row is recorded as an
``InvalidInput`` failure and the batch goes on.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, TextIO

from worker.errors import ConfigError
from worker.produce.client import (
    CustomerAdd,
)
from worker.produce.options import check_did

#: the name recorded for a row of the input file that cannot be used
INVALID_INPUT: Final = "InvalidInput"
_NDJSON_SUFFIXES: Final = (".ndjson", ".jsonl", ".json")
_CSV_FIELDS: Final = frozenset({"customer", "product", "external_account", "details"})
_JSON_FIELDS: Final = frozenset(
    {"customer", "product", "external_account", "externalAccount", "details"}
)


def _text_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of text values, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValueError(f"{what}[{k!r}] must be text, got {type(v).__name__}")
    return dict(value)


@dataclass(frozen=True, slots=True)
class Row:
    """One registration read from a bulk file, or why it cannot be used."""

    #: 1-based line number in the file (CSV: the line the record ends on)
    line: int
    args: CustomerAdd | None
    error: str | None = None


def _registration(
    customer: object, product: object, details: object, external: object
) -> CustomerAdd:
    if external is not None and not isinstance(external, str):
        raise ValueError(f"external_account must be text, got {type(external).__name__}")
    return CustomerAdd(
        customer=check_did(customer, "customer"),  # type: ignore[arg-type]
        product=check_did(product, "product"),  # type: ignore[arg-type]
        details=_text_map({} if details is None else details, "details"),
        external_account=external or None,
    )


def read_ndjson(stream: IO[str]) -> Iterator[Row]:
    """Rows of an NDJSON stream; blank lines are skipped."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            unknown = set(doc) - _JSON_FIELDS
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            external = doc.get("external_account", doc.get("externalAccount"))
            yield Row(
                number,
                _registration(
                    doc.get("customer"), doc.get("product"), doc.get("details"), external
                ),
            )
        except ValueError as exc:
            yield Row(number, None, str(exc))


def read_csv(stream: IO[str]) -> Iterator[Row]:
    """Rows of a CSV stream with a header row.

    Raises:
        ConfigError: the header lacks ``customer`` or ``product`` or names unknown columns.
    """
    reader = csv.DictReader(stream)
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in _CSV_FIELDS and not c.startswith("detail.")]
    if unknown or not {"customer", "product"} <= set(header):
        raise ConfigError(
            "--from: a CSV header needs customer and product, and may add external_account, "
            f"details and detail.<KEY>; got {header!r}"
        )
    for record in reader:
        number = reader.line_num
        try:
            if None in record:
                raise ValueError("more cells than header columns")
            details: dict[str, str] = {}
            if record.get("details"):
                try:
                    parsed = json.loads(record["details"])
                except json.JSONDecodeError as exc:
                    raise ValueError(f"details is not JSON: {exc.msg}") from None
                details.update(_text_map(parsed, "details"))
            for col, cell in record.items():
                if col.startswith("detail.") and cell:
                    details[col.removeprefix("detail.")] = cell
            yield Row(
                number,
                _registration(
                    record.get("customer") or None,
                    record.get("product") or None,
                    details,
                    record.get("external_account") or None,
                ),
            )
        except ValueError as exc:
            yield Row(number, None, str(exc))


def read_rows(path: Path) -> list[Row]:
    """Every row of a bulk file, NDJSON or CSV (see the module docstring).

    Raises:
        ConfigError: the file cannot be read or is not a CSV with a usable header.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            first = stream.read(4096).lstrip()[:1]
            stream.seek(0)
            if path.suffix.lower() in _NDJSON_SUFFIXES or (
                path.suffix.lower() != ".csv" and first == "{"
            ):
                return list(read_ndjson(stream))
            return list(read_csv(stream))
    except OSError as exc:
        raise ConfigError(f"--from: cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--from: {str(path)!r} is not UTF-8 text") from None


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere."""

    WIDTH: Final = 30

    def __init__(self, total: int, stream: TextIO, *, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.enabled = enabled
        self._last = 0.0

    def advance(self, *, ok: bool) -> None:
        """Count one outcome and redraw at most ten times a second (always at the end)."""
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            filled = self.WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(
                f"\r[{bar}] {self.done}/{self.total} ok {self.done - self.failed} "
                f"failed {self.failed}"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
