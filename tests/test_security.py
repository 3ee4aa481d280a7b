"""Issue 6, "safe by default": one test per bullet of the issue, each failing without its protection.

Bullets -> tests (the names start with the bullet):

* Network: ``test_network_*``            * Files the app serves: ``test_files_served_*``
* Uploads: ``test_uploads_*``            * Untrusted checkpoints and indexes: ``test_untrusted_*``
* Concurrency: ``test_concurrency_*``    * Faults: ``test_faults_*``
* Input validation at every CLI boundary: ``test_input_validation_*``

The app is served in-process on a free loopback port and attacked with raw HTTP (a socket, so that no client
library normalises ``../`` away). Full disks are real: a small tmpfs where we may mount one (root), else
``RLIMIT_FSIZE``, so the kernel itself refuses the write. Kills are real ``SIGKILL``s of child processes, at
fixed points inside the write being protected. See docs/security.md for what is protected and how.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="reid_ssl_gradio_"))

import numpy as np
import pytest
import torch
from tests.helpers import free_port, png_header_only, write_checkpoint, write_market_tree, write_person_image, write_zip
from PIL import Image

from reid_ssl.app.serve import launch, set_offline_env
from reid_ssl.app.service import GallerySearchApp
from reid_ssl.app.ui import build_demo
from reid_ssl.errors import ReidSslError
from reid_ssl.app.uploads import UploadError, UploadLimits, check_image, safe_extract_zip
from reid_ssl import cli
from reid_ssl.index import gallery as index_mod
from reid_ssl.checkpoint import CheckpointError, backbone_block, load_checkpoint, make_preprocess, save_checkpoint
from reid_ssl.embedder import load_embedder
from reid_ssl.images import MAX_IMAGE_PIXELS, ImageError, open_rgb
from reid_ssl.index.gallery import BuildOptions, EmbedderMismatchError, GalleryIndex, GalleryItem, IndexFormatError, StaleIndexError, build_index, current_generation, gallery_source

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SECRET = "TOP-SECRET-7f3a9c"  # content of files the app must never hand out


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------



def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send ``GET <target>`` byte for byte (no client normalises ``../`` or ``%2e``); (status, whole response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``reid_ssl <argv>`` in-process: (exit code, stdout, stderr); argparse's exits count as exit codes."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # `app` sets its own; keep the session's
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_line(code: int, err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a payload that would create a file on the host."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil(kind: str, marker: Path) -> bytes:
    """A payload that creates ``marker`` when unpickled: a raw pickle, a torch zip, or an object-array .npy."""
    if kind == "pickle":
        return pickle.dumps({"format": "reid_ssl.checkpoint", "x": CreatesFile(marker)})
    buf = io.BytesIO()
    if kind == "torch":
        torch.save({"format": "reid_ssl.checkpoint", "x": CreatesFile(marker)}, buf)
    else:
        arr = np.empty((4, 8), dtype=object)
        arr[0, 0] = CreatesFile(marker)
        np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def assert_live(kind: str, tmp: Path) -> None:
    """The payload really does create a file when trusted, so a refusal below means something."""
    probe = tmp / f"probe-{kind}"
    data = evil(kind, probe)
    {
        "pickle": pickle.loads,
        "torch": lambda b: torch.load(io.BytesIO(b), weights_only=False),
        "npy": lambda b: np.load(io.BytesIO(b), allow_pickle=True),
    }[kind](data)
    assert probe.exists(), f"the {kind} payload is not live"
    probe.unlink()


# Deterministic features from each file's bytes, without torch: the same in every process (builds, kills).
FAKE_EMBEDDER = textwrap.dedent("""
    import hashlib, types
    import numpy as np

    class FakeEmbedder:
        fingerprint = "fake-embedder-" + "0" * 50
        feature_dim = 16
        preprocess = {"height": 8, "width": 4, "mean": [0.5], "std": [0.5], "interpolation": "bicubic"}
        flip = False

        def __init__(self, delay=0.0):
            self.delay = delay

        def embed_images(self, images, batch_size=64, num_workers=0, progress=False, desc=""):
            import time
            time.sleep(self.delay)
            feats, ok, failures = [], [], []
            for i, p in enumerate(images):
                data = open(p, "rb").read()
                if not data.startswith((b"\\xff\\xd8", b"\\x89PNG")):
                    failures.append((i, f"{p}: not an image file"))
                    continue
                seed = int(hashlib.sha256(data).hexdigest()[:8], 16)
                feats.append(np.random.default_rng(seed).standard_normal(16).astype(np.float32))
                ok.append(i)
            x = np.stack(feats) if feats else np.zeros((0, 16), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
            return types.SimpleNamespace(features=x, ok=ok, failures=failures)
""")
_ns: dict = {}
exec(FAKE_EMBEDDER, _ns)
FakeEmbedder = _ns["FakeEmbedder"]


def fake_info(dim: int = 8, fingerprint: str = "f" * 64) -> dict:
    return {"fingerprint": fingerprint, "preprocess": {"height": 8, "width": 4}, "feature_dim": dim, "flip": True}


def small_index(folder: Path, n: int = 8, dim: int = 8) -> GalleryIndex:
    idx = GalleryIndex.create(fake_info(dim), "flat")
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    idx.add(x, [GalleryItem(path=f"/g/{i}.jpg", pid=i) for i in range(n)])
    idx.save(folder)
    return idx


def assert_consistent(folder: Path) -> GalleryIndex:
    """The published generation loads whole: FAISS, ids, vectors and metadata agree."""
    idx = GalleryIndex.load(folder)
    n = idx.ntotal
    assert len(idx.ids) == len(idx.vectors) == len(idx.items(idx.ids)) == n
    assert idx._index is None if n == 0 else idx._index.ntotal == n
    return idx


class SmallDisk:
    """A folder whose writes can be made to fail as on a full disk.

    As root: a 16 MiB tmpfs mounted on the folder and filled to ``leave`` free bytes (the kernel says ENOSPC).
    Elsewhere (CI runners without mount rights): ``RLIMIT_FSIZE``, so the kernel refuses to grow any file past
    ``leave`` bytes (EFBIG). Either way the write syscall itself fails, not a patched Python function.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.mounted = folder, False
        if os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("REID_SSL_TEST_NO_MOUNT"):
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True, check=False
            )
            self.mounted = r.returncode == 0

    @contextlib.contextmanager
    def full(self, leave: int = 16384):
        if self.mounted:
            filler = self.folder / ".filler"
            st = os.statvfs(self.folder)
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, max(st.f_bavail * st.f_frsize - leave, 4096))
            try:
                yield
            finally:
                filler.unlink()
        else:
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave, hard))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, handler)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.close()


