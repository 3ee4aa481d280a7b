"""Serving rules: what the server binds, who may log in, that it talks to nobody, and which files it hands out.

The app is served in-process on a free loopback port (tests/app/conftest.py) and attacked with raw HTTP (a
socket, so that no client library normalises ``../`` away).
"""

from __future__ import annotations

import ast
import os
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from reid_ssl import cli
from reid_ssl.app.serve import check_exposure, is_loopback, launch, parse_auth, resolve_auth, set_offline_env
from reid_ssl.app.service import GallerySearchApp
from reid_ssl.app.ui import build_demo
from reid_ssl.index import GalleryIndex
from tests.helpers import REPO, assert_one_clear_line, free_port, run_cli, write_person_image

SECRET = "TOP-SECRET-7f3a9c"  # content of files the app must never hand out


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send ``GET <target>`` byte for byte (no client normalises ``../`` or ``%2e``); (status, whole response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


# ---------------------------------------------------------------------------------------------------------
# Network: binding, logins, no telemetry
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_launch(monkeypatch):
    """Replace gradio's ``Blocks.launch`` by a recorder (no server) and keep torch's thread count."""
    import gradio as gr

    calls: list[dict] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_network_binds_loopback_by_default_and_never_shares(served, recorded_launch, monkeypatch):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    code, _, err = run_cli(["app", "--index", str(served.index)])
    assert code == 0, err
    (kw,) = recorded_launch
    assert kw["server_name"] == "127.0.0.1" and kw["auth"] is None
    assert kw["share"] is False and kw["allowed_paths"] == [] and kw["mcp_server"] is False
    assert kw["max_file_size"] == "100mb"  # the upload cap is on by default, too
    assert "login off" in err


def test_network_non_loopback_without_auth_is_refused(served, recorded_launch, monkeypatch, tmp_path):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        code, _, err = run_cli(["app", "--index", str(served.index), "--host", host])
        assert_one_clear_line(code, err, f"refusing to serve on {host} without a login")
    assert recorded_launch == []  # nothing was served
    # with a login from the environment (never a literal in the code) it serves, and passes the login on
    monkeypatch.setenv("REID_SSL_APP_AUTH", "alice:s3cret")
    code, _, err = run_cli(["app", "--index", str(served.index), "--host", "0.0.0.0"])
    assert code == 0, err
    assert recorded_launch[-1]["server_name"] == "0.0.0.0" and recorded_launch[-1]["auth"] == [("alice", "s3cret")]
    # no gradio launch in the code base passes a literal login or turns sharing on
    for path in [*REPO.glob("reid_ssl/**/*.py"), *REPO.glob("app/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "auth":
                        assert not isinstance(kw.value, (ast.List, ast.Tuple, ast.Constant)) or (
                            isinstance(kw.value, ast.Constant) and kw.value.value is None
                        ), f"{path}:{node.lineno}: a literal login"
                    if kw.arg == "share":
                        assert isinstance(kw.value, ast.Constant) and kw.value.value is False, f"{path}:{node.lineno}"


def test_network_no_telemetry_and_no_outside_connections(served, monkeypatch):
    """Even with telemetry and sharing asked for in the environment, the app talks to loopback only."""
    from gradio_client import Client, handle_file

    for key, value in {"GRADIO_ANALYTICS_ENABLED": "True", "GRADIO_SHARE": "True", "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(key, value)
    set_offline_env()  # what the app entry point does before gradio is imported: forced, not defaults
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["GRADIO_SHARE"] == "False"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # and the Blocks stay quiet even then

    outside: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def loopback(host) -> bool:
        return str(host).strip("[]") in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")

    def getaddrinfo(host, *a, **k):
        if not loopback(host):
            outside.append(f"lookup {host}")
        return real_getaddrinfo(host, *a, **k)

    def connect(self, address):
        if isinstance(address, tuple) and not loopback(address[0]):
            outside.append(f"connect {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    demo = build_demo(GalleryIndex.load(served.index), served.embedder)
    assert demo.analytics_enabled is False
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.share is False and demo.share_url is None
        client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False)
        gallery, _ = client.predict(handle_file(str(served.queries()[0])), 2, api_name="/search")
        assert len(gallery) == 2
        time.sleep(0.5)  # give any background telemetry thread its chance
    finally:
        demo.close()
    assert outside == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_public_bind_needs_a_login(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0"):
        check_exposure("0.0.0.0", None, insecure=False)
    assert check_exposure("0.0.0.0", [("u", "p")], insecure=False) == []
    assert "WITHOUT a login" in check_exposure("0.0.0.0", None, insecure=True)[0]
    assert check_exposure("127.0.0.1", None, insecure=False) == []
    assert cli.main(["app", "--host", "0.0.0.0", "--index", str(tmp_path)]) == 2
    assert "refusing to serve" in capsys.readouterr().err


def test_auth_from_env_or_file(tmp_path):
    assert parse_auth("alice:s3cret, bob:pw:with:colons", "env") == [("alice", "s3cret"), ("bob", "pw:with:colons")]
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("nopassword", "env")
    assert resolve_auth(None, {"REID_SSL_APP_AUTH": "a:b"}) == ([("a", "b")], [])
    f = tmp_path / "auth.txt"
    f.write_text("# team\ncarol:pw\n")
    f.chmod(0o644)
    creds, warnings = resolve_auth(str(f), {"REID_SSL_APP_AUTH": "a:b"})
    assert creds == [("carol", "pw")] and "chmod 600" in warnings[0]
    f.chmod(0o600)
    assert resolve_auth(str(f), {}) == ([("carol", "pw")], [])
    assert resolve_auth(None, {}) == (None, [])


def test_login_is_enforced_when_set(served):
    demo = build_demo(GalleryIndex.load(served.index), served.embedder)
    port = free_port()
    launch(demo, "127.0.0.1", port, auth=[("alice", "s3cret")], prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/gradio_api/info").status_code == 401
        assert httpx.post(url + "/login", data={"username": "alice", "password": "nope"}).status_code == 400
        with httpx.Client() as c:
            assert c.post(url + "/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            assert c.get(url + "/gradio_api/info").status_code == 200
    finally:
        demo.close()


def test_app_without_index_explains_how_to_build_one(tmp_path, capsys):
    assert cli.main(["app", "--index", str(tmp_path / "nothing")]) == 2
    assert "reid_ssl index build" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Files the app serves
# ---------------------------------------------------------------------------------------------------------


def test_only_gradio_files_are_served(served, tmp_path):
    secret = write_person_image(tmp_path / "secret.jpg", 2, np.random.default_rng(3))
    gallery_file = GalleryIndex.load(served.index).items([0])[0]["path"]
    link = Path(gallery_file).parent / "link_to_secret.jpg"
    link.symlink_to(secret)
    try:
        base = served.url + "gradio_api/file="
        for target in [
            "/etc/passwd",
            str(secret),
            gallery_file,
            str(link),
            "../../../../etc/passwd",
            "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        ]:
            r = httpx.get(base + target)
            assert r.status_code in (403, 404), (target, r.status_code)
            assert b"root:" not in r.content
        for remote in ["http://example.com/x.jpg", "https://1.1.1.1/", "//example.com/x"]:
            r = httpx.get(base + remote)
            assert r.status_code == 403 and "no remote files" in r.text
        assert httpx.get(served.url + "gradio_api/proxy=http://example.com/").status_code == 403
        gallery, _ = served.search(served.queries()[0], 1)  # what a search returns IS served
        r = httpx.get(served.url + "gradio_api/file=" + gallery[0]["image"])
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    finally:
        link.unlink()


def test_thumbnails_only_come_from_the_gallery_folders(served, tmp_path):
    outside = write_person_image(tmp_path / "private" / "secret.jpg", 3, np.random.default_rng(1), size=(96, 48))
    app, idx = served.app, GalleryIndex.load(served.index)
    assert Image.open(app.thumbnail(str(outside), idx)).size == (64, 128)  # the grey placeholder, not the file
    inside = idx.items([0])[0]["path"]
    assert Image.open(app.thumbnail(inside, idx)).size == Image.open(inside).size


def test_files_served_raw_http_traversal_is_refused(served, tmp_path):
    """``../``, absolute, URL-encoded and symlinked paths: the server hands out none of the host's files."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    gallery_file = Path(GalleryIndex.load(served.index).items([0])[0]["path"])
    link = gallery_file.parent / "zz_link_to_secret.jpg"  # a symlink INSIDE the gallery pointing outside
    link.symlink_to(secret)
    cache = os.environ["GRADIO_TEMP_DIR"]
    up = "../" * 12
    enc = "..%2f" * 12
    dots = "%2e%2e/" * 12
    try:
        targets = []
        for victim in (str(secret), "/etc/passwd"):
            rel = victim.lstrip("/")
            targets += [
                f"/gradio_api/file={victim}",
                f"/gradio_api/file={up}{rel}",
                f"/gradio_api/file={enc}{rel.replace('/', '%2f')}",
                f"/gradio_api/file={dots}{rel}",
                f"/gradio_api/file=%2f{rel.replace('/', '%2f')}",
                f"/gradio_api/file={cache}/{up}{rel}",
                f"/gradio_api/file={cache}/{enc}{rel}",
                f"/gradio_api/file/{up}{rel}",
                f"/file={victim}",
                f"/static/{up}{rel}",
                f"/static/{enc}{rel}",
                f"/assets/{enc}{rel}",
                f"/svelte/{dots}{rel}",
                f"/gradio_api/file=file://{victim}",
                f"/gradio_api/file=//{victim}",
            ]
        targets += [f"/gradio_api/file={link}", f"/gradio_api/file={gallery_file}"]
        for target in targets:
            status, body = raw_get(served.port, target)
            assert status in (400, 403, 404, 405), (target, status)
            assert SECRET.encode() not in body and b"root:x:0:0" not in body, target
        # what a search returns IS served: the refusals above are not a dead server
        gallery, _ = served.search(served.queries()[0], 1)
        status, body = raw_get(served.port, "/gradio_api/file=" + gallery[0]["image"])
        assert status == 200 and b"\r\n\r\n\xff\xd8" in body
    finally:
        link.unlink()


def test_files_served_symlink_in_the_gallery_pointing_outside_is_never_shown(served, tmp_path):
    """An indexed file later replaced by a symlink to a private image shows a placeholder (at build time such a
    symlink is not indexed at all: tests/index/test_safety.py)."""
    outside = write_person_image(tmp_path / "private" / "holiday.jpg", 3, np.random.default_rng(1), size=(96, 48))
    idx = GalleryIndex.load(served.index)
    victim = Path(idx.items([1])[1]["path"])
    original = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(outside)
    try:
        app = GallerySearchApp(idx, served.embedder)  # fresh: no thumbnail cached
        shown = app.thumbnail(str(victim), idx)
        assert Image.open(shown).size == (64, 128) != Image.open(outside).size  # the grey placeholder
    finally:
        victim.unlink()
        victim.write_bytes(original)


def test_files_served_no_request_makes_the_server_fetch_a_url(served):
    """gradio downloads an input file payload whose path is a URL before the event runs: refused up front."""
    api = served.url + "gradio_api/"
    for remote in ["https://203.0.113.7/person.jpg", "http://169.254.169.254/latest", "//example.com/x.jpg"]:
        file = {"path": remote, "meta": {"_type": "gradio.FileData"}}
        for route, body in [
            ("call/search", {"data": [file, 3]}),
            ("call/add", {"data": [[file]]}),
            ("queue/join", {"data": [file], "fn_index": 0, "session_hash": "fuzz", "trigger_id": None}),
        ]:
            r = httpx.post(api + route, json=body)
            assert r.status_code == 403 and "no remote files" in r.text, (remote, route, r.status_code)
    # the same request with a file uploaded to this server is answered
    image = served.queries()[0]
    (path,) = httpx.post(api + "upload", files={"files": (image.name, image.read_bytes(), "image/jpeg")}).json()
    file = {"path": path, "meta": {"_type": "gradio.FileData"}}
    r = httpx.post(api + "call/search", json={"data": [file, 3, False, "auto", 0.5]})
    assert r.status_code == 200 and r.json()["event_id"]
    with httpx.stream("GET", api + f"call/search/{r.json()['event_id']}", timeout=120) as events:
        text = "".join(events.iter_text())
    assert "event: complete" in text and "camid" in text
