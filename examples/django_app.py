"""A minimal single-file Django project to try trioserve with, over HTTP/1.1 and HTTP/2.

Run it from the repository root::

    trioserve examples.django_app:application                   # http://127.0.0.1:8000/
    trioserve examples.django_app:application --certfile cert.pem --keyfile key.pem

Then try::

    curl http://127.0.0.1:8000/
    curl --http2-prior-knowledge http://127.0.0.1:8000/          # h2c
    curl -c jar -b jar http://127.0.0.1:8000/form/               # the form, with its CSRF token
    curl -N "http://127.0.0.1:8000/stream/?n=5"                  # StreamingHttpResponse
    curl -OJ http://127.0.0.1:8000/file/                         # FileResponse (this file)
    curl -H "Transfer-Encoding: chunked" --data-binary @README.md http://127.0.0.1:8000/upload/

No database, no templates, no apps: settings are made with
``settings.configure()`` and the URLconf is this module.
"""

from __future__ import annotations

import hashlib
import html
import io
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.middleware.csrf import get_token
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

if not settings.configured:
    settings.configure(
        DEBUG=False,
        # An example key: a real project reads its key from the environment.
        SECRET_KEY="trioserve-example-not-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
        MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )

INDEX_PAGE = """<!doctype html>
<title>trioserve + Django</title>
<h1>Django on trioserve</h1>
<p>Served over {protocol}.</p>
<ul>
  <li><a href="/form/">/form/</a>: a form POST protected by CSRF</li>
  <li><a href="/stream/?n=10">/stream/?n=10</a>: a StreamingHttpResponse, one chunk per line</li>
  <li><a href="/file/">/file/</a>: a FileResponse of this file (<a href="/file/memory/">or of
      bytes in memory</a>)</li>
  <li>POST /upload/: a request body (chunked or not) answered with its size and SHA-256</li>
</ul>
"""

FORM_PAGE = """<!doctype html>
<title>Say hello</title>
<form method="post" action="/form/">
  <input type="hidden" name="csrfmiddlewaretoken" value="{token}">
  <input name="name"> <button>Send</button>
</form>
"""

# What /file/memory/ sends: a FileResponse over an in-memory file.
MEMORY_FILE = b"Hello from django.http.FileResponse, served by trioserve.\n"
# What /file/ sends: a FileResponse over a real file on disk (this module's source).
THIS_FILE = Path(__file__).resolve()

UPLOAD_BLOCK_SIZE = 64 * 1024


def index(request: HttpRequest) -> HttpResponse:
    protocol = html.escape(request.META["SERVER_PROTOCOL"])
    return HttpResponse(INDEX_PAGE.format(protocol=protocol))


def form(request: HttpRequest) -> HttpResponse:
    """GET: the form with a CSRF token; POST (checked by CsrfViewMiddleware): a greeting.

    A POST without the ``csrftoken`` cookie and the matching token in the form
    is refused with 403 before this view runs.
    """
    if request.method == "POST":
        name = request.POST.get("name", "").strip() or "stranger"
        return HttpResponse(f"Hello, {html.escape(name)}!\n", content_type="text/plain")
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET", "POST"])
    return HttpResponse(FORM_PAGE.format(token=get_token(request)))


def stream(request: HttpRequest) -> StreamingHttpResponse:
    count = int(request.GET.get("n", "10"))

    def chunks() -> Iterator[str]:
        for i in range(count):
            yield f"chunk {i} of {count}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain; charset=utf-8")


def file_on_disk(request: HttpRequest) -> FileResponse:
    # Django hands the open file to the server's wsgi.file_wrapper.
    return FileResponse(
        THIS_FILE.open("rb"), content_type="text/x-python; charset=utf-8", filename=THIS_FILE.name
    )


def file_in_memory(request: HttpRequest) -> FileResponse:
    return FileResponse(
        io.BytesIO(MEMORY_FILE), content_type="text/plain; charset=utf-8", filename="hello.txt"
    )


@csrf_exempt  # an API endpoint for curl, not a browser form
def upload(request: HttpRequest) -> HttpResponse:
    """Read the request body in blocks; answer with its size and SHA-256.

    Django's WSGIRequest reads only ``CONTENT_LENGTH`` bytes and treats a
    missing ``CONTENT_LENGTH`` as an empty body, so a chunked upload (HTTP/1.1
    ``Transfer-Encoding: chunked``, or HTTP/2 without ``content-length``) would
    look empty through ``request.read()``. When the server promises that
    ``wsgi.input`` ends at the end of the body (``wsgi.input_terminated``, as
    trioserve does), the view reads ``wsgi.input`` itself.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    meta = request.META
    if meta.get("CONTENT_LENGTH"):
        body = request  # request.read() stops after CONTENT_LENGTH bytes
    elif meta.get("wsgi.input_terminated"):
        body = meta["wsgi.input"]  # safe to read to EOF
    else:
        return HttpResponse("send a Content-Length\n", status=411, content_type="text/plain")
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: body.read(UPLOAD_BLOCK_SIZE), b""):
        digest.update(block)
        size += len(block)
    return JsonResponse(
        {
            "size": size,
            "sha256": digest.hexdigest(),
            "content_length": meta.get("CONTENT_LENGTH"),
            "protocol": meta["SERVER_PROTOCOL"],
        }
    )


urlpatterns = [
    path("", index),
    path("form/", form),
    path("stream/", stream),
    path("file/", file_on_disk),
    path("file/memory/", file_in_memory),
    path("upload/", upload),
]

application = get_wsgi_application()
