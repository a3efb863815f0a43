"""A real S3-compatible server on 127.0.0.1 for tests and benches: moto's server mode.

    server = S3Server().start()
    server.make_bucket("cogfun-test")
    url = f"s3://cogfun-test/latents.zarr"
    options = server.options()            # storage options: endpoint, fake credentials, http
    env = server.env()                    # the same as AWS_* variables, for child processes
    server.stop(); server.start()         # the same port and the same objects: a restart
    server.outage_at(3, "/buckets/", 1.5) # the 3rd such request starts a 1.5 s outage
    server.close()

The server runs in a thread of this process (werkzeug), keeps its objects in this process's memory
and speaks real HTTP, so child processes (a `cogfun precompute` under test) reach it like any S3
endpoint. `stop()` closes the port (requests then fail with connection errors) and `start()` opens
it again with every object still there: a server restart as a client sees it. `outage_at()` does
the same at a chosen request, not at a chosen time: what a test needs when the client under test
reads ahead and caches, so that when it reads next is not known. `requests` lists every request
served (method, path and query). Nothing leaves 127.0.0.1 and no credentials are real.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

from cogfun.testing.runs import free_port

REGION = "us-east-1"
ACCESS_KEY = "cogfun-test-key"
SECRET_KEY = "cogfun-test-secret"


class S3Server:
    """moto's S3 server on 127.0.0.1 (a free port, kept across restarts).

    Without `keep_alive` (the tests' server) every response closes its connection, so `stop()` is
    an outage for every client at once: with keep-alive, connections a client already holds
    would go on being served by their handler threads after the port closed."""

    def __init__(self, port: int = 0, keep_alive: bool = False):
        self.port = port or free_port()
        self.keep_alive = keep_alive
        self._server = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of each request served
        self.outages = 0  # outages `outage_at()` has started
        self._outage: tuple[int, str, float | None] | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request else
        handler = MotoRequestHandler
        if not self.keep_alive:  # a class attribute of its own: werkzeug leaves it as it is
            handler = type(
                "OneRequestHandler", (MotoRequestHandler,), {"protocol_version": "HTTP/1.0"}
            )
        app = self._watch(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", self.port, app, True, request_handler=handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # ready once the port accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """Close the port; the objects stay (in this process) for the next `start()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # new connections are refused from here on
            self._thread.join()
            self._server = None

    def outage_at(self, n: int, match: str = "", seconds: float | None = 1.5) -> None:
        """Arm one outage: the `n`-th request from now whose path holds `match` stops the server
        (the port closed, as `stop()`), and is itself answered 503 once the port is closed; the
        server starts again `seconds` later (None: it stays stopped, for the test to start).
        `outages` counts the outages started; n = 0 disarms."""
        with self._lock:
            self._outage = (n, match, seconds) if n > 0 else None

    def _watch(self, app):
        """`app` (WSGI), recording each request and firing the armed outage."""

        def watched(environ, start_response):
            method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
            if environ.get("QUERY_STRING"):
                path = f"{path}?{environ['QUERY_STRING']}"
            with self._lock:
                self.requests.append((method, path))
                fire, armed = False, self._outage
                if armed is not None and armed[1] in path:
                    n, match, seconds = armed
                    fire = n <= 1
                    self._outage = None if fire else (n - 1, match, seconds)
                    self.outages += fire
            if not fire:
                return app(environ, start_response)
            stopped = threading.Event()
            threading.Thread(target=self._down, args=(stopped, armed[2]), daemon=True).start()
            stopped.wait(30)
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]

        return watched

    def _down(self, stopped: threading.Event, seconds: float | None) -> None:
        self.stop()
        stopped.set()
        if seconds is not None:
            time.sleep(seconds)
            self.start()

    def close(self) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        import boto3

        name = name or f"cogfun-{uuid.uuid4().hex[:12]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=name)
        return name

    def options(self, **extra) -> dict:
        """Storage options that reach this server (`--storage-options` JSON)."""
        return {
            "endpoint": self.endpoint,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            **extra,
        }

    def env(self) -> dict[str, str]:
        """The same as environment variables (what a user on a real cluster sets)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ALLOW_HTTP": "true",
        }


class ServerProcess:
    """The same server in a child process (`python -m cogfun.testing.s3 --port P`): for benches,
    so that serving requests does not take this process's GIL from the loader it measures."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cogfun.testing.s3", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the S3 server process did not start") from None
                time.sleep(0.05)
        self._client = S3Server(self.port)  # names, options and buckets; it serves nothing here

    def make_bucket(self, name: str | None = None) -> str:
        return self._client.make_bucket(name)

    def options(self, **extra) -> dict:
        return self._client.options(**extra)

    def env(self) -> dict[str, str]:
        return self._client.env()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="moto's S3 server on 127.0.0.1 until killed")
    p.add_argument("--port", type=int, required=True)
    S3Server(p.parse_args().port, keep_alive=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
