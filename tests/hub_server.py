"""A small Hugging Face Hub for tests: threaded HTTP servers on 127.0.0.1 (port 0) speaking the part of the Hub API
that huggingface_hub uses.

Downloads: repo info (`/api/models/{id}/revision/{rev}`), the tree listing, and `/{id}/resolve/{rev}/{path}`: a
regular file answers 200 with `ETag` (git blob sha1), `X-Repo-Commit` and `Content-Length`; an LFS file (weights)
answers 302 with `X-Linked-Etag` (sha256), `X-Linked-Size` and a `Location` on a second port standing for the CDN,
so the client reads the metadata from the redirect itself as it does with the real Hub. Both serve `Range` requests
(206 + `Content-Range`), which huggingface_hub uses to resume a dropped download. Errors carry the `X-Error-Code`
values the client maps to RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError and EntryNotFoundError.
No Xet headers, links or listing fields are ever sent, so the client never tries Xet storage.

A token from `tokens` reads everything, one from `other_users` is a valid account without access to private or
gated repos, and any other token is refused with 401 "Invalid credentials", as the Hub does.

Uploads: create repo (with the Hub's initial `.gitattributes` commit), create branch, preupload (weights and files
of 10 MB or more as "lfs", the rest "regular"), the git-LFS batch API with the "basic" transfer (PUT to the CDN
port, then verify), and the ndjson commit endpoint. Writes need a token from `tokens`. The client only takes the
LFS path when Xet is off (HF_HUB_DISABLE_XET); with hf_xet installed it would upload weights through Xet, which this
server does not speak.

Every request is recorded (`requests`), and every body served for a repo file (`served`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool
    sha1: str  # git blob id of the stored object (the pointer file for LFS)
    sha256: str

    @classmethod
    def of(cls, path: str, data: bytes) -> "Blob":
        lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(data, lfs, git_sha1(pointer if lfs else data), sha256)


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted
    headers: dict[str, str]  # lower-case names
    status: int = 0


@dataclass
class Served:
    repo_id: str
    path: str
    start: int  # first byte sent (> 0: a resumed download)
    sent: int
    complete: bool  # False: the connection was dropped on purpose


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: "HubServer", role: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close kept-alive client connections, so their handler threads end with the server."""
        with self.sockets_lock:
            conns = list(self.open_sockets)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    timeout = 30
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _dispatch(self) -> None:
        self.server.hub._handle(self, self.server.role)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


