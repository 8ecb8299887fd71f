"""Evaluation and export read a workdir given as a gs:// URL.

checkpoint.py keeps a URL workdir a URL (`as_path`) and reads through
etils.epath (directories, JSON, file writes) and orbax, whose array data
tensorstore reads with its own GCS client (kvstore driver 'gcs'). Both
layers are exercised on `gs://bucket/run`, a copy of a training run's
workdir (tests/fixtures/checkpoints_c97bd70/detcon_b):

  tensorstore  over real HTTP, against FakeGcs below: a read-only fake of
               the GCS JSON API (object list by offsets, metadata, ranged
               media downloads) serving a local folder, reached through
               tensorstore's own test hooks TENSORSTORE_GCS_HTTP_URL and
               GOOGLE_AUTH_TOKEN_FOR_TESTING; every array is read from it;
  epath        etils.epath.testing.mock_epath maps gs://bucket/... onto the
               same folder (EPATH_USE_TF=false, or epath sends gs:// to
               tf.io.gfile, whose GCS endpoint cannot be redirected).

One call stays mocked: orbax's CheckpointManager asks the bucket itself,
through google-cloud-storage (a dependency since this test found that
without it a gs:// workdir fails with an ImportError), whether it has a
hierarchical namespace (gcs_utils.is_hierarchical_namespace_enabled). That
client talks to the real GCS endpoint with real credentials, neither of
which a test has; the test answers False (a flat bucket) in its place.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import urllib.parse

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from configs import detcon_b
from odin_jax import checkpoint
from odin_jax.evaluate import runner
from odin_jax.export import writer

FIXTURE = "tests/fixtures/checkpoints_c97bd70/detcon_b"
URL = "gs://bucket/run"
_EPATH_FNS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs",
              "mkdir", "open", "remove", "rename", "replace", "rmtree",
              "stat", "walk")


class FakeGcs(http.server.BaseHTTPRequestHandler):
  """GET /storage/v1/b/<bucket>/o[/<object>] over `root`/<bucket>/."""
  root = ""
  requests: list = []

  def log_message(self, *args):   # quiet
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    url = urllib.parse.urlparse(self.path)
    parts, query = url.path.split("/"), urllib.parse.parse_qs(url.query)
    FakeGcs.requests.append(urllib.parse.unquote(url.path))
    if len(parts) < 6 or parts[1:4] != ["storage", "v1", "b"] or \
        parts[5] != "o":
      return self._send(404, b"{}")
    base = os.path.join(self.root, parts[4])
    if len(parts) == 6:
      return self._send(200, json.dumps(
          {"kind": "storage#objects",
           "items": self._list(base, query)}).encode())
    name = urllib.parse.unquote("/".join(parts[6:]))
    path = os.path.join(base, name)
    if not os.path.isfile(path):
      return self._send(404, b'{"error": {"code": 404}}')
    meta = self._meta(base, path)
    if query.get("alt") != ["media"]:
      return self._send(200, json.dumps(meta).encode(), meta["generation"])
    with open(path, "rb") as f:
      data = f.read()
    ranged = self.headers.get("Range")
    if not ranged:
      return self._send(200, data, meta["generation"])
    first, last = ranged.split("=")[1].split("-")
    first, last = int(first), int(last) if last else len(data) - 1
    chunk = data[first:last + 1]
    return self._send(206, chunk, meta["generation"], {
        "Content-Range": f"bytes {first}-{first + len(chunk) - 1}/"
                         f"{len(data)}"})

  @staticmethod
  def _meta(base, path):
    stat = os.stat(path)
    return {"name": os.path.relpath(path, base), "size": str(stat.st_size),
            "generation": str(stat.st_mtime_ns), "metageneration": "1"}

  def _list(self, base, query):
    prefix = query.get("prefix", [""])[0]
    start = query.get("startOffset", [""])[0]
    end = query.get("endOffset", [None])[0]
    items = []
    for folder, _, files in os.walk(base):
      for f in files:
        meta = self._meta(base, os.path.join(folder, f))
        name = meta["name"]
        if name.startswith(prefix) and name >= start and (
            end is None or name < end):
          items.append(meta)
    return sorted(items, key=lambda m: m["name"])

  def _send(self, code, body, generation=None, headers=None):
    self.send_response(code)
    self.send_header("Content-Type", "application/json" if code != 206
                     else "application/octet-stream")
    self.send_header("Content-Length", str(len(body)))
    if generation:
      self.send_header("x-goog-generation", generation)
      self.send_header("x-goog-metageneration", "1")
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(body)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """(the folder behind gs://bucket, ) with both layers pointed at it."""
  root = tmp_path / "gcs"
  shutil.copytree(FIXTURE, root / "bucket" / "run")
  FakeGcs.root, FakeGcs.requests = str(root), []
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGcs)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL",
                     f"http://127.0.0.1:{server.server_port}")
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  monkeypatch.setenv("EPATH_USE_TF", "false")
  # epath reads EPATH_USE_TF once per process (a cached check): an earlier
  # gs:// path in this worker would have fixed the tf.io.gfile backend.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled",
                      lambda path: False)
  local = str(root) + "/"
  epath_calls = []

  def to_local(p):
    p = os.fspath(p)
    return local + p[len("gs://"):] if p.startswith("gs://") else p

  def to_url(p):
    return "gs://" + p[len(local):] if p.startswith(local) else p

  def mocked(name):
    def fn(original, path, *args, **kwargs):
      epath_calls.append((name, os.fspath(path)))
      args = tuple(to_local(a) if isinstance(a, (str, os.PathLike)) else a
                   for a in args)
      out = original(to_local(path), *args, **kwargs)
      if name == "glob":
        out = [to_url(o) for o in out]
      elif name == "walk":
        out = [(to_url(d), ds, fs) for d, ds, fs in out]
      return out
    return fn

  with epath_testing.mock_epath(**{n: mocked(n) for n in _EPATH_FNS}):
    yield root / "bucket", epath_calls
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  server.shutdown()
  server.server_close()


