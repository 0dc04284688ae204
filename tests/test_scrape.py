"""`lookalike scrape` against a local fake of the Bing Image Search v7 API on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import typer
from typer.testing import CliRunner

from lookalike.cli.datatools import register
from lookalike.datatools.download import read_url_list
from lookalike.datatools.scrape import BingImageSearch, ImageHit, SearchError, SearchProvider, scrape, synthesize_queries, write_url_list
from lookalike.errors import LookalikeError

KEY = "test-key-123"
TOTAL_RESULTS = 120  # results the fake has per query


class FakeBing:
    """Answers like api.bing.microsoft.com/v7.0/images/search; records each request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.throttle = 0  # answer 429 this many times first
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.requests.append({"path": parts.path, "params": params, "key": self.headers.get("Ocp-Apim-Subscription-Key")})
                if parts.path != "/v7.0/images/search":
                    return self.reply(404, {"_type": "ErrorResponse", "errors": [{"code": "ResourceNotFound", "message": "no such path"}]})
                if self.headers.get("Ocp-Apim-Subscription-Key") != KEY:
                    return self.reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
                if fake.throttle > 0:
                    fake.throttle -= 1
                    return self.reply(429, {"_type": "ErrorResponse", "errors": [{"code": "RateLimitExceeded", "message": "slow down"}]}, [("Retry-After", "0")])
                q, count, offset = params["q"], int(params.get("count", 35)), int(params.get("offset", 0))
                item, attribute = q.split(" ") if " " in q else ("any", q)
                value = []
                for i in range(offset, min(offset + count, TOTAL_RESULTS)):
                    if i == 0:
                        url = f"http://img.test/{item}/everywhere.jpg"  # the same picture for every attribute: ambiguous
                    elif i == 1:
                        url = f"http://img.test/{attribute}/common.jpg"  # the same picture for every item of one attribute
                    else:
                        url = f"http://img.test/{item}/{attribute}/{i}.jpg"
                    value.append({"contentUrl": url, "hostPageUrl": f"http://shop.test/{i}", "width": 640, "height": 480, "encodingFormat": "jpeg", "name": f"{q} {i}", "thumbnailUrl": f"http://tse.test/{i}"})
                value.append({"name": "result without contentUrl"})
                self.reply(200, {"_type": "Images", "totalEstimatedMatches": TOTAL_RESULTS, "nextOffset": offset + count, "value": value})

            def reply(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v7.0/images/search"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeBing()
    yield f
    f.close()


def _bing(fake, **kw):
    return BingImageSearch(KEY, fake.endpoint, min_interval=0, sleep=lambda s: None, **kw)


def test_request_and_response_follow_the_v7_api(fake):
    with _bing(fake, market="en-US") as bing:
        hits = bing.search("tshirt striped", count=10, offset=5)
    request = fake.requests[-1]
    assert request["path"] == "/v7.0/images/search"
    assert request["key"] == KEY
    assert request["params"] == {"q": "tshirt striped", "count": "10", "offset": "5", "mkt": "en-US", "safeSearch": "Moderate"}
    assert len(hits) == 10
    assert hits[0] == ImageHit(url="http://img.test/tshirt/striped/5.jpg", page_url="http://shop.test/5", width=640, height=480, format="jpeg", name="tshirt striped 5", thumbnail_url="http://tse.test/5")
    assert isinstance(bing, SearchProvider)


def test_query_synthesis_is_items_times_attributes():
    items = ["blouse", "hoodie", "pullover", "sweater", "shirt", "tshirt", "vest"]
    queries = synthesize_queries(["striped", "dotted", "leopard"], items)
    assert len(queries) == 21
    assert queries[0].text == "blouse striped" and queries[0].attribute == "striped"
    assert queries[-1].text == "vest leopard" and queries[-1].attribute == "leopard"
    assert [q.text for q in synthesize_queries(["striped", "striped", " dotted "])] == ["striped", "dotted"]
    assert synthesize_queries(["dotted"], ["dress"], "{attribute} {item} clothing")[0].text == "dotted dress clothing"
    with pytest.raises(LookalikeError):
        synthesize_queries([], ["shirt"])
    with pytest.raises(LookalikeError):
        synthesize_queries(["dotted"], ["shirt"], "{item}")


def test_scrape_keeps_top_n_per_query_dedups_and_drops_ambiguous(fake, tmp_path):
    queries = synthesize_queries(["striped", "dotted"], ["shirt", "vest"])
    with _bing(fake) as bing:
        result = scrape(bing, queries, per_query=50)
    assert result.per_query == {q.text: 50 for q in queries}
    assert all(r["params"]["count"] == "50" for r in fake.requests)

    urls = [u for _, u in result.rows]
    assert len(urls) == len(set(urls))
    # "everywhere.jpg" came back for both attributes: left out and reported
    assert {a["url"] for a in result.ambiguous} == {"http://img.test/shirt/everywhere.jpg", "http://img.test/vest/everywhere.jpg"}
    assert all(a["attributes"] == ["dotted", "striped"] for a in result.ambiguous)
    # "common.jpg" came back for two items of one attribute: kept once
    assert urls.count("http://img.test/striped/common.jpg") == 1
    assert result.repeated == 2
    assert len(result.rows) == 4 * 48 + 2
    assert ("dotted", "http://img.test/vest/dotted/49.jpg") in result.rows

    out = write_url_list(result.rows, tmp_path / "urls.tsv")
    parsed = read_url_list(out)
    assert [(e.attribute, e.url) for e in parsed.entries] == result.rows
    assert not parsed.invalid_lines and not parsed.repeated and not parsed.conflicts


def test_pages_through_results_beyond_one_request(fake):
    with _bing(fake) as bing:
        bing.MAX_COUNT = 20
        result = scrape(bing, synthesize_queries(["dotted"], ["shirt"]), per_query=50)
    assert [(r["params"]["offset"], r["params"]["count"]) for r in fake.requests] == [("0", "20"), ("20", "20"), ("40", "10")]
    assert len(result.rows) == 50


def test_stops_when_the_engine_runs_out(fake):
    with _bing(fake) as bing:
        result = scrape(bing, synthesize_queries(["dotted"], ["shirt"]), per_query=500)
    assert result.per_query == {"shirt dotted": TOTAL_RESULTS}


def test_rate_limit_is_retried(fake):
    fake.throttle = 2
    with _bing(fake) as bing:
        assert len(bing.search("shirt dotted", 5)) == 5
    assert len(fake.requests) == 3


def test_wrong_key_and_missing_key_are_clear(fake, monkeypatch):
    with BingImageSearch("wrong", fake.endpoint, min_interval=0) as bing:
        with pytest.raises(SearchError, match="refused the key.*invalid subscription key"):
            bing.search("shirt dotted", 5)
    monkeypatch.delenv("BING_SEARCH_KEY", raising=False)
    with pytest.raises(LookalikeError, match="BING_SEARCH_KEY"):
        BingImageSearch()
    monkeypatch.setenv("BING_SEARCH_KEY", KEY)
    monkeypatch.setenv("BING_SEARCH_ENDPOINT", fake.endpoint)
    with BingImageSearch(min_interval=0) as bing:
        assert bing.endpoint == fake.endpoint
        assert len(bing.search("shirt dotted", 3)) == 3


def test_any_provider_can_be_plugged_in():
    class Fixed:
        name = "fixed"

        def search(self, query, count, offset=0):
            return [ImageHit(f"https://pics.test/{query.replace(' ', '-')}/{i}.png") for i in range(offset, offset + count)]

    assert isinstance(Fixed(), SearchProvider)
    result = scrape(Fixed(), synthesize_queries(["red", "blue"]), per_query=3)
    assert result.rows == [("red", "https://pics.test/red/0.png"), ("red", "https://pics.test/red/1.png"), ("red", "https://pics.test/red/2.png"),
                           ("blue", "https://pics.test/blue/0.png"), ("blue", "https://pics.test/blue/1.png"), ("blue", "https://pics.test/blue/2.png")]


def test_cli_scrape(fake, tmp_path, monkeypatch):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    monkeypatch.delenv("BING_SEARCH_KEY", raising=False)
    result = runner.invoke(app, ["scrape", "-a", "striped,dotted", "-i", "shirt", "-i", "vest", "--list-queries"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["striped\tshirt striped", "striped\tvest striped", "dotted\tshirt dotted", "dotted\tvest dotted"]

    out = tmp_path / "urls.tsv"
    result = runner.invoke(app, ["scrape", "-a", "striped", "--endpoint", fake.endpoint, "--out", str(out)])
    assert isinstance(result.exception, LookalikeError) and "BING_SEARCH_KEY" in str(result.exception)
    assert not out.exists()

    monkeypatch.setenv("BING_SEARCH_KEY", KEY)
    result = runner.invoke(app, ["scrape", "-a", "striped,dotted", "-i", "shirt", "--per-query", "10", "--endpoint", fake.endpoint, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 18 URLs" in result.output
    assert len(read_url_list(out).entries) == 18