# ---------------------------------------------------------------------------------------------------------
# One app, served in-process on loopback with a 1 MB upload cap
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("security")
    ckpt = write_checkpoint(root / "ckpt.pt")
    tree = write_market_tree(root / "market", train_ids=range(1, 3))
    embedder = load_embedder(ckpt, device="cpu")
    build_index(embedder, gallery_source(tree), root / "idx", checkpoint=ckpt)
    limits = UploadLimits(max_upload_mb=1)
    demo = build_demo(GalleryIndex.load(root / "idx"), embedder, limits=limits)
    port = free_port()
    launch(demo, "127.0.0.1", port, limits=limits, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, analytics_enabled=False, verbose=False)
    yield {
        "root": root,
        "checkpoint": ckpt,
        "tree": tree,
        "index": root / "idx",
        "embedder": embedder,
        "app": demo.reid_app,
        "port": port,
        "url": url,
        "client": client,
    }
    demo.close()


def queries(served) -> list[Path]:
    return sorted((served["tree"] / "query").iterdir())


def search(served, path: Path, k: int = 3):
    from gradio_client import handle_file

    return served["client"].predict(handle_file(str(path)), k, api_name="/search")


def add(served, *paths: Path):
    from gradio_client import handle_file

    return served["client"].predict([handle_file(str(p)) for p in paths], api_name="/add")


# ---------------------------------------------------------------------------------------------------------
# Network
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
    code, _, err = run_cli(["app", "--index", str(served["index"])])
    assert code == 0, err
    (kw,) = recorded_launch
    assert kw["server_name"] == "127.0.0.1" and kw["auth"] is None
    assert kw["share"] is False and kw["allowed_paths"] == [] and kw["mcp_server"] is False
    assert kw["max_file_size"] == "100mb"  # the upload cap is on by default, too
    assert "login off" in err


def test_network_non_loopback_without_auth_is_refused(served, recorded_launch, monkeypatch, tmp_path):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        code, _, err = run_cli(["app", "--index", str(served["index"]), "--host", host])
        assert_one_clear_line(code, err, f"refusing to serve on {host} without a login")
    assert recorded_launch == []  # nothing was served
    # with a login from the environment (never a literal in the code) it serves, and passes the login on
    monkeypatch.setenv("REID_SSL_APP_AUTH", "alice:s3cret")
    code, _, err = run_cli(["app", "--index", str(served["index"]), "--host", "0.0.0.0"])
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
    demo = build_demo(GalleryIndex.load(served["index"]), served["embedder"])
    assert demo.analytics_enabled is False
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.share is False and demo.share_url is None
        client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False)
        gallery, _ = client.predict(handle_file(str(queries(served)[0])), 2, api_name="/search")
        assert len(gallery) == 2
        time.sleep(0.5)  # give any background telemetry thread its chance
    finally:
        demo.close()
    assert outside == []


# ---------------------------------------------------------------------------------------------------------
# Files the app serves
# ---------------------------------------------------------------------------------------------------------


