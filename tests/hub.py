"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's `snapshot_download`,
`hf_hub_download` and `HfApi.repo_info` use, served on a free port of 127.0.0.1 from repositories kept in memory.

Like moto for S3, it stands in for the external service only: the code under test runs the real huggingface_hub
client against it (`HF_ENDPOINT`). What it answers, as the Hub does for huggingface_hub 2.x:

    GET  /api/{models,datasets}/ORG/NAME[/revision/REV]   repository info: `sha` is the commit REV names now
    GET  /api/{models,datasets}/ORG/NAME/tree/REV[/PATH]  the files and folders at REV (recursive), one page
    HEAD /ORG/NAME/resolve/REV/FILE (datasets: /datasets/ORG/NAME/...)  X-Repo-Commit, ETag (the git blob id),
                                                                          Content-Length
    GET  the same                                         the file (a `Range: bytes=N-` is honoured)

Errors carry the `X-Error-Code` huggingface_hub turns into its exceptions: 404 `RepoNotFound`, `RevisionNotFound`
and `EntryNotFound`; a gated repository answers 401 `GatedRepo` without a token and 403 `GatedRepo` with a token
not granted access; a private one answers 401 `RepoNotFound` (the Hub does not say it exists). Every request is
logged (`Hub.requests`), so tests count downloads.

A repository's branch moves with `Hub.push`, which commits a new set of files on top of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

KINDS = {"models": "model", "datasets": "dataset"}


def blob_id(content: bytes) -> str:
    """The git blob sha1 of a file: the Hub's ETag for a file not stored with LFS."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    kind: str
    """model or dataset"""
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """commit sha -> path -> content"""
    refs: dict[str, str] = field(default_factory=dict)
    """branch or tag -> commit sha"""
    gated: bool = False
    private: bool = False
    tokens: frozenset[str] = frozenset()
    """Tokens granted access to a gated or private repository."""

    def commit_of(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    token: str | None


class Hub:
    """The repositories and the request log."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def push(
        self,
        kind: str,
        repo_id: str,
        files: Mapping[str, bytes | str] | Path,
        branch: str = "main",
        gated: bool = False,
        private: bool = False,
        tokens: tuple[str, ...] = (),
    ) -> str:
        """Commit `files` (path -> content, or every file of a folder) as the new head of `branch` of a model or
        dataset repository; the commit's sha. The first push makes the repository, `gated` or `private` with the
        `tokens` granted access."""
        if isinstance(files, Path):
            content = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        else:
            content = {path: data.encode() if isinstance(data, str) else data for path, data in files.items()}
        with self.lock:
            made = Repo(kind, repo_id, gated=gated, private=private, tokens=frozenset(tokens))
            repo = self.repos.setdefault((kind, repo_id), made)
            parent = repo.refs.get(branch, "")
            listing = "".join(f"{path}\0{blob_id(data)}\n" for path, data in sorted(content.items()))
            sha = hashlib.sha1(f"{kind}/{repo_id}\n{parent}\n{listing}".encode()).hexdigest()
            repo.commits[sha] = content
            repo.refs[branch] = sha
            return sha

    def downloads(self, repo_id: str = "") -> list[str]:
        """Paths of the files served (GET of a resolve URL answered 200 or 206), of one repository or all."""
        with self.lock:
            served = [r.path for r in self.requests if r.method == "GET" and r.status in (200, 206)]
        return [p for p in served if "/resolve/" in p and (not repo_id or f"/{repo_id}/resolve/" in p)]

    def log(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)


