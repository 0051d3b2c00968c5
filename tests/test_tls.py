"""TLS listeners (`[server] tls_bind`, `[tls]`) against real servers, with
certificates from a throwaway CA (trustme): HTTPS beside plain HTTP, SSE and
NDJSON streams, wss://, the OpenAI SDK, client certificates, TLS 1.2 at
least, ALPN, session resumption across workers, a certificate swap on HUP,
and bad certificates refused by check, start and reload with the file named."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import trustme
from server import ROOT, Server, read_all, to_toml, wait_for
from websockets.sync.client import connect as ws_connect

from neurohttp import config, tlsconfig

HOST = "127.0.0.1"
MODELS = {"echo": {"provider": "echo"},
          "paced": {"provider": "echo", "token_delay_ms": 5, "response": "one two three four"},
          "slow": {"provider": "echo", "token_delay_ms": 100, "repeat": True}}
_TLS_RE = re.compile(r"listening on .*?(\S+):(\d+) \(tls\)")


# ------------------------------------------------------------------ certificates
class PKI:
    """A CA and a server certificate for 127.0.0.1/localhost, written to files."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = d / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file, self.key_file = d / "cert.pem", d / "key.pem"
        self.issue()

    def issue(self, **kw: Any) -> trustme.LeafCert:
        """A new server certificate (and key) in cert_file/key_file."""
        leaf = self.ca.issue_cert(HOST, "localhost", **kw)
        self.cert_file.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key_file))
        self.leaf = leaf
        return leaf

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())

    def client_context(self, **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx

    def tls_table(self, **extra: str) -> dict[str, str]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file), **extra}


class TlsServer(Server):
    """A Server with a plain listener (for the harness) and a TLS one, both on
    free ports; the TLS port is read from the master's log."""

    def __init__(self, tmp: Path, pki: PKI, workers: int = 2, tls: dict[str, str] | None = None,
                 server: dict[str, Any] | None = None, sections: dict[str, Any] | None = None,
                 **kw: Any) -> None:
        cfg = {"server": {"tls_bind": [f"{HOST}:0"], **(server or {})},
               "tls": tls if tls is not None else pki.tls_table(), "models": MODELS,
               **(sections or {})}
        super().__init__(tmp, workers=workers, config=cfg, **kw)
        self.pki = pki

    @property
    def tls_port(self) -> int:
        m = _TLS_RE.search(self.log())
        assert m, self.log()
        return int(m.group(2))

    def tls_socket(self, ctx: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None,
                   timeout: float = 10.0) -> ssl.SSLSocket:
        ctx = ctx or self.pki.client_context()
        raw = socket.create_connection((HOST, self.tls_port), timeout=timeout)
        try:
            return ctx.wrap_socket(raw, server_hostname=HOST, session=session)
        except BaseException:
            raw.close()
            raise

    def https(self, ctx: ssl.SSLContext | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(HOST, self.tls_port, timeout=10,
                                           context=ctx or self.pki.client_context())

    def serving_worker(self, sock: socket.socket) -> int:
        """The pid of the worker holding the server end of `sock`."""
        me = sock.getsockname()
        for pid in self.worker_pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.raddr and (c.raddr.ip, c.raddr.port) == me for c in conns):
                return pid
        raise AssertionError(f"no worker holds the connection from {me}")