def test_files_served_raw_http_traversal_is_refused(served, tmp_path):
    """``../``, absolute, URL-encoded and symlinked paths: the server hands out none of the host's files."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    gallery_file = Path(GalleryIndex.load(served["index"]).items([0])[0]["path"])
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
            status, body = raw_get(served["port"], target)
            assert status in (400, 403, 404, 405), (target, status)
            assert SECRET.encode() not in body and b"root:x:0:0" not in body, target
        # what a search returns IS served: the refusals above are not a dead server
        gallery, _ = search(served, queries(served)[0], 1)
        status, body = raw_get(served["port"], "/gradio_api/file=" + gallery[0]["image"])
        assert status == 200 and b"\r\n\r\n\xff\xd8" in body
    finally:
        link.unlink()


def test_files_served_symlink_in_the_gallery_pointing_outside_is_never_shown(served, tmp_path):
    outside = write_person_image(tmp_path / "private" / "holiday.jpg", 3, np.random.default_rng(1), size=(96, 48))
    # at build time: a symlink inside the gallery folder that leaves it is skipped, not indexed
    gallery = tmp_path / "gallery"
    for i in range(3):
        write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
    (gallery / "sneaky.jpg").symlink_to(outside)
    src = gallery_source(gallery)
    assert len(src.items) == 3 and "outside the gallery folder" in src.skipped[0][1]
    # at serving time: an indexed file later replaced by a symlink to a private image shows a placeholder
    idx = GalleryIndex.load(served["index"])
    victim = Path(idx.items([1])[1]["path"])
    original = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(outside)
    try:
        app = GallerySearchApp(idx, served["embedder"])  # fresh: no thumbnail cached
        shown = app.thumbnail(str(victim), idx)
        assert Image.open(shown).size == (64, 128) != Image.open(outside).size  # the grey placeholder
    finally:
        victim.unlink()
        victim.write_bytes(original)


# ---------------------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------------------


def test_uploads_zip_slip_never_writes_outside_the_target_folder(served, tmp_path):
    good = write_person_image(tmp_path / "good.jpg", 5, np.random.default_rng(0)).read_bytes()
    escape = tmp_path / "escaped.jpg"
    target = tmp_path / "sandbox" / "out"
    cases = {
        "dot-dot": ({"ok.jpg": good, f"{'../' * 12}{str(escape).lstrip('/')}": good}, None, "leaving the archive"),
        "dot-dot-inside": ({"a/../../escaped.jpg": good}, None, "leaving the archive"),
        "backslash": ({"..\\..\\escaped.jpg": good}, None, "leaving the archive"),
        "absolute": ({str(escape): good}, None, "absolute path"),
        "drive": ({"C:\\escaped.jpg": good}, None, "absolute path"),
        "symlink": ({"ok.jpg": good}, "link.jpg", "symbolic link"),
    }
    for name, (members, link, message) in cases.items():
        z = write_zip(tmp_path / f"{name}.zip", members, link)
        with pytest.raises(UploadError, match=message):
            safe_extract_zip(z, target)
        assert not escape.exists() and not target.exists(), name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".jpg") == ["good.jpg"]
    # through the server: refused with the message, nothing written, the index untouched
    generation = current_generation(served["index"])
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="unsafe member"):
        add(served, tmp_path / "dot-dot.zip")
    assert current_generation(served["index"]) == generation and not escape.exists()


def test_uploads_zip_bombs_are_refused_with_a_message(tmp_path):
    good = write_person_image(tmp_path / "good.jpg", 5, np.random.default_rng(0)).read_bytes()
    out = tmp_path / "out"
    # one member that expands 1000:1
    with pytest.raises(UploadError, match="zip bomb"):
        safe_extract_zip(write_zip(tmp_path / "ratio.zip", {"big.jpg": b"\0" * (8 << 20)}), out)
    # more members than one upload may hold (default limit: 2000)
    with pytest.raises(UploadError, match="2001 members"):
        safe_extract_zip(write_zip(tmp_path / "count.zip", {f"{i}.jpg": b"x" for i in range(2001)}), out)
    # a central directory that claims 4 GB in total (checked before a byte is extracted)
    data = bytearray(write_zip(tmp_path / "claims.zip", {"a.jpg": good}).read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = struct.pack("<I", 0xFFFFFFF0)
    (tmp_path / "claims.zip").write_bytes(bytes(data))
    with pytest.raises(UploadError, match="would expand to"):
        safe_extract_zip(tmp_path / "claims.zip", out)
    assert not out.exists()


def test_uploads_decompression_bomb_images_are_refused(served, tmp_path):
    from gradio_client.exceptions import AppError

    bomb = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900 Mpx claimed by a 100-byte file
    assert "too many pixels" in check_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's own guard, set by reid_ssl.images: an error
    with pytest.raises(ImageError, match="too many pixels"):  # what index builds and training open with
        open_rgb(bomb)
    below_pil = png_header_only(tmp_path / "big.png", 7_000, 7_000)  # 49 Mpx: under PIL's limit, over the app's
    assert "refused: 7000 x 7000" in check_image(below_pil)
    generation = current_generation(served["index"])
    with pytest.raises(AppError, match="too many pixels"):
        search(served, bomb)
    with pytest.raises(AppError, match="too many pixels"):
        add(served, bomb)
    assert current_generation(served["index"]) == generation
    assert len(search(served, queries(served)[0], 2)[0]) == 2  # still serving


def test_uploads_size_limit_is_enforced_by_the_server(served):
    import httpx

    url = served["url"] + "gradio_api/upload"
    big = httpx.post(url, files={"files": ("big.jpg", b"\xff\xd8" + b"\0" * (1536 << 10), "image/jpeg")})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(url, files={"files": ("small.jpg", b"\xff\xd8" + b"\0" * 1024, "image/jpeg")})
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("kind", "message"),
    [("text", "not an image"), ("truncated", "decode"), ("empty", "empty")],
)
def test_uploads_non_image_or_truncated_image_gives_a_clear_message(served, tmp_path, kind, message):
    from gradio_client.exceptions import AppError

    good = write_person_image(tmp_path / "good.jpg", 1, np.random.default_rng(0), size=(128, 64)).read_bytes()
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes({"text": b"just some text", "truncated": good[:300], "empty": b""}[kind])
    generation = current_generation(served["index"])
    with pytest.raises(AppError, match=message):
        search(served, path)
    with pytest.raises(AppError, match=message):
        add(served, path)
    assert current_generation(served["index"]) == generation
    assert len(search(served, queries(served)[0], 2)[0]) == 2


# ---------------------------------------------------------------------------------------------------------
# Untrusted checkpoints and indexes
# ---------------------------------------------------------------------------------------------------------


def _sources() -> list[Path]:
    return sorted([*REPO.glob("reid_ssl/**/*.py"), *REPO.glob("app/**/*.py")])


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_untrusted_every_loader_is_safe_by_construction():
    """Every torch.load has weights_only=True, every np.load allow_pickle=False; nothing else unpickles."""
    found = {"torch.load": 0, "np.load": 0}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                bad = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}
                assert not bad & {n.split(".")[0] for n in names}, f"{where}: imports an unpickler"
            if not isinstance(node, ast.Call):
                continue
            name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                found[name] += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if name in ("np.load", "numpy.load"):
                found["np.load"] += 1
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load"), where
            assert name not in ("eval", "exec"), where
            if "shell" in kw:
                assert isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False, where
    assert found["torch.load"] >= 1 and found["np.load"] >= 4, found  # the scan does see the (one) loaders


def _evil_index(tmp: Path, what: str, marker: Path) -> Path:
    folder = tmp / "idx"
    small_index(folder)
    gen = folder / "gen-00000001"
    if what == "manifest":
        (gen / "manifest.json").write_bytes(evil("pickle", marker))
    else:
        (gen / what).write_bytes(evil("npy", marker))
        manifest = json.loads((gen / "manifest.json").read_text())
        manifest["files"][what] = (gen / what).stat().st_size  # sizes match: only the format can refuse it
        (gen / "manifest.json").write_text(json.dumps(manifest))
    return folder


UNTRUSTED_FILES = [
    "checkpoint-pickle",
    "checkpoint-torch-zip",
    "cli-eval-checkpoint",
    "cli-index-build-checkpoint",
    "cli-app-checkpoint",
    "cli-train-resume",
    "cli-train-init",
    "index-ids.npy",
    "index-vectors.npy",
    "index-manifest",
    "index-build-chunk",
    "eval-feature-cache",
]


@pytest.mark.parametrize("where", UNTRUSTED_FILES)
def test_untrusted_pickle_that_would_create_a_file_is_refused(tmp_path, served, where):
    npy = where.startswith(("index-", "eval-")) and where != "index-manifest"
    kind = "torch" if where == "checkpoint-torch-zip" else "npy" if npy else "pickle"
    assert_live(kind, tmp_path)
    marker = tmp_path / "created-by-the-pickle"
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(evil(kind, marker))
    images = served["tree"] / "bounding_box_train"
    if where.startswith("checkpoint"):
        with pytest.raises(CheckpointError, match="safe loader refused"):
            load_embedder(ckpt)
    elif where.startswith("cli-"):
        argv = {
            "cli-eval-checkpoint": ["eval", "--checkpoint", str(ckpt), "--dataset", "market-layout"],
            "cli-index-build-checkpoint": ["index", "build", "--checkpoint", str(ckpt), "--images", str(images)],
            "cli-app-checkpoint": ["app", "--index", str(served["index"]), "--checkpoint", str(ckpt)],
            "cli-train-resume": ["train", "-c", SMOKE, f"data.root={images}", "--resume", str(ckpt)],
            "cli-train-init": ["train", "-c", SMOKE, f"data.root={images}", f"model.init={ckpt}"],
        }[where]
        if where == "cli-eval-checkpoint":
            argv += ["--root", str(served["tree"])]
        if where == "cli-index-build-checkpoint":
            argv += ["--out", str(tmp_path / "out")]
        if where.startswith("cli-train"):
            argv += [f"train.out_dir={tmp_path / 'run'}", "--json"]
        code, _, err = run_cli(argv)
        assert_one_clear_line(code, err, str(ckpt))
        assert "weights_only=False" not in err  # never the advice to load it unsafely
    elif where.startswith("index-") and where != "index-build-chunk":
        folder = _evil_index(tmp_path, where.removeprefix("index-"), marker)
        with pytest.raises(IndexFormatError):
            GalleryIndex.load(folder)
        code, _, err = run_cli(["index", "info", "--index", str(folder)])
        assert_one_clear_line(code, err, str(folder))
    elif where == "index-build-chunk":
        gallery = tmp_path / "g"
        for i in range(6):
            write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
        src, opt = gallery_source(gallery), BuildOptions(chunk_size=3, calibrate=False)
        with pytest.raises(KeyboardInterrupt):  # leave an unfinished build with its plan

            class Dies(FakeEmbedder):
                def embed_images(self, *a, **k):
                    raise KeyboardInterrupt

            build_index(Dies(), src, tmp_path / "idx", opt)
        (tmp_path / "idx" / ".build" / "chunk-000000.npz").write_bytes(evil("npy", marker))
        res = build_index(FakeEmbedder(), src, tmp_path / "idx", opt)
        assert res["n_indexed"] == 6 and res["embedded_chunks"] == 2  # the planted chunk was redone, not loaded
    else:  # eval's feature cache: a planted .npy is ignored and recomputed
        from reid_ssl.eval import features as evaluate

        paths = [str(p) for p in sorted(images.iterdir())[:4]]
        fake = FakeEmbedder()
        key = evaluate._list_key(fake.fingerprint, paths)
        cache = tmp_path / "features"
        cache.mkdir()
        (cache / f"features-{key[:20]}.npy").write_bytes(evil("npy", marker))
        meta = {"key": key, "ok": [0, 1, 2, 3], "failures": []}
        (cache / f"features-{key[:20]}.json").write_text(json.dumps(meta))
        feats, ok, _, hit = evaluate.embed_items(fake, paths, cache_dir=cache)
        assert not hit and ok == [0, 1, 2, 3] and feats.dtype == np.float32
    assert not marker.exists()


def test_untrusted_index_metadata_is_data_never_pickle(tmp_path):
    folder = tmp_path / "idx"
    gallery = tmp_path / "g"
    for i in range(6):
        write_person_image(gallery / f"{i}.jpg", i, np.random.default_rng(i))
    build_index(FakeEmbedder(), gallery_source(gallery), folder, BuildOptions(chunk_size=3, calibrate=False))
    (folder / ".build").mkdir()  # and an unfinished build's files
    index_mod._write_chunk(index_mod._chunk_path(folder / ".build", 0), np.ones((2, 16)), [0, 1], [(2, "bad")])
    seen = set()
    for path in (p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not data.startswith(b"\x80"), f"{path} looks like a pickle"
        kind = path.suffix or path.name
        seen.add(kind)
        if kind == ".json":
            json.loads(data)
        elif kind == ".npy":
            np.load(path, allow_pickle=False)
        elif kind == ".npz":
            with np.load(path, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif kind == ".sqlite":
            assert data.startswith(b"SQLite format 3\x00")
        elif kind == ".faiss":
            import faiss

            faiss.read_index(str(path))
        else:
            assert kind in ("CURRENT", ".lock") and data.decode().strip(), path
    assert {".json", ".npy", ".npz", ".sqlite", ".faiss", "CURRENT"} <= seen


def test_untrusted_wrong_format_or_mismatched_hash_gives_a_clear_error(tmp_path, served):
    good = load_checkpoint(served["checkpoint"])
    payload = {k: v for k, v in good.items() if k not in ("format", "format_version", "reid_ssl_version")}
    cases = {}
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    cases["other.pt"] = "not a reid_ssl checkpoint"
    (tmp_path / "text.pt").write_text("hello")
    cases["text.pt"] = "not a loadable reid_ssl checkpoint"
    full = {"format": "reid_ssl.checkpoint", "format_version": 99, **payload}
    buf = io.BytesIO()
    torch.save(full, buf)
    (tmp_path / "newer.pt").write_bytes(buf.getvalue())
    cases["newer.pt"] = "newer than this"
    tampered = {**payload, "backbone": {**payload["backbone"], "state_dict": dict(payload["backbone"]["state_dict"])}}
    tampered["backbone"]["state_dict"]["conv1.weight"] = tampered["backbone"]["state_dict"]["conv1.weight"] + 1
    save_checkpoint(tmp_path / "tampered.pt", tampered)
    cases["tampered.pt"] = "do not match their recorded sha256"
    save_checkpoint(tmp_path / "huge.pt", {**payload, "preprocess": make_preprocess(1_000_000, 64)})
    cases["huge.pt"] = "preprocess height=1000000"
    data = served["checkpoint"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "not a loadable reid_ssl checkpoint"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    code, _, err = run_cli(["index", "search", "--index", str(served["index"]), "--query", str(queries(served)[0])])
    assert code == 0, err  # the control: the right checkpoint answers
    for name, message in cases.items():
        code, _, err = run_cli(
            ["eval", "--checkpoint", str(tmp_path / name), "--dataset", "market-layout", "--root", str(served["tree"])]
        )
        assert_one_clear_line(code, err, message)
    # indexes: wrong format, newer format, damaged file, another embedder's weights (its sha256 fingerprint)
    folder = tmp_path / "idx"
    small_index(folder)
    manifest_path = folder / "gen-00000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for change, message in [
        ({"format": "something.else"}, "not a reid_ssl index"),
        ({"format_version": 99}, "newer than this"),
        ({"files": {**manifest["files"], "ids.npy": 1}}, "the manifest says 1"),
    ]:
        manifest_path.write_text(json.dumps({**manifest, **change}))
        with pytest.raises(IndexFormatError, match=message):
            GalleryIndex.load(folder)
        code, _, err = run_cli(["index", "info", "--index", str(folder)])
        assert_one_clear_line(code, err, message)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EmbedderMismatchError, match="rebuild the index"):
        GalleryIndex.load(folder).check_embedder(FakeEmbedder())
    other = write_checkpoint(tmp_path / "other-weights.pt", seed=3)
    code, _, err = run_cli(
        [
            "index",
            "search",
            "--index",
            str(served["index"]),
            "--query",
            str(queries(served)[0]),
            "--checkpoint",
            str(other),
        ]
    )
    assert_one_clear_line(code, err, "rebuild the index")


# ---------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from reid_ssl.index import GalleryIndex, GalleryItem
    folder, w = sys.argv[1], int(sys.argv[2])
    for r in range(6):
        with GalleryIndex.open_for_update(folder) as idx:
            x = np.full((3, 8), 0.01, np.float32); x[:, w] = 1.0 + r
            idx.add(x, [GalleryItem(path=f"/w{w}/r{r}/{i}.jpg", pid=w) for i in range(3)])
""")


