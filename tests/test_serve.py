"""`clipkit index serve`: the search page in a real browser, the JSON API, every bad request, the server's limits.

One index is built per module from a real emoji shard with a tiny random-weight model and a caption index. With
random weights, text->image ranks mean nothing; caption mode compares the query with caption embeddings from the
same text tower, so an exact caption comes back first (score 1) and "a cat" ranks cat captions high, and an
uploaded image finds its own row (score 1): those are the checks that can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.index import open_index_dir
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
SHARD = "test-000000.tar"  # the emoji test split: a small real index


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, quickstart_data):
    import copy

    import torch

    from clipkit.config import ModelCfg
    from clipkit.models import bundle_from_config, save_model
    from clipkit.models.factory import resolve_config

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    bundle = bundle_from_config(resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL))))
    model = save_model(root / "model", bundle.model, bundle.config)
    shard = quickstart_data / "emoji" / SHARD
    assert main(["embed", "--checkpoint", str(model), "--data", str(shard), "--out", str(root / "emb")]) == 0
    assert main(["index", "build", str(root / "emb"), "--captions", "--no-eval"]) == 0
    return root / "emb" / "index"


@pytest.fixture(scope="module")
def server(index_dir):
    from clipkit.serve import QueryEncoder, make_server

    index = open_index_dir(index_dir)
    srv = make_server(index, QueryEncoder(index.model), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def _url(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def _get(srv, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(_url(srv, path), data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _json(srv, path: str, **kw) -> tuple[int, dict]:
    status, body, content_type = _get(srv, path, **kw)
    assert content_type.startswith("application/json"), (path, status, body[:200])
    return status, json.loads(body)


def _raw(srv, request: bytes, timeout: float = 30) -> bytes:
    """Sends raw bytes on one connection and returns all the server answers before it closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _member(quickstart_data, key: str) -> bytes:
    with tarfile.open(quickstart_data / "emoji" / SHARD) as tar:
        return tar.extractfile(f"{key}.png").read()


# ------------------------------------------------------------------------------------------------ API


def test_api_search_info_and_images(server, index_dir, quickstart_data):
    index = server.index
    status, info = _json(server, "/api/info")
    assert status == 200 and info["count"] == index.count == 188 and info["dim"] == 32
    assert info["modes"] == ["image", "caption"] and info["thumbnails"] and info["factory"] == "Flat"
    assert _json(server, "/api/health") == (200, {"status": "ok"})

    # An exact caption, in caption mode, comes back first with cosine 1.
    row = next(i for i, m in enumerate(index.meta) if m["captions"][0] == "black cat")
    status, got = _json(server, "/api/search?text=black+cat&k=5&mode=caption")
    assert status == 200 and got["mode"] == "caption" and len(got["hits"]) == 5
    top = got["hits"][0]
    assert top["captions"] == ["black cat"] and top["image_row"] == row and top["score"] > 0.999
    assert top["image"] == f"/api/image/{row}"
    rows = [h["image_row"] for h in got["hits"]]
    assert len(set(rows)) == len(rows)  # caption mode: each image once, with its best caption

    # The image of a row is its shard member, byte for byte; a search by that row (more like this) finds it first.
    key = index.meta[row]["key"]
    status, data, content_type = _get(server, f"/api/image/{row}")
    assert status == 200 and content_type == "image/png" and data == _member(quickstart_data, key)
    status, got = _json(server, f"/api/search?row={row}&k=3")
    assert status == 200 and got["hits"][0]["id"] == row and got["hits"][0]["score"] > 0.999

    # POST an image: its own row first.
    status, got = _json(server, "/api/search?k=4", data=data, headers={"Content-Type": "image/png"})
    assert status == 200 and got["hits"][0]["id"] == row and len(got["hits"]) == 4

    # The near-duplicate filter: no two kept hits within the threshold, and it drops some of the plain top 50.
    plain = _json(server, f"/api/search?row={row}&k=50")[1]["hits"]
    status, got = _json(server, f"/api/search?row={row}&k=50&dedup=0.9")
    kept = [h["id"] for h in got["hits"]]
    v = index.vectors(kept)
    sims = v @ v.T - 2 * np.eye(len(kept))
    assert status == 200 and sims.max() < 0.9 and kept[0] == row
    assert set(kept) != {h["id"] for h in plain}

    # The page and its two files, with no outside reference.
    for path in ("/", "/static/app.js", "/static/style.css"):
        status, body, content_type = _get(server, path)
        assert status == 200 and b"http://" not in body and b"https://" not in body, path


