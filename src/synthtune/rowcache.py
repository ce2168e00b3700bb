"""The row-level generation cache: one entry per answer a teacher wrote or rating a judge gave.

Why: a nightly run should pay only for what is new. The generate stage's key changes whenever a seed
is added, so a stage-level cache would regenerate everything; this one is keyed per row, by what
determines that row (`entry_key`: model identity, mode, generation settings, system prompt, the
prompt text, the generation index; for ratings the judge and the candidates rated).

Layout: `{artifact_root}/generate/.cache/{kind}/shard-{sha}.parquet`, where kind is `answers`,
`magpie` or `ratings`. Every shard holds a `key` column plus the entry's fields. Shards are
content-addressed (named by the sha256 of their bytes), written whole and atomically (a local
rename; one PUT on object stores) and never rewritten, so concurrent runs and crashed runs never
leave a torn entry. distilabel writes a shard per finished batch as it goes (`SaveBatches`), which
makes a crashed run's finished batches hits for its retry. `compact()` merges many small shards
into one: the merged shard is written first and the small ones deleted after; a reader that lists
a shard which is then deleted lists again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable

from synthtune.atomic import write_bytes

log = logging.getLogger("synthtune.rowcache")
PREFIX = "shard-"


def entry_key(**parts) -> str:
    """The key of one entry: sha256 over its parts (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class RowCache:
    """Entries of one kind under `url` (any fsspec URL)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.base = self.base.rstrip("/")

    def shards(self) -> list[str]:
        if not self.fs.exists(self.base):
            return []
        return sorted(p for p in self.fs.ls(self.base, detail=False) if p.rsplit("/", 1)[-1].startswith(PREFIX)
                      and p.endswith(".parquet"))

    def _read(self, shard: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        with self.fs.open(shard, "rb") as f:
            return pq.read_table(f, columns=columns)

    def lookup(self, keys: Iterable[str]) -> dict[str, dict]:
        """key -> entry fields, for the wanted keys found in the cache."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = set(keys)
        if not wanted:
            return {}
        want = pa.array(sorted(wanted))
        for _ in range(3):
            hits: dict[str, dict] = {}
            try:
                for shard in self.shards():
                    mask = pc.is_in(self._read(shard, ["key"])["key"], value_set=want)
                    if pc.any(mask).as_py():
                        for row in self._read(shard).filter(mask).to_pylist():
                            hits.setdefault(row.pop("key"), row)
                return hits
            except FileNotFoundError:  # compacted away while we read: its entries are in the merged shard
                log.info("a shard of %s went away while reading (compaction); listing again", self.url)
        raise RuntimeError(f"the row cache at {self.url} kept changing while being read")

    def write(self, rows: list[dict]) -> str | None:
        """One new shard holding `rows` (each with a `key`); None when there is nothing to write."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return None
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue()
        path = f"{self.base}/{PREFIX}{hashlib.sha256(data).hexdigest()[:32]}.parquet"
        if self.fs.exists(path):  # same bytes already there: content-addressed, nothing to do
            return path
        self.fs.makedirs(self.base, exist_ok=True)
        write_bytes(self.fs, path, data)  # a reader never sees a half-written shard
        return path

    def size(self) -> int:
        return sum(self._read(s, ["key"]).num_rows for s in self.shards())

    def compact(self, min_shards: int = 32) -> int:
        """Merge the shards into one when there are at least `min_shards`; returns how many were merged."""
        import pyarrow as pa

        shards = self.shards()
        if len(shards) < min_shards:
            return 0
        tables = []
        for shard in shards:
            try:
                tables.append(self._read(shard))
            except FileNotFoundError:  # another run compacted it meanwhile
                return 0
        merged = pa.concat_tables(tables, promote_options="permissive")
        seen: set[str] = set()
        keep = [i for i, k in enumerate(merged["key"].to_pylist()) if not (k in seen or seen.add(k))]
        written = self.write(merged.take(keep).to_pylist())
        for shard in shards:
            if shard != written:
                try:
                    self.fs.rm(shard)
                except FileNotFoundError:
                    pass
        return len(shards)