def test_concurrency_two_processes_adding_cannot_corrupt_the_index(tmp_path):
    folder = tmp_path / "idx"
    GalleryIndex.create(fake_info(8), "flat").save(folder)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(w)], env=ENV) for w in (2, 5)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    idx = assert_consistent(folder)
    assert idx.ntotal == 36 and sorted(idx.ids.tolist()) == list(range(36))  # no update lost, no id reused
    meta = idx.items(idx.ids)
    for row, i in zip(idx.vectors, idx.ids, strict=True):  # every vector still belongs to its metadata
        assert int(np.argmax(row)) == meta[int(i)]["pid"]
    assert current_generation(folder) == 13
    # the rule is enforced, not only documented: a writer that skipped the lock cannot save over a newer index
    stale = GalleryIndex.load(folder)
    with GalleryIndex.open_for_update(folder) as fresh:
        fresh.remove([0])
    stale.remove([1])
    with pytest.raises(StaleIndexError, match="another writer saved"):
        stale.save()
    assert GalleryIndex.load(folder).ntotal == 35


SAVER = textwrap.dedent("""
    import sys, time, numpy as np
    from reid_ssl.index import GalleryIndex, GalleryItem
    folder, rounds = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    for r in range(rounds):
        with GalleryIndex.open_for_update(folder) as idx:
            x = rng.standard_normal((500, 32)).astype(np.float32)
            idx.add(x, [GalleryItem(path=f"/{r}/{i}") for i in range(500)])
        time.sleep(0.05)
""")


