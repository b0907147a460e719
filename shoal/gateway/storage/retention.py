"""Retention: results older than the age limit go, then the oldest beyond the size limit. Both work on
whole segment files (a write batch), rows first: once they are gone nothing serves the files, which
then go at leisure. Hour folders wholly past the age limit go too, with anything left in them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shoal.gateway.storage.schema import results_table
from shoal.gateway.storage.segments import HOUR_DIR, hour_of

_t = results_table.c
_PAGE = 200


async def expired_files(engine: AsyncEngine, cluster: str, cutoff: float) -> list[str]:
    """Up to a page of segment files holding rows older than ``cutoff`` (unix seconds)."""
    q = select(_t.path).where(_t.cluster == cluster, _t.time < cutoff).group_by(_t.path).limit(_PAGE)
    async with engine.connect() as conn:
        return list((await conn.scalars(q)).all())


async def oldest_files(engine: AsyncEngine, cluster: str, excess: int) -> list[str] | None:
    """The oldest segment files whose rows hold at least ``excess`` bytes (as far as one page of rows
    reaches); None when the cluster has no rows at all."""
    q = select(_t.path, _t.bytes).where(_t.cluster == cluster).order_by(_t.id).limit(10 * _PAGE)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    if not rows:
        return None
    paths: list[str] = []
    freed = 0
    for r in rows:
        if r.path not in paths:
            if freed >= excess:
                break
            paths.append(r.path)
        freed += r.bytes
    return paths


async def drop_rows(engine: AsyncEngine, cluster: str, paths: list[str]) -> tuple[int, int]:
    """Delete every row stored in these files: (rows, their bytes)."""
    where = (_t.cluster == cluster, _t.path.in_(paths))
    async with engine.begin() as conn:
        freed = await conn.scalar(select(func.coalesce(func.sum(_t.bytes), 0)).where(*where))
        n = (await conn.execute(delete(results_table).where(*where))).rowcount or 0
    return n, int(freed or 0)


async def stored_bytes(engine: AsyncEngine, cluster: str) -> int:
    async with engine.connect() as conn:
        total = await conn.scalar(select(func.coalesce(func.sum(_t.bytes), 0)).where(_t.cluster == cluster))
    return int(total or 0)


async def remove_files(folder: Path, rels: list[str]) -> list[OSError]:
    """Remove segment files (gone already is fine); the errors of those that could not be."""

    def remove() -> list[OSError]:
        errors = []
        for rel in rels:
            try:
                os.unlink(folder / rel)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(e)
        return errors

    return await asyncio.to_thread(remove)


def sweep_hours(folder: Path, cutoff: float, now: float) -> None:
    """Hour folders wholly older than ``cutoff`` go, with anything left in them (a file whose rows
    were never written); empty past hours go too."""
    this_hour = hour_of(now)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not HOUR_DIR.fullmatch(name) or name >= this_hour:
            continue
        start = datetime.strptime(name, "%Y%m%d%H").replace(tzinfo=timezone.utc).timestamp()
        p = folder / name
        # A batch begun just before the hour ended may hold requests of the next minute.
        if start + 3600 + 60 < cutoff:
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.rmdir()