class HubServer:
    """An in-memory Hub. `with HubServer() as hub: hub.add_repo("org/name", files)`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_test_token",), other_users: tuple[str, ...] = ()) -> None:
        self.tokens = set(tokens)  # may read every repo and write
        self.other_users = set(other_users)  # valid tokens without access to private or gated repos
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> content uploaded through the LFS batch API
        self.requests: list[Request] = []
        self.served: list[Served] = []
        self.lock = threading.RLock()
        self._cuts: dict[tuple[str, str], int] = {}
        self._counter = 0
        self._hub = _HTTPServer(self, "hub")
        self._cdn = _HTTPServer(self, "cdn")
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> "HubServer":
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()
            srv.drop_connections()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- repos ----------------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(private=private, gated=gated)
            self._new_commit(repo, "main", {".gitattributes": Blob.of(".gitattributes", GITATTRIBUTES)}, "initial")
            return repo

    def commit(self, repo_id: str, files: Mapping[str, bytes | Path] | Path, branch: str = "main",
               message: str = "commit", deletions: tuple[str, ...] = ()) -> str:
        """Add (or replace) files on `branch` (a new branch starts from main; `files` may be a directory: all its
        files, by relative path) -> the commit hash."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p for p in sorted(files.rglob("*")) if p.is_file()}
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches.get(branch, repo.branches["main"])])
            for d in deletions:
                tree.pop(d, None)
            for name, content in files.items():
                data = content.read_bytes() if isinstance(content, Path) else bytes(content)
                tree[name] = Blob.of(name, data)
            return self._new_commit(repo, branch, tree, message)

    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path] | Path, private: bool = False,
                 gated: bool = False) -> str:
        self.create_repo(repo_id, private=private, gated=gated)
        return self.commit(repo_id, files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repos[repo_id]
            return {p: b.data for p, b in repo.commits[repo.branches.get(revision, revision)].items()}

    def cut_once(self, repo_id: str, path: str, after_bytes: int) -> None:
        """The next download of `path` sends its headers and `after_bytes` bytes, then drops the connection."""
        with self.lock:
            self._cuts[(repo_id, path)] = after_bytes

    def downloaded(self, repo_id: str) -> list[str]:
        """Repo files whose bytes were served (in order, each once)."""
        with self.lock:
            return list(dict.fromkeys(s.path for s in self.served if s.repo_id == repo_id))

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()
            self.served.clear()

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, Blob], message: str) -> str:
        self._counter += 1
        parent = repo.branches.get(branch, "")
        listing = json.dumps([parent, message, self._counter, sorted((p, b.sha1) for p, b in tree.items())])
        sha = hashlib.sha1(listing.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        return sha

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def _handle(self, h: _Handler, role: str) -> None:
        split = urlsplit(h.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        record = Request(role, h.command, unquote(split.path), {k.lower(): v for k, v in h.headers.items()})
        with self.lock:
            self.requests.append(record)
        body = self._read_body(h)
        # writes run one at a time; downloads stream their bytes without holding the lock
        guard = self.lock if h.command in ("POST", "PUT") else contextlib.nullcontext()
        try:
            with guard:
                route = self._cdn_route if role == "cdn" else self._hub_route
                status = route(h, segments, query, body)
        except _HubReply as reply:
            status = reply.send(h)
        record.status = status

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _token(self, h: _Handler) -> str | None:
        auth = h.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _repo(self, h: _Handler, repo_id: str) -> Repo:
        """The repo, or the Hub's error for a missing, private or gated one (or for an unknown token)."""
        token = self._token(h)
        if token is not None and token not in self.tokens | self.other_users:
            raise _HubReply(401, None, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in self.tokens):
            raise _HubReply(404 if token in self.tokens else 401, "RepoNotFound", "Repository not found")
        if repo.gated and token not in self.tokens:
            raise _HubReply(401 if token is None else 403, "GatedRepo",
                            f"Access to model {repo_id} is restricted. You must have access to it and be authenticated")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _HubReply(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _need_write(self, h: _Handler) -> None:
        if self._token(h) not in self.tokens:
            raise _HubReply(401, None, "Invalid credentials in Authorization header")

    def _hub_route(self, h: _Handler, seg: list[str], query: dict[str, str], body: bytes) -> int:
        m = h.command
        if seg[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create(h, json.loads(body))
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if not rest and m == "GET":
                return self._info(h, repo_id, "main")
            if len(rest) == 2 and rest[0] == "revision" and m == "GET":
                return self._info(h, repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree" and m == "GET":
                return self._tree(h, repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "preupload" and m == "POST":
                return self._preupload(h, repo_id, rest[1], json.loads(body))
            if len(rest) == 2 and rest[0] == "commit" and m == "POST":
                return self._commit_api(h, repo_id, rest[1], body)
            if len(rest) == 2 and rest[0] == "branch" and m == "POST":
                return self._branch(h, repo_id, rest[1], json.loads(body or b"{}"))
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and m == "POST":
            repo_id = f"{seg[0]}/{seg[1][:-4]}"
            if seg[5] == "batch":
                return self._lfs_batch(h, repo_id, json.loads(body))
            if seg[5] == "verify":
                oid = json.loads(body)["oid"]
                if oid not in self.lfs_store:
                    raise _HubReply(404, None, f"object {oid} not uploaded")
                return _json(h, 200, {"success": True})
        if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(h, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return _json(h, 404, {"error": f"no such endpoint: {m} {h.path}"})

    def _info(self, h: _Handler, repo_id: str, revision: str) -> int:
        with self.lock:
            repo = self._repo(h, repo_id)
            sha = self._commit_of(repo, revision)
            info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                    "gated": "auto" if repo.gated else False, "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]}
        return _json(h, 200, info)

    def _tree(self, h: _Handler, repo_id: str, revision: str, prefix: str) -> int:
        with self.lock:
            repo = self._repo(h, repo_id)
            tree = repo.commits[self._commit_of(repo, revision)]
        entries = []
        for path in sorted(tree):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            b = tree[path]
            entry: dict[str, Any] = {"type": "file", "oid": b.sha1, "size": len(b.data), "path": path}
            if b.lfs:
                entry["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": 134}
            entries.append(entry)
        return _json(h, 200, entries)

    def _resolve(self, h: _Handler, repo_id: str, revision: str, path: str) -> int:
        with self.lock:
            repo = self._repo(h, repo_id)
            sha = self._commit_of(repo, revision)
            blob = repo.commits[sha].get(path)
        if blob is None:
            raise _HubReply(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", {"X-Repo-Commit": sha})
        if blob.lfs:
            location = f"{self.cdn_url}/repos/{repo_id}/{blob.sha256}?filename={quote(path)}"
            return _send(h, 302, {"Location": location, "X-Repo-Commit": sha, "ETag": f'"{blob.sha1}"',
                                  "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        return self._serve(h, repo_id, path, blob.data, {"X-Repo-Commit": sha, "ETag": f'"{blob.sha1}"'})

    def _cdn_route(self, h: _Handler, seg: list[str], query: dict[str, str], body: bytes) -> int:
        with self.lock:
            if len(seg) == 4 and seg[0] == "repos" and h.command in ("GET", "HEAD"):
                repo_id, sha256, path = f"{seg[1]}/{seg[2]}", seg[3], query.get("filename", "")
                repo = self.repos.get(repo_id)
                blobs = [b for t in (repo.commits.values() if repo else ()) for b in t.values() if b.sha256 == sha256]
                if not blobs:
                    return _send(h, 404, {}, b"NoSuchKey")
                data = blobs[0].data
            elif len(seg) == 2 and seg[0] == "upload" and h.command == "PUT":  # the LFS "basic" transfer
                if hashlib.sha256(body).hexdigest() != seg[1]:
                    return _send(h, 400, {}, b"BadDigest")
                self.lfs_store[seg[1]] = body
                return _send(h, 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            else:
                return _send(h, 404, {}, b"NoSuchKey")
        return self._serve(h, repo_id, path, data, {"ETag": f'"{sha256}"'})

    def _serve(self, h: _Handler, repo_id: str, path: str, data: bytes, headers: dict[str, str]) -> int:
        """The file's bytes, honouring `Range: bytes=a-[b]`; a pending cut drops the connection part-way."""
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}";'}
        start, end, status = 0, len(data) - 1, 200
        rng = h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m[1]) >= len(data):
                return _send(h, 416, {"Content-Range": f"bytes */{len(data)}"})
            start, status = int(m[1]), 206
            end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        chunk = data[start:end + 1]
        if h.command == "HEAD":
            return _send(h, status, headers, length=len(chunk))
        with self.lock:
            cut = self._cuts.pop((repo_id, path), None)
        if cut is not None and cut < len(chunk):
            _send(h, status, headers, length=len(chunk), body=chunk[:cut])
            h.close_connection = True
            try:  # the peer sees the body end early: an incomplete read
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with self.lock:
                self.served.append(Served(repo_id, path, start, cut, False))
            return status
        with self.lock:
            self.served.append(Served(repo_id, path, start, len(chunk), True))
        return _send(h, status, headers, chunk)

    # ---- uploads --------------------------------------------------------------------------------------------
    def _create(self, h: _Handler, payload: dict[str, Any]) -> int:
        self._need_write(h)
        org, name = payload.get("organization"), payload["name"]
        repo_id = f"{org}/{name}" if org else name
        if repo_id in self.repos:
            return _json(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.create_repo(repo_id, private=payload.get("visibility") == "private")
        return _json(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _branch(self, h: _Handler, repo_id: str, branch: str, payload: dict[str, Any]) -> int:
        self._need_write(h)
        repo = self._repo(h, repo_id)
        if branch in repo.branches:
            raise _HubReply(409, None, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        return _json(h, 200, {})

    def _preupload(self, h: _Handler, repo_id: str, revision: str, payload: dict[str, Any]) -> int:
        self._need_write(h)
        repo = self._repo(h, repo_id)
        tree = repo.commits[self._commit_of(repo, revision)]
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = tree.get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else git_sha1(old.data))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return _json(h, 200, {"files": files, "commitOid": self._commit_of(repo, revision)})

    def _lfs_batch(self, h: _Handler, repo_id: str, payload: dict[str, Any]) -> int:
        self._need_write(h)
        self._repo(h, repo_id)
        if "basic" not in payload.get("transfers", ["basic"]):
            raise _HubReply(400, None, "only the basic LFS transfer is supported")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn_url}/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return _json(h, 200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _commit_api(self, h: _Handler, repo_id: str, revision: str, body: bytes) -> int:
        self._need_write(h)
        repo = self._repo(h, repo_id)
        if revision not in repo.branches:
            raise _HubReply(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        tree = dict(repo.commits[repo.branches[revision]])
        message = "commit"
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                tree[value["path"]] = Blob.of(value["path"], base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = self.lfs_store.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise _HubReply(400, None, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                tree[value["path"]] = Blob.of(value["path"], data)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                tree = {p: b for p, b in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise _HubReply(400, None, f"unsupported commit operation '{key}'")
        sha = self._new_commit(repo, revision, tree, message)
        return _json(h, 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                              "pullRequestUrl": None})


class _HubReply(Exception):
    """An error answer in the Hub's format: `X-Error-Code` / `X-Error-Message` headers and a JSON body."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def send(self, h: _Handler) -> int:
        headers = {**self.headers, "X-Error-Message": self.message}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json(h, self.status, {"error": self.message}, headers=headers)


def _send(h: _Handler, status: int, headers: dict[str, str], body: bytes = b"", length: int | None = None) -> int:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    if body and h.command != "HEAD":
        h.wfile.write(body)
    return status


def _json(h: _Handler, status: int, data: Any, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> int:
    return _send(h, status, {"Content-Type": content_type, **(headers or {})}, json.dumps(data).encode())