class Answer(Exception):
    """An HTTP error answer, with the Hub's error headers."""

    def __init__(self, status: int, code: str, message: str, commit: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: Hub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.answer("GET")

    def do_HEAD(self) -> None:
        self.answer("HEAD")

    def token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() or None if scheme == "Bearer" else None

    def answer(self, method: str) -> None:
        path = urlsplit(self.path).path
        status = 500
        try:
            status = self.route(method, [unquote(part) for part in path.strip("/").split("/")])
        except Answer as err:
            status = err.status
            headers = {"X-Error-Code": err.code, "X-Error-Message": err.message} if err.code else {}
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self.send(status, json.dumps({"error": err.message}).encode(), "application/json", headers, method)
        except Exception as err:  # a bug of this stand-in: said, not hidden behind a dropped connection
            self.send(500, json.dumps({"error": repr(err)}).encode(), "application/json", {}, method)
            raise
        finally:
            self.server.hub.log(Request(method, path, status, self.token()))

    def route(self, method: str, parts: list[str]) -> int:
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in KINDS:
            repo = self.repo(KINDS[parts[1]], f"{parts[2]}/{parts[3]}")
            rest = parts[4:]
            if not rest:
                return self.info(repo, "main", method)
            if len(rest) == 2 and rest[0] == "revision":
                return self.info(repo, rest[1], method)
            if len(rest) >= 2 and rest[0] == "tree":
                return self.tree(repo, rest[1], "/".join(rest[2:]), method)
        kind = "dataset" if parts[:1] == ["datasets"] else "model"
        rest = parts[1:] if kind == "dataset" else parts
        if len(rest) >= 5 and rest[2] == "resolve":
            return self.file(self.repo(kind, f"{rest[0]}/{rest[1]}"), rest[3], "/".join(rest[4:]), method)
        raise Answer(404, "", f"no such route: {self.path}")

    def repo(self, kind: str, repo_id: str) -> Repo:
        """The repository, if this request may read it."""
        hub = self.server.hub
        with hub.lock:
            repo = hub.repos.get((kind, repo_id))
        if repo is None:
            raise Answer(404, "RepoNotFound", "Repository not found")
        token = self.token()
        if (repo.gated or repo.private) and token not in repo.tokens:
            if repo.private:
                raise Answer(401, "RepoNotFound", "Invalid username or password.")
            what = f"Access to {kind} {repo_id} is restricted"
            if token is None:
                raise Answer(401, "GatedRepo", f"{what}. You must have access to it and be authenticated to access it.")
            raise Answer(403, "GatedRepo", f"{what} and you are not in the authorized list.")
        return repo

    def commit(self, repo: Repo, revision: str) -> str:
        with self.server.hub.lock:
            sha = repo.commit_of(revision)
        if sha is None:
            raise Answer(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def info(self, repo: Repo, revision: str, method: str) -> int:
        sha = self.commit(repo, revision)
        files = repo.commits[sha]
        body = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        return self.send(200, json.dumps(body).encode(), "application/json", {}, method)

    def tree(self, repo: Repo, revision: str, under: str, method: str) -> int:
        sha = self.commit(repo, revision)
        files = repo.commits[sha]
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        chosen = sorted(p for p in files if p.startswith(prefix))
        if prefix and not chosen:
            raise Answer(404, "EntryNotFound", f"{under} does not exist on {revision}", sha)
        folders = sorted({"/".join(p.split("/")[:i]) for p in chosen for i in range(1, p.count("/") + 1)})
        entries: list[dict[str, Any]] = [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
            for f in folders
            if f.startswith(prefix)
        ]
        entries += [{"type": "file", "path": p, "oid": blob_id(files[p]), "size": len(files[p])} for p in chosen]
        return self.send(200, json.dumps(entries).encode(), "application/json", {}, method)

    def file(self, repo: Repo, revision: str, path: str, method: str) -> int:
        sha = self.commit(repo, revision)
        content = repo.commits[sha].get(path)
        if content is None:
            raise Answer(404, "EntryNotFound", f"{path} does not exist on {revision}", sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_id(content)}"', "Accept-Ranges": "bytes"}
        status = 200
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start and method == "GET":
            offset = min(int(start.group(1)), len(content))
            headers["Content-Range"] = f"bytes {offset}-{len(content) - 1}/{len(content)}"
            content, status = content[offset:], 206
        return self.send(status, content, "application/octet-stream", headers, method)

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str], method: str) -> int:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
        return status


def point_client_at(mp: Any, endpoint: str) -> None:
    """Point this process's huggingface_hub at `endpoint` with a pytest MonkeyPatch: it reads HF_ENDPOINT once, at
    import, into these constants (processes started later take HF_ENDPOINT)."""
    from huggingface_hub import constants

    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@contextlib.contextmanager
def running(hub: Hub | None = None) -> Iterator[tuple[Hub, HubServer]]:
    """The hub served on 127.0.0.1 until the block ends."""
    hub = hub or Hub()
    server = HubServer(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, server
    finally:
        server.shutdown()
        server.server_close()
