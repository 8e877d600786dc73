"""Entries compressed with a dictionary trained on the store's own traffic, on both backends.

Stored entries must decode to exactly what was sent whichever dictionary (or none) they were
written with, in this process or another one opened later, across retraining and across a
store that cannot train one. The size figures are asserted as "smaller", never as ratios.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import zstandard

from alf_analytics.collector import Collector
from alf_analytics.collector.storage import Store, codec, open_store
from tests.pg import pg_server, store, store_db
from tests.test_collector import alf_of
from tests.test_collector_rollups import save_alfs

__all__ = ["pg_server", "store", "store_db"]  # fixtures, imported for pytest

TOKEN = "codec-token"
_AGENTS = ["python-httpx/0.28.1", "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0", "curl/8.5.0"]


def api_entry(rng: random.Random, i: int) -> dict[str, Any]:
    """One entry as an agent records an API call: alike in shape, different in values."""
    started = datetime.now(timezone.utc) - timedelta(seconds=rng.random() * 600)
    item = rng.randint(1, 10**6)
    body = json.dumps({"id": item, "name": f"item {item}", "tags": ["a", "b"][: i % 3]})
    return {
        "startedDateTime": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "time": round(rng.uniform(0.1, 900), 3),
        "request": {
            "method": rng.choice(["GET", "POST", "DELETE"]),
            "url": f"https://api.example.test/v1/items/{item}?page={i % 7}",
            "httpVersion": "HTTP/1.1",
            "queryString": [{"name": "page", "value": str(i % 7)}],
            "headers": [
                {"name": "host", "value": "api.example.test"},
                {"name": "user-agent", "value": rng.choice(_AGENTS)},
                {"name": "accept", "value": "application/json"},
                {"name": "x-request-id", "value": f"{rng.getrandbits(64):016x}"},
            ],
            "headersSize": 180 + i % 40,
            "bodyCaptured": False,
            "bodySize": 0,
        },
        "response": {
            "status": rng.choice([200, 200, 201, 404, 500]),
            "statusText": "",
            "httpVersion": "HTTP/1.1",
            "headers": [
                {"name": "content-type", "value": "application/json"},
                {"name": "content-length", "value": str(len(body))},
            ],
            "headersSize": 90,
            "bodyCaptured": True,
            "bodySize": len(body),
            "content": {
                "mimeType": "application/json",
                "encoding": "base64",
                "text": base64.b64encode(body.encode()).decode(),
            },
        },
        "timings": {"send": 0.01, "wait": 1.5, "receive": 0.02},
    }


def save(store: Store, entries: list[dict[str, Any]]) -> None:
    """Store ``entries`` as the collector does, 100 to a request."""
    for start in range(0, len(entries), 100):
        save_alfs(store, [alf_of(entries[start : start + 100], token=TOKEN)])


def stored(store: Store) -> list[tuple[int, bytes]]:
    """(dictionary id, blob) of every stored entry, in id order."""
    rows = store.fetchall("SELECT entry FROM entry_data ORDER BY id")
    blobs = [bytes(row[0]) for row in rows]
    return [(zstandard.get_frame_parameters(blob).dict_id, blob) for blob in blobs]


def decoded(store: Store) -> list[dict[str, Any]]:
    return [store.decode_entry(blob) for _, blob in stored(store)]


def test_a_dictionary_is_trained_from_the_first_entries_and_used_after(store: Store) -> None:
    rng = random.Random(1)
    store.codec.sample_entries = 300
    first = [api_entry(rng, i) for i in range(300)]
    save(store, first)
    assert store.codec.wait_for_training()
    [(dict_id, created)] = store.fetchall("SELECT id, created FROM dictionaries")
    assert dict_id != 0 and created > 0
    then = [api_entry(rng, i) for i in range(300, 600)]
    save(store, then)

    blobs = stored(store)
    assert {d for d, _ in blobs[:300]} == {0}  # written before the dictionary existed
    assert {d for d, _ in blobs[300:]} == {dict_id}
    before = sum(len(b) for _, b in blobs[:300])
    after = sum(len(b) for _, b in blobs[300:])
    assert after < before
    # Each decodes to what was sent, with the dictionary it was written with or none.
    assert decoded(store) == first + then


def test_another_process_decodes_and_compresses_with_the_stores_dictionary(
    store_db: str,
) -> None:
    rng = random.Random(2)
    entries = [api_entry(rng, i) for i in range(400)]
    writer = open_store(store_db)
    try:
        writer.codec.sample_entries = 200
        save(writer, entries[:200])
        assert writer.codec.wait_for_training()
        save(writer, entries[200:300])
    finally:
        writer.close()
    # Opened afresh (as a restart or a second collector process): nothing in memory.
    reader = open_store(store_db)
    try:
        assert decoded(reader) == entries[:300]
        save(reader, entries[300:])
        ids = [d for d, _ in stored(reader)]
        assert reader.codec.wait_for_training()
        assert ids[300:] == [ids[250]] * 100  # the newest dictionary, no new training
        assert reader.scalar("SELECT COUNT(*) FROM dictionaries") == 1
        assert decoded(reader) == entries
    finally:
        reader.close()


def test_retraining_adds_a_dictionary_and_old_entries_still_decode(store: Store) -> None:
    rng = random.Random(3)
    store.codec.sample_entries = 100
    entries = [api_entry(rng, i) for i in range(500)]
    save(store, entries[:100])
    assert store.codec.wait_for_training()
    save(store, entries[100:200])
    store.codec.retrain_after = 0.0  # the newest is old enough: sample again, train again
    save(store, entries[200:300])
    assert store.codec.wait_for_training()
    store.codec.retrain_after = 3600.0
    save(store, entries[300:500])

    ids = [d for d, _ in stored(store)]
    kept = [int(row[0]) for row in store.fetchall("SELECT id FROM dictionaries ORDER BY created")]
    assert len(set(kept)) == 2
    assert set(ids[100:300]) == {kept[0]}
    assert set(ids[300:]) == {kept[1]}
    assert decoded(store) == entries
    # Cleared (the command behind tests and `clear`): dictionaries stay, decoding still works.
    store.clear()
    assert store.scalar("SELECT COUNT(*) FROM dictionaries") == 2
    save(store, entries[:50])
    assert decoded(store) == entries[:50]


def test_a_store_that_cannot_train_keeps_storing_without_a_dictionary(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(4)
    store.codec.sample_entries = 2  # far too few samples for zstd's trainer
    entries = [api_entry(rng, i) for i in range(2)]
    with caplog.at_level(logging.INFO, logger="alf_analytics.collector"):
        save(store, entries)
        assert store.codec.wait_for_training()
        more = [api_entry(rng, i) for i in range(2, 50)]
        save(store, more)  # no new sample for an hour: no training at every request
        assert store.codec.wait_for_training()
    assert [r.getMessage() for r in caplog.records if "dictionary" in r.getMessage()] == [
        f"no compression dictionary from 2 entries: {_trainer_error()}"
    ]
    assert store.scalar("SELECT COUNT(*) FROM dictionaries") == 0
    assert {d for d, _ in stored(store)} == {0}
    assert decoded(store) == entries + more


def test_a_store_that_could_not_train_samples_again_after_the_pause(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "RETRY_AFTER", 0.0)  # the hour has passed at once
    rng = random.Random(8)
    store.codec.sample_entries = 2
    with caplog.at_level(logging.INFO, logger="alf_analytics.collector"):
        for i in range(0, 4, 2):
            save(store, [api_entry(rng, i), api_entry(rng, i + 1)])
            assert store.codec.wait_for_training()
    tried = [r.getMessage() for r in caplog.records if "dictionary" in r.getMessage()]
    assert tried == [f"no compression dictionary from 2 entries: {_trainer_error()}"] * 2


def test_samples_are_cut_but_entries_are_stored_whole(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    entries = [api_entry(rng, i) for i in range(200)]
    for entry in entries[::2]:  # a 12 KB body text: the entry's JSON is over the cut
        entry["response"]["content"]["text"] = base64.b64encode(rng.randbytes(9_000)).decode()
    sizes: list[int] = []
    train = zstandard.train_dictionary

    def spy(size: int, samples: list[bytes], **options: Any) -> zstandard.ZstdCompressionDict:
        sizes.extend(len(sample) for sample in samples)
        return train(size, samples, **options)

    monkeypatch.setattr(zstandard, "train_dictionary", spy)
    store.codec.sample_entries = 200
    save(store, entries)
    assert store.codec.wait_for_training()
    assert len(sizes) == 200
    assert max(sizes) == codec.SAMPLE_CUT
    assert decoded(store) == entries


def _trainer_error() -> str:
    try:
        zstandard.train_dictionary(32_768, [b"{}", b"{}"])
    except zstandard.ZstdError as exc:
        return str(exc)
    raise AssertionError("zstd trained a dictionary on two tiny samples")


def test_an_entry_naming_a_dictionary_the_store_lacks_is_a_clear_error(store: Store) -> None:
    rng = random.Random(5)
    samples = [json.dumps(api_entry(rng, i)).encode() for i in range(300)]
    foreign = zstandard.ZstdCompressor(dict_data=zstandard.train_dictionary(8192, samples))
    blob = foreign.compress(samples[0])
    dict_id = zstandard.get_frame_parameters(blob).dict_id
    with pytest.raises(ValueError, match=f"the store has no compression dictionary {dict_id}"):
        store.decode_entry(blob)


def test_through_a_real_collector_the_api_shows_entries_as_sent(store_db: str) -> None:
    """Over HTTP: the default sample, then entries compressed with the dictionary trained on
    it, all read back through the query API."""
    rng = random.Random(6)
    entries = [api_entry(rng, i) for i in range(2_500)]
    sample = codec.SAMPLE_ENTRIES
    with Collector(store_db, read_key="codec-read-key") as collector, httpx.Client() as http:

        def post(part: list[dict[str, Any]]) -> None:
            for start in range(0, len(part), 100):
                alf = alf_of(part[start : start + 100], token=TOKEN)
                answer = http.post(collector.endpoint("1.1.0", "single"), json=alf)
                assert answer.status_code == 200, answer.text

        post(entries[:sample])
        assert collector.store.codec.wait_for_training()
        post(entries[sample:])
        assert collector.store.scalar("SELECT COUNT(*) FROM dictionaries") == 1
        [dict_id] = [row[0] for row in collector.store.fetchall("SELECT id FROM dictionaries")]
        assert {d for d, _ in stored(collector.store)[sample:]} == {dict_id}
        got = sorted((e.entry for e in collector.entries()), key=json.dumps)
        assert got == sorted(entries, key=json.dumps)
        # The HAR export decodes every one of them again, through the query API.
        har = http.get(
            collector.url + "/api/export.har?limit=5000",
            headers={"Authorization": "Bearer codec-read-key"},
        )
        assert har.status_code == 200, har.text
        exported = har.json()["log"]["entries"]
        assert sorted(e["request"]["url"] for e in exported) == sorted(
            e["request"]["url"] for e in entries
        )
