"""A small but real HTTP key server for tests and local development.

It speaks the protocol of :mod:`bridge.crypto.keyserver` on a real TCP socket (127.0.0.1, a free
port by default)::

    async with KeyServer(token="s3cret") as server:
        key_id = server.add_owner("acme")
        provider = HttpKeyProvider(server.url, token="s3cret")
        ...
        server.fail = True        # every request now gets 503
        server.requests           # number of requests received (any outcome)

As a script, for manual use::

    python tests/keyserver.py --port 8089 --owners a,b [--token T]

Only aiohttp and the standard library are used, so the script runs without the package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import Sequence
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Handler

KEY_SIZE = 32


class KeyServer:
    """In-process aiohttp key server; use as an async context manager."""

    def __init__(self, *, token: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.fail = False  # answer 503 to everything
        self.failing_owners: dict[str, int] = {}  # owner -> an HTTP error status answered for it
        self.forgotten: set[str] = set()  # owners answered 404 unknown_owner (a restart, its store not loaded)
        self.slow_owners: dict[str, float] = {}  # owner -> seconds before answering for it (its KMS hangs)
        self.delay = 0.0  # seconds to wait before answering (makes concurrent requests overlap)
        self.padding = 0  # extra bytes of whitespace in every 200 answer (an oversized response)
        self.requests = 0  # requests received, whatever the outcome
        self.paths: list[str] = []  # raw paths received, in order
        self._owners: dict[str, dict[str, bytes]] = {}
        self._current: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # -- key management (synchronous, usable before or while serving) ----------------------

    def add_owner(self, owner: str) -> str:
        """Create ``owner`` with one fresh key; return its id."""
        if owner in self._owners:
            raise ValueError(f"owner {owner!r} exists")
        self._owners[owner] = {}
        return self.rotate(owner)

    def rotate(self, owner: str) -> str:
        """Add a fresh key for ``owner`` and make it current; old keys stay readable."""
        keys = self._owners[owner]
        key_id = f"k{len(keys) + 1}-{secrets.token_hex(4)}"
        keys[key_id] = secrets.token_bytes(KEY_SIZE)
        self._current[owner] = key_id
        return key_id

    def revoke(self, owner: str, key_id: str) -> None:
        """Forget one key (it must not be the current one)."""
        if self._current[owner] == key_id:
            raise ValueError("cannot revoke the current key; rotate first")
        del self._owners[owner][key_id]

    def secret(self, owner: str, key_id: str) -> bytes:
        return self._owners[owner][key_id]

    def current_id(self, owner: str) -> str:
        return self._current[owner]

    # -- serving ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("KeyServer is not running")
        return self._url

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/owners/{owner}/keys/{key_id}", self._handle_key)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self.port = port
        self._url = f"http://{self.host}:{port}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> KeyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        self.paths.append(request.raw_path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if (slow := self.slow_owners.get(request.match_info.get("owner", ""))) is not None:
            await asyncio.sleep(slow)
        if self.fail:
            return web.json_response({"error": "unavailable"}, status=503)
        if (status := self.failing_owners.get(request.match_info.get("owner", ""))) is not None:
            return web.json_response({"error": "failing for this owner"}, status=status)
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _handle_key(self, request: web.Request) -> web.Response:
        owner = request.match_info["owner"]
        key_id = request.match_info["key_id"]
        keys = self._owners.get(owner)
        if keys is None or owner in self.forgotten:
            return web.json_response({"error": "unknown_owner"}, status=404)
        if key_id == "current":
            key_id = self._current[owner]
        secret = keys.get(key_id)
        if secret is None:
            return web.json_response({"error": "unknown_key"}, status=404)
        body = {"id": key_id, "key": base64.b64encode(secret).decode("ascii")}
        if self.padding:
            return web.Response(text=json.dumps(body) + " " * self.padding, content_type="application/json")
        return web.json_response(body)


async def _serve(port: int, owners: Sequence[str], token: str | None) -> None:
    async with KeyServer(token=token, port=port) as server:
        print(f"key server listening on {server.url}")
        for owner in owners:
            print(f"  owner {owner!r}: current key {server.add_owner(owner)}")
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Development key server (queue-bridge key protocol).")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--owners", default="", help="comma-separated owners to create")
    parser.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'")
    args = parser.parse_args(argv)
    owners = [o.strip() for o in args.owners.split(",") if o.strip()]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, owners, args.token))


if __name__ == "__main__":
    main()