def get(sock: ssl.SSLSocket, path: str = "/health") -> tuple[int, bytes]:
    """One keep-alive GET on an open TLS socket."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, r.read()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, pki):
    s = TlsServer(tmp_path_factory.mktemp("tls"), pki, server={"header_timeout": 1.0},
                  sections={"log": {"access_log": "access.log"}})
    s.start()
    yield s
    try:
        assert s.stop() == 0, s.log()
    finally:
        s.kill()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


# ------------------------------------------------------------------ the API over https
def test_https_beside_plain_http(srv):
    conn = srv.https()
    for path in ("/health", "/stats", "/health"):   # one keep-alive connection
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
    assert json.loads(body)["status"] == "ok"
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert conn.sock.getpeercert(binary_form=True) == srv.pki.der
    conn.request("POST", "/v1/chat", body=json.dumps({"prompt": "Hello"}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["response"] == "Hello, AI world!"
    conn.close()
    # the plain listener still speaks plain HTTP
    assert srv.get_json("/health")["status"] == "ok"
    # the client address of a TLS request is the peer's, as on a plain connection
    def logged() -> list[dict[str, Any]]:
        lines = (srv.tmp / "access.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["path"] == "/v1/chat"]
    entries = wait_for(logged, 5, what="the access log line")
    assert entries[0]["client"] == HOST and entries[0]["status"] == 200


def test_sse_and_ndjson_streams_over_https(srv):
    ctx = srv.pki.client_context()
    base = f"https://{HOST}:{srv.tls_port}"
    with httpx.Client(verify=ctx, timeout=15) as c:
        with c.stream("POST", base + "/v1/chat/completions",
                      json={"model": "paced", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                       for d in data[:-1])
        assert text == "one two three four"
        with c.stream("POST", base + "/v1/chat",
                      json={"prompt": "x", "model": "paced", "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert "".join(m["token"] for m in lines if "token" in m) == "one two three four"
        assert lines[-1]["done"] is True


def test_websocket_chat_over_wss(srv):
    url = f"wss://{HOST}:{srv.tls_port}/v1/ws"
    with ws_connect(url, ssl=srv.pki.client_context(), open_timeout=10) as ws:
        for _ in range(2):   # two prompts on one connection
            ws.send(json.dumps({"prompt": "Hello", "model": "paced"}))
            msgs: list[dict[str, Any]] = []
            while not msgs or not ("done" in msgs[-1] or "error" in msgs[-1]):
                msgs.append(json.loads(ws.recv(timeout=15)))
            assert "".join(m["token"] for m in msgs[:-1]) == "one two three four"
            assert msgs[-1]["done"] is True


def test_openai_sdk_over_https(srv):
    http_client = openai.DefaultHttpxClient(verify=srv.pki.client_context())
    client = openai.OpenAI(base_url=f"https://{HOST}:{srv.tls_port}/v1", api_key="unused",
                           max_retries=0, timeout=30, http_client=http_client)
    try:
        r = client.chat.completions.create(model="echo",
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello, AI world!"
        stream = client.chat.completions.create(
            model="paced", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            "one two three four"
        assert [m.id for m in client.models.list()][:1] == ["echo"]
    finally:
        client.close()


# ------------------------------------------------------------------ protocol choices
def test_alpn_is_http11_and_an_h2_only_client_gets_no_h2(srv):
    ctx = srv.pki.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with srv.tls_socket(ctx) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert get(s)[0] == 200
    # A client that offers only h2 gets no protocol agreed (Python's ssl cannot
    # send the no_application_protocol alert; see docs/SECURITY.md, TLS), and if it speaks
    # HTTP/2 anyway its preface is answered 505 and the connection closed.
    ctx = srv.pki.client_context()
    ctx.set_alpn_protocols(["h2"])
    with srv.tls_socket(ctx) as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = read_all(s, 10)
    assert answer.startswith(b"HTTP/1.1 505 "), answer[:100]
    assert srv.get_json("/health")["workers"] == 2


def _speaks_tls11() -> ssl.SSLContext | None:
    """A client context limited to TLS 1.1, if this OpenSSL can still make a
    TLS 1.1 handshake at all: proved against a local server that allows it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        try:
            client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
            client.set_ciphers("DEFAULT:@SECLEVEL=0")
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server.minimum_version = ssl.TLSVersion.TLSv1
            server.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            return None
    return client if _handshake_ok(client, server) else None


def _handshake_ok(client: ssl.SSLContext, server: ssl.SSLContext) -> bool:
    pki_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    leaf = trustme.CA().issue_cert(HOST)
    with leaf.private_key_and_cert_chain_pem.tempfile(str(pki_dir)) as path:
        server.load_cert_chain(path)
    lsock = socket.create_server((HOST, 0))
    result: list[str] = []

    def serve() -> None:
        lsock.settimeout(10)
        try:
            conn, _ = lsock.accept()
            with server.wrap_socket(conn, server_side=True) as s:
                result.append(s.version() or "")
        except (OSError, ssl.SSLError):
            pass

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(lsock.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw) as s:
            ok = s.version() == "TLSv1.1"
    except (OSError, ssl.SSLError):
        ok = False
    t.join(15)
    lsock.close()
    return ok


def test_tls_1_1_is_refused_and_1_2_accepted(srv):
    assert tlsconfig.new_server_context().minimum_version == ssl.TLSVersion.TLSv1_2
    old = _speaks_tls11()
    if old is not None:   # this OpenSSL can still make a TLS 1.1 handshake: we refuse it
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with srv.tls_socket(old) as s:
                get(s)
    ctx = srv.pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with srv.tls_socket(ctx) as s:
        assert s.version() == "TLSv1.2"
        assert get(s)[0] == 200
        assert s.compression() is None


