"""Migration files: numbered, ordered, unique."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.service import store


def test_shipped_migrations_are_numbered_from_one_without_gaps() -> None:
    found = store.discover()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "upload_service"
    assert all(m.path.read_text().strip() for m in found)


def test_discover_orders_by_number_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("0010_later.sql", "0002_second.sql", "README.md", "3_bad.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [(m.version, m.name) for m in store.discover(tmp_path)] == [
        (2, "second"),
        (10, "later"),
    ]


def test_two_files_with_one_number_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="reuses number 1"):
        store.discover(tmp_path)