def test_concurrency_readers_never_see_a_half_written_index(tmp_path):
    folder = tmp_path / "idx"
    small_index(folder, n=500, dim=32)
    writer = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), "12"], env=ENV)
    seen = []
    while writer.poll() is None:
        idx = assert_consistent(folder)  # never a mix of two generations, never a partial file
        seen.append(idx.ntotal)
        assert idx.ntotal % 500 == 0 and idx.generation == idx.ntotal // 500
    assert writer.returncode == 0 and assert_consistent(folder).ntotal == 6500
    assert len(set(seen)) > 2  # the reads really did overlap the writes


def test_concurrency_app_answers_50_searches_while_a_gallery_upload_is_added(served, tmp_path):
    from gradio_client import handle_file

    app = served["app"]
    rng = np.random.default_rng(21)
    zpath = tmp_path / "batch.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in range(12):
            z.write(write_person_image(tmp_path / f"u{n}.jpg", 60 + n, rng), f"0{60 + n}_c3s1_{n:06d}_00.jpg")

    # Instrument the app: when each search finished, and when the upload held the index (made to take 3 s).
    finished: list[float] = []
    window: list[float] = []
    real_search, real_add, real_embedder = app._search_feature, app._add_checked, app.embedder

    class SlowBatches:
        def __getattr__(self, name):
            return getattr(real_embedder, name)

        def embed_images(self, *a, **k):
            time.sleep(3.0)
            return real_embedder.embed_images(*a, **k)

    def timed_search(*a, **k):
        out = real_search(*a, **k)
        finished.append(time.monotonic())
        return out

    def timed_add(*a, **k):
        window.append(time.monotonic())
        try:
            return real_add(*a, **k)
        finally:
            window.append(time.monotonic())

    app._search_feature, app._add_checked, app.embedder = timed_search, timed_add, SlowBatches()
    try:
        q = queries(served)[3]
        before = [i["caption"] for i in search(served, q, 3)[0]]
        finished.clear()
        upload = served["client"].submit([handle_file(str(zpath))], api_name="/add")
        deadline = time.monotonic() + 60
        while not window and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs = [served["client"].submit(handle_file(str(q)), 3, api_name="/search") for _ in range(50)]
        results = [job.result(timeout=300) for job in jobs]
        assert "Added **12** images" in upload.result(timeout=300)[0]
    finally:
        app._search_feature, app._add_checked, app.embedder = real_search, real_add, real_embedder
    after = [i["caption"] for i in search(served, q, 3)[0]]
    for gallery, _ in results:  # every search answered, with the gallery before or after the upload
        assert [item["caption"] for item in gallery] in (before, after)
    start, end = window
    during = [t for t in finished if start <= t <= end]
    assert len(finished) >= 50 and len(during) >= 3, (len(finished), len(during), end - start)


