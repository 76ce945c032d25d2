"""The web server: API contract, bad input and abuse, batching, the page and the CLI command."""

from __future__ import annotations

import io
import logging
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")  # python-multipart
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from captioner.checkpoint import load_checkpoint  # noqa: E402
from captioner.serve import create_app  # noqa: E402
from tests.helpers import live_server  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def client(loaded):
    with TestClient(create_app(loaded)) as c:
        yield c


def png_bytes(size: tuple[int, int] = (48, 40), seed: int = 0, noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:  # incompressible: the file is about as large as its pixels
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        a = np.full((size[1], size[0], 3), 230, dtype=np.uint8)
        y, x = rng.integers(0, min(size) // 2, 2)
        a[y:y + size[1] // 3, x:x + size[0] // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def post(client, data: bytes, beam_size=None, filename: str = "image.png", **kw):
    form = {} if beam_size is None else {"beam_size": str(beam_size)}
    return client.post("/api/caption", files={"image": (filename, data, "image/png")}, data=form, **kw)


def check_caption(body: dict) -> None:
    words, att = body["words"], body["attention"]
    h, w = body["grid"]
    assert body["caption"] == " ".join(words)
    assert isinstance(body["score"], float)
    assert len(att) == len(words), "one attention map per word"
    for m in att:
        a = np.asarray(m, dtype=np.float64)
        assert a.shape == (h, w)
        assert (a >= 0).all()
        assert a.sum() == pytest.approx(1.0, abs=1e-3), "each map is a distribution over the grid"


# -- the API ---------------------------------------------------------------------------------------
def test_caption_good_image(client):
    r = post(client, png_bytes(), beam_size=1)  # greedy: the tiny model's beams may prefer ""
    assert r.status_code == 200, r.text
    body = r.json()
    check_caption(body)
    assert body["beam_size"] == 1
    assert len(body["words"]) >= 1


def test_caption_default_beam_and_every_beam_size(client):
    for k in (None, 1, 10):
        r = post(client, png_bytes(seed=3), beam_size=k)
        assert r.status_code == 200, r.text
        check_caption(r.json())


def test_caption_carries_per_word_probabilities(client):
    body = post(client, png_bytes(seed=5), beam_size=2).json()
    assert len(body["word_probs"]) == len(body["words"]) and all(0 < p <= 1 for p in body["word_probs"])
    assert body["mean_logprob"] <= 0 and body["rank"] == 1 and body["alternatives"] == []
    assert sum(np.log(body["word_probs"])) >= body["score"] - 1e-3  # the score adds <end>'s


def post_options(client, **fields):
    return client.post("/api/caption", files={"image": ("x.png", png_bytes(seed=4), "image/png")},
                       data={k: str(v) for k, v in fields.items()})


def test_n_best_returns_distinct_sorted_alternatives(client):
    r = post_options(client, beam_size=4, n_best=3, max_length=8)
    assert r.status_code == 200, r.text
    body = r.json()
    caps = [body, *body["alternatives"]]
    assert [c["rank"] for c in caps] == list(range(1, len(caps) + 1)) and len(caps) >= 2
    assert len({c["caption"] for c in caps}) == len(caps)
    assert [c["score"] for c in caps] == sorted((c["score"] for c in caps), reverse=True)
    for c in caps:
        check_caption(c)
        assert len(c["word_probs"]) == len(c["words"]) <= 8
    assert body["caption"] == post_options(client, beam_size=4, max_length=8).json()["caption"]


def test_seeded_sampling_repeats(client):
    def draw(seed):
        r = post_options(client, sample="true", num_samples=3, seed=seed, temperature=1.5, top_p=0.9, top_k=12)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sample"] is True and len(body["alternatives"]) == 2
        return [c["caption"] for c in [body, *body["alternatives"]]]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize(("field", "value"), [
    ("n_best", "0"), ("n_best", "11"), ("n_best", "x"), ("beam_size", "11"), ("max_length", "0"),
    ("max_length", "51"), ("num_samples", "0"), ("num_samples", "11"), ("temperature", "0"),
    ("temperature", "-1"), ("temperature", "nan"), ("top_p", "0"), ("top_p", "1.5"), ("top_k", "-1"),
    ("seed", "-1"), ("seed", "1.5"), ("sample", "maybe"),
])
def test_out_of_range_options_are_422_naming_the_field(client, field, value):
    extra = {} if field in ("n_best", "beam_size", "max_length", "sample") else {"sample": "true"}
    r = post_options(client, **extra, **{field: value})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]


@pytest.mark.parametrize(("fields", "named"), [
    ({"beam_size": "2", "n_best": "3"}, "n_best"), ({"temperature": "0.5"}, "temperature"),
    ({"sample": "true", "n_best": "2"}, "n_best"), ({"seed": "1"}, "seed"),
])
def test_options_that_do_not_go_together_are_422(client, fields, named):
    r = post_options(client, **fields)
    assert r.status_code == 422 and named in r.json()["error"], r.text


def test_rgba_and_jpeg_uploads(client):
    buf = io.BytesIO()
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(buf, format="PNG")
    assert post(client, buf.getvalue()).status_code == 200
    buf = io.BytesIO()
    Image.new("RGB", (50, 70), (10, 200, 30)).save(buf, format="JPEG")
    assert post(client, buf.getvalue(), filename="x.jpg").status_code == 200


def test_healthz(client, loaded):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["vocab_size"] == len(loaded.vocab)
    assert body["model"] == "shapes_cnn + soft attention"
    assert body["quantize"] == "none"


@pytest.mark.parametrize("beam", ["0", "11", "-1", "three", "2.5"])
def test_bad_beam_size(client, beam):
    r = post(client, png_bytes(), beam_size=beam)
    assert r.status_code == 422
    assert "beam_size" in r.json()["error"]


def test_not_an_image_is_415(client):
    r = post(client, b"%PDF-1.4 this is not an image at all" * 10)
    assert r.status_code == 415
    assert "not an image" in r.json()["error"]


def test_truncated_image_is_400(client):
    data = png_bytes((64, 64), noise=True)
    r = post(client, data[: len(data) // 2])
    assert r.status_code == 400
    assert "truncated" in r.json()["error"]


def test_empty_upload_is_400(client):
    r = post(client, b"")
    assert r.status_code == 400
    assert r.json()["error"]


def test_decompression_bomb_refused(client, monkeypatch):
    import captioner.data.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    r = post(client, png_bytes((64, 64)))
    assert r.status_code in (400, 413)
    assert "decompression bomb" in r.json()["error"]


def test_missing_image_field_and_wrong_content_type(client):
    r = client.post("/api/caption", files={"other": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 422
    assert "image" in r.json()["error"]
    r = client.post("/api/caption", files={"image": (None, "just text")})  # a field, not a file
    assert r.status_code == 422
    r = client.post("/api/caption", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 415
    assert "multipart" in r.json()["error"]


def test_malformed_multipart_is_400(client):
    r = client.post("/api/caption", content=b"--xyz\r\nnonsense",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code in (400, 422)
    assert r.json()["error"]


def test_the_file_name_is_never_used(client):
    r = post(client, b"not an image", filename="../../../etc/passwd")
    assert r.status_code == 415
    assert "passwd" not in r.text
    r = post(client, png_bytes(), filename="/tmp/../../x.png")
    assert r.status_code == 200


def test_unknown_route_is_json_404(client):
    r = client.get("/no/such/page")
    assert r.status_code == 404
    assert "error" in r.json()


# -- size limits -----------------------------------------------------------------------------------
@pytest.fixture
def small_client(loaded):
    with TestClient(create_app(loaded, max_upload_mb=0.01)) as c:  # 10 KiB
        yield c


def test_upload_over_the_limit_is_413(small_client):
    big = png_bytes((300, 300), noise=True)  # ~270 KB: refused on its Content-Length
    assert len(big) > 200_000
    r = post(small_client, big)
    assert r.status_code == 413
    assert "too large" in r.json()["error"]
    # Just over the limit: the body fits the multipart slack, the image part itself does not.
    medium = png_bytes((80, 80), noise=True)
    assert 10_486 < len(medium) < 30_000
    r = post(small_client, medium)
    assert r.status_code == 413
    small = png_bytes((20, 20))
    assert post(small_client, small).status_code == 200


def test_upload_without_content_length_is_counted(small_client):
    """A chunked body has no Content-Length: the server counts the bytes it reads instead."""
    boundary = "captionerboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = small_client.post("/api/caption", content=body(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert "too large" in r.json()["error"]


def test_streamed_upload_is_refused_before_it_ends(loaded):
    """Over a real socket: send more than the limit and then stall; the 413 must come anyway.

    A server that read the whole body first would wait for the rest and never answer.
    """
    app = create_app(loaded, max_upload_mb=0.01)
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + b"\0" * 200_000
    with live_server(app) as port, socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(
            b"POST /api/caption HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            + f"{len(part):x}\r\n".encode() + part + b"\r\n"
        )  # ... and the body never ends
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


# -- batching and the bounded queue ----------------------------------------------------------------
def test_concurrent_requests_are_batched(loaded):
    app = create_app(loaded, max_batch=8)
    batcher = app.state.batcher
    run_model = batcher._run_model

    def slow_model(images, beam_size):  # give the other requests time to queue up
        time.sleep(0.3)
        return run_model(images, beam_size)

    batcher._run_model = slow_model
    images = [png_bytes(seed=i) for i in range(16)]
    results: list = [None] * 16
    start = threading.Barrier(16)
    with TestClient(app) as c:
        def worker(i):
            start.wait()
            results[i] = post(c, images[i], beam_size=2)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Each answer is this image's caption, not a neighbour's from the same batch.
        for i in (0, 7, 15):
            alone = post(c, images[i], beam_size=2).json()
            assert results[i].json()["words"] == alone["words"]
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.status_code for r in results]
    for r in results:
        check_caption(r.json())
    stats = app.state.stats
    assert stats.images == 16 + 3
    assert stats.batches < 16, stats
    assert 2 <= stats.largest_batch <= 8, stats


def test_mixed_beam_sizes_are_batched_separately(loaded):
    app = create_app(loaded, max_batch=8, batch_wait_ms=200)
    seen: list[tuple[int, int]] = []
    run_model = app.state.batcher._run_model

    def record(images, beam_size):
        seen.append((len(images), beam_size))
        return run_model(images, beam_size)

    app.state.batcher._run_model = record
    with TestClient(app) as c:
        out = {}

        def worker(i):
            out[i] = post(c, png_bytes(seed=i), beam_size=1 + i % 2)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(r.status_code == 200 for r in out.values())
    assert all(r.json()["beam_size"] == 1 + i % 2 for i, r in out.items())
    assert sum(n for n, _ in seen) == 6
    assert len(seen) < 6, seen


def test_seeded_sampling_requests_run_alone(loaded):
    """Concurrent requests with the same seed are not batched together, so each gets the draws
    that seed gives alone; unseeded ones still batch."""
    app = create_app(loaded, max_batch=8, batch_wait_ms=200)
    seen: list[int] = []
    run_model = app.state.batcher._run_model

    def record(images, options):
        seen.append(len(images))
        return run_model(images, options)

    app.state.batcher._run_model = record
    with TestClient(app) as c:
        out = {}

        def worker(i):
            out[i] = post_options(c, sample="1", num_samples=2, seed=9)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(r.status_code == 200 for r in out.values())
    assert len({r.json()["caption"] for r in out.values()}) == 1
    assert seen == [1, 1, 1]


def test_full_queue_answers_503(loaded):
    app = create_app(loaded, max_queue=2)
    gate = threading.Event()
    run_model = app.state.batcher._run_model

    def blocked(images, beam_size):
        gate.wait(30)
        return run_model(images, beam_size)

    app.state.batcher._run_model = blocked
    codes = []
    with TestClient(app) as c:
        def worker(i):
            codes.append(post(c, png_bytes(seed=i)).status_code)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while app.state.stats.busy < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(60)
    assert sorted(codes) == [200, 200, 503, 503, 503]


def test_model_failure_is_500_and_the_server_recovers(loaded):
    app = create_app(loaded)
    run_model = app.state.batcher._run_model
    calls = []

    def flaky(images, beam_size):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return run_model(images, beam_size)

    app.state.batcher._run_model = flaky
    with TestClient(app) as c:
        r = post(c, png_bytes())
        assert r.status_code == 500
        assert "model failed" in r.json()["error"]
        assert post(c, png_bytes()).status_code == 200
    assert app.state.stats.failures == 1


# -- the page --------------------------------------------------------------------------------------
def test_index_page_uses_only_local_files(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert any(x.endswith("app.js") for x in refs) and any(x.endswith("style.css") for x in refs)
    for ref in refs:
        assert not re.match(r"^(?:[a-z]+:)?//", ref, re.I), f"external reference {ref}"
        got = client.get("/" + ref.lstrip("/"))
        assert got.status_code == 200, ref
    for name in ("app.js", "style.css"):
        text = client.get(f"/static/{name}").text
        assert not re.search(r"https?://|@import|url\(\s*['\"]?//", text), f"{name} reaches outside"


def test_static_files_cannot_escape(client):
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        r = client.get(path)
        assert r.status_code == 404
        assert "create_app" not in r.text


# -- behind a reverse proxy ------------------------------------------------------------------------
# What the proxy of docs/usage.md ("Behind a reverse proxy") sends: the client's address, the
# scheme it was reached by, the public host name. The prefix (/captioner/) is stripped by the proxy.
FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "Host": "captions.example.org"}


def _access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "captioner.serve.access"]


def test_behind_a_trusted_proxy_each_request_is_logged_with_the_forwarded_client(loaded, caplog):
    import httpx

    caplog.set_level(logging.INFO, logger="captioner.serve.access")
    app = create_app(loaded)
    with live_server(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as port, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=FORWARDED, timeout=30) as http:
        assert http.get("/healthz", params={"token": "secret"}).json()["status"] == "ok"  # no query logged
        r = http.post("/api/caption", files={"image": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 200 and r.json()["caption"]
        assert http.post("/api/caption", files={"image": ("a.txt", b"not an image", "image/png")}).status_code == 415
        assert http.get("/missing").status_code == 404
    lines = _access_lines(caplog)
    assert len(lines) == 4, lines
    for line, (method, path, status) in zip(lines, [("GET", "/healthz", 200), ("POST", "/api/caption", 200),
                                                    ("POST", "/api/caption", 415), ("GET", "/missing", 404)]):
        assert re.fullmatch(rf'203\.0\.113\.7 "{method} {path}" {status} \d+\.\d ms', line), line


def test_forwarded_headers_from_an_untrusted_peer_are_not_believed(loaded, caplog):
    import httpx

    caplog.set_level(logging.INFO, logger="captioner.serve.access")
    with live_server(create_app(loaded), proxy_headers=True, forwarded_allow_ips="10.9.8.7") as port:
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers=FORWARDED, timeout=30)
    assert r.status_code == 200
    (line,) = _access_lines(caplog)
    assert line.startswith('127.0.0.1 "GET /healthz" 200 '), line


def test_the_page_works_under_a_path_prefix(client):
    """A proxy serving the app at /captioner/ strips the prefix; the page then loads only if every
    address it uses is relative (no leading slash), so that the browser keeps the prefix."""
    html = client.get("/").text
    script = client.get("/static/app.js").text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""fetch\(\s*["'`]([^"'`]+)""", script)
    assert "api/caption" in refs and "healthz" in refs, refs
    for ref in refs:
        assert not ref.startswith("/"), f"{ref} would leave the proxy's prefix"


# -- the command -----------------------------------------------------------------------------------
def test_cli_serve_defaults_to_loopback(tiny_checkpoint, monkeypatch):
    import uvicorn

    from captioner.cli import main

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--max-batch", "4"]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8000
    assert calls["app"].state.batcher.max_batch == 4
    # a proxy on this machine is believed; the app logs each request itself, uvicorn does not
    assert calls["proxy_headers"] and calls["forwarded_allow_ips"] == "127.0.0.1"
    assert calls["access_log"] is False
    main(["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--forwarded-allow-ips", "10.0.0.2"])
    assert calls["forwarded_allow_ips"] == "10.0.0.2"


def test_cli_serve_bad_arguments(tmp_path: Path, tiny_checkpoint, capsys):
    from captioner.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--max-upload-mb", "0"]) == 2
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--port", "70000"]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "--checkpoint", str(tiny_checkpoint), "--device", "tpu"])