def test_session_resumption_across_workers_and_reloads(srv):
    """The workers share one context, made by the master before forking, so a
    ticket issued by one worker resumes on the other; a reload that leaves the
    certificate alone keeps the context (and the tickets)."""
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = srv.pki.client_context(maximum_version=version)
        with srv.tls_socket(ctx) as s:
            assert get(s)[0] == 200   # TLS 1.3 tickets arrive after the handshake
            session = s.session
            first = srv.serving_worker(s)
        assert session is not None
        served: set[int] = set()
        for _ in range(40):
            with srv.tls_socket(ctx, session=session) as s:
                assert s.session_reused, (version, len(served))
                served.add(srv.serving_worker(s))
                assert get(s)[0] == 200
            if len(served) == 2 and len(served - {first}) >= 1:
                break
        assert served == set(srv.worker_pids()), (served, first)
    old_pids = set(srv.worker_pids())
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: not set(srv.worker_pids()) & old_pids
             and len(srv.worker_pids()) == 2 and srv.ready_workers() == 2, 20,
             what="the new generation")
    with srv.tls_socket(ctx, session=session) as s:
        assert s.session_reused
        assert get(s)[0] == 200


def test_plain_http_and_silence_on_the_tls_port_are_closed(srv):
    # plain HTTP sent to the TLS port: the handshake fails, the connection closes
    with socket.create_connection((HOST, srv.tls_port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in read_all(s, 10)
    # a client that connects and never finishes the handshake is closed after
    # header_timeout (1 s here), as one that never sends a request head
    t0 = time.monotonic()
    with socket.create_connection((HOST, srv.tls_port), timeout=10) as s:
        s.settimeout(10)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 9
    assert srv.get_json("/health")["workers"] == 2
    assert len(srv.worker_pids()) == 2


# ------------------------------------------------------------------ client certificates
def test_client_certificate_required_when_ca_file_is_set(tmp_path):
    pki = PKI(tmp_path / "pki")
    clients = trustme.CA()
    clients_file = tmp_path / "clients-ca.pem"
    clients.cert_pem.write_to_path(str(clients_file))
    srv = TlsServer(tmp_path / "srv", pki, workers=1,
                    tls=pki.tls_table(ca_file=str(clients_file)))
    srv.start()
    try:
        # no certificate: refused (TLS 1.3 clients learn it at their first read)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with srv.tls_socket() as s:
                status, _ = get(s)
        # a certificate from another CA: refused
        stranger = trustme.CA().issue_cert("client@example.com")
        ctx = pki.client_context()
        stranger.configure_cert(ctx)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with srv.tls_socket(ctx) as s:
                get(s)
        # a certificate from the configured CA: served, over TLS 1.3 and 1.2
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            ctx = pki.client_context(maximum_version=version)
            clients.issue_cert("client@example.com").configure_cert(ctx)
            with srv.tls_socket(ctx) as s:
                assert get(s)[0] == 200
                assert get(s, "/v1/models")[0] == 200
        assert srv.get_json("/health")["workers"] == 1
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()


# ------------------------------------------------------------------ reload
def test_certificate_swap_on_hup(tmp_path):
    pki = PKI(tmp_path / "pki")
    srv = TlsServer(tmp_path / "srv", pki, workers=2, cli_workers=False,
                    server={"workers": 2})
    srv.start()
    try:
        old_der = pki.der
        conn = srv.https()
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and r.read()
        # a stream in flight on a keep-alive connection opened before the HUP
        conn.request("POST", "/v1/chat", body=json.dumps(
            {"prompt": "x", "model": "slow", "stream": True, "max_tokens": 30}),
            headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200
        first = stream.readline()
        assert b"token" in first
        pki.issue()            # a new certificate and key in the same files
        new_der = pki.der
        assert new_der != old_der
        srv.send_signal(signal.SIGHUP)

        def served_cert() -> bytes:
            with srv.tls_socket() as s:
                return s.getpeercert(binary_form=True) or b""
        wait_for(lambda: served_cert() == new_der, 20, what="the new certificate")
        # the old connection finishes its stream, on the old certificate
        lines = [first] + [line for line in iter(stream.readline, b"") if line.strip()]
        done = json.loads(lines[-1])
        assert done["done"] is True and done["finish_reason"] == "length", done
        assert done["usage"]["completion_tokens"] == 30
        assert sum(1 for line in lines if b'"token"' in line) > 10
        assert conn.sock is not None and conn.sock.getpeercert(binary_form=True) == old_der
        conn.close()
        with srv.tls_socket() as s:
            assert get(s)[0] == 200
        assert "reload refused" not in srv.log()
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()


# ------------------------------------------------------------------ bad certificates
def _bad_files(pki: PKI, case: str) -> tuple[dict[str, str], str, str]:
    """Break one file: ([tls] table, the file named, what the error says)."""
    d = pki.dir
    table = pki.tls_table()
    if case == "missing cert":
        table["cert_file"] = str(d / "nope.pem")
        return table, table["cert_file"], "cannot read: No such file or directory"
    if case == "not a certificate":
        (d / "text.pem").write_text("hello\n")
        table["cert_file"] = str(d / "text.pem")
        return table, table["cert_file"], "no PEM certificate"
    if case == "corrupt certificate":
        (d / "corrupt.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n"
                                        "-----END CERTIFICATE-----\n")
        table["cert_file"] = str(d / "corrupt.pem")
        return table, table["cert_file"], "cannot be read"
    if case == "key of another certificate":
        trustme.CA().issue_cert(HOST).private_key_pem.write_to_path(str(d / "other.pem"))
        table["key_file"] = str(d / "other.pem")
        return table, table["key_file"], "does not match the certificate"
    if case == "missing key":
        table["key_file"] = str(d / "nokey.pem")
        return table, table["key_file"], "cannot read"
    if case == "no key at all":
        table["key_file"] = ""
        return table, table["cert_file"], "no PEM private key"
    if case == "encrypted key":
        from cryptography.hazmat.primitives import serialization
        key = serialization.load_pem_private_key(pki.leaf.private_key_pem.bytes(), None)
        (d / "enc.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        table["key_file"] = str(d / "enc.pem")
        return table, table["key_file"], "passphrase"
    if case == "bad ca file":
        (d / "ca-text.pem").write_text("not a CA\n")
        table["ca_file"] = str(d / "ca-text.pem")
        return table, table["ca_file"], "no usable CA certificate"
    raise AssertionError(case)


BAD_CASES = ["missing cert", "not a certificate", "corrupt certificate",
             "key of another certificate", "missing key", "no key at all", "encrypted key",
             "bad ca file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_certificate_fails_check_and_start_naming_the_file(tmp_path, case):
    pki = PKI(tmp_path / "pki")
    table, named, says = _bad_files(pki, case)
    conf = tmp_path / "n.toml"
    conf.write_text(to_toml({"server": {"bind": [f"{HOST}:0"], "tls_bind": [f"{HOST}:0"]},
                             "tls": table}))
    r = run_cli("check", "-c", str(conf))
    assert r.returncode == 1, r.stdout
    assert named in r.stderr and says in r.stderr and str(conf) in r.stderr, r.stderr
    r = run_cli("start", "-c", str(conf), "-w", "1", "--pid-file", str(tmp_path / "p.pid"),
                cwd=tmp_path)
    assert r.returncode == 1
    assert named in r.stderr and says in r.stderr, r.stderr
    assert not (tmp_path / "p.pid").exists()


def test_bad_certificate_on_reload_keeps_the_running_generation(tmp_path):
    pki = PKI(tmp_path / "pki")
    srv = TlsServer(tmp_path / "srv", pki, workers=2)
    srv.start()
    try:
        good = pki.der
        pids = srv.worker_pids()
        for case in ("not a certificate", "key of another certificate", "missing cert"):
            table, named, says = _bad_files(pki, case)
            srv.config["tls"] = table
            srv.write_config()
            before = srv.log().count("reload refused")
            srv.send_signal(signal.SIGHUP)
            wait_for(lambda b=before: srv.log().count("reload refused") > b, 10,
                     what="the reload refused")
            refusal = next(line for line in reversed(srv.log().splitlines())
                           if "reload refused" in line)
            assert named in refusal and says in refusal, refusal
            assert srv.worker_pids() == pids
            with srv.tls_socket() as s:
                assert s.getpeercert(binary_form=True) == good
                assert get(s)[0] == 200
        assert srv.stats()["master"]["generation"] == 1
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()


def test_an_expired_certificate_is_warned_about(tmp_path):
    pki = PKI(tmp_path / "pki")
    pki.issue(not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
              not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    conf = tmp_path / "n.toml"
    conf.write_text(to_toml({"server": {"bind": [f"{HOST}:0"], "tls_bind": [f"{HOST}:0"]},
                             "tls": pki.tls_table()}))
    r = run_cli("check", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and str(pki.cert_file) in r.stderr
    assert "expired on 2021-01-01" in r.stderr


def test_a_reload_cannot_move_an_address_between_plain_and_tls(tmp_path):
    pki = PKI(tmp_path / "pki")
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    srv = TlsServer(tmp_path / "srv", pki, workers=1,
                    server={"bind": [f"{HOST}:{port}"]}, bind=None)
    srv.start()
    try:
        srv.config["server"] = {"bind": [f"{HOST}:0"], "tls_bind": [f"{HOST}:{port}"]}
        srv.write_config()
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in srv.log(), 10, what="the reload refused")
        assert f"{HOST}:{port} moves from server.bind to server.tls_bind" in srv.log()
        assert srv.get_json("/health")["status"] == "ok"   # still plain on that port
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()


# ------------------------------------------------------------------ config and unit tests
@pytest.mark.parametrize("text,needle", [
    ('[server]\ntls_bind = ["127.0.0.1:8443"]\n', "server.tls_bind needs tls.cert_file"),
    ('[server]\nbind = ["127.0.0.1:8443"]\ntls_bind = ["127.0.0.1:8443"]\n'
     '[tls]\ncert_file = "c.pem"\n', "the same address is also in server.bind"),
    ('[server]\nbind = []\ntls_bind = []\n', "needs at least one address (or server.tls_bind"),
    ('[server]\ntls_bind = ["example.com:443"]\n', "server.tls_bind bad address"),
    ('[tls]\ncert_file = 3\n', "tls.cert_file must be a string"),
    ('[tls]\nkeyfile = "k.pem"\n', "unknown key 'tls.keyfile'"),
])
def test_tls_config_errors_name_the_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)


def test_a_tls_only_server_is_a_valid_config(tmp_path):
    path = tmp_path / "tls.toml"
    path.write_text('[server]\nbind = []\ntls_bind = ["[::1]:8443", "0.0.0.0:8443"]\n'
                    '[tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n')
    cfg = config.load(str(path))
    assert cfg.binds == [] and cfg.tls_binds == [("::1", 8443), ("0.0.0.0", 8443)]
    assert config.load(None).tls_binds == [] and config.load(None).tls.cert_file == ""


def test_validity_reads_the_certificate_dates(tmp_path):
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    for when in (dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),   # UTCTime
                 dt.datetime(2051, 6, 1, 12, 0, 0, tzinfo=dt.UTC)):      # GeneralizedTime
        for kind in (trustme.KeyType.ECDSA, trustme.KeyType.RSA):
            leaf = ca.issue_cert("a.example", not_before=dt.datetime(2024, 2, 29, tzinfo=dt.UTC),
                                 not_after=when, key_type=kind)
            der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
            assert tlsconfig.validity(der) == (dt.datetime(2024, 2, 29, tzinfo=dt.UTC), when)
    for junk in (b"", b"\x30", b"\x30\x03\x02\x01\x01", b"\x04\x00", os.urandom(64)):
        with pytest.raises(ValueError):
            tlsconfig.validity(junk)


def test_server_context_settings():
    ctx = tlsconfig.new_server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_NONE   # CERT_REQUIRED only with ca_file
    assert tlsconfig.server_kwargs(None, 3.0) == {}
    kw = tlsconfig.server_kwargs(ctx, 3.0)
    assert kw["ssl"] is ctx and kw["ssl_handshake_timeout"] == 3.0


def test_top_finds_the_plain_address_not_the_tls_one(tmp_path):
    """`neurohttpd top` speaks plain HTTP: with no -u it watches the master's
    first plain address, even when a TLS one sorts first."""
    from neurohttp import cli
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind((HOST, 0))
    low, high = sorted(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    pki = PKI(tmp_path / "pki")
    srv = TlsServer(tmp_path / "srv", pki, workers=1,
                    server={"tls_bind": [f"{HOST}:{low}"]}, bind=f"{HOST}:{high}")
    srv.start()
    try:
        assert srv.tls_port == low
        assert cli._default_url(None, srv.pid_file) == f"http://{HOST}:{high}"
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()