# ---------------------------------------------------------------------------------------------------------
# Faults: SIGKILL, full disks, corrupt images
# ---------------------------------------------------------------------------------------------------------

DIE_IN_CHECKPOINT_WRITE = textwrap.dedent("""
    import os, signal, sys, tempfile
    import reid_ssl.checkpoint as c
    real, calls = c.atomic_write_bytes, [0]
    def dying_write(path, data):  # the n-th checkpoint write is killed half-way through
        calls[0] += 1
        if calls[0] < int(sys.argv[1]):
            return real(path, data)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    c.atomic_write_bytes = dying_write
    from reid_ssl.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_faults_sigkill_during_training_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(23):
        write_person_image(data / f"{i % 6:04d}" / f"{i}.jpg", i % 6, rng)
    (data / "0003" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # 24 files: 3 batches of 8
    out = tmp_path / "run"
    argv = ["train", "-c", SMOKE, f"data.root={data}", f"train.out_dir={out}", "train.checkpoint_every_steps=2"]
    # checkpoint writes: step 2, end of epoch 1 (step 3), step 4 <- killed in the middle of writing it
    killed = subprocess.run(
        [sys.executable, "-c", DIE_IN_CHECKPOINT_WRITE, "3", *argv, "-q"], cwd=REPO, env=ENV, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL
    last_good = load_checkpoint(out / "checkpoint.pt")
    assert last_good["step"] == 3
    code, stdout, err = run_cli([*argv, "--resume", "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 6 and load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert summary["bad_images"] == 1  # the corrupt image was reported and skipped, not fatal
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [4, 5, 6]


DIE_IN_CHUNK_WRITE = FAKE_EMBEDDER + textwrap.dedent("""
    import os, signal, sys, tempfile
    from pathlib import Path
    import reid_ssl.index.gallery as m
    real = m.atomic_write_bytes
    def dying_write(path, data):  # killed half-way through writing the third chunk
        if Path(path).name == "chunk-000002.npz":
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    m.atomic_write_bytes = dying_write
    options = m.BuildOptions(chunk_size=3, calibrate=False)
    m.build_index(FakeEmbedder(), m.gallery_source(sys.argv[1]), sys.argv[2], options)
""")


def test_faults_sigkill_during_index_build_leaves_no_index_and_resumes(tmp_path):
    gallery = tmp_path / "g"
    for i in range(12):
        write_person_image(gallery / f"{i:02d}.jpg", i, np.random.default_rng(i))
    (gallery / "05b.jpg").write_bytes(b"corrupt in the middle")
    out = tmp_path / "idx"
    killed = subprocess.run([sys.executable, "-c", DIE_IN_CHUNK_WRITE, str(gallery), str(out)], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "CURRENT").exists()  # nothing half-built was published
    assert sorted(p.name for p in (out / ".build").glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    res = build_index(FakeEmbedder(), gallery_source(gallery), out, BuildOptions(chunk_size=3, calibrate=False))
    assert res["resumed_chunks"] == 2 and res["embedded_chunks"] == 3 and res["n_indexed"] == 12
    assert res["n_failed"] == 1 and "05b.jpg" in res["failures"][0][0]  # reported, not fatal
    assert_consistent(out)
    assert not (out / ".build").exists()


DIE_IN_ADD = textwrap.dedent("""
    import os, signal, sys, numpy as np
    from reid_ssl.index import gallery as m
    folder, where = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "mid-write":  # half of the new generation's vectors.npy on disk
        real = m._save_npy
        def half(path, array):
            if path.name == "vectors.npy":
                with open(path, "wb") as f:
                    f.write(b"\\x93NUMPY" + b"\\0" * 64)
                die()
            real(path, array)
        m._save_npy = half
    elif where == "before-commit":  # the new generation complete and renamed, CURRENT not replaced yet
        m.atomic_write_bytes = die
    else:  # "before-cleanup": CURRENT replaced, the old generations not yet collected
        calls, real_gc = [0], m.GalleryIndex._collect_garbage
        def gc(folder, keep):
            calls[0] += 1
            if calls[0] == 2:
                die()
            real_gc(folder, keep)
        m.GalleryIndex._collect_garbage = staticmethod(gc)
    with m.GalleryIndex.open_for_update(folder) as idx:
        x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
        idx.add(x, [m.GalleryItem(path=f"/new/{i}.jpg") for i in range(5)])
""")


@pytest.mark.parametrize("where", ["mid-write", "before-commit", "before-cleanup"])
def test_faults_sigkill_during_gallery_add_keeps_the_index_and_the_add_can_be_redone(tmp_path, where):
    folder = tmp_path / "idx"
    small_index(folder)
    killed = subprocess.run([sys.executable, "-c", DIE_IN_ADD, str(folder), where], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    idx = assert_consistent(folder)
    committed = where == "before-cleanup"
    assert idx.ntotal == (13 if committed else 8) and idx.generation == (2 if committed else 1)
    with GalleryIndex.open_for_update(folder, timeout=5) as again:  # the dead writer left no stale lock
        if not committed:
            again.add(np.ones((5, 8), np.float32), [GalleryItem(path=f"/new/{i}.jpg") for i in range(5)])
        again.remove([0])
    final = assert_consistent(folder)
    assert final.ntotal == 12
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in ("CURRENT", ".lock"))
    assert leftovers == [f"gen-{final.generation - 1:08d}", f"gen-{final.generation:08d}"]  # junk collected


def _written_error(e: pytest.ExceptionInfo, what: str) -> None:
    text = str(e.value)
    assert what in text and "unchanged" in text and ("No space left" in text or "File too large" in text), text


def test_faults_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(small_disk):
    path = small_disk.folder / "run" / "checkpoint.pt"
    old = {"backbone": backbone_block("resnet18", 4, {"w": torch.zeros(4)}), "preprocess": make_preprocess(8, 4)}
    save_checkpoint(path, {**old, "config": {}, "step": 1})
    new = {"backbone": backbone_block("resnet18", 4, {"w": torch.ones(1 << 20)}), "preprocess": make_preprocess(8, 4)}
    with small_disk.full(), pytest.raises(OSError) as e:
        save_checkpoint(path, {**new, "config": {}, "step": 2})
    _written_error(e, f"could not write {path}")
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_faults_full_disk_during_index_save_keeps_the_previous_index(small_disk, served):
    folder = small_disk.folder / "idx"
    idx = small_index(folder)
    idx.add(np.ones((8000, 8), np.float32), [GalleryItem(path=f"/big/{i}") for i in range(8000)])
    with small_disk.full(), pytest.raises(OSError) as e:
        idx.save()
    _written_error(e, f"could not save the index to {folder}")
    assert "generation 1 is still the published one" in str(e.value)
    assert assert_consistent(folder).ntotal == 8
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "CURRENT", "gen-00000001"]
    idx.save()  # the same object saves once there is room again
    assert assert_consistent(folder).ntotal == 8008
    # the CLI says it in one line, and the index stays as it was
    src = gallery_source(served["tree"] / "query")
    real = build_index(served["embedder"], src, small_disk.folder / "real", checkpoint=served["checkpoint"])
    assert real["n_indexed"] == 5
    img = write_person_image(small_disk.folder / "new" / "0099_c1s1_000001_00.jpg", 99, np.random.default_rng(9))
    with small_disk.full(leave=4096):
        code, _, err = run_cli(["index", "add", str(img), "--index", str(small_disk.folder / "real")])
    assert_one_clear_line(code, err, "could not save the index")
    assert GalleryIndex.load(small_disk.folder / "real").ntotal == 5


def test_faults_full_disk_during_gallery_add_in_the_app(small_disk, served, tmp_path):
    embedder = served["embedder"]
    folder = small_disk.folder / "gallery-index"
    images = [write_person_image(tmp_path / f"{i}.jpg", i, np.random.default_rng(i)) for i in range(6)]
    idx = GalleryIndex.create(embedder, "flat")
    idx.add(embedder.embed_images(images[:3]).features, [GalleryItem(path=str(p)) for p in images[:3]])
    idx.save(folder)
    app = GallerySearchApp(GalleryIndex.load(folder), embedder)
    with small_disk.full(leave=4096), pytest.raises(ReidSslError, match="the gallery is unchanged"):
        app.add_files([str(p) for p in images[3:]])
    assert assert_consistent(folder).ntotal == 3 and current_generation(folder) == 1
    assert list((folder / "uploads").glob("*")) == []  # the copied upload was removed again
    status, _ = app.add_files([str(p) for p in images[3:]])  # and works once there is room
    assert "Added **3** images" in status and assert_consistent(folder).ntotal == 6


def test_faults_corrupt_image_in_the_middle_of_a_dataset_is_reported_not_fatal(tmp_path, served):
    """Index builds and training: see the kill tests above (a corrupt file sits in their data). Here: eval."""
    from reid_ssl.eval.features import embed_items

    paths = [str(p) for p in sorted((served["tree"] / "query").iterdir())]
    bad = tmp_path / "0013_c1s1_000000_00.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    feats, ok, failures, _ = embed_items(served["embedder"], [*paths[:2], str(bad), *paths[2:]])
    assert ok == [0, 1, 3, 4, 5] and len(feats) == 5
    assert failures[0][0] == 2 and str(bad) in failures[0][1]


# ---------------------------------------------------------------------------------------------------------
# Input validation at every CLI boundary
# ---------------------------------------------------------------------------------------------------------

# (argv with {placeholders}, what the one line must say)
BAD_INPUT = [
    # train: unknown names, wrong layouts, missing paths, absurd sizes
    (["train", "data.source=nope"], "data.source='nope' is not one of"),
    (["train", "-c", SMOKE, "data.root={missing}"], "expected an image folder at"),
    (["train", "-c", SMOKE, "data.root={empty}"], "no images found"),
    (["train", "-c", SMOKE, "data.root={tree}", "train.batch_size=-4"], "batch_size >= 2"),
    (["train", "-c", SMOKE, "data.root={tree}/query", "train.batch_size=100000000"], "fewer than one batch"),
    (["train", "-c", "{missing}.yaml"], "config file not found"),
    (["train", "--resume", "{missing}.pt"], "no checkpoint at"),
    (["train", "-c", SMOKE, "model.backbone=resnet9000"], "is not one of"),
    # eval / finetune / export
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["eval", "--checkpoint", "{missing}.pt"], "checkpoint not found"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--root", "{missing}"], "not found"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--root", "{empty}"], "expected query/"),
    (["eval", "--checkpoint", "{ckpt}", "--batch-size", "-3"], "--batch-size"),
    (["eval", "--checkpoint", "{ckpt}", "--batch-size", "1000000"], "--batch-size"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "fashion-mnist", "--k", "0"], "--k"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "nope"], "invalid choice: 'nope'"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--train-batch-size", "0"], "batch-size"),
    (["export", "--checkpoint", "{missing}.pt", "--to", "onnx", "--out", "{empty}/x.onnx"], "checkpoint not found"),
    (["export", "--checkpoint", "{ckpt}", "--to", "pickle", "--out", "{empty}/x"], "invalid choice: 'pickle'"),
    # index
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "nope_dataset", "--out", "{out}"], "no such image"),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "pets09", "--data-root", "{empty}", "--out", "{out}"],
        "pets09 gallery not found",
    ),
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "{empty}", "--out", "{out}"], "no image files"),
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "{file}", "--out", "{out}"], "must be a folder"),
    (["index", "build", "--checkpoint", "{missing}.pt", "--images", "{tree}", "--out", "{out}"], "not found"),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--batch-size", "0"],
        "--batch-size",
    ),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--batch-size", "9999999"],
        "--batch-size",
    ),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--workers", "-2"],
        "--workers",
    ),
    (["index", "add", "{missing}.jpg", "--index", "{index}"], "no such file or folder"),
    (["index", "add", "{query}", "--index", "{missing}"], "index not found"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "0"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "-5"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "100000"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{missing}.jpg"], "query image not found"),
    (["index", "search", "--index", "{index}", "--query", "{file}"], "not an image file"),
    (["index", "info", "--index", "{missing}"], "index not found"),
    (["index", "info", "--index", "{empty}"], "no reid_ssl index"),
    (["index", "info", "--index", "{file}"], "is a file, not an index folder"),
    (["index", "remove", "--index", "{missing}", "--ids", "1"], "index not found"),
    (["index", "remove", "--index", "{index}"], "nothing to remove"),
    (["index", "calibrate", "--index", "{index}", "--queries", "{missing}"], "query folder not found"),
    # app, k-rule, prepare
    (["app", "--index", "{missing}"], "no gallery index at"),
    (["app", "--index", "{index}", "--port", "0"], "--port"),
    (["app", "--index", "{index}", "--port", "70000"], "--port"),
    (["app", "--index", "{index}", "--max-upload-mb", "-1"], "--max-upload-mb"),
    (["app", "--index", "{index}", "--auth-file", "{missing}"], "auth file not found"),
    (["app", "--index", "{index}", "--checkpoint", "{missing}.pt"], "checkpoint not found"),
    (["k-rule", "--negatives", "-1", "--classes", "5"], "must be >= 1"),
    (["prepare", "nope"], "invalid choice: 'nope'"),
    (["prepare", "pets09", "--video", "{missing}.avi"], "not found"),
    (["nope"], "invalid choice: 'nope'"),
]


@pytest.fixture(scope="module")
def bad_input_places(served, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not an image, not a folder")
    return {
        "ckpt": str(served["checkpoint"]),
        "index": str(served["index"]),
        "tree": str(served["tree"]),
        "query": str(queries(served)[0]),
        "missing": str(root / "missing"),
        "empty": str(root / "empty"),
        "file": str(root / "file.txt"),
        "out": str(root / "out"),
    }


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_input_validation_every_cli_subcommand_gives_one_clear_line(bad_input_places, argv, message, monkeypatch):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    code, _, err = run_cli([a.format(**bad_input_places) for a in argv])
    assert_one_clear_line(code, err, message)
    assert not Path(bad_input_places["missing"]).exists()  # a refused command creates nothing
