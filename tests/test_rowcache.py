"""The row-level generation cache: content-addressed, append-only shards on any fsspec root."""

from __future__ import annotations

import threading

import pytest

from synthtune.rowcache import RowCache, entry_key


@pytest.fixture(params=["local", "memory"])
def cache(request, tmp_path):
    if request.param == "local":
        return RowCache(str(tmp_path / "answers"))
    import uuid

    return RowCache(f"memory://rowcache-{uuid.uuid4().hex}/answers")  # stands in for an object store


def test_entries_come_back_by_key(cache):
    cache.write([{"key": "k1", "generation": "one"}, {"key": "k2", "generation": "two"}])
    cache.write([{"key": "k3", "generation": "three"}])
    assert cache.lookup(["k1", "k3", "nope"]) == {"k1": {"generation": "one"}, "k3": {"generation": "three"}}
    assert cache.lookup([]) == {}


def test_shards_are_content_addressed_and_never_rewritten(cache):
    first = cache.write([{"key": "k1", "generation": "one"}])
    again = cache.write([{"key": "k1", "generation": "one"}])  # same bytes: the same shard, nothing new
    other = cache.write([{"key": "k2", "generation": "two"}])
    assert first == again != other and len(cache.shards()) == 2
    with cache.fs.open(first, "rb") as f:
        before = f.read()
    cache.write([{"key": "k1", "generation": "one"}, {"key": "k9", "generation": "nine"}])
    with cache.fs.open(first, "rb") as f:
        assert f.read() == before


def test_no_half_written_shard_is_ever_visible(tmp_path):
    cache = RowCache(str(tmp_path / "answers"))
    cache.write([{"key": f"k{i}", "generation": "x" * 1000} for i in range(100)])
    assert [p.name for p in (tmp_path / "answers").iterdir()] == [p.rsplit("/", 1)[-1] for p in cache.shards()]


def test_concurrent_writers_all_land(cache):
    def writer(n):
        for i in range(5):
            cache.write([{"key": f"w{n}-{i}", "generation": f"{n}/{i}"}])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache.lookup([f"w{n}-{i}" for n in range(4) for i in range(5)])) == 20


def test_compaction_keeps_every_entry_and_drops_the_small_shards(cache):
    for i in range(6):
        cache.write([{"key": f"k{i}", "generation": str(i)}])
    cache.write([{"key": "k0", "generation": "0"}, {"key": "k1", "generation": "1"}])  # a repeat of two entries
    assert cache.compact(min_shards=3) == 7
    assert len(cache.shards()) == 1 and cache.size() == 6
    assert cache.lookup([f"k{i}" for i in range(6)]) == {f"k{i}": {"generation": str(i)} for i in range(6)}
    assert cache.compact(min_shards=3) == 0  # one shard: nothing to do


def test_a_reader_that_loses_a_race_with_compaction_reads_again(tmp_path, monkeypatch):
    cache = RowCache(str(tmp_path / "answers"))
    for i in range(3):
        cache.write([{"key": f"k{i}", "generation": str(i)}])
    stale = cache.shards()
    calls = {"n": 0}

    def listing():
        calls["n"] += 1
        if calls["n"] == 1:  # the first listing is taken before another run compacts
            RowCache(cache.url).compact(min_shards=2)
            return stale
        return RowCache.shards(cache)

    monkeypatch.setattr(cache, "shards", listing)
    assert set(cache.lookup(["k0", "k1", "k2"])) == {"k0", "k1", "k2"} and calls["n"] == 2


def test_entry_keys_depend_on_every_part():
    base = entry_key(kind="answer", model="m", prompt="p", index=0)
    assert base == entry_key(index=0, prompt="p", model="m", kind="answer")  # order of parts is irrelevant
    assert len({base, entry_key(kind="answer", model="m2", prompt="p", index=0),
                entry_key(kind="answer", model="m", prompt="p2", index=0),
                entry_key(kind="answer", model="m", prompt="p", index=1)}) == 4
