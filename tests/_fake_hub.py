"""A fake Hugging Face Hub on loopback, for the sharing tests (no network, files in memory)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """A Hub stand-in on 127.0.0.1 for what huggingface_hub 2.4 calls: upload (create_repo, validate-yaml,
    preupload, commit) and download (HEAD/GET ``/{repo}/resolve/{revision}/{path}``), for model repos and
    dataset repos (``/datasets/{repo}/resolve/...``, ``/api/datasets/...``). Files live in memory, keyed by
    ``(repo, path)`` for models and ``("datasets/" + repo, path)`` for datasets."""

    COMMIT = "c0ffee" + "0" * 34

    def __init__(self, lifetime_s: float = 300.0) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def _send(self, code: int, body: bytes | dict, headers=None) -> None:  # noqa: ANN001
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header(
                    "Content-Type",
                    "application/octet-stream" if isinstance(body, bytes) else "application/json",
                )
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                hub.calls.append((self.command, self.path))
                m = re.match(r"^/((?:datasets/)?[^/]+/[^/]+)/resolve/[^/]+/(.+?)(\?.*)?$", self.path)
                if m and (m.group(1), m.group(2)) in hub.files:
                    data = hub.files[(m.group(1), m.group(2))]
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, {"X-Repo-Commit": hub.COMMIT, "ETag": f'"{etag}"'})
                self._send(
                    404,
                    {"error": "not found"},
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.COMMIT},
                )

            def do_POST(self) -> None:  # noqa: N802
                hub.calls.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}"
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if self.path == "/api/validate-yaml":
                    return self._send(200, {"warnings": [], "errors": []})
                m = re.match(r"^/api/(models|datasets)/(.+)/preupload/[^/?]+", self.path)
                if m:
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self._send(200, {"files": modes})
                m = re.match(r"^/api/(models|datasets)/(.+)/commit/[^/?]+", self.path)
                if m:
                    repo = m.group(2) if m.group(1) == "models" else f"datasets/{m.group(2)}"
                    for line in body.decode().splitlines():
                        item = json.loads(line) if line.strip() else {}
                        if item.get("key") == "file":
                            value = item["value"]
                            hub.files[(repo, value["path"])] = base64.b64decode(value["content"])
                    url = f"{hub.url}/{repo}/commit/{hub.COMMIT}"
                    return self._send(200, {"commitUrl": url, "commitOid": hub.COMMIT})
                self._send(404, {"error": f"fake hub: unknown endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._timer = threading.Timer(lifetime_s, self.server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def env(self, tmp_path) -> dict[str, str]:  # noqa: ANN001
        return dict(
            os.environ,
            HF_ENDPOINT=self.url,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
            HF_TOKEN="hf_fake_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            OMP_NUM_THREADS="1",
        )
