"""The collector service as README.md's "The collector service" promises it, probed as a
client would: what an audit from outside found the service doing otherwise.

Each test drives the real app under uvicorn (:class:`~alf_analytics.collector.Collector`)
over loopback HTTP.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft4Validator, FormatChecker

from alf_analytics.collector import Collector, create_app
from alf_analytics.collector.settings import TokenSet

FIXTURES = Path(__file__).parent / "fixtures" / "alf"
SCHEMAS = Path(__file__).resolve().parents[1] / "src" / "alf_analytics" / "schemas"
TOKEN = "contract-write-token-4321"
READ_KEY = "contract-read-key-8765"


def minimal_alf(token: str = TOKEN) -> dict[str, Any]:
    alf: dict[str, Any] = json.loads((FIXTURES / "1.1.0" / "minimal.json").read_text("utf-8"))
    alf = copy.deepcopy(alf)
    alf["serviceToken"] = token
    return alf


@pytest.fixture
def guarded() -> Iterator[Collector]:
    with Collector(tokens=[f"billing={TOKEN}"], read_key=READ_KEY) as running:
        yield running


@pytest.fixture
def reader() -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    with httpx.Client(trust_env=False, timeout=10.0, headers=headers) as http:
        yield http


# README: "A bad filter gets a 400 naming it ... never a 500." str.isdigit() takes "①" and
# "²", which int() refuses, and int() refuses more than 4,300 digits: each was a 500.
MANY_DIGITS = "9" * 5000


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/api/endpoints?limit=%E2%91%A0", "limit"),
        ("/api/entries?limit=%C2%B2", "limit"),
        ("/api/consumers?limit=%C2%B2", "limit"),
        ("/api/export.har?limit=%C2%B2", "limit"),
        (f"/api/entries?limit={MANY_DIGITS}", "limit"),
        ("/api/stats?interval=%E2%91%A0", "interval"),
        (f"/api/stats?interval={MANY_DIGITS}", "interval"),
        ("/api/stats?interval=%D9%A1%D9%A2%D9%A0", "interval"),  # Arabic-Indic 120
    ],
)
def test_numbers_in_other_digits_are_a_400_naming_the_parameter(
    guarded: Collector, reader: httpx.Client, path: str, named: str
) -> None:
    response = reader.get(guarded.url + path)
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert error.startswith(named)


@pytest.mark.parametrize("suffix", ["", ".har"])
def test_an_entry_id_of_thousands_of_digits_is_a_404(
    guarded: Collector, reader: httpx.Client, suffix: str
) -> None:
    assert guarded.count() == 0
    response = reader.get(f"{guarded.url}/api/entries/{MANY_DIGITS}{suffix}")
    assert response.status_code == 404, response.text
    assert response.json() == {"errors": ["no such entry"]}
    # Ids within 64 bits still route as before.
    assert reader.get(f"{guarded.url}/api/entries/12{suffix}").status_code == 404
    assert reader.get(f"{guarded.url}/api/entries/x{suffix}").status_code == 404


# README: ingest "answers {"errors": [...], "sent": N, "saved": M, "refused": K} with ...
# 405". A method Starlette's route did not list got Starlette's own 405, without the counts
# and with an Allow naming GET, PUT, DELETE, ..., all of them 405s too.
@pytest.mark.parametrize("method", ["PROPFIND", "TRACE", "CONNECT", "FOO"])
def test_any_other_method_on_an_alf_endpoint_is_the_ingest_405(
    guarded: Collector, method: str
) -> None:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        response = client.request(method, guarded.endpoint("1.1.0", "batch"))
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        body = response.json()
        assert set(body) == {"errors", "sent", "saved", "refused"}
        assert body["sent"] == body["saved"] == body["refused"] == 0
        health = client.request(method, guarded.url + "/health")
        assert health.status_code == 405
        assert health.headers["allow"] == "GET, HEAD"
    assert [record.method for record in guarded.requests()] == [method]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# README: "--verbose: log every request (uvicorn's access log, on stdout; tokens masked)" and
# "Tokens and keys never appear in full in logs". The access log wrote request targets as
# sent, and /api/...?service= takes the token itself.
def test_the_access_log_masks_tokens_and_the_read_key(reader: httpx.Client) -> None:
    open_token = "open-collector-token-5555"
    options = {"access_log": True, "log_level": "info"}
    lines = _Lines()
    access = logging.getLogger("uvicorn.access")
    with Collector(
        tokens=[f"billing={TOKEN}"], read_key=READ_KEY, server_options=options
    ) as collector:
        access.addHandler(lines)  # after uvicorn configured its logging
        try:
            assert reader.post(collector.endpoint(), json=[minimal_alf()]).status_code == 200
            for query in (
                f"service={TOKEN}",
                f"service={TOKEN.replace('-', '%2D')}&x={READ_KEY}",
                "service=billing",
            ):
                response = reader.get(f"{collector.url}/api/entries?{query}")
                assert response.status_code == 200
                assert len(response.json()["entries"]) == 1
        finally:
            access.removeHandler(lines)
    assert len(lines.lines) == 4, lines.lines
    text = "\n".join(lines.lines)
    assert TOKEN not in text and TOKEN.replace("-", "%2D") not in text
    assert READ_KEY not in text
    assert text.count("service=billing") == 3
    # An open collector (any token, loopback only) masks what a service filter names, unless
    # it is a token id.
    with Collector(server_options=options) as collector:
        access.addHandler(lines)
        try:
            response = httpx.get(f"{collector.url}/api/entries?service={open_token}")
            assert response.status_code == 200
            response = httpx.get(f"{collector.url}/api/entries?service=svc_0123456789ab")
            assert response.status_code == 200
        finally:
            access.removeHandler(lines)
    assert open_token not in "\n".join(lines.lines)
    assert "service=...5555" in lines.lines[-2]
    assert "service=svc_0123456789ab" in lines.lines[-1]
    assert access.filters == []  # each app took its mask away when it stopped


# README: "/api/entries/42.har: one entry as HAR 1.2". An ALF 1.0.0 entry is a HAR 1.2 entry,
# yet its export lost postData.params, content.compression and comment, the entry's
# connection, pageref, comment and cache, and took content.size (the decoded length) from
# bodySize (the bytes transferred).
def test_the_har_of_an_alf_1_0_0_entry_keeps_its_har_fields(
    guarded: Collector, reader: httpx.Client
) -> None:
    alf = json.loads((FIXTURES / "1.0.0" / "full.json").read_text("utf-8"))
    alf["serviceToken"] = TOKEN
    [sent] = alf["har"]["log"]["entries"]
    sent.update(pageref="page_1", comment="an entry", cache={"comment": "not cached"})
    sent["response"]["content"]["comment"] = "a body"
    sent["request"]["postData"]["comment"] = "a form"
    form_only = copy.deepcopy(sent)
    del form_only["request"]["postData"]["text"]
    alf["har"]["log"]["entries"] = [sent, form_only]
    assert reader.post(guarded.endpoint("1.0.0", "single"), json=alf).status_code == 200
    validator = Draft4Validator(
        json.loads((SCHEMAS / "1.0.0.json").read_text("utf-8")), format_checker=FormatChecker()
    )
    exported = reader.get(guarded.url + "/api/export.har").json()
    one = reader.get(guarded.url + "/api/entries/1.har").json()
    for document in (exported, one):
        errors = list(
            validator.iter_errors({"version": "1.0.0", "serviceToken": "x", "har": document})
        )
        assert errors == []
    [har, _] = exported["log"]["entries"]
    assert one["log"]["entries"] == [har]
    for key in ("connection", "pageref", "comment", "cache", "serverIPAddress"):
        assert har[key] == sent[key]
    assert har["request"]["postData"] == sent["request"]["postData"]
    assert har["response"]["content"] == sent["response"]["content"]  # size 23, compression
    assert har["response"]["content"]["size"] != sent["response"]["bodySize"]
    # params alone stay alone (HAR: params or text).
    assert exported["log"]["entries"][1]["request"]["postData"] == form_only["request"]["postData"]


# README: "--tokens-file FILE: accepted tokens, one [NAME=]TOKEN a line (blank lines and lines
# starting with # skipped)". A file saved with a byte order mark (Notepad's UTF-8) and CRLF
# line ends was a startup error: its first token "holds whitespace or control characters".
def test_a_tokens_file_with_a_byte_order_mark_and_crlf_reads_as_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_bytes(f"\ufeffbilling={TOKEN}\r\n# a comment\r\n\r\nplain-token-0001\r\n".encode())
    tokens = TokenSet.from_sources(tokens_file=str(path), environ={})
    assert [(token.token, token.name) for token in tokens] == [
        (TOKEN, "billing"),
        ("plain-token-0001", None),
    ]


# README: create_app's "db, tokens and key fall back to ALF_COLLECTOR_DB, ..." and --db's
# default is alf.sqlite. An empty ALF_COLLECTOR_DB (unset, as an empty ALF_COLLECTOR_READ_KEY
# or ALF_COLLECTOR_RETENTION is) opened SQLite's "": a database thrown away at each restart.
def test_an_empty_alf_collector_db_is_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALF_COLLECTOR_DB", "")
    app = create_app(tokens=[])
    try:
        assert app.state.store.display_name == "alf.sqlite"
        assert (tmp_path / "alf.sqlite").exists()
    finally:
        app.state.store.close()


@pytest.mark.parametrize("command", ["collector", "summary"])
def test_an_empty_alf_collector_db_is_the_default_file_on_the_command_line(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for both commands' --db: an empty variable is an unset one."""
    from alf_analytics import cli

    monkeypatch.setenv("ALF_COLLECTOR_DB", "")
    args = cli._build_parser().parse_args([command])
    assert args.db == "alf.sqlite"


# README: "The read side takes Authorization: Bearer READ_KEY". A key with a non-ASCII
# character opened the login page but never the header: the server decodes header bytes
# as Latin-1, so the UTF-8 bytes of "clé" compared as "clÃ©".
def test_a_non_ascii_read_key_works_as_a_bearer_header() -> None:
    key, token = "clé-de-lecture-2468", "jeton-écriture-1357"
    with Collector(tokens=[token], read_key=key) as collector:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            url = collector.url + "/api/stats"

            def bearer(value: str) -> int:
                auth = [(b"authorization", f"Bearer {value}".encode())]
                return client.get(url, headers=auth).status_code

            assert bearer(key) == 200
            assert bearer(token) == 403
            assert bearer("clé-de-lecture-2469") == 401
            latin1 = [(b"authorization", f"Bearer {key}".encode("latin-1"))]
            # Bytes that are not UTF-8 are read as before (Latin-1): the same characters.
            assert client.get(url, headers=latin1).status_code == 200
