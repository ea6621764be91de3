#!/usr/bin/env python3
"""Loopback HTTPS + unix-socket HTTP test server for kengine (stdlib only).

Usage: python3 tests/support/https_server.py DIR

Creates DIR and, unless already there, a throwaway CA and certificates made
with the `openssl` command line:
    ca.pem / ca.key          the CA (trust it with --cacert DIR/ca.pem)
    server.pem / server.key  CN=localhost, SAN IP:127.0.0.1, DNS:localhost
    client.pem / client.key  CN=kengine-test-client, for client-cert auth
Then serves the same endpoints over
    HTTPS on 127.0.0.1:PORT (PORT written to DIR/port), and
    plain HTTP on the unix socket DIR/http.sock,
writes DIR/pid, and DIR/ready once both listen. Runs until SIGTERM/SIGINT,
then removes DIR/ready and DIR/http.sock and exits 0.

Endpoints (any of GET POST PUT PATCH DELETE HEAD; HEAD sends no body):
    /hello                  200 text/plain "hello"
    /echo                   200 JSON {method, path, query, args, headers,
                            body, body_length, json}
    /status/NNN             status NNN, JSON {"status": NNN}
    /slow?id=ID&ms=MS       writes DIR/slow/ID.start, sleeps, writes
                            DIR/slow/ID.end (time.time() values), body ID
    /bytes?n=N              N bytes, byte i = i % 256
    /header?name=X&value=Y  response header X: Y, body "ok"
    /client-cert            200 {"subject", "issuer"} if the TLS client sent
                            a cert signed by the CA, else 401
Requests are logged to DIR/access.log, not the terminal.
"""

import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


# --------------------------------------------------------------------------
# Certificates


def openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def new_key(name, cwd):
    # EC P-256: quick to generate, accepted by every TLS stack we care about.
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)
    os.chmod(os.path.join(cwd, name), 0o600)


def sign(name, cn, ext, cwd):
    """Make NAME.key and NAME.pem (CN=cn, extensions ext) signed by the CA."""
    new_key(name + ".key", cwd)
    openssl("req", "-new", "-key", name + ".key", "-subj", "/CN=" + cn,
            "-out", name + ".csr", cwd=cwd)
    with open(os.path.join(cwd, name + ".ext"), "w") as f:
        # Key identifiers: strict verifiers (e.g. Python >= 3.13's default
        # VERIFY_X509_STRICT) reject leaf certs without an AKID.
        f.write(ext + "\nsubjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid,issuer\n")
    openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem",
            "-CAkey", "ca.key", "-CAcreateserial", "-days", "825",
            "-extfile", name + ".ext", "-out", name + ".pem", cwd=cwd)
    for junk in (name + ".csr", name + ".ext"):
        os.remove(os.path.join(cwd, junk))


def make_certs(d):
    files = ("ca.pem", "ca.key", "server.pem", "server.key",
             "client.pem", "client.key")
    if all(os.path.exists(os.path.join(d, f)) for f in files):
        return  # reuse: a restarted server stays trusted by earlier clients
    new_key("ca.key", d)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-days", "3650",
            "-subj", "/CN=kengine-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.pem", cwd=d)
    sign("server", "localhost",
         "basicConstraints = CA:FALSE\n"
         "keyUsage = critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage = serverAuth\n"
         "subjectAltName = IP:127.0.0.1,DNS:localhost", d)
    sign("client", "kengine-test-client",
         "basicConstraints = CA:FALSE\n"
         "keyUsage = critical,digitalSignature\n"
         "extendedKeyUsage = clientAuth", d)


