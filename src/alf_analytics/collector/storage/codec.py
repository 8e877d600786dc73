"""How entries are stored: zstd-compressed JSON, with a dictionary trained on the store's traffic.

The entries of one API look alike (the same header names, most of their values, the same
shape), but one entry alone is too small for zstd to learn that: compressed on its own, a
typical 1.4 KB entry keeps half its size. A dictionary trained on a sample of the store's own
entries holds what they share, and with it each entry compresses to a fraction of that, in
a third of the time (measured on the ingest benchmark's entries: 674 bytes and 7.6 µs each
without, about 100 bytes and 2.4 µs with). Less to compress is less to write, too.

- Until the store has a dictionary, entries are compressed without one and the first
  ``sample_entries`` of them (each cut at ``SAMPLE_CUT`` bytes) are kept as samples.
- Then a thread of its own trains a dictionary (zstd's trainer runs without the GIL: about
  0.1 s for 2,000 entries), the store saves it in its ``dictionaries`` table, and the
  entries that follow are compressed with it.
- Every zstd frame names its dictionary, so each entry is decoded with the one it was
  written with. Dictionaries are never changed or deleted: a new one is trained from a
  fresh sample once the newest is ``retrain_after`` seconds old (a day), so that the
  dictionary follows the API as it changes, and the old ones stay for the entries that
  use them (one row of at most ``DICTIONARY_BYTES`` a day).
- Several collector processes on one PostgreSQL store may each train one; every process
  starts from the store's newest and decodes any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
import zstandard

__all__ = ["EntryCodec"]

logger = logging.getLogger("alf_analytics.collector")

LEVEL: Final = 1
DICTIONARY_BYTES: Final = 32_768
SAMPLE_ENTRIES: Final = 2_000
SAMPLE_CUT: Final = 8_192
RETRAIN_AFTER: Final = 86_400.0
RETRY_AFTER: Final = 3_600.0

Loader = Callable[[int], "bytes | None"]
"""The data of the dictionary with this id, from the store (``None``: there is none)."""
Adder = Callable[[int, int, bytes], bytes]
"""Store a dictionary (id, created in seconds since the epoch, data); returns the data that the
store now holds under that id (another process's, should two ever draw the same id)."""
Newest = Callable[[], "tuple[int, int, bytes] | None"]
"""The store's newest dictionary as (id, created, data), if it has one."""
Sample = bytes | bytearray | memoryview
"""A training sample, as zstd's trainer types its list (invariant: a list[bytes] will not do)."""


class _Current:
    """The dictionary entries are compressed with now, and when it was trained."""

    def __init__(self, dict_id: int, created: float, data: bytes) -> None:
        self.dict_id = dict_id
        self.created = created
        self.dictionary = zstandard.ZstdCompressionDict(data)


class EntryCodec:
    """Compresses entries for one store and decodes what it holds; safe to share by threads."""

    def __init__(
        self,
        load: Loader,
        add: Adder,
        newest: Newest,
        *,
        sample_entries: int = SAMPLE_ENTRIES,
        retrain_after: float = RETRAIN_AFTER,
    ) -> None:
        self.sample_entries = sample_entries
        self.retrain_after = retrain_after
        self._load, self._add, self._newest = load, add, newest
        self._lock = threading.Lock()
        self._started = False
        self._current: _Current | None = None
        self._dictionaries: dict[int, zstandard.ZstdCompressionDict] = {}
        self._samples: list[Sample] | None = None  # collecting while a list
        self._training: threading.Thread | None = None
        self._next_sample = 0.0  # after a failed training: when to sample again
        self._local = threading.local()

    # -- writing ------------------------------------------------------------------------

    def compress(self, entries: list[bytes]) -> list[bytes]:
        """Each entry's JSON compressed, in order (with the current dictionary if any)."""
        current = self._prepare(entries)
        compressor = self._compressor(current)
        return [compressor.compress(entry) for entry in entries]

    def _prepare(self, entries: list[bytes]) -> _Current | None:
        if not self._started:
            self._start()
        current = self._current
        if self._training is None:
            now = time.time()
            stale = current is None or now - current.created >= self.retrain_after
            if stale and now >= self._next_sample:
                self._sample(entries)
        return current

    def _start(self) -> None:
        # Two threads may both get here first: both load the same newest, which is harmless.
        newest = self._newest()
        if newest is not None:
            dict_id, created, data = newest
            self._use(dict_id, created, data)
        self._started = True

    def _sample(self, entries: list[bytes]) -> None:
        with self._lock:
            if self._training is not None:
                return
            if self._samples is None:
                self._samples = []
            self._samples.extend(entry[:SAMPLE_CUT] for entry in entries)
            if len(self._samples) < self.sample_entries:
                return
            samples, self._samples = self._samples, None
            self._training = threading.Thread(
                target=self._train, args=(samples,), name="alf-collector-dictionary", daemon=True
            )
            self._training.start()

    def _train(self, samples: list[Sample]) -> None:
        created = time.time()
        try:
            trained = zstandard.train_dictionary(DICTIONARY_BYTES, samples, level=LEVEL)
            dict_id = trained.dict_id()
            self._use(dict_id, created, self._add(dict_id, int(created), trained.as_bytes()))
            logger.info("compression dictionary %d trained on %d entries", dict_id, len(samples))
        except Exception as exc:
            # Too few or too alike samples, or the store closed meanwhile: entries are
            # compressed as before, and a new sample is taken an hour later.
            logger.info("no compression dictionary from %d entries: %s", len(samples), exc)
            self._next_sample = created + RETRY_AFTER
        finally:
            with self._lock:
                self._training = None

    def _use(self, dict_id: int, created: float, data: bytes) -> None:
        current = _Current(dict_id, created, data)
        with self._lock:
            self._dictionaries[dict_id] = current.dictionary
            if self._current is None or self._current.created <= created:
                self._current = current

    def _compressor(self, current: _Current | None) -> zstandard.ZstdCompressor:
        dict_id = current.dict_id if current is not None else 0
        cached: tuple[int, zstandard.ZstdCompressor] | None = getattr(
            self._local, "compressor", None
        )
        if cached is not None and cached[0] == dict_id:
            return cached[1]
        if current is None:
            compressor = zstandard.ZstdCompressor(level=LEVEL)
        else:
            compressor = zstandard.ZstdCompressor(level=LEVEL, dict_data=current.dictionary)
        self._local.compressor = (dict_id, compressor)
        return compressor

    # -- reading ------------------------------------------------------------------------

    def decode(self, blob: bytes | memoryview) -> dict[str, Any]:
        """The entry stored as ``blob``."""
        data = bytes(blob)
        dict_id = zstandard.get_frame_parameters(data).dict_id
        decoded: dict[str, Any] = orjson.loads(self._decompressor(dict_id).decompress(data))
        return decoded

    def _decompressor(self, dict_id: int) -> zstandard.ZstdDecompressor:
        cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(
            self._local, "decompressors", None
        )
        if cache is None:
            cache = self._local.decompressors = {}
        decompressor = cache.get(dict_id)
        if decompressor is None:
            if dict_id == 0:
                decompressor = zstandard.ZstdDecompressor()
            else:
                decompressor = zstandard.ZstdDecompressor(dict_data=self._dictionary(dict_id))
            if len(cache) >= 32:  # a dictionary a day: only recent ones are read often
                cache.clear()
            cache[dict_id] = decompressor
        return decompressor

    def _dictionary(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        with self._lock:
            known = self._dictionaries.get(dict_id)
        if known is not None:
            return known
        data = self._load(dict_id)
        if data is None:
            raise ValueError(f"the store has no compression dictionary {dict_id}")
        dictionary = zstandard.ZstdCompressionDict(data)
        with self._lock:
            self._dictionaries.setdefault(dict_id, dictionary)
        return dictionary

    def wait_for_training(self, timeout: float = 10.0) -> bool:
        """Wait for a training in progress (tests, benchmarks); True when none is left."""
        thread = self._training
        if thread is not None:
            thread.join(timeout)
        return self._training is None
