"""Serving the app safely: offline gradio, the launch settings, refused remote fetches, and who may log in.

* :func:`offline_gradio` is the one way reid_ssl imports gradio: it sets :data:`OFFLINE_ENV` first (no
  telemetry, no share link, no hub), forced rather than defaulted. Nothing happens when this module is
  imported.
* :func:`launch`: no share link, no telemetry, no MCP server, ``allowed_paths`` empty, an upload size cap,
  one job at a time per event, and :class:`RefuseRemoteFetch` in front of gradio.
* Logins: the app binds 127.0.0.1 by default; any other address needs a login (:func:`check_exposure`) from
  ``--auth-file`` or ``$REID_SSL_APP_AUTH`` (:func:`resolve_auth`), never from a literal in the code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from reid_ssl.app.uploads import UploadLimits
from reid_ssl.errors import InputError
from reid_ssl.fileio import require_file

AUTH_ENV = "REID_SSL_APP_AUTH"

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
}

# Let result captions wrap instead of being cut to "0.823 · pid 1…" under narrow thumbnails (the element
# ids are those of reid_ssl.app.ui; gradio 6 takes the CSS at launch).
CSS = """
#results .caption-label, #frame_results .caption-label, #people .caption-label {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
  max-width: 100% !important;
}
"""


def set_offline_env() -> None:
    """Keep gradio offline: the values are forced, not defaults, so a ``GRADIO_ANALYTICS_ENABLED=True`` or
    ``GRADIO_SHARE=True`` left in the environment never turns telemetry or a share link on."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))


def offline_gradio() -> ModuleType:
    """``gradio``, imported right after :func:`set_offline_env` (gradio reads some variables at import)."""
    set_offline_env()
    import gradio

    return gradio


class RefuseRemoteFetch:
    """ASGI middleware: no client can make the server fetch a URL.

    Refused with 403: the routes ``/file=<url>`` and ``/proxy=`` (gradio serves ``/gradio_api/file=http://...``
    by downloading the URL itself), and JSON requests whose file payloads name a remote ``path`` (gradio
    downloads an input ``{"path": "https://...", "meta": {"_type": "gradio.FileData"}}`` before the event
    runs). Uploads reach the app through ``/upload`` only.
    """

    _REMOTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|//)")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            path = scope.get("path", "")
            at = path.find("/file=")
            if "/proxy=" in path or (at >= 0 and self._REMOTE.match(path[at + 6 :])):
                await self._refuse(scope, receive, send)
                return
            if scope.get("method") == "POST" and b"json" in dict(scope.get("headers", [])).get(b"content-type", b""):
                messages, body = await self._read_body(receive)
                if self.names_remote_file(body):
                    await self._refuse(scope, receive, send)
                    return
                receive = self._replay(messages, receive)
        await self.app(scope, receive, send)

    @classmethod
    def names_remote_file(cls, body: bytes) -> bool:
        """Whether a JSON body holds a dict whose ``path`` is a URL (any ``scheme:`` or ``//host``)."""
        try:
            data = json.loads(body or b"null")
        except (ValueError, RecursionError):
            return False  # not JSON: gradio refuses it itself
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                path = item.get("path")
                if isinstance(path, str) and cls._REMOTE.match(path.strip()):
                    return True
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return False

    @staticmethod
    async def _read_body(receive: Any) -> tuple[list[dict], bytes]:
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        return messages, b"".join(chunks)

    @staticmethod
    def _replay(messages: list[dict], receive: Any) -> Any:
        pending = list(messages)

        async def replayed() -> dict:
            return pending.pop(0) if pending else await receive()

        return replayed

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import PlainTextResponse

        await PlainTextResponse("This app serves no remote files.", status_code=403)(scope, receive, send)


def launch(
    demo: Any,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    auth: list[tuple[str, str]] | None = None,
    limits: UploadLimits | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Serve ``demo`` with the safe settings: no share link, no telemetry, upload size cap, no remote fetches."""
    offline_gradio()
    from starlette.middleware import Middleware

    limits = limits or UploadLimits()
    demo.queue(default_concurrency_limit=1, max_size=256)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        auth=auth,
        show_error=True,
        quiet=quiet,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=f"{limits.max_upload_mb}mb",
        allowed_paths=[],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        pwa=False,
        footer_links=["api"],
        css=CSS,
        app_kwargs={"middleware": [Middleware(RefuseRemoteFetch)]},
    )


# ---------------------------------------------------------------------------------------------------------
# Who may connect
# ---------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_auth(text: str, origin: str) -> list[tuple[str, str]]:
    """``user:password`` entries, one per line or comma; blank lines and ``#`` comments are ignored."""
    pairs = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise InputError(f"{origin}: expected user:password entries, got one without a user or a password")
        pairs.append((user, password))
    if not pairs:
        raise InputError(f"{origin}: no user:password entry")
    return pairs


def resolve_auth(auth_file: str | None, environ: Mapping[str, str] | None = None) -> tuple[list | None, list[str]]:
    """(credentials or None, warnings) from --auth-file or $REID_SSL_APP_AUTH (the file wins)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    warnings = []
    if auth_file:
        path = require_file(auth_file, "auth file")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{path} is readable by other users: chmod 600 {path}")
        return parse_auth(path.read_text(), str(path)), warnings
    if env.get(AUTH_ENV):
        return parse_auth(env[AUTH_ENV], f"${AUTH_ENV}"), warnings
    return None, warnings


def check_exposure(host: str, auth: list | None, insecure: bool) -> list[str]:
    """Refuse (InputError) a non-loopback address without a login, unless ``insecure``; returns warnings."""
    if is_loopback(host) or auth:
        return []
    if not insecure:
        raise InputError(
            f"refusing to serve on {host} without a login: anyone who reaches it could add images to "
            f"the gallery. Set {AUTH_ENV}=user:password or pass --auth-file FILE (or "
            "--insecure-no-auth to accept the risk)"
        )
    return [
        f"WARNING: serving on {host} WITHOUT a login (--insecure-no-auth): anyone who can reach this address "
        "can search and add images"
    ]
