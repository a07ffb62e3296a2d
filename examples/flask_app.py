"""A small Flask app to try trioserve with, over HTTP/1.1 and HTTP/2.

Run it from the repository root::

    trioserve examples.flask_app:app                        # http://127.0.0.1:8000/
    trioserve examples.flask_app:app --certfile cert.pem --keyfile key.pem   # HTTPS, h2 via ALPN

Then try::

    curl http://127.0.0.1:8000/api/info
    curl --http2-prior-knowledge http://127.0.0.1:8000/api/info      # h2c: "HTTP/2"
    curl -N "http://127.0.0.1:8000/stream?n=5"
    curl -F file=@README.md http://127.0.0.1:8000/upload
    curl -OJ http://127.0.0.1:8000/send-file
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_file, stream_with_context

app = Flask(__name__)

INDEX_PAGE = """<!doctype html>
<title>trioserve + Flask</title>
<h1>Flask on trioserve</h1>
<ul>
  <li><a href="/api/info">/api/info</a>: method, path and protocol as JSON</li>
  <li><a href="/stream?n=10">/stream?n=10</a>: a streamed response, one line at a time</li>
  <li><a href="/upload">/upload</a>: a multipart file upload</li>
  <li><a href="/send-file">/send-file</a>: a file sent with flask.send_file</li>
  <li><a href="/send-file/disk">/send-file/disk</a>: this module, from disk</li>
</ul>
"""

UPLOAD_FORM = """<!doctype html>
<title>Upload</title>
<form method="post" enctype="multipart/form-data">
  <input type="file" name="file"> <button>Upload</button>
</form>
"""

SAMPLE_FILE = b"Hello from flask.send_file, served by trioserve.\n"


@app.get("/")
def index() -> str:
    return INDEX_PAGE


@app.route("/api/info", methods=["GET", "POST", "PUT", "DELETE"])
def info() -> Response:
    return jsonify(
        method=request.method,
        path=request.path,
        protocol=request.environ["SERVER_PROTOCOL"],
    )


@app.get("/stream")
def stream() -> Response:
    count = request.args.get("n", default=10, type=int)

    @stream_with_context
    def lines() -> Iterator[str]:
        for i in range(count):
            yield f"line {i} of {count}\n"

    return Response(lines(), mimetype="text/plain")


@app.route("/upload", methods=["GET", "POST"])
def upload() -> str | Response | tuple[Response, int]:
    if request.method == "GET":
        return UPLOAD_FORM
    upload = request.files.get("file")
    if upload is None:
        return jsonify(error="send the file in a form field named 'file'"), 400
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: upload.stream.read(64 * 1024), b""):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(filename=upload.filename, size=size, sha256=digest.hexdigest())


THIS_FILE = Path(__file__)


@app.get("/send-file")
def send_sample_file() -> Response:
    return send_file(io.BytesIO(SAMPLE_FILE), mimetype="text/plain", download_name="hello.txt")


@app.get("/send-file/disk")
def send_this_module() -> Response:
    """A file on disk: over plain HTTP/1.1, trioserve sends it with os.sendfile."""
    return send_file(THIS_FILE, mimetype="text/x-python")
