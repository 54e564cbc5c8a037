"""The studio's history: every job with every setting, in SQLite (the standard library's sqlite3) in
RUNS/.studio/history.sqlite, created on first start.

One row per job: id, kind (generate, inpaint, chain), run, status, the settings as JSON, the prompt (searched
with LIKE), the images written, the error and the times. Opening the database marks jobs left queued or running
by a previous server as ``interrupted``: nothing is reported done that was not written."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .jobs import JobKindName

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    run TEXT NOT NULL,
    status TEXT NOT NULL,
    settings TEXT NOT NULL,
    prompt TEXT NOT NULL DEFAULT '',
    images INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""
UNFINISHED = ("queued", "running")


class History:
    """The jobs table; one connection shared by the worker and the request threads, behind a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.executescript(SCHEMA)
            self.interrupted = self.db.execute(
                "UPDATE jobs SET status = 'interrupted', finished = ? WHERE status IN ('queued', 'running')",
                (time.time(),),
            ).rowcount

    def add(self, id: str, kind: JobKindName, run: str, settings: dict, created: float) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO jobs (id, kind, run, status, settings, prompt, created) VALUES (?, ?, ?, 'queued', ?, ?, "
                "?)",
                (id, kind, run, json.dumps(settings, sort_keys=True), settings.get("prompt") or "", created),
            )

    def finish(self, id: str, status: str, images: int = 0, error: str | None = None) -> None:
        with self.lock:
            self.db.execute(
                "UPDATE jobs SET status = ?, images = ?, error = ?, finished = ? WHERE id = ?",
                (status, images, error, time.time(), id),
            )

    def set_status(self, id: str, status: str) -> None:
        with self.lock:
            self.db.execute("UPDATE jobs SET status = ? WHERE id = ?", (status, id))

    def get(self, id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone()
        return _row(row) if row else None

    def search(self, q: str = "", status: str | None = "done", limit: int = 50, offset: int = 0) -> list[dict]:
        """Jobs newest first whose prompt contains ``q`` (case-insensitive), of one status (None: any)."""
        where, args = (
            ["prompt LIKE ? ESCAPE '\\'"],
            ["%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"],
        )
        if status is not None:
            where.append("status = ?")
            args.append(status)
        with self.lock:
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return [_row(r) for r in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["settings"] = json.loads(d["settings"])
    return d