def test_every_bad_request_gets_a_json_4xx_and_the_server_keeps_serving(server, monkeypatch):
    from clipkit.serve import http

    cases = [
        ("/api/search", 400, "missing query"),
        ("/api/search?text=", 400, "empty text"),
        ("/api/search?text=%20%20", 400, "empty text"),
        ("/api/search?text=cat&k=ten", 400, "k must be an integer"),
        ("/api/search?text=cat&k=2.5", 400, "k must be an integer"),
        ("/api/search?text=cat&k=1001", 400, "k must be an integer"),
        ("/api/search?text=cat&k=0", 400, "k must be an integer"),
        ("/api/search?text=cat&k=" + "9" * 400, 400, "k must be an integer"),
        ("/api/search?text=cat&mode=video", 400, "unknown mode"),
        ("/api/search?text=cat&dedup=1e999", 400, "dedup"),
        ("/api/search?text=cat&dedup=nan", 400, "dedup"),
        ("/api/search?row=-1", 400, "non-negative integer"),
        ("/api/search?row=188", 404, "not in the index"),
        ("/api/search?text=" + "a" * 1001, 400, "at most 1000"),
        ("/api/image/188", 404, "not in the index"),
        ("/api/image/x", 400, "non-negative integer"),
        ("/api/image/" + "9" * 400, 400, "non-negative integer"),
        # Path traversal: a row id is the only name of an image; no path reaches the file system.
        ("/api/image/..%2F..%2F..%2Fetc%2Fpasswd", 400, "non-negative integer"),
        ("/api/image/../../../etc/passwd", 404, "unknown path"),
        ("/static/../../../../etc/passwd", 404, "unknown path"),
        ("/static/%2e%2e/%2e%2e/pyproject.toml", 404, "unknown path"),
        ("/nothing", 404, "unknown path"),
    ]
    for path, code, words in cases:
        status, body = _json(server, path)
        assert (status, body["status"]) == (code, code) and words in body["error"], (path, body)

    post = {"Content-Type": "image/png"}
    status, body = _json(server, "/api/search", data=b"not an image at all", headers=post)
    assert status == 415 and "not a PNG" in body["error"] and "BytesIO" not in body["error"]
    status, body = _json(server, "/api/search?mode=caption&k=abc", data=b"x", headers=post)
    assert status == 400
    status, body = _json(server, "/api/info", data=b"x", headers=post)  # POST to a GET-only path
    assert status == 405
    # Legacy JSON queries: deeply nested JSON, a number too large for a float, a non-object body.
    js = {"Content-Type": "application/json"}
    for payload in (b"[" * 100_000, b'{"vectors": [[' + b"9" * 400 + b"]]}", b"[1, 2]", b"{bad json"):
        status, body = _json(server, "/query", data=payload, headers=js)
        assert status == 400, (payload[:20], body)

    # Raw requests: Content-Length missing, negative, non-numeric, above the cap (never read), a bad request line.
    monkeypatch.setattr(http, "MAX_BODY_BYTES", 1000)
    raw = [
        (b"POST /api/search HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
        (b"POST /api/search HTTP/1.1\r\nContent-Length: -1\r\n\r\n" + b"x" * 5000, b"400"),
        (b"POST /api/search HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", b"400"),
        (b"POST /api/search HTTP/1.1\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n", b"400"),
        (b"POST /api/search HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, b"413"),
        (b"POST /api/search HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"411"),
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"DELETE /api/info HTTP/1.1\r\n\r\n", b"405"),
    ]
    for request, code in raw:
        answer = _raw(server, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == code and b"application/json" in head, (request[:60], answer[:300])
        assert json.loads(body)["status"] == int(code)

    # Still serving, with the right answers.
    assert _json(server, "/api/health")[0] == 200
    status, got = _json(server, "/api/search?text=black+cat&k=1&mode=caption")
    assert status == 200 and got["hits"][0]["captions"] == ["black cat"]


def test_idle_and_half_open_connections_are_closed(server, monkeypatch):
    from clipkit.serve.http import Handler

    monkeypatch.setattr(Handler, "timeout", 1.0)
    t0 = time.monotonic()
    assert _raw(server, b"") == b""  # connects, sends nothing: closed by the server
    assert _raw(server, b"POST /api/search HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly part") == b""  # half a body
    assert time.monotonic() - t0 < 10
    assert _json(server, "/api/health")[0] == 200


def test_port_errors_and_empty_text_exit_2(server, index_dir, capsys):
    port = server.server_address[1]
    assert main(["index", "serve", str(index_dir), "--port", "70000"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["index", "serve", str(index_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "in use" in err and len(err.splitlines()) == 1
    assert main(["index", "query", str(index_dir), "--text", ""]) == 2
    assert "empty text query" in capsys.readouterr().err
    assert main(["index", "query", str(index_dir), "--text", "black cat", "-k", "2", "--json"]) == 0


def test_serve_cli_warns_off_loopback_and_stops_on_sigterm(index_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "clipkit.cli", "index", "serve", str(index_dir), "--port", "0", "--host", "0.0.0.0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... on http://0.0.0.0:<port>/"
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=30) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "no authentication" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ browser


def test_search_page_in_a_real_browser(server, quickstart_data, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian chromium + chromium-driver are not installed (bash tools/setup.sh test)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    wait = WebDriverWait(driver, 30)
    status = lambda: driver.find_element(By.ID, "status").text
    hits = lambda: driver.find_elements(By.CSS_SELECTOR, "#grid .hit")
    try:
        driver.get(_url(server, "/"))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert driver.find_element(By.ID, "mode-box").is_displayed()  # the index folder has captions
        driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=caption]").click()
        driver.find_element(By.ID, "q").send_keys("a cat")
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: "results for a cat" in status() and hits())
        captions = [h.find_element(By.CLASS_NAME, "caption").text for h in hits()[:3]]
        assert len(hits()) == 20 and any("cat" in c for c in captions), captions
        assert "q=a+cat" in driver.current_url and "mode=caption" in driver.current_url  # a deep link to this
        # Every thumbnail loaded from the shards.
        assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")

        # Upload a real image file: its own row comes first.
        row = next(i for i, m in enumerate(server.index.meta) if m["captions"][0] == "black cat")
        image = tmp_path / "black-cat.png"
        image.write_bytes(_member(quickstart_data, server.index.meta[row]["key"]))
        driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=image]").click()
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: "results for <image>" in status())
        assert hits()[0].get_attribute("data-row") == str(row)

        # More like this on the third result: that row's search, its own image first.
        third = hits()[2].get_attribute("data-row")
        hits()[2].find_element(By.CLASS_NAME, "more").click()
        wait.until(lambda d: f"results for row {third}" in status())
        assert hits()[0].get_attribute("data-row") == third and f"row={third}" in driver.current_url

        # A deep link opens with its query run.
        driver.get(_url(server, "/?q=black+cat&k=5&mode=caption"))
        wait.until(lambda d: "results for black cat" in status())
        assert len(hits()) == 5 and hits()[0].get_attribute("data-row") == str(row)
        shots = Path(os.environ.get("CLIPKIT_SCREENSHOTS", tmp_path))
        driver.get(_url(server, "/?q=a+cat&k=20&mode=caption"))
        wait.until(lambda d: "results for a cat" in status())
        wait.until(lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
        assert driver.save_screenshot(str(shots / "serve-page.png"))
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------------ load benchmark


def test_bench_serve_smoke(index_dir, tmp_path):
    import runpy

    bench = runpy.run_path(str(REPO / "tools/bench/bench_serve.py"))  # in this process: no second model load
    out = tmp_path / "serve.json"
    args = [
        str(index_dir),
        "--clients",
        "2",
        "--requests",
        "6",
        "-k",
        "5",
        "--rounds",
        "2",
        "--cli-runs",
        "0",
        "--function-requests",
        "8",
    ]
    bench["main"]([*args, "--out", str(out)])
    result = json.loads(out.read_text())
    server = result["server"]
    assert server["requests"] == 12 and server["errors"] == 0 and server["p99_ms"] >= server["p50_ms"] > 0
    assert result["query_function"]["requests"] == result["query_function_thread"]["requests"] == 8
    assert result["cli_command"] is None and len(result["per_round"]) == 2
