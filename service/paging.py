"""Paged listing shared by the list routes: the ``limit``/``offset`` query parameters and the
count + page query (newest first)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute

from worker.db import Base, Database

Limit = Annotated[int, Query(ge=1, le=500)]
# bounded: SQLite's integers are 64-bit (2**63 was a 500), no table is this long
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]

Row = TypeVar("Row", bound=Base)


def page(db: Database, model: type[Row], where: Sequence[ColumnElement[bool]],
         newest: InstrumentedAttribute[Any], limit: int, offset: int
         ) -> tuple[int, Sequence[Row]]:
    """How many rows match ``where``, and the page of them ordered by ``newest`` descending
    (ties broken by id, so pages never overlap)."""
    with db.session() as s:
        total = s.scalar(select(func.count()).select_from(model).where(*where)) or 0
        rows = s.scalars(select(model).where(*where)
                         .order_by(newest.desc(), model.id)  # type: ignore[attr-defined]
                         .limit(limit).offset(offset)).all()
    return total, rows
