"""What the kit meets in the wild, served from 127.0.0.1: a Hugging Face Hub and a plain file server.

`FakeHub` answers the Hub's routes that huggingface_hub, transformers and datasets use to find and
download a repository (info with the file list, refs, pull requests, file resolution), for model
and dataset repositories of several revisions, as huggingface.co answers them: the same JSON
fields, headers (X-Repo-Commit, ETag) and error codes (X-Error-Code: RepoNotFound,
RevisionNotFound, EntryNotFound). Revisions with a slash (refs/pr/1) come URL-encoded, as the
client sends them.

`FileServer` serves files by path with Range requests, as a CDN does (the official Speech Commands
archive lives on one), and can cut a response short to play a dropped connection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

Scope = dict


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]]  # revision ("main", "refs/pr/1") -> {path: content}
    pull_requests: list[dict] = field(default_factory=list)  # {"num", "title", "author", "status"}
    converts: list[str] = field(default_factory=list)  # e.g. ["refs/convert/parquet"]

    def find(self, revision: str) -> str | None:
        """The revision a name or commit sha refers to (None: no such revision)."""
        if revision in self.revisions:
            return revision
        return next((name for name in self.revisions if self.sha(name) == revision), None)

    def sha(self, revision: str) -> str:
        digest = hashlib.sha1(revision.encode())
        for name, content in sorted(self.revisions[revision].items()):
            digest.update(name.encode() + hashlib.sha1(content).digest())
        return digest.hexdigest()


class FakeHub:
    def __init__(self, models: dict[str, Repo] | None = None, datasets: dict[str, Repo] | None = None):
        self.repos = {"model": dict(models or {}), "dataset": dict(datasets or {})}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, decoded

    def downloads(self) -> list[str]:
        """The paths of the files served whole (GET on a resolve route)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        raw = scope["raw_path"].decode()
        self.requests.append((scope["method"], unquote(raw)))
        status, headers, body = self.answer(scope["method"], raw, parse_qs(scope["query_string"].decode()))
        headers = {"content-type": "application/json", **headers}
        headers.setdefault("content-length", str(len(body)))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def answer(self, method: str, raw: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        parts = raw.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self.api(parts[1][:-1], "/".join(parts[2:4]), parts[4:], query)
        kind = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:] if kind == "dataset" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(kind, "/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])))
        return error(404, "EntryNotFound")

    def api(self, kind: str, repo_id: str, rest: list[str], query: dict[str, list[str]]):
        repo = self.repos[kind].get(repo_id)
        if repo is None:
            return error(404, "RepoNotFound")
        if not rest or rest[0] == "revision":
            revision = repo.find(unquote("/".join(rest[1:])) if rest else "main")
            if revision is None:
                return error(404, "RevisionNotFound")
            files = [{"rfilename": name, "size": len(content)}
                     for name, content in sorted(repo.revisions[revision].items())]
            return ok({"_id": repo_id, "id": repo_id, "sha": repo.sha(revision), "private": False, "disabled": False,
                       "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": files,
                       "lastModified": "2022-11-14T00:00:00.000Z", "createdAt": "2022-11-14T00:00:00.000Z"})
        if rest[0] == "tree":  # /tree/<revision>[/<folder>]: the revision's files (snapshot_download lists them)
            revision = repo.find(unquote(rest[1]) if len(rest) > 1 else "main")
            if revision is None:
                return error(404, "RevisionNotFound")
            return 200, {}, json.dumps([{"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content),
                                         "path": name} for name, content in sorted(repo.revisions[revision].items())
                                        ]).encode()
        if rest[0] == "refs":
            def ref(name: str, full: str) -> dict:
                return {"name": name, "ref": full, "targetCommit": repo.sha(full if full in repo.revisions else "main")}

            refs = {"branches": [ref("main", "refs/heads/main")], "tags": [],
                    "converts": [ref(c.rsplit("/", 1)[-1], c) for c in repo.converts]}
            if query.get("include_prs"):
                refs["pullRequests"] = [ref(str(pr["num"]), f"refs/pr/{pr['num']}") for pr in repo.pull_requests]
            return ok(refs)
        if rest[0] == "discussions":
            wanted = {key: values[0] for key, values in query.items() if key in ("author", "status", "type")}
            found = [pr for pr in repo.pull_requests if pr["author"] == wanted.get("author", pr["author"])
                     and pr["status"] == wanted.get("status", pr["status"]) and wanted.get("type") in (None, "all",
                                                                                                   "pull_request")]
            page = int(query.get("p", ["0"])[0])
            shown = found if page == 0 else []
            return ok({"discussions": [{"num": pr["num"], "title": pr["title"], "status": pr["status"],
                                        "author": {"name": pr["author"]}, "createdAt": "2023-03-01T00:00:00.000Z",
                                        "repo": {"name": repo_id, "type": kind}, "isPullRequest": True}
                                       for pr in shown], "count": len(found), "start": 0, "numClosedDiscussions": 0})
        return error(404, "EntryNotFound")

    def resolve(self, kind: str, repo_id: str, revision: str, path: str):
        repo = self.repos[kind].get(repo_id)
        if repo is None:
            return error(404, "RepoNotFound")
        revision = repo.find(revision)
        if revision is None:
            return error(404, "RevisionNotFound")
        content = repo.revisions[revision].get(path)
        headers = {"x-repo-commit": repo.sha(revision)}
        if content is None:
            status, more, body = error(404, "EntryNotFound")
            return status, {**more, **headers}, body
        return 200, {**headers, "etag": f'"{hashlib.sha256(content).hexdigest()}"',
                     "content-type": "application/octet-stream"}, content


class FileServer:
    """Files by path, with Range requests; `cut_after[path] = n` ends the next GET of it after n bytes
    (the connection drops), once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of `path` (None: the whole file)."""
        return [r for method, p, r in self.requests if method == "GET" and p == path]

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        wanted = headers.get(b"range", b"").decode() or None
        path = scope["path"]
        self.requests.append((scope["method"], path, wanted))
        content = self.files.get(path)
        if content is None:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        start, status = 0, 200
        out = [(b"accept-ranges", b"bytes"), (b"etag", f'"{hashlib.md5(content).hexdigest()}"'.encode()),
               (b"content-type", b"application/x-gzip")]
        if wanted and wanted.startswith("bytes="):
            start, status = int(wanted[6:].split("-")[0]), 206
            out.append((b"content-range", f"bytes {start}-{len(content) - 1}/{len(content)}".encode()))
        body = content[start:]
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        cut = self.cut_after.pop(path, None)
        if cut is not None:
            # Part of the body, then the connection closes: the client sees a short read.
            await send({"type": "http.response.body", "body": body[:cut], "more_body": True})
            raise ConnectionResetError("dropped on purpose")
        await send({"type": "http.response.body", "body": body})


def ok(payload: dict) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps(payload).encode()


def error(status: int, code: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"x-error-code": code}, json.dumps({"error": code}).encode()
