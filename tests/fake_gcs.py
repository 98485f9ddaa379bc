"""An in-memory Google Cloud Storage server, for tests of gs:// workdirs without the network.

It speaks the part of the GCS JSON API that gcsfs (file I/O through fsspec and etils.epath) and
TensorStore (Orbax's array writes) use, with GCS's object generations and preconditions
(ifGenerationMatch / ifGenerationNotMatch), on which TensorStore's OCDBT format relies. Point
the clients at it with STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL (`environment`).

    python tests/fake_gcs.py PORT BUCKET...   # serves until killed
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_generations = itertools.count(int(time.time() * 1e6))


class Store:

  def __init__(self, buckets=()):
    self.lock = threading.Lock()
    self.buckets = set(buckets)
    self.objects: dict[tuple[str, str], tuple[bytes, dict]] = {}
    self.uploads: dict[str, dict] = {}

  def meta(self, bucket: str, name: str, data: bytes, content_type: str) -> dict:
    generation = str(next(_generations))
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {
        "kind": "storage#object",
        "bucket": bucket,
        "name": name,
        "id": f"{bucket}/{name}/{generation}",
        "generation": generation,
        "metageneration": "1",
        "size": str(len(data)),
        "contentType": content_type or "application/octet-stream",
        "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
        "timeCreated": now,
        "updated": now,
        "storageClass": "STANDARD",
    }


def _precondition_ok(query: dict, current: dict | None) -> bool:
  generation = current["generation"] if current else "0"
  match = query.get("ifGenerationMatch")
  if match is not None and match != generation:
    return False
  not_match = query.get("ifGenerationNotMatch")
  return not_match is None or not_match != generation


class Handler(BaseHTTPRequestHandler):
  store: Store
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):  # quiet: tests read their own output
    pass

  # --- responses -------------------------------------------------------------------------
  def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
    try:
      self.send_response(status)
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      if body and self.command != "HEAD":
        self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      # gcsfs asks for an object's metadata and lists its prefix at once, and hangs up on
      # the request whose answer it no longer needs.
      self.close_connection = True

  def _json(self, obj, status: int = 200):
    self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

  def _error(self, status: int, message: str):
    self._json({"error": {"code": status, "message": message}}, status)

  # --- routing ---------------------------------------------------------------------------
  def _parts(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
    return [urllib.parse.unquote(p) for p in url.path.split("/") if p != ""], query

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      out = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        chunk = self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF
        if not size:
          return out
        out += chunk
    n = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(n) if n else b""

  def do_GET(self):
    parts, q = self._parts()
    if parts[:1] == ["download"]:
      parts = parts[1:]
    if parts[:3] != ["storage", "v1", "b"] or len(parts) < 4:
      return self._error(404, "no such route")
    bucket = parts[3]
    if bucket not in self.store.buckets:
      return self._error(404, f"no bucket {bucket}")
    if len(parts) == 4:
      return self._json({"kind": "storage#bucket", "name": bucket, "id": bucket})
    if len(parts) == 5 and parts[4] == "o":
      return self._list(bucket, q)
    name = "/".join(parts[5:])
    with self.store.lock:
      data, meta = self.store.objects.get((bucket, name), (None, None))
    if meta is None:
      return self._error(404, f"no object {name}")
    if not _precondition_ok(q, meta):
      status = 304 if "ifGenerationNotMatch" in q else 412
      return self._send(status, headers={"x-goog-generation": meta["generation"]})
    if q.get("alt") != "media":
      return self._json(meta)
    headers = {
        "x-goog-generation": meta["generation"],
        "x-goog-metageneration": meta["metageneration"],
        "x-goog-stored-content-length": str(len(data)),
        "Content-Type": meta["contentType"],
    }
    status, rng = 200, self.headers.get("Range")
    if rng and rng.startswith("bytes="):
      start, _, end = rng[len("bytes=") :].partition("-")
      start, end = int(start), (int(end) if end else len(data) - 1)
      if start >= len(data) and len(data) > 0:
        return self._send(416, headers={"x-goog-generation": meta["generation"]})
      end = min(end, len(data) - 1)
      headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
      data, status = data[start : end + 1], 206
    self._send(status, data, headers)

  do_HEAD = do_GET

  def _list(self, bucket: str, q: dict):
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter")
    limit = int(q.get("maxResults", 1000))
    with self.store.lock:
      names = sorted(n for b, n in self.store.objects if b == bucket and n.startswith(prefix))
      metas = {n: self.store.objects[(bucket, n)][1] for n in names}
    items, prefixes, token = [], [], None
    for name in names:
      if name <= q.get("pageToken", "") or name < q.get("startOffset", ""):
        continue
      rest = name[len(prefix) :]
      if delimiter and delimiter in rest:
        sub = prefix + rest.split(delimiter)[0] + delimiter
        if sub not in prefixes:
          prefixes.append(sub)
        continue
      if len(items) == limit:
        token = items[-1]["name"]
        break
      items.append(metas[name])
    out = {"kind": "storage#objects", "items": items, "prefixes": prefixes}
    if token:
      out["nextPageToken"] = token
    self._json(out)

  def _store(self, bucket: str, name: str, data: bytes, q: dict, content_type: str = ""):
    with self.store.lock:
      current = self.store.objects.get((bucket, name), (None, None))[1]
      if not _precondition_ok(q, current):
        return self._error(412, f"precondition failed for {name}")
      meta = self.store.meta(bucket, name, data, content_type)
      self.store.objects[(bucket, name)] = (data, meta)
    self._json(meta)

  def do_POST(self):
    parts, q = self._parts()
    body = self._body()
    if parts == ["storage", "v1", "b"]:  # create a bucket
      name = json.loads(body)["name"]
      self.store.buckets.add(name)
      return self._json({"kind": "storage#bucket", "name": name, "id": name})
    if parts[:4] == ["upload", "storage", "v1", "b"] and len(parts) == 6:
      return self._upload(parts[4], q, body)
    verbs = [v for v in ("rewriteTo", "copyTo", "moveTo") if v in parts]
    if parts[:3] == ["storage", "v1", "b"] and verbs:
      verb = verbs[0]
      i = parts.index(verb)
      src_bucket, src = parts[3], "/".join(parts[5:i])
      # moveTo stays in the bucket: .../o/SRC/moveTo/o/DST
      dst_bucket, dst = (
          (src_bucket, "/".join(parts[i + 2 :]))
          if verb == "moveTo"
          else (parts[i + 2], "/".join(parts[i + 4 :]))
      )
      with self.store.lock:
        data, meta = self.store.objects.get((src_bucket, src), (None, None))
        if meta is None:
          return self._error(404, f"no object {src}")
        new = self.store.meta(dst_bucket, dst, data, meta["contentType"])
        self.store.objects[(dst_bucket, dst)] = (data, new)
        if verb == "moveTo":
          del self.store.objects[(src_bucket, src)]
      if verb != "rewriteTo":
        return self._json(new)
      n = str(len(data))
      return self._json(
          {
              "kind": "storage#rewriteResponse",
              "done": True,
              "resource": new,
              "totalBytesRewritten": n,
              "objectSize": n,
          }
      )
    self._error(501, "not implemented")

  def _upload(self, bucket: str, q: dict, body: bytes):
    if bucket not in self.store.buckets:
      return self._error(404, f"no bucket {bucket}")
    kind = q.get("uploadType", "media")
    if "upload_id" in q:  # gcsfs sends a resumable upload's chunks with POST
      return self._chunk(q, body)
    if kind == "media":
      return self._store(bucket, q["name"], body, q, self.headers.get("Content-Type", ""))
    if kind == "multipart":
      meta, data = _split_multipart(self.headers.get("Content-Type", ""), body)
      return self._store(bucket, q.get("name") or meta["name"], data, q, meta.get("contentType"))
    if kind == "resumable":
      meta = json.loads(body) if body else {}
      upload_id = f"u{next(_generations)}"
      with self.store.lock:
        self.store.uploads[upload_id] = dict(
            bucket=bucket, name=q.get("name") or meta["name"], q=q, data=b""
        )
      host = self.headers.get("Host")
      location = f"http://{host}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
      return self._send(200, headers={"Location": f"{location}&upload_id={upload_id}"})
    self._error(400, f"uploadType {kind}")

  def do_PUT(self):  # TensorStore sends a resumable upload's chunks with PUT
    _, q = self._parts()
    self._chunk(q, self._body())

  def _chunk(self, q: dict, body: bytes):
    upload = self.store.uploads.get(q.get("upload_id", ""))
    if upload is None:
      return self._error(404, "no such upload")
    upload["data"] += body
    # "bytes a-b/*" is a chunk of an upload of unknown size; ".../N" ends it once N arrived.
    total = (self.headers.get("Content-Range") or "").rpartition("/")[2]
    if total == "*" or (total and int(total) > len(upload["data"])):
      return self._send(308, headers={"Range": f"bytes=0-{len(upload['data']) - 1}"})
    del self.store.uploads[q["upload_id"]]
    self._store(upload["bucket"], upload["name"], upload["data"], upload["q"])

  def do_DELETE(self):
    parts, q = self._parts()
    if parts[:3] != ["storage", "v1", "b"] or len(parts) < 6:
      return self._error(404, "no such route")
    bucket, name = parts[3], "/".join(parts[5:])
    with self.store.lock:
      current = self.store.objects.get((bucket, name), (None, None))[1]
      if current is None:
        return self._error(404, f"no object {name}")
      if not _precondition_ok(q, current):
        return self._error(412, f"precondition failed for {name}")
      del self.store.objects[(bucket, name)]
    self._send(204)


def _split_multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
  """(metadata, media) of a multipart/related upload: a JSON part, then the bytes. Lines end
  in CRLF or, as gcsfs writes them, LF."""
  boundary = content_type.split("boundary=")[1].strip('"').encode()
  parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
  meta, data = None, b""
  for part in parts:
    part = part[2:] if part.startswith(b"\r\n") else part[1:] if part.startswith(b"\n") else part
    sep = b"\r\n\r\n" if b"\r\n\r\n" in part.split(b"\n\n")[0] + b"\n\n" else b"\n\n"
    head, _, content = part.partition(sep)
    content = content.removesuffix(b"\r\n") if sep == b"\r\n\r\n" else content.removesuffix(b"\n")
    if meta is None and b"application/json" in head.lower():
      meta = json.loads(content)
    else:
      data = content
  return meta or {}, data


class Server(ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      super().handle_error(request, client_address)  # a client hanging up is no error


def serve(buckets=(), port: int = 0) -> tuple[Server, str]:
  """Starts the server in a thread; returns it and its base URL."""
  handler = type("BoundHandler", (Handler,), {"store": Store(buckets)})
  server = Server(("127.0.0.1", port), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}"


def environment(url: str) -> dict[str, str]:
  """Variables that send gcsfs and TensorStore to the server at `url`, anonymously."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      # gcsfs's experimental bucket-type probe speaks gRPC, which this server does not.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "GOOGLE_CLOUD_PROJECT": "test",
  }


if __name__ == "__main__":
  server, url = serve(sys.argv[2:], int(sys.argv[1]))
  print(url, flush=True)
  threading.Event().wait()