def _array_reads():
  """Objects tensorstore fetched: the OCDBT manifest and data files."""
  return [r for r in FakeGcs.requests if "/ocdbt.process_0/d/" in r or
          r.endswith("/state/manifest.ocdbt")]


def test_checkpoint_read_through_gcs_matches_local(gcs):
  bucket, epath_calls = gcs
  state, meta, step = checkpoint.read(URL)
  assert step == 2 and meta["method"] == "detcon_b"
  assert _array_reads(), FakeGcs.requests   # arrays came over HTTP
  assert any(p.startswith(URL) for _, p in epath_calls)
  local, _, _ = checkpoint.read(str(bucket / "run"))
  url_leaves = jax.tree_util.tree_leaves_with_path(state)
  local_leaves = jax.tree_util.tree_leaves_with_path(local)
  assert [k for k, _ in url_leaves] == [k for k, _ in local_leaves]
  assert len(url_leaves) > 10
  for (key, a), (_, b) in zip(url_leaves, local_leaves):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(key))


def test_export_writes_into_the_url_workdir(gcs):
  bucket, _ = gcs
  info = writer.export(URL, config=None, step=None, formats=["npz"],
                       out_dir=None)
  assert info["step"] == 2 and info["out_dir"] == f"{URL}/export/step_2"
  assert _array_reads()
  out = bucket / "run" / "export" / "step_2"
  with np.load(out / "backbone.npz") as npz:
    assert len(npz.files) == info["files"]["backbone.npz"]["keys"] > 10
  assert json.loads((out / "export_info.json").read_text())["step"] == 2


def test_evaluate_reads_the_checkpoint_and_writes_results_there(gcs):
  bucket, _ = gcs
  config = detcon_b.get_config("test")
  metrics = runner.evaluate(
      config, URL, which="discovery", log_table=False,
      overrides={"num_images": 4, "batch_size": 4, "image_size": 64,
                 "discovery_ks": (1, 2), "mask_baselines": ()})
  assert _array_reads()
  assert np.isfinite(metrics["discovery/abo_instance"])
  results = bucket / "run" / "eval" / "results_step_2.json"
  saved = json.loads(results.read_text())
  assert saved["metrics"]["discovery/abo_instance"] == pytest.approx(
      metrics["discovery/abo_instance"])
  assert runner.results_path(URL, "step_2") == f"{URL}/eval/results_step_2.json"