# --------------------------------------------------------------------------
# Request handling


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has a length
    server_version = "kengine-test"
    sys_version = ""

    def version_string(self):
        return self.server_version

    timeout = 60  # seconds; drops idle keep-alive or stuck clients

    # --- plumbing -------------------------------------------------------

    def setup(self):
        super().setup()  # applies self.timeout to the socket
        if isinstance(self.connection, ssl.SSLSocket):
            # Deferred from accept (see TLSServer.get_request); failures go
            # to QuietErrors.handle_error.
            self.connection.do_handshake()

    def address_string(self):
        # On the unix socket client_address is a str (usually ""), and the
        # base class would index it like a (host, port) tuple.
        if isinstance(self.client_address, tuple):
            return self.client_address[0]
        addr = self.client_address
        if isinstance(addr, bytes):
            addr = addr.decode(errors="replace")
        return "unix:" + (addr or "-")

    def log_message(self, fmt, *args):
        line = "%s - [%s] %s\n" % (self.address_string(),
                                   self.log_date_time_string(), fmt % args)
        with self.server.state.log_lock:
            with open(self.server.state.path("access.log"), "a") as f:
                f.write(line)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Skip trailers up to the blank line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def respond(self, status, body=b"", ctype="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        # 204 and 304 must not carry a body (nor, for 204, a length).
        no_body = status in (204, 304)
        if not no_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and not no_body:
            self.wfile.write(body)

    def respond_json(self, status, obj, headers=()):
        self.respond(status, json.dumps(obj), "application/json", headers)

    # --- dispatch -------------------------------------------------------

    def dispatch(self):
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return self.respond_json(400, {"error": "bad request body"})
        url = urllib.parse.urlsplit(self.path)
        self.url_path = url.path
        self.query = url.query
        self.args = dict(urllib.parse.parse_qsl(url.query,
                                                keep_blank_values=True))
        p = url.path
        if p == "/hello":
            return self.respond(200, "hello")
        if p == "/echo":
            return self.echo(body)
        if p.startswith("/status/"):
            return self.status(p[len("/status/"):])
        if p == "/slow":
            return self.slow()
        if p == "/bytes":
            return self.bytes_()
        if p == "/header":
            return self.header()
        if p == "/client-cert":
            return self.client_cert()
        return self.respond_json(404, {"error": "not found", "path": p})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = dispatch

    # --- endpoints ------------------------------------------------------

    def echo(self, body):
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = (headers[name] + ", " + value
                             if name in headers else value)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        parsed = None
        if ctype == "application/json":
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        self.respond_json(200, {
            "method": self.command,
            "path": self.url_path,
            "query": self.query,       # raw query string, "" if none
            "args": self.args,         # parsed query, last value wins
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "body_length": len(body),
            "json": parsed,
        })

    def status(self, code):
        if not (code.isdigit() and 200 <= int(code) <= 599):
            return self.respond_json(400, {"error": "bad status " + code})
        self.respond_json(int(code), {"status": int(code)})

    def slow(self):
        ident = self.args.get("id", "")
        try:
            ms = int(self.args.get("ms", "0"))
        except ValueError:
            ms = -1
        if not ident or "/" in ident or ident.startswith(".") or ms < 0:
            return self.respond_json(400, {"error": "need id and ms >= 0"})
        base = os.path.join(self.server.state.path("slow"), ident)
        with open(base + ".start", "w") as f:
            f.write("%.6f\n" % time.time())
        time.sleep(ms / 1000.0)
        with open(base + ".end", "w") as f:
            f.write("%.6f\n" % time.time())
        self.respond(200, ident)

    def bytes_(self):
        n = self.args.get("n", "")
        if not n.isdigit():
            return self.respond_json(400, {"error": "need n >= 0"})
        n = int(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        block = bytes(range(256)) * 256  # 64 KiB, starts at byte value 0
        while n > 0:  # streamed, so large N needs no memory
            chunk = block[:min(n, len(block))]
            self.wfile.write(chunk)
            n -= len(chunk)

    def header(self):
        name = self.args.get("name", "")
        value = self.args.get("value", "")
        if not name or any(c in name + value for c in "\r\n") or ":" in name:
            return self.respond_json(400, {"error": "bad header"})
        self.respond(200, "ok", headers=[(name, value)])

    def client_cert(self):
        cert = None
        if isinstance(self.connection, ssl.SSLSocket):
            cert = self.connection.getpeercert()  # {} / None if none sent
        if not cert:
            return self.respond_json(401, {"error": "no client certificate"})

        def name(rdns):  # ((("commonName", "x"),), ...) -> "CN=x"
            short = {"commonName": "CN", "organizationName": "O",
                     "countryName": "C", "organizationalUnitName": "OU"}
            return ",".join("%s=%s" % (short.get(k, k), v)
                            for rdn in rdns for k, v in rdn)
        self.respond_json(200, {"subject": name(cert["subject"]),
                                "issuer": name(cert["issuer"])})


# --------------------------------------------------------------------------
# Servers


class State:
    """What handlers share: DIR and the access-log lock."""

    def __init__(self, d):
        self.dir = d
        self.log_lock = threading.Lock()

    def path(self, name):
        return os.path.join(self.dir, name)


class QuietErrors:
    """Log handler exceptions (e.g. failed TLS handshakes from clients that
    reject our CA) to access.log instead of printing tracebacks."""

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        with self.state.log_lock:
            with open(self.state.path("access.log"), "a") as f:
                f.write("error from %r: %r\n" % (client_address, exc))


class TLSServer(QuietErrors, http.server.ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops SYNs when 50 clients connect
    # at once; the kernel then retries a second later.
    request_queue_size = 256

    def __init__(self, state, context):
        self.state = state
        self.context = context
        super().__init__(("127.0.0.1", 0), Handler)

    def server_bind(self):
        # Skip HTTPServer.server_bind's socket.getfqdn(), which may hit DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, addr = super().get_request()
        # Handshake lazily in the handler thread, so a slow or failing client
        # cannot stall the accept loop.
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False), addr


class UnixHTTPServer(QuietErrors, socketserver.ThreadingMixIn,
                     socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, state, sock_path):
        self.state = state
        super().__init__(sock_path, Handler)


def tls_context(d):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(d, "server.pem"),
                        os.path.join(d, "server.key"))
    # Ask for a client cert but do not require one (see /client-cert).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(os.path.join(d, "ca.pem"))
    return ctx


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: https_server.py DIR")
    d = os.path.abspath(sys.argv[1])
    os.makedirs(os.path.join(d, "slow"), exist_ok=True)
    for stale in ("ready", "port", "pid"):
        if os.path.exists(os.path.join(d, stale)):
            os.remove(os.path.join(d, stale))
    make_certs(d)
    state = State(d)

    tls = TLSServer(state, tls_context(d))

    # sun_path is limited to ~107 bytes; bind relative to DIR if it's long.
    sock_path = os.path.join(d, "http.sock")
    if os.path.exists(sock_path):
        os.remove(sock_path)
    if len(sock_path.encode()) >= 100:
        os.chdir(d)
        unix = UnixHTTPServer(state, "http.sock")
    else:
        unix = UnixHTTPServer(state, sock_path)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    threads = [threading.Thread(target=s.serve_forever, daemon=True)
               for s in (tls, unix)]
    for t in threads:
        t.start()

    write_atomic(state.path("pid"), "%d\n" % os.getpid())
    write_atomic(state.path("port"), "%d\n" % tls.server_port)
    write_atomic(state.path("ready"), "ok\n")  # last: both are listening

    # Event.wait with a timeout keeps the main thread able to run the
    # signal handler promptly.
    while not stop.wait(0.5):
        pass

    for s in (tls, unix):
        s.shutdown()
        s.server_close()
    for name in ("ready", "http.sock"):
        try:
            os.remove(state.path(name))
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
