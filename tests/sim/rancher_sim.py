#!/usr/bin/env python3
"""Rancher v2 + Kubernetes API simulator for kengine (Python 3 stdlib only).

Stands in for the rancher/rancher container in tests and in the lab: the
Rancher v3 API (login, password change, settings, API tokens, kubeconfig for
the `local` cluster) and, under /k8s/clusters/local, a Kubernetes API with
Deployments, Services, Pods, Nodes and Namespaces.  Behaviour follows
shared/reference/rancher-kubernetes-api.md; tests/sim/README.md maps every
behaviour to the section of the reference it implements.

Usage:
    python3 tests/sim/rancher_sim.py --dir DIR [--port 0] [--bind 127.0.0.1]
        [--login-shape v2.13|legacy] [--ready-seconds 2]
        [--bootstrap-password PW] [--tls | --no-tls] ...   (see --help)

Creates DIR and, unless already there, a throwaway CA and server certificate
made with the `openssl` command line (ca.pem/ca.key, server.pem/server.key,
SAN IP:127.0.0.1, DNS:localhost).  Listens, then writes DIR/pid, DIR/port and
last DIR/ready.  Requests are logged to DIR/access.log, server messages (the
generated bootstrap password, as Rancher prints it) to DIR/server.log.  State
is kept in memory and in DIR/state.json, so a restart with the same DIR keeps
users, tokens, settings and Kubernetes objects.  SIGTERM/SIGINT: stop, remove
DIR/ready, exit 0.
"""

import argparse
import base64
import calendar
import copy
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

# Rancher's and Kubernetes' random-name alphabet (no vowels, no 0/1/3).
SAFE = "bcdfghjklmnpqrstvwxz2456789"
MISSING = object()


# --------------------------------------------------------------------------
# Small helpers


def rand_name(n=5):
    return "".join(secrets.choice(SAFE) for _ in range(n))


def det_name(seed, n=5):
    """Deterministic name suffix: the same seed gives the same letters."""
    d = hashlib.sha256(seed.encode()).digest()
    return "".join(SAFE[b % len(SAFE)] for b in d[:n])


def ts(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def dumps(obj, sort=False):
    """Go-style compact JSON with the trailing newline json.Encoder adds."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                       sort_keys=sort) + "\n").encode()


def canon(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False)


def gostr(s):
    """Approximates Go's %q for the names that appear in messages."""
    return json.dumps(s, ensure_ascii=False)


def deep(o):
    return copy.deepcopy(o)


def ordered(d, order):
    """Re-key dict d: keys in `order` first (Go struct field order)."""
    if not isinstance(d, dict):
        return d
    out = {k: d[k] for k in order if k in d}
    for k, v in d.items():
        if k not in out:
            out[k] = v
    return out


def human_age(seconds):
    """kubectl/apimachinery HumanDuration, as shown in AGE columns."""
    s = int(max(0, seconds))
    if s < 120:
        return "%ds" % s
    m = s // 60
    if m < 10:
        return "%dm%ds" % (m, s % 60) if s % 60 else "%dm" % m
    if m < 180:
        return "%dm" % m
    h = m // 60
    if h < 8:
        return "%dh%dm" % (h, m % 60) if m % 60 else "%dh" % h
    if h < 48:
        return "%dh" % h
    d = h // 24
    if d < 8:
        return "%dd%dh" % (d, h % 24) if h % 24 else "%dd" % d
    if d < 730:
        return "%dd" % d
    return "%dy" % (d // 365)


# --------------------------------------------------------------------------
# Replies and error bodies


class Reply(Exception):
    """An HTTP response; raised to abort a handler with an error."""

    def __init__(self, status, body=b"", ctype="application/json",
                 headers=None):
        super().__init__(status)
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.ctype = ctype
        self.headers = list(headers or [])


def jreply(status, obj, headers=None, sort=False):
    return Reply(status, dumps(obj, sort), "application/json", headers)


def text_reply(status, text):
    return Reply(status, text, "text/plain; charset=utf-8")


# Rancher, §2.1 of the reference: three error shapes.

def norman_error(status, code, message="", field=None):
    """norman's httperror handler: a Go map, so keys come out sorted."""
    body = {"baseType": "error", "code": code}
    if field:
        body["fieldName"] = field
    body["message"] = message
    body["status"] = status
    body["type"] = "error"
    return jreply(status, body)


def api_error(status, code, message=""):
    """pkg/auth/util ReturnAPIError (v2.13+ login): struct field order."""
    body = {"code": code, "status": status}
    if message:
        body["message"] = message
    body["type"] = "error"
    body["baseType"] = "error"
    return jreply(status, body)


def must_authenticate():
    """pkg/auth/util ReturnHTTPError: status is a *string*."""
    return jreply(401, {"type": "error", "status": "401",
                        "message": "must authenticate"})


# Kubernetes, §3: metav1.Status.

def details(name=None, group=None, kind=None, uid=None, causes=None):
    d = {}
    if name:
        d["name"] = name
    if group:
        d["group"] = group
    if kind:
        d["kind"] = kind
    if uid:
        d["uid"] = uid
    if causes:
        d["causes"] = causes
    return d


def k8s_status(code, reason, message, det=None, meta=None):
    st = {"kind": "Status", "apiVersion": "v1", "metadata": meta or {},
          "status": "Failure", "message": message, "reason": reason}
    if det is not None:
        st["details"] = det
    st["code"] = code
    return jreply(code, st)


def qual(group, resource):
    return resource + "." + group if group else resource


def e_not_found(group, resource, name):
    return k8s_status(404, "NotFound", "%s %s not found" % (
        qual(group, resource), gostr(name)), details(name, group, resource))


def e_exists(group, resource, name):
    return k8s_status(409, "AlreadyExists", "%s %s already exists" % (
        qual(group, resource), gostr(name)), details(name, group, resource))


MODIFIED = ("the object has been modified; please apply your changes to the "
            "latest version and try again")


def e_conflict(group, resource, name, why=MODIFIED):
    return k8s_status(409, "Conflict",
                      "Operation cannot be fulfilled on %s %s: %s" % (
                          qual(group, resource), gostr(name), why),
                      details(name, group, resource))


def e_bad_request(message):
    return k8s_status(400, "BadRequest", message)


def e_path_not_found():
    return k8s_status(404, "NotFound",
                      "the server could not find the requested resource", {})


def e_method_not_allowed():
    return k8s_status(405, "MethodNotAllowed", "the server does not allow "
                      "this method on the requested resource", {})


class FieldError:
    """k8s.io/apimachinery/pkg/util/validation/field.Error."""
    REQUIRED = "Required value"
    INVALID = "Invalid value"
    FORBIDDEN = "Forbidden"
    UNSUPPORTED = "Unsupported value"
    DUPLICATE = "Duplicate value"
    CAUSE = {REQUIRED: "FieldValueRequired", INVALID: "FieldValueInvalid",
             FORBIDDEN: "FieldValueForbidden",
             UNSUPPORTED: "FieldValueNotSupported",
             DUPLICATE: "FieldValueDuplicate"}
    OMIT = object()

    def __init__(self, typ, field, value=OMIT, detail="", legacy_repr=None):
        self.typ, self.field, self.value = typ, field, value
        self.detail, self.legacy_repr = detail, legacy_repr

    def body(self, legacy):
        if self.typ in (self.REQUIRED, self.FORBIDDEN) or \
                self.value is self.OMIT:
            s = self.typ
        else:
            s = "%s: %s" % (self.typ, fmt_bad_value(self.value, legacy,
                                                    self.legacy_repr))
        if self.detail:
            s += ": " + self.detail
        return s

    def text(self, legacy):
        return "%s: %s" % (self.field, self.body(legacy))


def go_repr(v):
    """Go's %#v for the values validation messages show (k8s <= 1.33)."""
    if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
        return "map[string]string{%s}" % ", ".join(
            "%s:%s" % (gostr(k), gostr(v[k])) for k in sorted(v))
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "[]string{%s}" % ", ".join(gostr(x) for x in v)
    return canon(v)


def fmt_bad_value(v, legacy, legacy_repr=None):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return gostr(v)
    if v is None:
        return "null"
    if legacy:
        return legacy_repr if legacy_repr is not None else go_repr(v)
    # k8s >= 1.34 renders complex values as JSON (apimachinery c58e197e).
    return canon(v)


def e_invalid(group, kind, name, errs, legacy):
    """apierrors.NewInvalid: 422, reason Invalid, details.kind is the Kind."""
    causes = [{"reason": FieldError.CAUSE.get(e.typ, "FieldValueInvalid"),
               "message": e.body(legacy), "field": e.field} for e in errs]
    texts = []
    for e in errs:
        t = e.text(legacy)
        if t not in texts:
            texts.append(t)
    agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    qk = kind + "." + group if group else kind
    return k8s_status(422, "Invalid", "%s %s is invalid: %s" % (
        qk, gostr(name), agg), details(name, group, kind, causes=causes))


# --------------------------------------------------------------------------
# Certificates (same recipe as tests/support/https_server.py)


def openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_certs(d):
    files = ("ca.pem", "ca.key", "server.pem", "server.key")
    if all(os.path.exists(os.path.join(d, f)) for f in files):
        return  # reuse: clients that trusted ca.pem keep trusting us
    for name in ("ca.key", "server.key"):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-out", name, cwd=d)
        os.chmod(os.path.join(d, name), 0o600)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-days", "3650",
            "-subj", "/O=dynamiclistener-org/CN=dynamiclistener-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.pem", cwd=d)
    openssl("req", "-new", "-key", "server.key", "-subj",
            "/O=dynamiclistener-org/CN=dynamic", "-out", "server.csr", cwd=d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("basicConstraints = CA:FALSE\n"
                "keyUsage = critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage = serverAuth\n"
                "subjectAltName = IP:127.0.0.1,DNS:localhost\n"
                "subjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey",
            "ca.key", "-CAcreateserial", "-days", "825", "-extfile",
            "server.ext", "-out", "server.pem", cwd=d)
    for junk in ("server.csr", "server.ext"):
        os.remove(os.path.join(d, junk))


# --------------------------------------------------------------------------
# State: in memory, mirrored to DIR/state.json after every change


def hash_password(pw, salt=None):
    salt = salt or secrets.token_hex(8)
    h = hashlib.pbkdf2_hmac("sha256", pw.encode(), salt.encode(), 10000)
    return salt + "$" + h.hex()


def check_password(pw, stored):
    salt = stored.split("$", 1)[0]
    return hmac.compare_digest(hash_password(pw, salt), stored)


def hash_key(key):
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    def __init__(self, d):
        self.path = os.path.join(d, "state.json")
        self.lock = threading.RLock()
        self.rv_times = []  # (wall time, rv): for continue-token expiry
        self.data = None
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def next_rv(self):
        self.data["rv"] += 1
        rv = self.data["rv"]
        self.rv_times.append((time.time(), rv))
        if len(self.rv_times) > 4096:
            del self.rv_times[:2048]
        return str(rv)

    def compacted_rv(self, window):
        """Highest rv older than the compaction window (etcd compaction)."""
        limit = time.time() - window
        best = 0
        for t, rv in self.rv_times:
            if t < limit:
                best = rv
            else:
                break
        return best

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, separators=(",", ":"))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------
# Rancher settings (§2.4)

SETTING_DEFAULTS = {
    "cacerts": "",
    "first-login": "true",
    "password-min-length": "12",
    "server-url": "",
    "server-version": "dev",
    "ui-pl": "rancher",
    "ui-banners": "{}",
    "ui-issues": "",
    "ui-brand": "",
    "ui-default-landing": "vue",
    "telemetry-opt": "prompt",
    "eula-agreed": "",
    "auth-token-max-ttl-minutes": "129600",
    "auth-token-default-ttl-minutes": "129600",
    "auth-user-session-ttl-minutes": "960",
    "kubeconfig-default-token-ttl-minutes": "43200",
    "kubeconfig-max-token-ttl-minutes": "129600",
    "kubeconfig-generate-token": "true",
}
READONLY_SETTINGS = ("cacerts",)
PUBLIC_SETTINGS = ("cacerts", "first-login", "ui-banners", "ui-issues",
                   "ui-pl", "ui-brand", "ui-default-landing")


def setting_env_key(name):
    return "CATTLE_" + name.upper().replace("-", "_")


# --------------------------------------------------------------------------
# Requests


class Ctx:
    """One request, as the handlers see it."""

    def __init__(self, method, raw_path, headers, body, tls, peer):
        url = urllib.parse.urlsplit(raw_path)
        self.method = method
        self.path = urllib.parse.unquote(url.path)
        self.query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.headers = headers
        self.body = body
        self.tls = tls
        self.peer = peer

    def arg(self, name, default=None):
        v = self.query.get(name)
        return v[-1] if v else default

    def header(self, name):
        return self.headers.get(name, "") or ""

    def cookie(self, name):
        for part in self.header("Cookie").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return None

    def host(self):
        return self.header("Host") or "127.0.0.1"

    def api_host(self):
        return (self.header("X-API-Host") or self.header("X-Forwarded-Host")
                or self.host())

    def scheme(self):
        if self.tls:
            return "https"
        return self.header("X-Forwarded-Proto") or "http"

    def base(self):
        return "%s://%s" % (self.scheme(), self.api_host())


class Auth:
    def __init__(self, user, token, bearer):
        self.user, self.token, self.bearer = user, token, bearer


def format_cert(data):
    """pkg/kubeconfig FormatCertString: 49 chars, then `\\`+newline+6
    spaces before every further chunk of up to 76 (§2.6)."""
    if len(data) <= 49:
        return data
    out = data[:49]
    for chunk in re.findall(r"\S{1,76}", data[49:]):
        out += "\\\n      " + chunk
    return out


def kubeconfig_yaml(cluster, host, cert, token):
    """pkg/kubeconfig tokenTemplate, rendered exactly (blank lines too)."""
    s = "apiVersion: v1\nkind: Config\nclusters:"
    s += '\n- name: "%s"\n  cluster:\n    server: "https://%s/k8s/clusters/%s"' \
        % (cluster, host, cluster)
    if cert:
        s += '\n    certificate-authority-data: "%s"' % cert
    s += '\n\nusers:\n- name: "%s"\n  user:' % cluster
    if token:
        s += '\n    token: "%s"\n' % token
    else:
        s += ("\n    exec:\n      apiVersion: client.authentication.k8s.io/"
              "v1beta1\n      args:\n        - token\n        - --server=%s\n"
              "        - --user=%s\n      command: rancher" % (host, cluster))
    s += '\n\ncontexts:\n- name: "%s"\n  context:\n    user: "%s"\n' \
         '    cluster: "%s"' % (cluster, cluster, cluster)
    s += '\n\ncurrent-context: "%s"\n' % cluster
    return s


NOT_FOUND_TEXT = "404 page not found\n"


# --------------------------------------------------------------------------
# The Rancher side (§1, §2)


class Rancher:
    def __init__(self, sim):
        self.sim = sim
        self.o = sim.o
        self.store = sim.store

    @property
    def d(self):
        return self.store.data

    @property
    def v213(self):
        return self.o.login_shape == "v2.13"

    # --- settings --------------------------------------------------------

    def setting(self, name):
        env = os.environ.get(setting_env_key(name))
        if env is not None:
            return env
        if name == "cacerts":
            return self.sim.cacerts
        v = self.d["settings"].get(name)
        return v if v not in (None, "") else SETTING_DEFAULTS.get(name, "")

    def setting_int(self, name):
        try:
            return int(self.setting(name))
        except ValueError:
            return int(SETTING_DEFAULTS[name])

    def setting_resource(self, ctx, name):
        default = SETTING_DEFAULTS[name]
        env = os.environ.get(setting_env_key(name))
        stored = self.sim.cacerts if name == "cacerts" \
            else self.d["settings"].get(name)
        if env is not None:
            value, customized, source = env, False, "env"
        elif stored in (None, ""):
            value, customized, source = default, False, "default"
        else:
            value, customized, source = stored, True, "db"
        link = ctx.base() + "/v3/settings/" + name
        links = {"remove": link, "self": link, "update": link}
        if source == "env" or name in READONLY_SETTINGS:
            del links["update"]
        created = self.d["started"]
        return {"baseType": "setting", "created": ts(created),
                "createdTS": int(created * 1000), "creatorId": None,
                "customized": customized, "default": default, "id": name,
                "labels": {}, "links": links, "name": name,
                "source": source, "type": "setting",
                "uuid": det_uuid("setting/" + name), "value": value}

    # --- tokens ----------------------------------------------------------

    def ttl_expired(self, tok, now=None):
        ttl = tok.get("ttl", 0)
        return ttl > 0 and (now or time.time()) >= tok["created"] + ttl / 1000

    def expires_at(self, tok):
        ttl = tok.get("ttl", 0)
        return ts(tok["created"] + ttl / 1000) if ttl > 0 else ""

    def new_token(self, user, derived, ttl, description, kind=None,
                  cluster=None, ext=False, prefix="token-"):
        while True:
            name = prefix + rand_name(5)
            if name not in self.d["tokens"]:
                break
        key = "".join(secrets.choice(SAFE) for _ in range(54))
        tok = {"name": name, "hash": hash_key(key), "userId": user["id"],
               "derived": derived, "ttl": ttl, "created": time.time(),
               "description": description or "", "kind": kind,
               "clusterId": cluster or None, "ext": ext,
               "uuid": str(uuid.uuid4())}
        self.d["tokens"][name] = tok
        self.store.save()
        bearer = ("ext/" if ext else "") + name + ":" + key
        return tok, bearer

    def token_resource(self, ctx, tok, current=False, public=False):
        labels = {"authn.management.cattle.io/token-userId": tok["userId"],
                  "cattle.io/creator": "norman"}
        if tok.get("kind"):
            labels["authn.management.cattle.io/kind"] = tok["kind"]
        link = ctx.base() + ("/v3-public/tokens/" if public else
                             "/v3/tokens/") + tok["name"]
        return {"authProvider": "local", "baseType": "token",
                "clusterId": tok.get("clusterId"),
                "created": ts(tok["created"]),
                "createdTS": int(tok["created"] * 1000), "creatorId": None,
                "current": current, "description": tok["description"],
                "enabled": True, "expired": self.ttl_expired(tok),
                "expiresAt": self.expires_at(tok), "groupPrincipals": None,
                "id": tok["name"], "isDerived": tok["derived"],
                "labels": labels, "lastUpdateTime": "",
                "links": {"remove": link, "self": link},
                "name": tok["name"], "ttl": tok["ttl"], "type": "token",
                "userId": tok["userId"],
                "userPrincipal": "local://" + tok["userId"],
                "uuid": tok["uuid"]}

    def ingest_ttl(self, ttl, max_setting, default_setting):
        """pkg/ext/stores/tokens IngestTTL: 0 = default, clamp to max."""
        mx = self.setting_int(max_setting) * 60000
        if mx < 1:
            mx = -1
        df = self.setting_int(default_setting) * 60000
        if df == 0:
            df = mx
        if ttl == 0:
            ttl = df
        if mx < 1:
            return ttl
        if ttl < 0:
            return mx
        return min(ttl, mx)

    # --- authentication (§2.1) -------------------------------------------

    def token_value(self, ctx):
        h = ctx.header("Authorization").strip()
        if h:
            scheme, _, rest = h.partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip()
            if scheme.lower() == "basic":
                try:  # decoded as URL-safe base64, as Rancher does
                    return base64.urlsafe_b64decode(rest.strip()).decode()
                except (ValueError, UnicodeDecodeError):
                    return ""
            return ""
        return ctx.cookie("R_SESS") or ""

    def authenticate(self, ctx, cluster=""):
        value = self.token_value(ctx)
        if not value:
            return None
        parts = value.split(":")
        name, key = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], "")
        if not name or not key:
            return None
        ext = name.startswith("ext/")
        if ext:
            name = name[4:]
        with self.store.lock:
            tok = self.d["tokens"].get(name)
            if not tok or bool(tok.get("ext")) != ext:
                return None
            if not hmac.compare_digest(tok["hash"], hash_key(key)):
                return None
            if self.ttl_expired(tok):
                return None
            if tok.get("clusterId") and tok["clusterId"] != cluster:
                return None  # "clusterID does not match"
            user = self.d["users"].get(tok["userId"])
            if not user or not user.get("enabled", True):
                return None
            return Auth(user, tok, value)

    def csrf(self, ctx):
        """norman CheckCSRF: only for browsers (User-Agent has "mozilla")."""
        if "mozilla" not in ctx.header("User-Agent").lower():
            return []
        cookie = ctx.cookie("CSRF")
        headers = []
        if cookie is None:
            cookie = secrets.token_hex(16)
            headers.append(("Set-Cookie", "CSRF=%s; Path=/; Secure; "
                            "SameSite=Lax" % cookie))
        if ctx.method != "GET" and cookie != ctx.header("X-API-CSRF") and \
                cookie != ctx.arg("CSRF"):
            r = norman_error(422, "InvalidCSRFToken", "Invalid CSRF token")
            r.headers.extend(headers)
            raise r
        return headers

    # --- dispatch ----------------------------------------------------------

    def handle(self, ctx):
        p = ctx.path
        if p == "/ping":
            return text_reply(200, "pong")
        if p == "/healthz":
            return text_reply(200, "ok")
        if p == "/rancherversion":
            return jreply(200, {"Version": self.o.rancher_version,
                                "GitCommit": det_name("commit", 8),
                                "RancherPrime": "false"})
        if p.startswith("/v1-public/"):
            return self.v1_public(ctx)
        if p.startswith("/v3-public/") or p == "/v3-public":
            return self.with_csrf(ctx, self.v3_public)
        if p.startswith("/k8s/clusters/"):
            return self.k8s_proxy(ctx)
        if p.startswith("/v1/management.cattle.io.clusters/"):
            return self.steve_cluster(ctx)
        if self.o.k8s_direct and (p in ("/version", "/api", "/apis") or
                                  p.startswith(("/api/", "/apis/"))):
            auth = self.authenticate(ctx, "local")
            if not auth:
                return k8s_status(401, "Unauthorized", "Unauthorized")
            return self.sim.k8s.handle(ctx, p, auth)
        if p == "/v3" or p.startswith("/v3/"):
            parts = [x for x in p.split("/") if x]
            if ctx.method == "GET" and len(parts) == 3 and \
                    parts[1].lower() in ("settings", "setting") and \
                    parts[2] in PUBLIC_SETTINGS:
                return self.with_csrf(ctx, lambda c: self.v3(c, None))
            auth = self.authenticate(ctx, "")
            if not auth:
                return must_authenticate()
            return self.with_csrf(ctx, lambda c: self.v3(c, auth))
        return text_reply(404, NOT_FOUND_TEXT)

    def with_csrf(self, ctx, fn):
        headers = self.csrf(ctx)
        r = fn(ctx)
        r.headers.extend(headers)
        return r

    def steve_cluster(self, ctx):
        """§2.6: the steve action redirects (302) to the /v3 action; a
        client that follows it turns the POST into a GET and receives the
        cluster resource instead of a kubeconfig."""
        auth = self.authenticate(ctx, "")
        if not auth:
            return must_authenticate()
        ident = ctx.path[len("/v1/management.cattle.io.clusters/"):]
        if ident != "local":
            return jreply(404, {"type": "error", "status": "404",
                                "code": "NotFound", "message": "%s not found"
                                % ident})
        if ctx.method == "POST" and ctx.arg("action") == "generateKubeconfig":
            return Reply(302, b"", None, [(
                "Location", "/v3/clusters/local?action=generateKubeconfig")])
        with self.store.lock:
            return jreply(200, self.cluster_resource(ctx), sort=True)

    def k8s_proxy(self, ctx):
        """§2.7: /k8s/clusters/<id>/... behind Rancher's auth filter."""
        rest = ctx.path[len("/k8s/clusters/"):]
        cluster, _, sub = rest.partition("/")
        auth = self.authenticate(ctx, cluster)
        if not auth:
            return must_authenticate()
        if cluster != "local":
            # clusterrouter: json.Encode of a norman APIError struct,
            # written after WriteHeader (so no JSON content type).
            body = {"Code": {"Code": "NotFound", "Status": 404},
                    "Message": "clusters.management.cattle.io %s not found"
                    % gostr(cluster), "Cause": None, "FieldName": ""}
            return Reply(404, dumps(body), "text/plain; charset=utf-8")
        return self.sim.k8s.handle(ctx, "/" + sub, auth)

    # --- login (§2.2) --------------------------------------------------------

    def v1_public(self, ctx):
        if not self.v213:  # /v1-public arrived in v2.13
            return text_reply(404, NOT_FOUND_TEXT)
        p = ctx.path.rstrip("/")
        if p == "/v1-public/login" and ctx.method == "POST":
            try:
                data = json.loads(ctx.body or b"null")
                if not isinstance(data, dict):
                    raise ValueError
            except ValueError:
                return api_error(422, "InvalidBodyContent")
            if data.get("type") != "localProvider":
                # providerInputForType: unknown or missing type -> nil input
                return api_error(422, "InvalidBodyContent")
            return self.login(ctx, data, "api")
        if p == "/v1-public/authproviders" and ctx.method == "GET":
            return jreply(200, {"apiVersion": "v1", "kind": "List",
                                "items": [self.local_provider(ctx)]})
        return text_reply(404, NOT_FOUND_TEXT)

    def local_provider(self, ctx):
        link = ctx.base() + "/v3-public/localProviders/local"
        return {"actions": {"login": link + "?action=login"},
                "baseType": "authProvider", "creatorId": None, "id": "local",
                "links": {"self": link}, "type": "localProvider"}

    def v3_public(self, ctx):
        parts = [x for x in ctx.path.split("/") if x][1:]
        if not parts:
            return jreply(200, {"type": "apiRoot", "links": {
                "authProviders": ctx.base() + "/v3-public/authProviders"}},
                sort=True)
        typ = norm_type(parts[0])
        ident = parts[1] if len(parts) > 1 else None
        if len(parts) > 2 or typ not in ("authproviders", "localproviders"):
            return norman_error(404, "NotFound", "")
        if ctx.method == "GET":
            if ident is None:
                return jreply(200, self.collection(
                    ctx, "authProvider", [self.local_provider(ctx)],
                    "/v3-public/" + parts[0]), sort=True)
            if ident == "local":
                return jreply(200, self.local_provider(ctx), sort=True)
            return norman_error(404, "NotFound", "")
        if ctx.method != "POST":
            return norman_error(405, "MethodNotAllow",
                                "Method %s not supported" % ctx.method)
        action = ctx.arg("action")
        if ident != "local":
            return norman_error(404, "NotFound", "")
        if action != "login":
            return norman_error(422, "InvalidAction",
                                "Invalid action: %s" % (action or ""))
        try:
            data = json.loads(ctx.body or b"null")
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return norman_error(422, "InvalidBodyContent", "")
        # v2.13 runs the shared login code, which answers with ReturnAPIError;
        # v2.12 and earlier answer every error through norman.
        return self.login(ctx, data, "api" if self.v213 else "norman")

    def login(self, ctx, data, errors):
        def fail(status, code, message):
            if errors == "api":
                return api_error(status, code, message)
            return norman_error(status, code, message)

        username, password = data.get("username"), data.get("password")
        for v in (username, password, data.get("description", ""),
                  data.get("responseType", "")):
            if v is not None and not isinstance(v, str):
                return fail(422, "InvalidBodyContent", "")
        ttl = data.get("ttl", 0)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            return fail(422, "InvalidBodyContent", "")
        with self.store.lock:
            user = None
            if time.time() >= self.d["admin_at"]:
                user = next((u for u in self.d["users"].values()
                             if u["username"] == username), None)
            if not user or not check_password(password or "",
                                              user["password"]):
                return fail(401, "Unauthorized", "authentication failed")
            if not user.get("enabled", True):
                return fail(403, "PermissionDenied",
                            "" if errors == "api" else "Permission Denied")
            # auth-user-session-ttl-minutes overrides the requested ttl
            try:
                ttl = int(self.setting("auth-user-session-ttl-minutes")) \
                    * 60000
            except ValueError:
                pass
            rtype = data.get("responseType") or ""
            kind = "kubeconfig" if rtype.startswith("kubeconfig") \
                else "session"
            prefix = "kubeconfig-" if kind == "kubeconfig" else "token-"
            tok, bearer = self.new_token(
                user, False, ttl, data.get("description", ""), kind=kind,
                ext=self.o.ext_login_tokens, prefix=prefix)
        if rtype == "cookie":
            cookie = "R_SESS=%s; Path=/; HttpOnly; Secure" % bearer
            if self.v213:
                cookie += "; SameSite=Lax"
            return Reply(200, b"", None, [("Set-Cookie", cookie)])
        if self.v213:
            return jreply(201, {"baseType": "token",
                                "expiresAt": self.expires_at(tok),
                                "id": tok["name"], "token": bearer,
                                "type": "token"}, sort=True)
        res = self.token_resource(ctx, tok, public=True)
        res["token"] = bearer
        return jreply(201, res, sort=True)

    # --- /v3 (§2.3 - §2.6) --------------------------------------------------

    def collection(self, ctx, rtype, data, path, actions=None, create=False):
        link = ctx.base() + path
        c = {"actions": actions or {}, "data": data, "filters": {},
             "links": {"self": link},
             "pagination": {"limit": 1000, "total": len(data)},
             "resourceType": rtype, "sort": {"order": "asc", "reverse": link
                                             + "?order=desc"},
             "type": "collection"}
        if create:
            c["createTypes"] = {rtype: link}
        return c

    def v3(self, ctx, auth):
        parts = [x for x in ctx.path.split("/") if x][1:]
        if not parts:
            return jreply(200, {"type": "apiRoot", "links": {
                k: ctx.base() + "/v3/" + k for k in
                ("clusters", "settings", "tokens", "users")}}, sort=True)
        typ = norm_type(parts[0])
        ident = parts[1] if len(parts) > 1 else None
        if len(parts) > 2:
            return norman_error(404, "NotFound", "")
        fn = {"settings": self.v3_settings, "tokens": self.v3_tokens,
              "users": self.v3_users, "clusters": self.v3_clusters}.get(typ)
        if not fn:
            return norman_error(404, "NotFound", "")
        with self.store.lock:
            return fn(ctx, auth, ident)

    def read_json(self, ctx, code="InvalidBodyContent", prefix=
                  "Failed to parse body: "):
        try:
            data = json.loads(ctx.body or b"{}")
        except ValueError as e:
            raise norman_error(422, code, prefix + str(e))
        if not isinstance(data, dict):
            raise norman_error(422, code, prefix + "not a JSON object")
        return data

    def v3_settings(self, ctx, auth, name):
        if name is None:
            if ctx.method != "GET":
                return norman_error(405, "MethodNotAllow",
                                    "Method %s not supported" % ctx.method)
            data = [self.setting_resource(ctx, n)
                    for n in sorted(SETTING_DEFAULTS)]
            return jreply(200, self.collection(
                ctx, "setting", data, "/v3/settings", create=True), sort=True)
        if name not in SETTING_DEFAULTS:
            return norman_error(404, "NotFound",
                                "settings.management.cattle.io %s not found"
                                % gostr(name))
        if ctx.method == "GET":
            return jreply(200, self.setting_resource(ctx, name), sort=True)
        if ctx.method != "PUT":
            if ctx.method == "DELETE" and name in READONLY_SETTINGS:
                return norman_error(405, "MethodNotAllow",
                                    "Cannot delete readOnly setting %s."
                                    % name)
            return norman_error(405, "MethodNotAllow",
                                "Method %s not supported" % ctx.method)
        data = self.read_json(ctx)
        if os.environ.get(setting_env_key(name)) is not None:
            return norman_error(405, "MethodNotAllow",
                                "%s is readOnly because its value is from "
                                "environment variable" % name)
        if name in READONLY_SETTINGS:
            return norman_error(405, "MethodNotAllow",
                                "%s is readOnly" % name)
        if "value" not in data:
            return norman_error(500, "ServerError", "value not found")
        if not isinstance(data["value"], str):
            return norman_error(500, "ServerError", "value not string")
        self.d["settings"][name] = data["value"]
        self.store.save()
        return jreply(200, self.setting_resource(ctx, name), sort=True)

    def v3_tokens(self, ctx, auth, ident):
        user = auth.user
        cur = auth.token
        if ident is None:
            if ctx.method == "GET":
                data = [self.token_resource(
                    ctx, t, current=(t["name"] == cur["name"]
                                     and not cur["derived"]))
                    for t in sorted(self.d["tokens"].values(),
                                    key=lambda t: t["name"])
                    if t["userId"] == user["id"]]
                return jreply(200, self.collection(
                    ctx, "token", data, "/v3/tokens", create=True,
                    actions={"logout": ctx.base()
                             + "/v3/tokens?action=logout"}), sort=True)
            if ctx.method != "POST":
                return norman_error(405, "MethodNotAllow",
                                    "Method %s not supported" % ctx.method)
            action = ctx.arg("action")
            if action == "logout":
                if not cur["derived"]:
                    self.d["tokens"].pop(cur["name"], None)
                    self.store.save()
                return Reply(200, b"", None, [(
                    "Set-Cookie", "R_SESS=; Path=/; Max-Age=0; HttpOnly; "
                    "Secure")])
            if action:
                return norman_error(422, "InvalidAction",
                                    "Invalid action: %s" % action)
            data = self.read_json(ctx, "InvalidFormat", "")
            ttl = data.get("ttl", 0)
            if ttl is None:
                ttl = 0
            if not isinstance(ttl, int) or isinstance(ttl, bool):
                return norman_error(422, "InvalidFormat",
                                    "json: cannot unmarshal %s into Go struct"
                                    " field Token.ttl of type int64"
                                    % type(ttl).__name__)
            ttl = self.ingest_ttl(ttl, "auth-token-max-ttl-minutes",
                                  "auth-token-default-ttl-minutes")
            desc = data.get("description") or ""
            cluster = data.get("clusterId") or None
            tok, bearer = self.new_token(user, True, ttl, desc,
                                         cluster=cluster)
            res = self.token_resource(ctx, tok)
            res["token"] = bearer
            return jreply(201, res, sort=True)
        tok = self.d["tokens"].get(ident)
        if not tok or tok["userId"] != user["id"]:
            return norman_error(404, "NotFound",
                                "tokens.management.cattle.io %s not found"
                                % gostr(ident))
        if ctx.method == "GET":
            return jreply(200, self.token_resource(
                ctx, tok, current=(tok["name"] == cur["name"]
                                   and not cur["derived"])), sort=True)
        if ctx.method == "DELETE":
            if tok["name"] == cur["name"] and not cur["derived"]:
                return norman_error(400, "ServerError",
                                    "Cannot delete token for current "
                                    "session. Use logout instead")
            del self.d["tokens"][ident]
            self.store.save()
            return Reply(204, b"", None)
        return norman_error(405, "MethodNotAllow",
                            "Method %s not supported" % ctx.method)

    def user_resource(self, ctx, user, me):
        link = ctx.base() + "/v3/users/" + user["id"]
        return {"actions": {"refreshauthprovideraccess": link
                            + "?action=refreshauthprovideraccess",
                            "setpassword": link + "?action=setpassword"},
                "baseType": "user", "created": ts(user["created"]),
                "createdTS": int(user["created"] * 1000), "creatorId": None,
                "description": "", "enabled": user.get("enabled", True),
                "id": user["id"], "links": {
                    "remove": link, "self": link, "update": link,
                    "tokens": ctx.base() + "/v3/tokens?userId=" + user["id"]},
                "me": me, "mustChangePassword": user["mustChangePassword"],
                "name": user["name"],
                "principalIds": ["local://" + user["id"]],
                "state": "active", "transitioning": "no",
                "transitioningMessage": "", "type": "user",
                "username": user["username"], "uuid": user["uuid"]}

    def validate_password(self, username, current, new):
        """pkg/auth/api/user validatePassword (§2.3)."""
        minlen = self.setting_int("password-min-length")
        if len(new) < minlen:
            return "Password must be at least %d characters" % minlen
        if new == username:
            return "Password cannot be the same as the username"
        if new == current:
            return ("The new password must not be the same as the current "
                    "password")
        return None

    def user_action_done(self):
        self.d["settings"]["first-login"] = "false"
        self.store.save()

    def v3_users(self, ctx, auth, ident):
        user = auth.user
        action = ctx.arg("action")
        if ident is None:
            if ctx.method == "GET":
                users = sorted(self.d["users"].values(),
                               key=lambda u: u["id"])
                if ctx.arg("me") == "true":
                    users = [user]
                if ctx.arg("username"):
                    users = [u for u in users
                             if u["username"] == ctx.arg("username")]
                data = [self.user_resource(ctx, u, u["id"] == user["id"])
                        for u in users]
                base = ctx.base() + "/v3/users"
                return jreply(200, self.collection(
                    ctx, "user", data, "/v3/users", create=True, actions={
                        "changepassword": base + "?action=changepassword",
                        "refreshauthprovideraccess":
                            base + "?action=refreshauthprovideraccess"}),
                    sort=True)
            if ctx.method != "POST":
                return norman_error(405, "MethodNotAllow",
                                    "Method %s not supported" % ctx.method)
            if action == "changepassword":
                return self.change_password(ctx, user)
            if action == "refreshauthprovideraccess":
                self.user_action_done()
                return Reply(200, b"", None)
            if action:
                return norman_error(422, "InvalidAction",
                                    "Invalid action: %s" % action)
            return norman_error(405, "MethodNotAllow",
                                "creating users is not simulated")
        target = self.d["users"].get(ident)
        if not target:
            if action and ctx.method == "POST":
                return norman_error(404, "NotFound",
                                    "Failed to find type: user id: %s"
                                    % ident)
            return norman_error(404, "NotFound",
                                "users.management.cattle.io %s not found"
                                % gostr(ident))
        if ctx.method == "GET":
            return jreply(200, self.user_resource(
                ctx, target, target["id"] == user["id"]), sort=True)
        if ctx.method == "POST" and action == "setpassword":
            data = self.read_json(ctx)
            new = data.get("newPassword")
            if not isinstance(new, str) or not new:
                return norman_error(500, "ServerError", "Invalid password")
            msg = self.validate_password(target["username"], "", new)
            if msg:
                return norman_error(422, "InvalidBodyContent", msg)
            target["password"] = hash_password(new)
            target["mustChangePassword"] = False
            self.user_action_done()
            return jreply(200, self.user_resource(
                ctx, target, target["id"] == user["id"]), sort=True)
        if ctx.method == "POST" and action:
            return norman_error(422, "InvalidAction",
                                "Invalid action: %s" % action)
        return norman_error(405, "MethodNotAllow",
                            "Method %s not supported" % ctx.method)

    def change_password(self, ctx, user):
        """POST /v3/users?action=changepassword (§2.3)."""
        data = self.read_json(ctx)
        current = data.get("currentPassword")
        if not isinstance(current, str) or not current:
            return norman_error(422, "InvalidBodyContent",
                                "must specify current password")
        new = data.get("newPassword")
        if not isinstance(new, str) or not new:
            return norman_error(422, "InvalidBodyContent",
                                "invalid new password")
        msg = self.validate_password(user["username"], current, new)
        if msg:
            return norman_error(422, "InvalidBodyContent", msg)
        if not check_password(current, user["password"]):
            return norman_error(422, "InvalidBodyContent",
                                "invalid current password")
        user["password"] = hash_password(new)
        user["mustChangePassword"] = False
        self.user_action_done()
        return Reply(200, b"", None)

    def cluster_resource(self, ctx):
        link = ctx.base() + "/v3/clusters/local"
        ver = self.sim.k8s.version_info()
        return {"actions": {
                    "generateKubeconfig": link + "?action=generateKubeconfig"},
                "baseType": "cluster", "caCert": base64.b64encode(
                    self.sim.cacerts.encode()).decode(),
                "conditions": [{"status": "True", "type": t} for t in
                               ("Ready", "Provisioned", "Updated")],
                "created": ts(self.d["started"]),
                "createdTS": int(self.d["started"] * 1000),
                "creatorId": None, "description": "", "driver": "k3s",
                "id": "local", "internal": True, "links": {
                    "self": link, "remove": link, "update": link},
                "name": "local", "provider": "k3s", "state": "active",
                "transitioning": "no", "transitioningMessage": "",
                "type": "cluster", "uuid": det_uuid("cluster/local"),
                "version": {k: ver[k] for k in (
                    "buildDate", "compiler", "gitCommit", "gitTreeState",
                    "gitVersion", "goVersion", "major", "minor",
                    "platform")}}

    def v3_clusters(self, ctx, auth, ident):
        if ident is None:
            if ctx.method != "GET":
                return norman_error(405, "MethodNotAllow",
                                    "Method %s not supported" % ctx.method)
            return jreply(200, self.collection(
                ctx, "cluster", [self.cluster_resource(ctx)],
                "/v3/clusters", create=True), sort=True)
        action = ctx.arg("action")
        if ctx.method == "POST" and action:
            if action != "generateKubeconfig":
                return norman_error(422, "InvalidAction",
                                    "Invalid action: %s" % action)
            if ident != "local":
                return norman_error(404, "NotFound",
                                    "Failed to find type: cluster id: %s"
                                    % ident)
            return self.generate_kubeconfig(ctx, auth)
        if ident != "local":
            return norman_error(404, "NotFound",
                                "clusters.management.cattle.io %s not found"
                                % gostr(ident))
        if ctx.method == "GET":
            return jreply(200, self.cluster_resource(ctx), sort=True)
        return norman_error(405, "MethodNotAllow",
                            "Method %s not supported" % ctx.method)

    def generate_kubeconfig(self, ctx, auth):
        """§2.6: 200 {"config": <yaml>, "type": "generateKubeconfigOutput"}."""
        token = ""
        if self.setting("kubeconfig-generate-token").lower() == "true":
            ttl = self.ingest_ttl(0, "kubeconfig-max-token-ttl-minutes",
                                  "kubeconfig-default-token-ttl-minutes")
            _, token = self.new_token(
                auth.user, True, ttl, "Kubeconfig token", kind="kubeconfig",
                prefix="kubeconfig-" + auth.user["id"])
        host = ctx.host()
        url = self.setting("server-url")
        if url:
            parsed = urllib.parse.urlsplit(url)
            host = parsed.netloc or host
        cert = ""
        if self.sim.cacerts:
            cert = format_cert(base64.b64encode(
                self.sim.cacerts.encode()).decode())
        cfg = kubeconfig_yaml("local", host, cert, token)
        return jreply(200, {"config": cfg,
                            "type": "generateKubeconfigOutput"}, sort=True)


def norm_type(seg):
    """Type names are case-insensitive and singular = plural (§2.1)."""
    s = seg.lower()
    return s if s.endswith("s") else s + "s"


def det_uuid(seed):
    return str(uuid.UUID(hashlib.md5(seed.encode()).hexdigest()))


# --------------------------------------------------------------------------
# Kubernetes object machinery: list semantics, patches, managed fields

CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
KEY_DEFAULTS = {"protocol": "TCP"}
# structs Kubernetes marks +structType=atomic, per kind
ATOMIC_STRUCTS = {"Deployment": {("spec", "selector")}}
GRANULAR_MAPS = ("labels", "annotations", "matchLabels", "nodeSelector",
                 "limits", "requests", "selector")


def list_kind(sp):
    """(kind, strategic-merge key, server-side-apply keys) for the list at
    schema path sp (field names only).  kind: map | set | atomic."""
    last = sp[-1] if sp else ""
    if sp == ("metadata", "finalizers"):
        return "set", None, None
    if sp == ("metadata", "ownerReferences"):
        return "map", "uid", ("uid",)
    if sp == ("status", "conditions"):
        return "map", "type", ("type",)
    if sp == ("spec", "ports"):  # Service
        return "map", "port", ("port", "protocol")
    if last in CONTAINER_LISTS:
        return "map", "name", ("name",)
    if len(sp) >= 2 and sp[-2] in CONTAINER_LISTS:
        if last == "ports":
            return "map", "containerPort", ("containerPort", "protocol")
        if last == "env":
            return "map", "name", ("name",)
        if last == "volumeMounts":
            return "map", "mountPath", ("mountPath",)
        if last == "volumeDevices":
            return "map", "devicePath", ("devicePath",)
    if last in ("volumes", "imagePullSecrets"):
        return "map", "name", ("name",)
    if last == "hostAliases":
        return "map", "ip", ("ip",)
    return "atomic", None, None


def key_json(item, keys):
    k = {}
    for f in keys:
        v = item.get(f, KEY_DEFAULTS.get(f, MISSING))
        if v is not MISSING:
            k[f] = v
    return canon(k)


# --- JSON merge patch (RFC 7386) -------------------------------------------

def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return deep(patch)
    out = deep(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# --- strategic merge patch (subset of apimachinery strategicpatch) ---------

DELETE = object()


def smp(orig, patch, sp=()):
    if not isinstance(patch, dict):
        return deep(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: deep(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return DELETE
    out = deep(orig) if isinstance(orig, dict) else {}
    orders = {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(out.get(f), list) and isinstance(v, list):
                out[f] = [x for x in out[f] if x not in v]
            continue
        if k.startswith("$"):
            continue
        if v is None:
            out.pop(k, None)
            continue
        path = sp + (k,)
        lk, mkey, _ = list_kind(path)
        if isinstance(v, list) and lk == "map":
            out[k] = smp_list(out.get(k) if isinstance(out.get(k), list)
                              else [], v, mkey, path)
        elif isinstance(v, list) and lk == "set":
            cur = out.get(k) if isinstance(out.get(k), list) else []
            out[k] = cur + [x for x in v if x not in cur]
        elif isinstance(v, dict):
            r = smp(out.get(k), v, path)
            if r is DELETE:
                out.pop(k, None)
            else:
                out[k] = r
        else:
            out[k] = deep(v)
    for f, order in orders.items():
        lk, mkey, _ = list_kind(sp + (f,))
        if isinstance(out.get(f), list) and isinstance(order, list):
            def rank(x, order=order, mkey=mkey):
                probe = x.get(mkey) if isinstance(x, dict) and mkey else x
                for i, o in enumerate(order):
                    if (o.get(mkey) if isinstance(o, dict) and mkey
                            else o) == probe:
                        return i
                return len(order)
            out[f] = sorted(out[f], key=rank)
    if "$retainKeys" in patch and isinstance(patch["$retainKeys"], list):
        out = {k: v for k, v in out.items() if k in patch["$retainKeys"]}
    return out


def strip_directives(v):
    if isinstance(v, dict):
        return {k: strip_directives(x) for k, x in v.items()
                if not k.startswith("$")}
    if isinstance(v, list):
        return [strip_directives(x) for x in v]
    return v


def smp_list(orig, patch, mkey, sp):
    if any(isinstance(i, dict) and i.get("$patch") == "replace"
           for i in patch):
        return [strip_directives(i) for i in patch
                if not (isinstance(i, dict) and "$patch" in i)]
    out = deep(orig)
    for item in patch:
        if not isinstance(item, dict):
            out.append(deep(item))
            continue
        kv = item.get(mkey)
        idx = next((i for i, x in enumerate(out)
                    if isinstance(x, dict) and x.get(mkey) == kv), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        if idx is None:
            out.append(strip_directives(item))
        else:
            out[idx] = smp(out[idx], item, sp)
    return out


# --- JSON patch (RFC 6902) ---------------------------------------------------

class PatchFailed(Exception):
    pass


def _pointer(p):
    if p == "":
        return []
    if not p.startswith("/"):
        raise PatchFailed("invalid pointer " + p)
    return [t.replace("~1", "/").replace("~0", "~") for t in p[1:].split("/")]


def _walk(doc, toks):
    cur = doc
    for t in toks:
        if isinstance(cur, dict):
            if t not in cur:
                raise PatchFailed("missing key " + t)
            cur = cur[t]
        elif isinstance(cur, list):
            try:
                cur = cur[int(t)]
            except (ValueError, IndexError):
                raise PatchFailed("bad index " + t)
        else:
            raise PatchFailed("cannot descend into a scalar")
    return cur


def _add(doc, toks, value):
    if not toks:
        return value
    parent = _walk(doc, toks[:-1])
    last = toks[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                i = int(last)
            except ValueError:
                raise PatchFailed("bad index " + last)
            if i < 0 or i > len(parent):
                raise PatchFailed("index out of range")
            parent.insert(i, value)
    else:
        raise PatchFailed("cannot add to a scalar")
    return doc


def _remove(doc, toks):
    if not toks:
        raise PatchFailed("cannot remove the root")
    parent = _walk(doc, toks[:-1])
    last = toks[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchFailed("missing key " + last)
        return parent.pop(last)
    if isinstance(parent, list):
        try:
            return parent.pop(int(last))
        except (ValueError, IndexError):
            raise PatchFailed("bad index " + last)
    raise PatchFailed("cannot remove from a scalar")


def json_patch(doc, ops):
    doc = deep(doc)
    for op in ops:
        if not isinstance(op, dict):
            raise PatchFailed("operation is not an object")
        kind = op.get("op")
        toks = _pointer(op.get("path", ""))
        if kind == "add":
            doc = _add(doc, toks, deep(op.get("value")))
        elif kind == "remove":
            _remove(doc, toks)
        elif kind == "replace":
            _walk(doc, toks)  # must exist
            if not toks:
                doc = deep(op.get("value"))
            else:
                _remove(doc, toks)
                doc = _add(doc, toks, deep(op.get("value")))
        elif kind == "move":
            v = _remove(doc, _pointer(op.get("from", "")))
            doc = _add(doc, toks, v)
        elif kind == "copy":
            v = deep(_walk(doc, _pointer(op.get("from", ""))))
            doc = _add(doc, toks, v)
        elif kind == "test":
            if _walk(doc, toks) != op.get("value"):
                raise PatchFailed("testing value %s failed" % op.get("path"))
        else:
            raise PatchFailed("unexpected kind: %s" % kind)
    return doc


# --- managed fields (fieldsV1) and server-side apply -------------------------

SYSTEM_META = ("name", "namespace", "uid", "resourceVersion", "generation",
               "creationTimestamp", "managedFields", "selfLink",
               "deletionTimestamp", "deletionGracePeriodSeconds")


def strip_for_fields(obj, sub):
    o = deep(obj) if isinstance(obj, dict) else {}
    o.pop("apiVersion", None)
    o.pop("kind", None)
    md = o.get("metadata")
    if isinstance(md, dict):
        for k in SYSTEM_META:
            md.pop(k, None)
        if not md:
            o.pop("metadata")
    if sub == "":
        o.pop("status", None)
    elif sub == "status":
        o = {"status": o["status"]} if o.get("status") else {}
    elif sub == "scale":
        spec = o.get("spec") or {}
        o = {"spec": {"replicas": spec["replicas"]}} \
            if "replicas" in spec else {}
    return o


def fieldset(obj, kind, mode):
    """Field paths (tuples of fieldsV1 keys) an object sets.  mode "update"
    also counts map nodes themselves, as Update operations record them."""
    out = set()
    atomic = ATOMIC_STRUCTS.get(kind, set())

    def walk(v, path, sp):
        if isinstance(v, dict):
            if (not v or sp in atomic) and path:
                out.add(path)
                return
            if mode == "update" and sp and sp[-1] in GRANULAR_MAPS:
                out.add(path)
            for k, x in v.items():
                walk(x, path + ("f:" + k,), sp + (k,))
        elif isinstance(v, list):
            lk, _, keys = list_kind(sp)
            if lk == "map" and all(isinstance(i, dict) for i in v):
                for item in v:
                    ip = path + ("k:" + key_json(item, keys),)
                    out.add(ip)
                    for k, x in item.items():
                        walk(x, ip + ("f:" + k,), sp + (k,))
            elif lk == "set":
                for item in v:
                    out.add(path + ("v:" + canon(item),))
            else:
                out.add(path)
        elif path:
            out.add(path)

    walk(obj, (), ())
    return out


def leaves_of(s):
    prefixes = set()
    for p in s:
        for i in range(1, len(p)):
            prefixes.add(p[:i])
    return {p for p in s if p not in prefixes}


def value_at(obj, path):
    cur = obj
    for el in path:
        if el.startswith("f:"):
            if not isinstance(cur, dict) or el[2:] not in cur:
                return MISSING
            cur = cur[el[2:]]
        elif el.startswith("k:"):
            if not isinstance(cur, list):
                return MISSING
            want = json.loads(el[2:])
            found = MISSING
            for item in cur:
                if isinstance(item, dict) and all(
                        item.get(k, KEY_DEFAULTS.get(k)) == v
                        for k, v in want.items()):
                    found = item
                    break
            if found is MISSING:
                return MISSING
            cur = found
        elif el.startswith("v:"):
            val = json.loads(el[2:])
            if not isinstance(cur, list) or val not in cur:
                return MISSING
            cur = val
    return cur


def remove_at(obj, path):
    if not path:
        return
    parent = value_at(obj, path[:-1])
    el = path[-1]
    if el.startswith("f:") and isinstance(parent, dict):
        parent.pop(el[2:], None)
    elif el.startswith("k:") and isinstance(parent, list):
        target = value_at(obj, path)
        if target is not MISSING:
            parent.remove(target)
    elif el.startswith("v:") and isinstance(parent, list):
        val = json.loads(el[2:])
        if val in parent:
            parent.remove(val)


def set_to_fieldsv1(s):
    root = {}
    for p in s:
        node = root
        for el in p:
            node = node.setdefault(el, {})
    for p in s:
        node = root
        for el in p:
            node = node[el]
        if node and "." not in node:
            node["."] = {}

    def srt(n):
        return {k: srt(n[k]) for k in sorted(n)}
    return srt(root)


def fieldsv1_to_set(tree, prefix=()):
    out = set()
    for k, sub in (tree or {}).items():
        if k == ".":
            out.add(prefix)
            continue
        p = prefix + (k,)
        if not sub:
            out.add(p)
        else:
            out |= fieldsv1_to_set(sub, p)
    return out


def mf_load(obj):
    out = []
    for e in (obj or {}).get("metadata", {}).get("managedFields") or []:
        out.append({"manager": e.get("manager", ""),
                    "operation": e.get("operation", "Update"),
                    "apiVersion": e.get("apiVersion", ""),
                    "time": e.get("time"),
                    "subresource": e.get("subresource", ""),
                    "fields": fieldsv1_to_set(e.get("fieldsV1"))})
    return out


def mf_store(obj, entries):
    lst = []
    for e in entries:
        if not e["fields"]:
            continue
        d = {"manager": e["manager"], "operation": e["operation"],
             "apiVersion": e["apiVersion"], "time": e["time"],
             "fieldsType": "FieldsV1",
             "fieldsV1": set_to_fieldsv1(e["fields"])}
        if e["subresource"]:
            d["subresource"] = e["subresource"]
        lst.append(d)
    md = obj.setdefault("metadata", {})
    if lst:
        md["managedFields"] = lst
    else:
        md.pop("managedFields", None)


def mf_find(entries, manager, operation, sub):
    for e in entries:
        if (e["manager"], e["operation"], e["subresource"]) == \
                (manager, operation, sub):
            return e
    return None


def track_update(old, new, kind, manager, sub, apiv, when):
    """An Update operation: the manager takes the fields it changed."""
    entries = mf_load(old) if old else []
    old_s = fieldset(strip_for_fields(old, sub), kind, "update") \
        if old else set()
    new_s = fieldset(strip_for_fields(new, sub), kind, "update")
    new_leaves = leaves_of(new_s)
    changed = set()
    for p in new_s:
        if p not in old_s:
            changed.add(p)
        elif p in new_leaves and value_at(old, p) != value_at(new, p):
            changed.add(p)
    removed = old_s - new_s
    mine = mf_find(entries, manager, "Update", sub)
    for e in entries:
        e["fields"] -= removed
        if e is not mine:
            e["fields"] -= changed
    if changed:
        if mine is None:
            mine = {"manager": manager, "operation": "Update",
                    "apiVersion": apiv, "time": when, "subresource": sub,
                    "fields": set()}
            entries.append(mine)
        mine["fields"] |= changed
        mine["time"] = when
        mine["apiVersion"] = apiv
    mf_store(new, entries)


def print_manager(e):
    s = gostr(e["manager"])
    if e["subresource"]:
        s += " with subresource " + gostr(e["subresource"])
    if e["operation"] == "Update":
        s += " using " + e["apiVersion"]
    return s


def path_str(p):
    out = ""
    for el in p:
        if el.startswith("f:"):
            out += "." + el[2:]
        elif el.startswith("k:"):
            d = json.loads(el[2:])
            out += "[" + ",".join("%s=%s" % (k, json.dumps(d[k]))
                                  for k in sorted(d)) + "]"
        elif el.startswith("v:"):
            out += "[=" + el[2:] + "]"
    return out


def apply_conflict(conflicts):
    causes = [{"reason": "FieldManagerConflict",
               "message": "conflict with " + print_manager(e),
               "field": path_str(p)} for e, p in conflicts]
    if len(conflicts) == 1:
        e, p = conflicts[0]
        msg = "Apply failed with 1 conflict: conflict with %s: %s" % (
            print_manager(e), path_str(p))
    else:
        groups = {}
        for e, p in conflicts:
            groups.setdefault(print_manager(e), []).append(path_str(p))
        lines = []
        for m in sorted(groups):
            lines.append("conflicts with %s:" % m)
            lines.extend("- " + x for x in groups[m])
        msg = "Apply failed with %d conflicts: %s" % (len(conflicts),
                                                      "\n".join(lines))
    return k8s_status(409, "Conflict", msg, {"causes": causes})


def apply_merge(live, cfg, kind, sp=()):
    if isinstance(cfg, dict):
        if not isinstance(live, dict) or sp in ATOMIC_STRUCTS.get(kind, ()):
            return {k: apply_merge(MISSING, v, kind, sp + (k,))
                    for k, v in cfg.items() if v is not None}
        out = deep(live)
        for k, v in cfg.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = apply_merge(out.get(k, MISSING), v, kind, sp + (k,))
        return out
    if isinstance(cfg, list):
        lk, _, keys = list_kind(sp)
        if lk == "map" and isinstance(live, list):
            out = deep(live)
            for item in cfg:
                if not isinstance(item, dict):
                    continue
                kj = key_json(item, keys)
                idx = next((i for i, x in enumerate(out) if isinstance(x, dict)
                            and key_json(x, keys) == kj), None)
                if idx is None:
                    out.append(apply_merge(MISSING, item, kind, sp))
                else:
                    out[idx] = apply_merge(out[idx], item, kind, sp)
            return out
        if lk == "set" and isinstance(live, list):
            return deep(live) + [x for x in cfg if x not in live]
        return deep(cfg)
    return cfg


def server_side_apply(live, cfg, kind, manager, force, apiv, when):
    """Returns (merged object, managed field entries) or raises 409."""
    entries = mf_load(live) if live else []
    cfg_s = fieldset(strip_for_fields(cfg, ""), kind, "apply")
    mine = mf_find(entries, manager, "Apply", "")
    prev = set(mine["fields"]) if mine else set()
    conflicts = []
    if live:
        leaves = leaves_of(cfg_s)
        for e in entries:
            if e is mine:
                continue
            for p in sorted(leaves & e["fields"]):
                lv = value_at(live, p)
                if lv is not MISSING and lv != value_at(cfg, p):
                    conflicts.append((e, p))
    if conflicts and not force:
        raise apply_conflict(conflicts)
    for e, p in conflicts:
        e["fields"].discard(p)
    others = set()
    for e in entries:
        if e is not mine:
            others |= e["fields"]
    new = deep(live) if live else {}
    for p in sorted(prev - cfg_s - others, key=len, reverse=True):
        if any(len(q) > len(p) and q[:len(p)] == p for q in others):
            continue
        remove_at(new, p)
    new = apply_merge(new, cfg, kind)
    if mine is None:
        mine = {"manager": manager, "operation": "Apply", "apiVersion": apiv,
                "time": when, "subresource": "", "fields": set()}
        entries.append(mine)
    mine["fields"] = cfg_s
    mine["time"] = when
    mine["apiVersion"] = apiv
    return new, entries


# --- label and field selectors -------------------------------------------

SEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"


def split_selector(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(s):
    reqs = []
    for part in split_selector(s or ""):
        m = re.match(r"^(%s)\s+(in|notin)\s+\(([^)]*)\)$" % SEL_KEY, part)
        if m:
            vals = {v.strip() for v in m.group(3).split(",") if v.strip()}
            reqs.append((m.group(1), m.group(2), vals))
            continue
        m = re.match(r"^!\s*(%s)$" % SEL_KEY, part)
        if m:
            reqs.append((m.group(1), "!", None))
            continue
        m = re.match(r"^(%s)\s*(==|!=|=)\s*([-A-Za-z0-9_.]*)$" % SEL_KEY, part)
        if m:
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append((m.group(1), op, m.group(3)))
            continue
        m = re.match(r"^(%s)$" % SEL_KEY, part)
        if m:
            reqs.append((m.group(1), "exists", None))
            continue
        raise e_bad_request("unable to parse requirement: found '%s', "
                            "expected: identifier" % part)
    return reqs


def labels_match(labels, reqs):
    labels = labels or {}
    for key, op, val in reqs:
        have = key in labels
        v = labels.get(key)
        if op == "=" and v != val:
            return False
        if op == "!=" and have and v == val:
            return False
        if op == "in" and (not have or v not in val):
            return False
        if op == "notin" and have and v in val:
            return False
        if op == "exists" and not have:
            return False
        if op == "!" and have:
            return False
    return True


def selector_string(sel):
    """metav1.LabelSelectorAsSelector(...).String()"""
    parts = []
    for k, v in sorted(((sel or {}).get("matchLabels") or {}).items()):
        parts.append("%s=%s" % (k, v))
    for r in (sel or {}).get("matchExpressions") or []:
        if not isinstance(r, dict):
            continue
        op = r.get("operator")
        vals = ",".join(sorted(r.get("values") or []))
        if op == "In":
            parts.append("%s in (%s)" % (r.get("key"), vals))
        elif op == "NotIn":
            parts.append("%s notin (%s)" % (r.get("key"), vals))
        elif op == "Exists":
            parts.append(r.get("key") or "")
        elif op == "DoesNotExist":
            parts.append("!" + (r.get("key") or ""))
    return ",".join(sorted(parts))


def selector_reqs(sel):
    if sel is None:
        return None
    return parse_label_selector(selector_string(sel))


# --------------------------------------------------------------------------
# Kubernetes kinds: defaults and validation (§3)


class Res:
    def __init__(self, group, resource, kind, namespaced, writable,
                 short=(), create_on_update=False, name_rule="subdomain"):
        self.group, self.resource, self.kind = group, resource, kind
        self.namespaced, self.writable = namespaced, writable
        self.short, self.create_on_update = short, create_on_update
        self.name_rule = name_rule
        self.api = group + "/v1" if group else "v1"


RESOURCES = {
    ("apps", "deployments"): Res("apps", "deployments", "Deployment", True,
                                 True, ("deploy",)),
    ("", "services"): Res("", "services", "Service", True, True, ("svc",),
                          create_on_update=True, name_rule="dns1035"),
    ("", "pods"): Res("", "pods", "Pod", True, False, ("po",)),
    ("", "namespaces"): Res("", "namespaces", "Namespace", False, True,
                            ("ns",), name_rule="label"),
    ("", "nodes"): Res("", "nodes", "Node", False, False, ("no",)),
}

RE_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RE_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RE_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MSG_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
    "characters, '-' or '.', and must start and end with an alphanumeric "
    "character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
MSG_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric "
    "characters or '-', and must start and end with an alphanumeric "
    "character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
MSG_1035 = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or "
    "'-', start with an alphabetic character, and end with an alphanumeric "
    "character (e.g. 'my-name',  or 'abc-123', regex used for validation is "
    "'[a-z]([-a-z0-9]*[a-z0-9])?')")

DEPLOYMENT_SPEC_ORDER = ("replicas", "selector", "template", "strategy",
                         "minReadySeconds", "revisionHistoryLimit", "paused",
                         "progressDeadlineSeconds")
POD_SPEC_ORDER = (
    "volumes", "initContainers", "containers", "ephemeralContainers",
    "restartPolicy", "terminationGracePeriodSeconds", "activeDeadlineSeconds",
    "dnsPolicy", "nodeSelector", "serviceAccountName", "serviceAccount",
    "automountServiceAccountToken", "nodeName", "hostNetwork", "hostPID",
    "hostIPC", "shareProcessNamespace", "securityContext", "imagePullSecrets",
    "hostname", "subdomain", "affinity", "schedulerName", "tolerations",
    "hostAliases", "priorityClassName", "priority", "dnsConfig",
    "readinessGates", "runtimeClassName", "enableServiceLinks",
    "preemptionPolicy", "overhead", "topologySpreadConstraints")
CONTAINER_ORDER = (
    "name", "image", "command", "args", "workingDir", "ports", "envFrom",
    "env", "resources", "resizePolicy", "restartPolicy", "volumeMounts",
    "volumeDevices", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "terminationMessagePath", "terminationMessagePolicy",
    "imagePullPolicy", "securityContext", "stdin", "stdinOnce", "tty")
SERVICE_SPEC_ORDER = (
    "ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs",
    "sessionAffinity", "loadBalancerIP", "loadBalancerSourceRanges",
    "externalName", "externalTrafficPolicy", "healthCheckNodePort",
    "publishNotReadyAddresses", "sessionAffinityConfig", "ipFamilies",
    "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass",
    "internalTrafficPolicy", "trafficDistribution")
SERVICE_PORT_ORDER = ("name", "protocol", "appProtocol", "port", "targetPort",
                      "nodePort")
META_ORDER = ("name", "generateName", "namespace", "selfLink", "uid",
              "resourceVersion", "generation", "creationTimestamp",
              "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
              "annotations", "ownerReferences", "finalizers", "managedFields")
TOP_ORDER = ("kind", "apiVersion", "metadata", "spec", "status")


def image_pull_policy(image):
    name = image.split("@")[0]
    tag = name.rsplit("/", 1)[-1]
    if "@" in image:
        return "IfNotPresent"
    if ":" not in tag or tag.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def default_pod_spec(ps):
    if not isinstance(ps, dict):
        return ps
    for lst in ("initContainers", "containers"):
        for c in ps.get(lst) or []:
            if not isinstance(c, dict):
                continue
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            if isinstance(c.get("image"), str):
                c.setdefault("imagePullPolicy", image_pull_policy(c["image"]))
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")
            c_ordered = ordered(c, CONTAINER_ORDER)
            c.clear()
            c.update(c_ordered)
    ps.setdefault("restartPolicy", "Always")
    ps.setdefault("terminationGracePeriodSeconds", 30)
    ps.setdefault("dnsPolicy", "ClusterFirst")
    ps.setdefault("securityContext", {})
    ps.setdefault("schedulerName", "default-scheduler")
    return ordered(ps, POD_SPEC_ORDER)


def default_deployment(d):
    spec = d.get("spec")
    if not isinstance(spec, dict):
        spec = d["spec"] = {}
    if spec.get("replicas") is None:
        spec["replicas"] = 1
    st = spec.get("strategy")
    if not isinstance(st, dict):
        st = spec["strategy"] = {}
    if not st.get("type"):
        st["type"] = "RollingUpdate"
    if st["type"] == "RollingUpdate":
        ru = st.get("rollingUpdate")
        if not isinstance(ru, dict):
            ru = st["rollingUpdate"] = {}
        ru.setdefault("maxUnavailable", "25%")
        ru.setdefault("maxSurge", "25%")
        st["rollingUpdate"] = ordered(ru, ("maxUnavailable", "maxSurge"))
    spec["strategy"] = ordered(st, ("type", "rollingUpdate"))
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    tmpl = spec.get("template")
    if isinstance(tmpl, dict):
        if isinstance(tmpl.get("spec"), dict):
            tmpl["spec"] = default_pod_spec(tmpl["spec"])
        spec["template"] = ordered(tmpl, ("metadata", "spec"))
    d["spec"] = ordered(spec, DEPLOYMENT_SPEC_ORDER)


def default_service(s):
    spec = s.get("spec")
    if not isinstance(spec, dict):
        spec = s["spec"] = {}
    typ = spec.get("type") or "ClusterIP"
    spec["type"] = typ
    spec.setdefault("sessionAffinity", "None")
    ports = spec.get("ports")
    if isinstance(ports, list):
        for i, p in enumerate(ports):
            if not isinstance(p, dict):
                continue
            p.setdefault("protocol", "TCP")
            if p.get("targetPort") in (None, 0, "") and \
                    isinstance(p.get("port"), int):
                p["targetPort"] = p["port"]
            ports[i] = ordered(p, SERVICE_PORT_ORDER)
    if typ != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if typ in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if typ == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    s["spec"] = ordered(spec, SERVICE_SPEC_ORDER)


def int_or_percent(v, total, round_up):
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.endswith("%"):
        try:
            pct = int(v[:-1])
        except ValueError:
            return 0
        x = pct * total / 100.0
        return int(-(-x // 1)) if round_up else int(x // 1)
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def label_selector_go(sel):
    ml = (sel or {}).get("matchLabels")
    me = (sel or {}).get("matchExpressions")
    mls = go_repr(ml) if ml else "map[string]string(nil)"
    mes = "[]v1.LabelSelectorRequirement(nil)" if not me else \
        "[]v1.LabelSelectorRequirement{...}"
    return "v1.LabelSelector{MatchLabels:%s, MatchExpressions:%s}" % (mls,
                                                                      mes)


def validate_name(md, rule):
    errs = []
    name = md.get("name")
    if not name:
        errs.append(FieldError(FieldError.REQUIRED, "metadata.name",
                               detail="name or generateName is required"))
        return errs
    if rule == "dns1035":
        ok, msg, mx = RE_1035.match(name), MSG_1035, 63
    elif rule == "label":
        ok, msg, mx = RE_LABEL.match(name), MSG_LABEL, 63
    else:
        ok, msg, mx = RE_SUBDOMAIN.match(name), MSG_SUBDOMAIN, 253
    if len(name) > mx:
        errs.append(FieldError(FieldError.INVALID, "metadata.name", name,
                               "must be no more than %d characters" % mx))
    if not ok:
        errs.append(FieldError(FieldError.INVALID, "metadata.name", name,
                               msg))
    return errs


def validate_containers(ps, base):
    errs = []
    containers = ps.get("containers")
    if not containers:
        errs.append(FieldError(FieldError.REQUIRED, base + ".containers"))
        return errs
    seen = set()
    for i, c in enumerate(containers):
        f = "%s.containers[%d]" % (base, i)
        name = c.get("name")
        if not name:
            errs.append(FieldError(FieldError.REQUIRED, f + ".name"))
        elif not RE_LABEL.match(name) or len(name) > 63:
            errs.append(FieldError(FieldError.INVALID, f + ".name", name,
                                   MSG_LABEL))
        elif name in seen:
            errs.append(FieldError(FieldError.DUPLICATE, f + ".name", name))
        seen.add(name)
        image = c.get("image")
        if not isinstance(image, str) or not image.strip():
            errs.append(FieldError(FieldError.REQUIRED, f + ".image"))
        for j, p in enumerate(c.get("ports") or []):
            pf = "%s.ports[%d]" % (f, j)
            cp = p.get("containerPort")
            if not isinstance(cp, int) or not 1 <= cp <= 65535:
                errs.append(FieldError(FieldError.INVALID,
                                       pf + ".containerPort", cp,
                                       "must be between 1 and 65535, "
                                       "inclusive"))
            if p.get("protocol") not in ("TCP", "UDP", "SCTP"):
                errs.append(FieldError(FieldError.UNSUPPORTED,
                                       pf + ".protocol", p.get("protocol"),
                                       'supported values: "SCTP", "TCP", '
                                       '"UDP"'))
        ipp = c.get("imagePullPolicy")
        if ipp not in ("Always", "IfNotPresent", "Never"):
            errs.append(FieldError(FieldError.UNSUPPORTED,
                                   f + ".imagePullPolicy", ipp,
                                   'supported values: "Always", '
                                   '"IfNotPresent", "Never"'))
    return errs


def validate_deployment(d, old):
    md = d.get("metadata") or {}
    errs = validate_name(md, "subdomain")
    spec = d.get("spec") or {}
    rep = spec.get("replicas")
    if isinstance(rep, int) and rep < 0:
        errs.append(FieldError(FieldError.INVALID, "spec.replicas", rep,
                               "must be greater than or equal to 0"))
    sel = spec.get("selector")
    if sel is None:
        errs.append(FieldError(FieldError.REQUIRED, "spec.selector"))
    else:
        for i, r in enumerate(sel.get("matchExpressions") or []):
            f = "spec.selector.matchExpressions[%d]" % i
            op = r.get("operator")
            if op in ("In", "NotIn") and not r.get("values"):
                errs.append(FieldError(
                    FieldError.REQUIRED, f + ".values", detail="must be "
                    "specified when `operator` is 'In' or 'NotIn'"))
            elif op in ("Exists", "DoesNotExist") and r.get("values"):
                errs.append(FieldError(
                    FieldError.FORBIDDEN, f + ".values", detail="may not be "
                    "specified when `operator` is 'Exists' or "
                    "'DoesNotExist'"))
            elif op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                errs.append(FieldError(FieldError.INVALID, f + ".operator",
                                       op, "is not a valid label selector "
                                       "operator"))
            if not r.get("key"):
                errs.append(FieldError(FieldError.INVALID, f + ".key",
                                       r.get("key") or "",
                                       "name part must be non-empty"))
        if not (sel.get("matchLabels") or sel.get("matchExpressions")):
            errs.append(FieldError(FieldError.INVALID, "spec.selector", sel,
                                   "empty selector is invalid for deployment",
                                   legacy_repr=label_selector_go(sel)))
    tmpl = spec.get("template") or {}
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    reqs = selector_reqs(sel)
    # A nil selector selects nothing (and is not "empty"), so it never matches.
    if reqs is None or (reqs and not labels_match(labels, reqs)):
        errs.append(FieldError(FieldError.INVALID,
                               "spec.template.metadata.labels", labels,
                               "`selector` does not match template `labels`"))
    ps = tmpl.get("spec") or {}
    errs.extend(validate_containers(ps, "spec.template.spec"))
    if ps.get("restartPolicy", "Always") != "Always":
        errs.append(FieldError(FieldError.UNSUPPORTED,
                               "spec.template.spec.restartPolicy",
                               ps.get("restartPolicy"),
                               'supported values: "Always"'))
    st = spec.get("strategy") or {}
    if st.get("type") not in ("Recreate", "RollingUpdate"):
        errs.append(FieldError(FieldError.UNSUPPORTED, "spec.strategy.type",
                               st.get("type"), 'supported values: '
                               '"Recreate", "RollingUpdate"'))
    elif st["type"] == "Recreate" and st.get("rollingUpdate") is not None:
        errs.append(FieldError(FieldError.FORBIDDEN,
                               "spec.strategy.rollingUpdate",
                               detail="may not be specified when strategy "
                               "`type` is 'Recreate'"))
    elif st["type"] == "RollingUpdate":
        ru = st.get("rollingUpdate") or {}
        # validation looks at the literal values, not resolved ones
        if int_or_percent(ru.get("maxSurge"), 100, True) == 0 and \
                int_or_percent(ru.get("maxUnavailable"), 100, False) == 0:
            errs.append(FieldError(FieldError.INVALID,
                                   "spec.strategy.rollingUpdate."
                                   "maxUnavailable", ru.get("maxUnavailable"),
                                   "may not be 0 when `maxSurge` is 0"))
    rhl = spec.get("revisionHistoryLimit")
    if isinstance(rhl, int) and rhl < 0:
        errs.append(FieldError(FieldError.INVALID,
                               "spec.revisionHistoryLimit", rhl,
                               "must be greater than or equal to 0"))
    pds = spec.get("progressDeadlineSeconds")
    if isinstance(pds, int) and pds <= (spec.get("minReadySeconds") or 0):
        errs.append(FieldError(FieldError.INVALID,
                               "spec.progressDeadlineSeconds", pds,
                               "must be greater than minReadySeconds"))
    if old is not None:
        osel = (old.get("spec") or {}).get("selector")
        if sel is not None and canon(osel) != canon(sel):
            errs.append(FieldError(FieldError.INVALID, "spec.selector", sel,
                                   "field is immutable",
                                   legacy_repr=label_selector_go(sel)))
    return errs


def validate_service(s, old):
    md = s.get("metadata") or {}
    errs = validate_name(md, "dns1035")
    spec = s.get("spec") or {}
    typ = spec.get("type")
    if typ not in ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort"):
        errs.append(FieldError(FieldError.UNSUPPORTED, "spec.type", typ,
                               'supported values: "ClusterIP", '
                               '"ExternalName", "LoadBalancer", "NodePort"'))
    ports = spec.get("ports") or []
    if not ports and typ != "ExternalName" and spec.get("clusterIP") != "None":
        errs.append(FieldError(FieldError.REQUIRED, "spec.ports"))
    seen = set()
    for i, p in enumerate(ports):
        f = "spec.ports[%d]" % i
        name = p.get("name")
        if len(ports) > 1 and not name:
            errs.append(FieldError(FieldError.REQUIRED, f + ".name"))
        elif name and not RE_1035.match(name) and not RE_LABEL.match(name):
            errs.append(FieldError(FieldError.INVALID, f + ".name", name,
                                   MSG_LABEL))
        port = p.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            errs.append(FieldError(FieldError.INVALID, f + ".port", port,
                                   "must be between 1 and 65535, inclusive"))
        proto = p.get("protocol")
        if proto not in ("TCP", "UDP", "SCTP"):
            errs.append(FieldError(FieldError.UNSUPPORTED, f + ".protocol",
                                   proto, 'supported values: "SCTP", "TCP", '
                                   '"UDP"'))
        key = (port, proto)
        if key in seen:
            errs.append(FieldError(FieldError.DUPLICATE, f, {
                "port": port, "protocol": proto}))
        seen.add(key)
        tp = p.get("targetPort")
        if isinstance(tp, int) and not 1 <= tp <= 65535:
            errs.append(FieldError(FieldError.INVALID, f + ".targetPort", tp,
                                   "must be between 1 and 65535, inclusive"))
        if p.get("nodePort") and typ in ("ClusterIP", "ExternalName"):
            errs.append(FieldError(FieldError.FORBIDDEN, f + ".nodePort",
                                   detail="may not be used when `type` is "
                                   "'%s'" % typ))
    return errs


def validate_namespace(n, old):
    return validate_name(n.get("metadata") or {}, "label")


# Go types of the fields the simulator reads: decoding a body checks them
# the way encoding/json would, so handlers only ever see well-typed values.

def _st(goname, /, **fields):
    return ("struct", goname, fields)


def _ls(t, goname):
    return ("list", t, goname)


_S = ("scalar", "string", (str,))
_I32 = ("scalar", "int32", (int,))
_I64 = ("scalar", "int64", (int,))
_B = ("scalar", "bool", (bool,))
_IS = ("scalar", "intstr.IntOrString", (int, str))
_ANY = ("any",)
_MAPS = ("map", _S, "map[string]string")
_META = _st("ObjectMeta", name=_S, generateName=_S, namespace=_S,
            resourceVersion=_S, uid=_S, generation=_I64, labels=_MAPS,
            annotations=_MAPS, finalizers=_ls(_S, "[]string"),
            ownerReferences=_ANY, managedFields=_ANY, creationTimestamp=_ANY,
            deletionTimestamp=_ANY)
_SELECTOR = _st("LabelSelector", matchLabels=_MAPS, matchExpressions=_ls(
    _st("LabelSelectorRequirement", key=_S, operator=_S,
        values=_ls(_S, "[]string")), "[]v1.LabelSelectorRequirement"))
_CONTAINER = _st(
    "Container", name=_S, image=_S, command=_ls(_S, "[]string"),
    args=_ls(_S, "[]string"), workingDir=_S, imagePullPolicy=_S,
    ports=_ls(_st("ContainerPort", name=_S, hostPort=_I32,
                  containerPort=_I32, protocol=_S, hostIP=_S),
              "[]v1.ContainerPort"),
    env=_ls(_st("EnvVar", name=_S, value=_S, valueFrom=_ANY),
            "[]v1.EnvVar"),
    volumeMounts=_ls(_st("VolumeMount", name=_S, mountPath=_S,
                         readOnly=_B, subPath=_S), "[]v1.VolumeMount"))
_PODSPEC = _st(
    "PodSpec", containers=_ls(_CONTAINER, "[]v1.Container"),
    initContainers=_ls(_CONTAINER, "[]v1.Container"), restartPolicy=_S,
    terminationGracePeriodSeconds=_I64, dnsPolicy=_S, nodeSelector=_MAPS,
    serviceAccountName=_S, hostNetwork=_B, schedulerName=_S,
    volumes=_ls(_st("Volume", name=_S), "[]v1.Volume"),
    imagePullSecrets=_ls(_st("LocalObjectReference", name=_S),
                         "[]v1.LocalObjectReference"))
GO_TYPES = {
    "Deployment": _st("Deployment", apiVersion=_S, kind=_S, metadata=_META,
                      spec=_st(
                          "DeploymentSpec", replicas=_I32, selector=_SELECTOR,
                          template=_st("PodTemplateSpec", metadata=_META,
                                       spec=_PODSPEC),
                          strategy=_st("DeploymentStrategy", type=_S,
                                       rollingUpdate=_st(
                                           "RollingUpdateDeployment",
                                           maxUnavailable=_IS,
                                           maxSurge=_IS)),
                          minReadySeconds=_I32, revisionHistoryLimit=_I32,
                          paused=_B, progressDeadlineSeconds=_I32),
                      status=_ANY),
    "Service": _st("Service", apiVersion=_S, kind=_S, metadata=_META,
                   spec=_st("ServiceSpec", ports=_ls(_st(
                       "ServicePort", name=_S, protocol=_S, appProtocol=_S,
                       port=_I32, targetPort=_IS, nodePort=_I32),
                       "[]v1.ServicePort"),
                       selector=_MAPS, clusterIP=_S,
                       clusterIPs=_ls(_S, "[]string"), type=_S,
                       externalIPs=_ls(_S, "[]string"), sessionAffinity=_S,
                       loadBalancerIP=_S, externalName=_S,
                       externalTrafficPolicy=_S, internalTrafficPolicy=_S,
                       ipFamilies=_ls(_S, "[]v1.IPFamily"),
                       ipFamilyPolicy=_S, allocateLoadBalancerNodePorts=_B,
                       publishNotReadyAddresses=_B), status=_ANY),
    "Scale": _st("Scale", apiVersion=_S, kind=_S, metadata=_META,
                 spec=_st("ScaleSpec", replicas=_I32), status=_ANY),
    "Namespace": _st("Namespace", apiVersion=_S, kind=_S, metadata=_META,
                     spec=_ANY, status=_ANY),
}


def _json_type(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def go_decode(v, t, path, owner):
    """Checks v against Go type t; returns an encoding/json error message or
    None.  Nulls are dropped, as decoding and re-encoding would drop them."""
    kind = t[0]
    if kind == "any" or v is None:
        return None
    if kind == "scalar":
        ok = isinstance(v, t[2]) and not (
            isinstance(v, bool) and bool not in t[2])
        if ok:
            return None
        what = _json_type(v)
        if what == "number" and isinstance(v, float):
            what = "number %s" % json.dumps(v)
        return "json: cannot unmarshal %s into Go struct field %s.%s of " \
            "type %s" % (what, owner, path, t[1])
    if kind == "map":
        if not isinstance(v, dict):
            return "json: cannot unmarshal %s into Go struct field %s.%s " \
                "of type %s" % (_json_type(v), owner, path, t[2])
        for k in list(v):
            if v[k] is None:
                v[k] = ""
            err = go_decode(v[k], t[1], path, owner)
            if err:
                return err
        return None
    if kind == "list":
        if not isinstance(v, list):
            return "json: cannot unmarshal %s into Go struct field %s.%s " \
                "of type %s" % (_json_type(v), owner, path, t[2])
        for i, item in enumerate(v):
            if item is None:  # null decodes to the element's zero value
                el = t[1]
                v[i] = {} if el[0] in ("struct", "map") else [] \
                    if el[0] == "list" else "" if el[1] in (
                        "string", "intstr.IntOrString") else False \
                    if el[1] == "bool" else 0 if el[0] == "scalar" else None
                continue
            err = go_decode(item, t[1], path, owner)
            if err:
                return err
        return None
    # struct
    if not isinstance(v, dict):
        return "json: cannot unmarshal %s into Go struct field %s.%s of " \
            "type v1.%s" % (_json_type(v), owner, path, t[1])
    for k in list(v):
        if v[k] is None:
            del v[k]
            continue
        sub = t[2].get(k)
        if sub is None:
            continue
        err = go_decode(v[k], sub, (path + "." + k) if path else k,
                        t[1] if path else owner)
        if err:
            return err
    return None


def type_errors(obj, kind):
    """The decode error a Go struct unmarshal would report, or None."""
    t = GO_TYPES.get(kind)
    if t is None or not isinstance(obj, dict):
        return None
    for k in list(obj):
        if obj[k] is None:
            del obj[k]
            continue
        sub = t[2].get(k)
        if sub is not None:
            err = go_decode(obj[k], sub, k, kind)
            if err:
                return err
    return None


class StreamReply(Reply):
    """A chunked response whose body comes from a generator (watch)."""

    def __init__(self, chunks):
        super().__init__(200, b"", "application/json")
        self.chunks = chunks


PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json",
               "application/apply-patch+yaml")
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public",
                        "kube-node-lease")


# --------------------------------------------------------------------------
# The Kubernetes API (§3), as proxied by Rancher under /k8s/clusters/local


class K8s:
    def __init__(self, sim):
        self.sim = sim
        self.o = sim.o
        self.store = sim.store

    @property
    def d(self):
        return self.store.data

    def minor(self):
        m = re.match(r"v?(\d+)\.(\d+)", self.o.k8s_version)
        return (int(m.group(1)), int(m.group(2))) if m else (1, 34)

    @property
    def legacy(self):
        """Clusters before 1.34 print complex bad values with Go's %#v."""
        return self.minor() < (1, 34)

    def version_info(self):
        major, minor = self.minor()
        v = {"major": str(major), "minor": str(minor)}
        if minor >= 31:
            v.update({"emulationMajor": str(major),
                      "emulationMinor": str(minor),
                      "minCompatibilityMajor": str(major),
                      "minCompatibilityMinor": str(minor - 1)})
        v.update({"gitVersion": self.o.k8s_version,
                  "gitCommit": hashlib.sha1(
                      self.o.k8s_version.encode()).hexdigest(),
                  "gitTreeState": "clean",
                  "buildDate": "2025-09-10T10:00:00Z",
                  "goVersion": "go1.24.6", "compiler": "gc",
                  "platform": "linux/amd64"})
        return v

    def tbl(self, resource):
        return self.d["k8s"][resource]

    @staticmethod
    def key(ns, name):
        return ns + "/" + name if ns else name

    # --- the deployment controller, evaluated lazily -----------------------

    def effective_epoch(self, sim, t):
        cur = sim.get("cur")
        if cur is None:
            return None
        if t >= cur["start"]:
            return cur
        prev = cur.get("prev")
        if prev and t >= prev["start"]:
            return prev
        return None

    def eval_epoch(self, ep, t):
        n = ep["n"]
        rs = self.o.ready_seconds
        el = max(0.0, t - ep["start"])
        if ep["unready"]:
            grow = 0
        elif rs <= 0 or n == 0:
            grow = n
        else:
            grow = int(n * el / rs + 1e-9)
        base_ready = min(ep["base_ready"], n)
        r = min(n, base_ready + grow)
        old_pods = 0 if ep["recreate"] else ep["old_pods"]
        if old_pods:
            step = max(ep["surge"], ep["maxu"], 1)
            updated = min(n, max(min(ep["base_pods"], n), r + step))
            other = max(0, min(old_pods, n - r))
        else:
            updated, other = n, 0
        other_ready = min(other, ep["old_ready"])
        ready = r + other_ready
        replicas = updated + other
        complete = updated == n and replicas == n and ready == n
        if n and rs > 0:
            last_progress = ep["start"] + (r - base_ready) * rs / n
        else:
            last_progress = ep["start"]
        pds = ep.get("pds")
        exceeded = (not complete and pds is not None
                    and t - last_progress > pds)
        pods = {ep["hash"]: [updated, r]}
        if other and ep.get("old_hash"):
            pods[ep["old_hash"]] = [other, other_ready]
        return {"pods": pods, "n": n, "r": r, "updated": updated,
                "other": other, "ready": ready, "available": ready,
                "replicas": replicas,
                "unavailable": max(0, replicas - ready),
                "complete": complete, "exceeded": exceeded,
                "maxu": ep["maxu"], "gen": ep["gen"], "hash": ep["hash"],
                "new_rs": ep["new_rs"], "base_ready": base_ready}

    def start_epoch(self, dep, now):
        """The controller's view after a spec change: observed after
        --observe-delay, pods then become ready over --ready-seconds."""
        md = dep["metadata"]
        sim = self.d["sim"].setdefault(md["uid"], {
            "revisions": {}, "templates": {}, "cur": None})
        spec = dep["spec"]
        tmpl = spec.get("template") or {}
        h = det_name(canon(tmpl), 10)
        running = self.effective_epoch(sim, now)
        pods = self.eval_epoch(running, now)["pods"] if running else {}
        base = pods.get(h, [0, 0])
        others = {k: v for k, v in pods.items() if k != h}
        revs = sim["revisions"]
        cur = sim.get("cur")
        new_rs = cur is None or cur["hash"] != h
        if new_rs:
            revs[h] = max(revs.values(), default=0) + 1
        sim["templates"][h] = deep(tmpl)
        keep = sorted(revs, key=lambda k: revs[k])[-12:]
        sim["templates"] = {k: v for k, v in sim["templates"].items()
                            if k in keep or k in pods}
        n = spec.get("replicas", 1)
        st = spec.get("strategy") or {}
        recreate = st.get("type") == "Recreate"
        ru = st.get("rollingUpdate") or {}
        surge = 0 if recreate else int_or_percent(
            ru.get("maxSurge", "25%"), n, True)
        maxu = n if recreate else int_or_percent(
            ru.get("maxUnavailable", "25%"), n, False)
        if not recreate and surge == 0 and maxu == 0:
            maxu = 1
        images = [c.get("image", "") for c in
                  (tmpl.get("spec") or {}).get("containers") or []
                  if isinstance(c, dict)]
        unready = bool(self.o.unready_image) and any(
            re.search(self.o.unready_image, i or "") for i in images)
        old_hash = max(others, key=lambda k: others[k][0]) if others else None
        prev = {k: v for k, v in running.items() if k != "prev"} \
            if running else None
        sim["cur"] = {
            "gen": md.get("generation", 1), "hash": h, "n": n,
            "start": now + self.o.observe_delay, "changed": now,
            "base_pods": base[0], "base_ready": base[1],
            "old_pods": sum(v[0] for v in others.values()),
            "old_ready": sum(v[1] for v in others.values()),
            "old_hash": old_hash, "surge": surge, "maxu": maxu,
            "recreate": recreate, "unready": unready,
            "pds": spec.get("progressDeadlineSeconds"),
            "revision": revs[h], "new_rs": new_rs, "prev": prev}

    def deployment_status(self, dep, ev):
        st = {}
        for k, v in (("observedGeneration", ev["gen"]),
                     ("replicas", ev["replicas"]),
                     ("updatedReplicas", ev["updated"]),
                     ("readyReplicas", ev["ready"]),
                     ("availableReplicas", ev["available"]),
                     ("unavailableReplicas", ev["unavailable"])):
            if v:  # omitempty: zero counters are left out (§3)
                st[k] = v
        rs = "%s-%s" % (dep["metadata"]["name"], ev["hash"])
        if ev["available"] >= ev["n"] - ev["maxu"]:
            avail = ("Available", "True", "MinimumReplicasAvailable",
                     "Deployment has minimum availability.")
        else:
            avail = ("Available", "False", "MinimumReplicasUnavailable",
                     "Deployment does not have minimum availability.")
        if ev["complete"]:
            prog = ("Progressing", "True", "NewReplicaSetAvailable",
                    'ReplicaSet "%s" has successfully progressed.' % rs)
        elif ev["exceeded"]:
            prog = ("Progressing", "False", "ProgressDeadlineExceeded",
                    'ReplicaSet "%s" has timed out progressing.' % rs)
        elif ev["new_rs"] and ev["r"] == ev["base_ready"]:
            prog = ("Progressing", "True", "NewReplicaSetCreated",
                    'Created new replica set "%s"' % rs)
        else:
            prog = ("Progressing", "True", "ReplicaSetUpdated",
                    'ReplicaSet "%s" is progressing.' % rs)
        st["conditions"] = [avail, prog]
        return st

    @staticmethod
    def timeless(status):
        s = deep(status or {})
        for c in s.get("conditions") or []:
            if isinstance(c, dict):
                c.pop("lastUpdateTime", None)
                c.pop("lastTransitionTime", None)
        return canon(s)

    def reconcile(self, now):
        changed = False
        deps = self.tbl("deployments")
        for key in list(deps):
            changed |= self.reconcile_deployment(key, deps[key], now)
        nss = self.tbl("namespaces")
        for name in list(nss):
            ns = nss[name]
            if ns["metadata"].get("deletionTimestamp") and \
                    now >= ns.get("_delete_at", 0):
                for res in ("deployments", "services"):
                    t = self.tbl(res)
                    for k in [k for k in t if k.startswith(name + "/")]:
                        self.d["sim"].pop(t[k]["metadata"]["uid"], None)
                        del t[k]
                self.d["orphans"] = {k: v for k, v in
                                     self.d["orphans"].items()
                                     if not k.startswith(name + "/")}
                del nss[name]
                changed = True
        if changed:
            self.store.save()

    def reconcile_deployment(self, key, dep, now):
        md = dep["metadata"]
        sim = self.d["sim"].get(md["uid"])
        if sim is None:
            return False
        if md.get("deletionTimestamp"):
            if now >= sim.get("delete_at", 0):
                del self.tbl("deployments")[key]
                del self.d["sim"][md["uid"]]
                return True
            return False
        ep = self.effective_epoch(sim, now)
        if ep is None:
            return False
        ev = self.eval_epoch(ep, now)
        new = self.deployment_status(dep, ev)
        old = dep.get("status") or {}
        when = ts(now)
        changed = False
        if self.timeless({**new, "conditions": [
                {"type": c[0], "status": c[1], "reason": c[2],
                 "message": c[3]} for c in new["conditions"]]}) != \
                self.timeless(old):
            oldc = {c.get("type"): c for c in old.get("conditions") or []}
            conds = []
            for typ, status, reason, msg in new["conditions"]:
                o = oldc.get(typ) or {}
                same = o.get("status") == status
                conds.append({
                    "type": typ, "status": status,
                    "lastUpdateTime": o["lastUpdateTime"] if same and (
                        o.get("reason"), o.get("message")) == (reason, msg)
                    and "lastUpdateTime" in o else when,
                    "lastTransitionTime": o["lastTransitionTime"]
                    if same and "lastTransitionTime" in o else when,
                    "reason": reason, "message": msg})
            new["conditions"] = conds
            before = deep(dep)
            dep["status"] = new
            track_update(before, dep, "Deployment", "k3s", "status",
                         "apps/v1", when)
            changed = True
        rev = str(ep["revision"])
        ann = md.get("annotations") or {}
        if ann.get("deployment.kubernetes.io/revision") != rev:
            before = deep(dep)
            ann = dict(ann)
            ann["deployment.kubernetes.io/revision"] = rev
            md["annotations"] = ann
            track_update(before, dep, "Deployment", "k3s", "", "apps/v1",
                         when)
            changed = True
        if changed:
            md["resourceVersion"] = self.store.next_rv()
            dep["metadata"] = ordered(md, META_ORDER)
        return changed

    # --- synthesized objects: pods, the node --------------------------------

    def node_name(self):
        return self.o.node_name

    def node(self):
        name = self.node_name()
        created = self.d["started"]
        ver = self.o.k8s_version
        return {
            "kind": "Node", "apiVersion": "v1",
            "metadata": {
                "name": name, "uid": det_uuid("node/" + name),
                "resourceVersion": str(self.d["rv"]),
                "creationTimestamp": ts(created),
                "labels": {
                    "beta.kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/instance-type": "k3s",
                    "beta.kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "node-role.kubernetes.io/control-plane": "true",
                    "node-role.kubernetes.io/master": "true",
                    "node.kubernetes.io/instance-type": "k3s"},
                "annotations": {
                    "k3s.io/internal-ip": self.o.node_ip,
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach":
                        "true"}},
            "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"],
                     "providerID": "k3s://" + name},
            "status": {
                "capacity": {"cpu": "4", "ephemeral-storage": "61202244Ki",
                             "hugepages-2Mi": "0", "memory": "8131948Ki",
                             "pods": "110"},
                "allocatable": {"cpu": "4",
                                "ephemeral-storage": "59538581116",
                                "hugepages-2Mi": "0", "memory": "8131948Ki",
                                "pods": "110"},
                "conditions": [
                    {"type": t, "status": s, "lastHeartbeatTime": ts(
                        time.time() // 60 * 60), "lastTransitionTime":
                     ts(created), "reason": r, "message": m}
                    for t, s, r, m in (
                        ("MemoryPressure", "False",
                         "KubeletHasSufficientMemory",
                         "kubelet has sufficient memory available"),
                        ("DiskPressure", "False", "KubeletHasNoDiskPressure",
                         "kubelet has no disk pressure"),
                        ("PIDPressure", "False", "KubeletHasSufficientPID",
                         "kubelet has sufficient PID available"),
                        ("Ready", "True", "KubeletReady",
                         "kubelet is posting ready status"))],
                "addresses": [{"type": "InternalIP",
                               "address": self.o.node_ip},
                              {"type": "Hostname", "address": name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": det_name("machine", 32),
                    "systemUUID": det_uuid("system/" + name),
                    "bootID": det_uuid("boot/" + name),
                    "kernelVersion": os.uname().release,
                    "osImage": "SUSE Linux Enterprise Server 15 SP7",
                    "containerRuntimeVersion": "containerd://2.1.4-k3s1",
                    "kubeletVersion": ver, "kubeProxyVersion": ver,
                    "operatingSystem": "linux", "architecture": "amd64"}}}

    def make_pod(self, dep, h, i, ready, tmpl, ep, now):
        md = dep["metadata"]
        rsname = "%s-%s" % (md["name"], h)
        name = "%s-%s" % (rsname, det_name(md["uid"] + h + str(i), 5))
        tmeta = tmpl.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        labels["pod-template-hash"] = h
        meta = {"name": name, "generateName": rsname + "-",
                "namespace": md["namespace"], "uid": det_uuid("pod/" + name),
                "resourceVersion": md.get("resourceVersion", "1"),
                "creationTimestamp": ts(ep["changed"]), "labels": labels}
        if tmeta.get("annotations"):
            meta["annotations"] = dict(tmeta["annotations"])
        meta["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rsname,
            "uid": det_uuid("rs/" + md["uid"] + h), "controller": True,
            "blockOwnerDeletion": True}]
        spec = deep(tmpl.get("spec") or {})
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", "default")
        spec["nodeName"] = self.node_name()
        spec.setdefault("tolerations", [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300}])
        spec.setdefault("priority", 0)
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec = ordered(spec, POD_SPEC_ORDER)
        started = ts(ep["start"])
        n = max(ep["n"], 1)
        ready_at = ts(ep["start"] + (i + 1) * self.o.ready_seconds / n)
        cstatus = []
        for c in spec.get("containers") or []:
            image = c.get("image", "")
            cid = hashlib.sha256((name + c.get("name", "")).encode())
            if ready:
                cstatus.append({
                    "name": c.get("name"), "state": {"running": {
                        "startedAt": started}}, "lastState": {},
                    "ready": True, "restartCount": 0, "image": image,
                    "imageID": image.split(":")[0] + "@sha256:" +
                    hashlib.sha256(image.encode()).hexdigest(),
                    "containerID": "containerd://" + cid.hexdigest(),
                    "started": True})
            else:
                waiting = {"reason": "ContainerCreating"}
                if ep["unready"]:
                    waiting = {"reason": "ImagePullBackOff", "message":
                               'Back-off pulling image "%s"' % image}
                cstatus.append({
                    "name": c.get("name"), "state": {"waiting": waiting},
                    "lastState": {}, "ready": False, "restartCount": 0,
                    "image": image, "imageID": "", "started": False})
        ip = "10.42.0.%d" % (2 + int(hashlib.sha256(
            name.encode()).hexdigest(), 16) % 250)
        flag = "True" if ready else "False"
        conds = [("PodReadyToStartContainers", flag, started),
                 ("Initialized", "True", started),
                 ("Ready", flag, ready_at if ready else started),
                 ("ContainersReady", flag, ready_at if ready else started),
                 ("PodScheduled", "True", started)]
        status = {"phase": "Running" if ready else "Pending",
                  "conditions": [{"type": t, "status": s, "lastProbeTime":
                                  None, "lastTransitionTime": w}
                                 for t, s, w in conds],
                  "hostIP": self.o.node_ip,
                  "hostIPs": [{"ip": self.o.node_ip}]}
        if ready:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        status["startTime"] = started
        status["containerStatuses"] = cstatus
        status["qosClass"] = "BestEffort"
        return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
                "spec": spec, "status": status}

    def deployment_pods(self, dep, now):
        md = dep["metadata"]
        if md.get("deletionTimestamp"):
            return []
        sim = self.d["sim"].get(md["uid"])
        ep = self.effective_epoch(sim, now) if sim else None
        if not ep:
            return []
        ev = self.eval_epoch(ep, now)
        out = []
        for h, (count, ready) in ev["pods"].items():
            tmpl = sim["templates"].get(h) or dep["spec"].get("template", {})
            for i in range(count):
                out.append(self.make_pod(dep, h, i, i < ready, tmpl, ep, now))
        return out

    def pods(self, ns, now):
        out = []
        for key, dep in self.tbl("deployments").items():
            if ns is None or dep["metadata"]["namespace"] == ns:
                out.extend(self.deployment_pods(dep, now))
        for key, pod in self.d["orphans"].items():
            if ns is None or pod["metadata"]["namespace"] == ns:
                out.append(deep(pod))
        return out

    # --- collections ---------------------------------------------------------

    def collect(self, res, ns, now):
        """[(key, object)] sorted by storage key, objects are copies."""
        if res.resource == "pods":
            items = [(self.key(p["metadata"]["namespace"],
                               p["metadata"]["name"]), p)
                     for p in self.pods(ns, now)]
        elif res.resource == "nodes":
            items = [(self.node_name(), self.node())]
        else:
            items = [(k, deep(v)) for k, v in self.tbl(res.resource).items()
                     if ns is None or k.startswith(ns + "/")]
        items.sort(key=lambda kv: kv[0])
        return items

    def get_one(self, res, ns, name, now):
        if res.resource in ("pods", "nodes"):
            for k, obj in self.collect(res, ns, now):
                if obj["metadata"]["name"] == name:
                    return obj
            return None
        return self.tbl(res.resource).get(self.key(ns, name))

    # --- services: cluster IPs and node ports -------------------------------

    def used_node_ports(self, skip_key):
        used = set()
        for k, s in self.tbl("services").items():
            if k == skip_key:
                continue
            for p in (s.get("spec") or {}).get("ports") or []:
                if p.get("nodePort"):
                    used.add(p["nodePort"])
        return used

    def alloc_service(self, svc, old, key):
        """What BeginCreate/BeginUpdate allocate (before validation)."""
        errs = []
        spec = svc.get("spec") or {}
        typ = spec.get("type") or "ClusterIP"
        ospec = (old or {}).get("spec") or {}
        if typ != "ExternalName":
            ip = spec.get("clusterIP")
            if old and not ip and ospec.get("clusterIP"):
                ip = ospec["clusterIP"]
            if old and ospec.get("clusterIP") and ip != ospec["clusterIP"]:
                errs.append(FieldError(FieldError.INVALID,
                                       "spec.clusterIPs[0]", [ip],
                                       "may not change once set"))
            elif not ip:
                used = {(s.get("spec") or {}).get("clusterIP")
                        for s in self.tbl("services").values()}
                while True:
                    ip = "10.43.%d.%d" % (secrets.randbelow(256),
                                          1 + secrets.randbelow(254))
                    if ip not in used and ip not in ("10.43.0.1",
                                                     "10.43.0.10"):
                        break
            elif ip != "None" and not old:
                taken = any((s.get("spec") or {}).get("clusterIP") == ip
                            for s in self.tbl("services").values())
                if taken:
                    errs.append(FieldError(
                        FieldError.INVALID, "spec.clusterIPs", [ip],
                        "failed to allocate IP %s: provided IP is already "
                        "allocated" % ip))
            spec["clusterIP"] = ip
            spec["clusterIPs"] = [ip]
            spec.setdefault("ipFamilies", ospec.get("ipFamilies", ["IPv4"]))
            spec.setdefault("ipFamilyPolicy",
                            ospec.get("ipFamilyPolicy", "SingleStack"))
            svc["spec"] = ordered(spec, SERVICE_SPEC_ORDER)
        if typ in ("NodePort", "LoadBalancer"):
            used = self.used_node_ports(key)
            oldports = {(p.get("port"), p.get("protocol", "TCP")):
                        p.get("nodePort") for p in ospec.get("ports") or []
                        if isinstance(p, dict)}
            ports = spec.get("ports") or []
            for i, p in enumerate(ports):
                if not isinstance(p, dict):
                    continue
                np = p.get("nodePort")
                prev = oldports.get((p.get("port"), p.get("protocol", "TCP")))
                if np:
                    if np == prev:
                        pass
                    elif not 30000 <= np <= 32767:
                        errs.append(FieldError(
                            FieldError.INVALID, "spec.ports[%d].nodePort" % i,
                            np, "provided port is not in the valid range. "
                            "The range of valid ports is 30000-32767"))
                    elif np in used:
                        errs.append(FieldError(
                            FieldError.INVALID, "spec.ports[%d].nodePort" % i,
                            np, "provided port is already allocated"))
                else:
                    np = prev if prev and prev not in used else None
                    while not np:
                        c = 30000 + secrets.randbelow(2768)
                        if c not in used:
                            np = c
                    p["nodePort"] = np
                used.add(np)
        return errs

    # --- routing ---------------------------------------------------------

    def handle(self, ctx, path, auth):
        now = time.time()
        with self.store.lock:
            self.reconcile(now)
            try:
                return self.route(ctx, path, now)
            except Reply as r:
                return r

    def route(self, ctx, path, now):
        parts = [p for p in path.split("/") if p]
        m = ctx.method
        if not parts:
            return jreply(200, {"paths": sorted([
                "/api", "/api/v1", "/apis", "/apis/apps", "/apis/apps/v1",
                "/healthz", "/livez", "/readyz", "/version"])})
        if parts in (["version"], ["version", ""]):
            return jreply(200, self.version_info())
        if parts[0] in ("healthz", "livez", "readyz") and len(parts) == 1:
            return text_reply(200, "ok")
        if parts[:2] == ["openapi", "v3"]:
            return self.openapi_v3(parts[2:])
        if parts[0] == "api":
            if len(parts) == 1:
                return jreply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [{
                                        "clientCIDR": "0.0.0.0/0",
                                        "serverAddress": self.o.node_ip
                                        + ":6443"}]})
            if parts[1] != "v1":
                return e_path_not_found()
            group, rest = "", parts[2:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                return jreply(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                    "groups": [self.apps_group()]})
            if parts[1] != "apps":
                return e_path_not_found()
            if len(parts) == 2:
                g = self.apps_group()
                g.update({"kind": "APIGroup", "apiVersion": "v1"})
                return jreply(200, ordered(g, ("kind", "apiVersion")))
            if parts[2] != "v1":
                return e_path_not_found()
            group, rest = "apps", parts[3:]
        else:
            return e_path_not_found()
        if not rest:
            if m != "GET":
                return e_method_not_allowed()
            return jreply(200, self.resource_list(group))
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        if len(rest) > 3:
            return e_path_not_found()
        res = RESOURCES.get((group, rest[0]))
        if res is None:
            return e_path_not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if (res.namespaced and ns is None and name is not None) or \
                (not res.namespaced and ns is not None):
            return e_path_not_found()
        if sub is not None:
            return self.subresource(ctx, res, ns, name, sub, now)
        if name is None:
            if m == "GET":
                if ctx.arg("watch") in ("1", "true", "True"):
                    return self.watch(ctx, res, ns)
                return self.list(ctx, res, ns, now)
            if m == "POST" and res.writable:
                return self.create(ctx, res, ns, now)
            if m == "DELETE" and res.writable and \
                    res.resource != "namespaces":
                return self.delete_collection(ctx, res, ns, now)
            return e_method_not_allowed()
        if m == "GET":
            obj = self.get_one(res, ns, name, now)
            if obj is None:
                return e_not_found(res.group, res.resource, name)
            return self.respond_obj(ctx, res, deep(obj), now)
        if not res.writable:
            return e_method_not_allowed()
        if m == "PUT":
            return self.update(ctx, res, ns, name, now)
        if m == "PATCH":
            return self.patch(ctx, res, ns, name, now)
        if m == "DELETE":
            return self.delete(ctx, res, ns, name, now)
        return e_method_not_allowed()

    def openapi_v3(self, rest):
        """Just enough OpenAPI v3 for kubectl: it looks for the PATCH
        operation of a kind and its fieldValidation parameter (server-side
        field validation).  No schemas: kubectl then computes strategic
        merge patches from its built-in types, as for an old server."""
        gvs = {"api/v1": "", "apis/apps/v1": "apps"}
        h = det_name(self.o.k8s_version, 16).upper()
        if not rest:
            return jreply(200, {"paths": {
                gv: {"serverRelativeURL": "/openapi/v3/%s?hash=%s" % (gv, h)}
                for gv in gvs}})
        gv = "/".join(rest)
        if gv not in gvs:
            return e_path_not_found()
        group = gvs[gv]
        params = [{"name": n, "in": "query", "schema": {
            "type": "string", "uniqueItems": True}} for n in (
            "dryRun", "fieldManager", "fieldValidation", "force")]
        paths = {}
        for (g, r), res in RESOURCES.items():
            if g != group or not res.writable:
                continue
            gvk = {"group": g, "kind": res.kind, "version": "v1"}
            base = "/" + gv + ("/namespaces/{namespace}" if res.namespaced
                               else "") + "/" + r
            paths[base + "/{name}"] = {
                "get": {"x-kubernetes-action": "get",
                        "x-kubernetes-group-version-kind": gvk},
                "put": {"x-kubernetes-action": "put", "parameters": params[
                    :3], "x-kubernetes-group-version-kind": gvk},
                "patch": {"x-kubernetes-action": "patch",
                          "parameters": params,
                          "x-kubernetes-group-version-kind": gvk}}
            paths[base] = {"post": {"x-kubernetes-action": "post",
                                    "parameters": params[:3],
                                    "x-kubernetes-group-version-kind": gvk}}
        return jreply(200, {"openapi": "3.0.0", "info": {
            "title": "Kubernetes", "version": self.o.k8s_version},
            "paths": paths, "components": {"schemas": {}}})

    def apps_group(self):
        v = {"groupVersion": "apps/v1", "version": "v1"}
        return {"name": "apps", "versions": [v], "preferredVersion": v}

    def resource_list(self, group):
        rs = []
        for (g, r), res in sorted(RESOURCES.items(), key=lambda x: x[0][1]):
            if g != group:
                continue
            verbs = ["create", "delete", "deletecollection", "get", "list",
                     "patch", "update", "watch"] if res.writable else \
                ["get", "list", "watch"]
            if r == "namespaces":
                verbs.remove("deletecollection")
            e = {"name": r, "singularName": res.kind.lower(),
                 "namespaced": res.namespaced, "kind": res.kind,
                 "verbs": verbs, "shortNames": list(res.short)}
            if r in ("pods", "services", "deployments"):
                e["categories"] = ["all"]
            rs.append(e)
            if r == "deployments":
                rs.append({"name": "deployments/scale", "singularName": "",
                           "namespaced": True, "group": "autoscaling",
                           "version": "v1", "kind": "Scale",
                           "verbs": ["get", "patch", "update"]})
            if r in ("deployments", "services", "pods", "namespaces",
                     "nodes"):
                rs.append({"name": r + "/status", "singularName": "",
                           "namespaced": res.namespaced, "kind": res.kind,
                           "verbs": ["get"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": group + "/v1" if group else "v1",
                "resources": rs}

    # --- request helpers -------------------------------------------------

    def field_manager(self, ctx):
        fm = ctx.arg("fieldManager")
        if fm:
            if len(fm) > 128:
                raise e_invalid("meta.k8s.io", "CreateOptions", "", [
                    FieldError(FieldError.INVALID, "fieldManager", fm,
                               "must be no more than 128 characters")],
                    self.legacy)
            return fm
        ua = ctx.header("User-Agent")
        return ua.split("/")[0][:128] if ua else ""

    def dry_run(self, ctx, opts_kind="CreateOptions", values=None):
        vals = values if values is not None else ctx.query.get("dryRun", [])
        for v in vals:
            if v != "All":
                raise e_invalid("meta.k8s.io", opts_kind, "", [FieldError(
                    FieldError.UNSUPPORTED, "dryRun", vals,
                    'supported values: "All"')], self.legacy)
        return bool(vals)

    def decode(self, ctx, res, kind=None, api=None):
        kind = kind or res.kind
        api = api or res.api
        body = ctx.body or b""
        ctype = ctx.header("Content-Type").split(";")[0].strip().lower()
        if ctype and ctype not in ("application/json", "application/yaml"):
            accepted = "application/json, application/yaml"
            if ctype != "application/vnd.kubernetes.protobuf":
                accepted += ", application/vnd.kubernetes.protobuf"
            # (the simulator decodes JSON only: it does not claim protobuf
            # to a client that just sent protobuf)
            raise k8s_status(415, "UnsupportedMediaType",
                             "the body of the request was in an unknown "
                             "format - accepted media types include: "
                             + accepted)
        try:
            obj = json.loads(body)
        except ValueError as e:
            summary = body[:30].decode("utf-8", "replace") + (
                " ..." if len(body) > 30 else "")
            raise e_bad_request(
                "the object provided is unrecognized (must be of type %s): "
                "couldn't get version/kind; json parse error: %s (%s)"
                % (kind, e, summary))
        if not isinstance(obj, dict):
            raise e_bad_request(
                "the object provided is unrecognized (must be of type %s): "
                "couldn't get version/kind; json parse error: json: cannot "
                "unmarshal %s into Go value of type struct { APIVersion "
                "string \"json:\\\"apiVersion,omitempty\\\"\"; Kind string "
                "\"json:\\\"kind,omitempty\\\"\" }"
                % (kind, "array" if isinstance(obj, list) else "value"))
        av, k = obj.get("apiVersion"), obj.get("kind")
        if av and av != api:
            raise e_bad_request("the API version in the data (%s) does not "
                                "match the expected API version (%s)"
                                % (av, api))
        if k and k != kind:
            raise e_bad_request(
                "%s in version %s cannot be handled as a %s: no kind %s is "
                "registered for version %s" % (k, gostr(api.split("/")[-1]),
                                                kind, gostr(k), gostr(api)))
        err = type_errors(obj, kind)
        if err:
            raise e_bad_request("%s in version %s cannot be handled as a %s: "
                                "%s" % (kind, gostr(api.split("/")[-1]),
                                        kind, err))
        obj["apiVersion"], obj["kind"] = api, kind
        if obj.get("metadata") is None:
            obj["metadata"] = {}
        return obj

    def defaults(self, res, obj):
        if res.kind == "Deployment":
            default_deployment(obj)
        elif res.kind == "Service":
            default_service(obj)
        elif res.kind == "Namespace":
            labels = dict(obj["metadata"].get("labels") or {})
            labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj["metadata"]["labels"] = labels

    def validate(self, res, obj, old):
        fn = {"Deployment": validate_deployment,
              "Service": validate_service,
              "Namespace": validate_namespace}[res.kind]
        errs = fn(obj, old)
        if errs:
            raise e_invalid(res.group, res.kind,
                            obj["metadata"].get("name", ""), errs,
                            self.legacy)

    def finish(self, obj):
        obj["metadata"] = ordered(obj["metadata"], META_ORDER)
        return ordered(obj, TOP_ORDER)

    def check_namespace(self, ns):
        nso = self.tbl("namespaces").get(ns)
        if nso is None:
            raise e_not_found("", "namespaces", ns)
        if nso["metadata"].get("deletionTimestamp"):
            raise k8s_status(403, "Forbidden", "unable to create new content "
                             "in namespace %s because it is being terminated"
                             % ns, details(ns, None, "namespaces"))

    # --- create / update / patch / delete --------------------------------

    def create(self, ctx, res, ns, now):
        obj = self.decode(ctx, res)
        dry = self.dry_run(ctx)
        manager = self.field_manager(ctx)
        md = obj["metadata"]
        if res.namespaced:
            if md.get("namespace") and md["namespace"] != ns:
                raise e_bad_request("the namespace of the provided object "
                                    "does not match the namespace sent on "
                                    "the request")
            md["namespace"] = ns
            self.check_namespace(ns)
        else:
            md.pop("namespace", None)
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + rand_name(5)
        return jreply(201, self.commit_create(res, ns, obj, manager, dry,
                                              now))

    def commit_create(self, res, ns, obj, manager, dry, now, entries=None):
        md = obj["metadata"]
        for k in ("uid", "resourceVersion", "creationTimestamp",
                  "deletionTimestamp", "deletionGracePeriodSeconds",
                  "generation", "managedFields", "selfLink"):
            md.pop(k, None)
        name = md.get("name") or ""
        key = self.key(ns, name)
        when = ts(now)
        # the order of the apiserver: defaults (decoding), managed fields,
        # allocation (BeginCreate), PrepareForCreate, validation, storage
        if name:
            self.defaults(res, obj)
        if entries is None:
            track_update(None, obj, res.kind, manager, "", res.api, when)
        else:
            mf_store(obj, entries)
        if res.kind == "Service":
            errs = self.alloc_service(obj, None, key)
            if errs:
                raise e_invalid("", "Service", name, errs, self.legacy)
            obj["status"] = {"loadBalancer": {}}
        elif res.kind == "Namespace":
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif res.kind == "Deployment":
            obj["status"] = {}
        self.validate(res, obj, None)
        if key in self.tbl(res.resource):
            raise e_exists(res.group, res.resource, name)
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = when
        if res.kind == "Deployment":
            md["generation"] = 1
        obj = self.finish(obj)
        if dry:
            return obj
        obj["metadata"]["resourceVersion"] = self.store.next_rv()
        obj = self.finish(obj)
        self.tbl(res.resource)[key] = obj
        if res.kind == "Deployment":
            self.start_epoch(obj, now)
        self.store.save()
        return deep(obj)

    def commit_update(self, res, old, new, manager, now, dry, sub="",
                      entries=None):
        omd = old["metadata"]
        md = new.get("metadata")
        if not isinstance(md, dict):
            md = new["metadata"] = {}
        for k in ("uid", "creationTimestamp", "namespace", "name",
                  "deletionTimestamp", "deletionGracePeriodSeconds",
                  "generation"):
            if k in omd:
                md[k] = omd[k]
            else:
                md.pop(k, None)
        md.pop("managedFields", None)
        new["apiVersion"], new["kind"] = res.api, res.kind
        if "status" in old:
            new["status"] = deep(old["status"])
        else:
            new.pop("status", None)
        key = self.key(omd.get("namespace"), omd["name"])
        when = ts(now)
        self.defaults(res, new)
        if entries is None:
            track_update(old, new, res.kind, manager, sub, res.api, when)
        else:
            mf_store(new, entries)
        if res.kind == "Service":
            errs = self.alloc_service(new, old, key)
            if errs:
                raise e_invalid("", "Service", omd["name"], errs, self.legacy)
        elif res.kind == "Namespace":
            new["spec"] = deep(old.get("spec") or {})
        self.validate(res, new, old)
        spec_changed = canon(new.get("spec")) != canon(old.get("spec"))
        if res.kind == "Deployment" and spec_changed:
            md["generation"] = omd.get("generation", 1) + 1
        md["resourceVersion"] = omd.get("resourceVersion")
        new = self.finish(new)

        def essence(o):
            o = deep(o)
            o["metadata"].pop("managedFields", None)
            return canon(o)
        if essence(new) == essence(old):
            olds = {(e["manager"], e["operation"], e["subresource"]):
                    e["fields"] for e in mf_load(old)}
            news = {(e["manager"], e["operation"], e["subresource"]):
                    e["fields"] for e in mf_load(new)}
            if olds == news:
                return deep(old)  # a no-op update keeps resourceVersion
        if dry:
            return new
        new["metadata"]["resourceVersion"] = self.store.next_rv()
        self.tbl(res.resource)[key] = new
        if res.kind == "Deployment" and spec_changed:
            self.start_epoch(new, now)
        self.store.save()
        return deep(new)

    def update(self, ctx, res, ns, name, now):
        obj = self.decode(ctx, res)
        dry = self.dry_run(ctx, "UpdateOptions")
        manager = self.field_manager(ctx)
        md = obj["metadata"]
        if md.get("name") != name:
            raise e_bad_request("the name of the object (%s) does not match "
                                "the name on the URL (%s)"
                                % (md.get("name") or "", name))
        if ns and md.get("namespace") and md["namespace"] != ns:
            raise e_bad_request("the namespace of the object (%s) does not "
                                "match the namespace on the request (%s)"
                                % (md["namespace"], ns))
        old = self.tbl(res.resource).get(self.key(ns, name))
        if old is None:
            if not res.create_on_update:
                raise e_not_found(res.group, res.resource, name)
            if ns:
                md["namespace"] = ns
                self.check_namespace(ns)
            return jreply(201, self.commit_create(res, ns, obj, manager, dry,
                                                  now))
        self.preconditions(res, old, md.get("uid"), md.get("resourceVersion"))
        new = self.commit_update(res, old, obj, manager, now, dry)
        return jreply(200, new)

    def preconditions(self, res, old, uid, rv):
        omd = old["metadata"]
        if uid and uid != omd.get("uid"):
            raise e_conflict(res.group, res.resource, omd["name"],
                             "Precondition failed: UID in precondition: %s, "
                             "UID in object meta: %s" % (uid, omd.get("uid")))
        if rv and rv != omd.get("resourceVersion"):
            raise e_conflict(res.group, res.resource, omd["name"])

    def patch_options(self, ctx, ptype):
        ctype = ctx.header("Content-Type").split(";")[0].strip()
        if ctype not in PATCH_TYPES:
            raise k8s_status(415, "UnsupportedMediaType",
                             "the body of the request was in an unknown "
                             "format - accepted media types include: "
                             + ", ".join(PATCH_TYPES))
        errs = []
        force = ctx.arg("force")
        if ctype == "application/apply-patch+yaml":
            if not ctx.arg("fieldManager"):
                errs.append(FieldError(FieldError.REQUIRED, "fieldManager",
                                       detail="is required for apply patch"))
        elif force is not None:
            errs.append(FieldError(FieldError.FORBIDDEN, "force",
                                   detail="may not be specified for "
                                   "non-apply patch"))
        if errs:
            raise e_invalid("meta.k8s.io", "PatchOptions", "", errs,
                            self.legacy)
        return ctype, force in ("true", "1", "True")

    def read_patch(self, ctx, ctype):
        try:
            p = json.loads(ctx.body or b"")
        except ValueError as e:
            if ctype == "application/apply-patch+yaml":
                raise e_bad_request("error decoding YAML: this simulator "
                                    "accepts the JSON form of YAML only: %s"
                                    % e)
            raise e_bad_request("error decoding patch: %s" % e)
        if ctype == "application/json-patch+json":
            if not isinstance(p, list):
                raise e_bad_request("json: cannot unmarshal object into Go "
                                    "value of type jsonpatch.Patch")
        elif not isinstance(p, dict):
            raise e_bad_request("error decoding patch: json: cannot "
                                "unmarshal array into Go value of type "
                                "map[string]interface {}")
        return p

    def apply_patch(self, base, ctype, p):
        if ctype == "application/json-patch+json":
            try:
                return json_patch(base, p)
            except PatchFailed:
                raise k8s_status(422, "Invalid", "the server rejected our "
                                 "request due to an error in our request",
                                 {})
        if ctype == "application/merge-patch+json":
            return merge_patch(base, p)
        return smp(base, p)

    def patch(self, ctx, res, ns, name, now):
        ctype, force = self.patch_options(ctx, None)
        p = self.read_patch(ctx, ctype)
        dry = self.dry_run(ctx, "PatchOptions")
        manager = self.field_manager(ctx)
        old = self.tbl(res.resource).get(self.key(ns, name))
        when = ts(now)
        if ctype == "application/apply-patch+yaml":
            if not p.get("apiVersion") or not p.get("kind"):
                raise e_bad_request("Object 'Kind' is missing in '%s'"
                                    % canon(p))
            if p.get("apiVersion") != res.api or p.get("kind") != res.kind:
                raise e_bad_request("the API version in the data (%s) does "
                                    "not match the expected API version (%s)"
                                    % (p.get("apiVersion"), res.api))
            err = type_errors(p, res.kind)
            if err:
                raise e_bad_request("%s in version \"v1\" cannot be handled "
                                    "as a %s: %s" % (res.kind, res.kind, err))
            pmd = p.get("metadata") or {}
            if pmd.get("name") and pmd["name"] != name:
                raise e_bad_request("the name of the object (%s) does not "
                                    "match the name on the URL (%s)"
                                    % (pmd["name"], name))
            if old is None:
                if ns:
                    self.check_namespace(ns)
                new, entries = server_side_apply(None, p, res.kind, manager,
                                                 force, res.api, when)
                new.setdefault("metadata", {})["name"] = name
                if ns:
                    new["metadata"]["namespace"] = ns
                new["apiVersion"], new["kind"] = res.api, res.kind
                return jreply(201, self.commit_create(
                    res, ns, new, manager, dry, now, entries))
            self.preconditions(res, old, pmd.get("uid"),
                               pmd.get("resourceVersion"))
            new, entries = server_side_apply(old, p, res.kind, manager,
                                             force, res.api, when)
            return jreply(200, self.commit_update(res, old, new, manager, now,
                                                  dry, entries=entries))
        if old is None:
            raise e_not_found(res.group, res.resource, name)
        new = self.apply_patch(deep(old), ctype, p)
        if not isinstance(new, dict):
            raise k8s_status(422, "Invalid", "the server rejected our "
                             "request due to an error in our request", {})
        err = type_errors(new, res.kind)
        if err:
            raise e_bad_request("%s in version \"v1\" cannot be handled as a "
                                "%s: %s" % (res.kind, res.kind, err))
        nmd = new.get("metadata") if isinstance(new.get("metadata"),
                                                dict) else {}
        if nmd.get("name") != name:
            raise e_bad_request("the name of the object (%s) does not match "
                                "the name on the URL (%s)"
                                % (nmd.get("name") or "", name))
        self.preconditions(res, old, nmd.get("uid"),
                           nmd.get("resourceVersion"))
        return jreply(200, self.commit_update(res, old, new, manager, now,
                                              dry))

    def delete_options(self, ctx):
        opts = {}
        if ctx.body and ctx.body.strip():
            try:
                opts = json.loads(ctx.body)
            except ValueError as e:
                raise e_bad_request("error decoding DeleteOptions: %s" % e)
            if not isinstance(opts, dict):
                raise e_bad_request("DeleteOptions must be a JSON object")
        else:
            for k in ("propagationPolicy", "gracePeriodSeconds"):
                if ctx.arg(k) is not None:
                    opts[k] = ctx.arg(k)
            if ctx.arg("orphanDependents") is not None:
                opts["orphanDependents"] = ctx.arg("orphanDependents") in (
                    "true", "1")
            if ctx.query.get("dryRun"):
                opts["dryRun"] = ctx.query["dryRun"]
        policy = opts.get("propagationPolicy")
        if policy is None and opts.get("orphanDependents") is not None:
            policy = "Orphan" if opts["orphanDependents"] else "Background"
        if policy is not None and policy not in ("Foreground", "Background",
                                                 "Orphan"):
            raise e_invalid("meta.k8s.io", "DeleteOptions", "", [FieldError(
                FieldError.UNSUPPORTED, "propagationPolicy", policy,
                'supported values: "Foreground", "Background", "Orphan"')],
                self.legacy)
        dry = self.dry_run(ctx, "DeleteOptions", opts.get("dryRun") or [])
        return policy, opts.get("preconditions") or {}, dry

    def delete(self, ctx, res, ns, name, now):
        policy, pre, dry = self.delete_options(ctx)
        key = self.key(ns, name)
        t = self.tbl(res.resource)
        old = t.get(key)
        if old is None:
            raise e_not_found(res.group, res.resource, name)
        omd = old["metadata"]
        if pre.get("uid") and pre["uid"] != omd["uid"]:
            raise e_conflict(res.group, res.resource, name,
                             "Precondition failed: UID in precondition: %s, "
                             "UID in object meta: %s" % (pre["uid"],
                                                         omd["uid"]))
        if pre.get("resourceVersion") and \
                pre["resourceVersion"] != omd["resourceVersion"]:
            raise e_conflict(res.group, res.resource, name,
                             "Precondition failed: ResourceVersion in "
                             "precondition: %s, ResourceVersion in object "
                             "meta: %s" % (pre["resourceVersion"],
                                           omd["resourceVersion"]))
        if res.kind == "Namespace":
            if name in PROTECTED_NAMESPACES:
                raise k8s_status(403, "Forbidden", "namespaces %s is "
                                 "forbidden: this namespace may not be "
                                 "deleted" % gostr(name),
                                 details(name, None, "namespaces"))
            obj = deep(old)
            if not omd.get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = ts(now)
                obj["status"] = {"phase": "Terminating"}
                if not dry:
                    obj["metadata"]["resourceVersion"] = self.store.next_rv()
                    obj["_delete_at"] = now + 1.0
                    t[key] = obj
                    self.store.save()
            obj.pop("_delete_at", None)
            return jreply(200, obj)
        if res.kind == "Deployment":
            if omd.get("deletionTimestamp"):
                return jreply(200, deep(old))
            if policy in ("Foreground", "Orphan"):
                obj = deep(old)
                md = obj["metadata"]
                md["deletionTimestamp"] = ts(now)
                md["deletionGracePeriodSeconds"] = 0
                md["generation"] = md.get("generation", 1) + 1  # markAsDeleting
                fin = "foregroundDeletion" if policy == "Foreground" \
                    else "orphan"
                md["finalizers"] = list(md.get("finalizers") or []) + [fin]
                obj = self.finish(obj)
                if dry:
                    return jreply(200, obj)
                if policy == "Orphan":
                    for pod in self.deployment_pods(old, now):
                        self.d["orphans"][self.key(
                            ns, pod["metadata"]["name"])] = pod
                obj["metadata"]["resourceVersion"] = self.store.next_rv()
                sim = self.d["sim"].get(omd["uid"])
                if sim is not None:
                    sim["delete_at"] = now + (1.0 if policy == "Foreground"
                                              else 0.2)
                t[key] = obj
                self.store.save()
                return jreply(200, deep(obj))
            if not dry:
                del t[key]
                self.d["sim"].pop(omd["uid"], None)
                self.store.save()
            return jreply(200, {"kind": "Status", "apiVersion": "v1",
                                "metadata": {}, "status": "Success",
                                "details": details(name, res.group,
                                                   res.resource, omd["uid"])})
        # Services have no dependents: deleted at once, the object returned.
        if not dry:
            del t[key]
            self.store.save()
        return jreply(200, deep(old))

    def delete_collection(self, ctx, res, ns, now):
        reqs = parse_label_selector(ctx.arg("labelSelector", ""))
        items = [o for k, o in self.collect(res, ns, now)
                 if labels_match(o["metadata"].get("labels"), reqs)]
        for o in items:
            self.delete(ctx, res, o["metadata"].get("namespace"),
                        o["metadata"]["name"], now)
        return jreply(200, {"kind": res.kind + "List", "apiVersion": res.api,
                            "metadata": {"resourceVersion":
                                         str(self.d["rv"])},
                            "items": [self.list_item(o) for o in items]})

    # --- subresources: scale, status ---------------------------------------

    def scale_of(self, dep):
        md = dep["metadata"]
        spec = {}
        if dep["spec"].get("replicas"):
            spec["replicas"] = dep["spec"]["replicas"]  # omitempty
        status = {"replicas": (dep.get("status") or {}).get("replicas", 0)}
        sel = selector_string(dep["spec"].get("selector"))
        if sel:
            status["selector"] = sel
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: md[k] for k in (
                    "name", "namespace", "uid", "resourceVersion",
                    "creationTimestamp") if k in md},
                "spec": spec, "status": status}

    def subresource(self, ctx, res, ns, name, sub, now):
        if res.kind not in ("Deployment", "Service", "Pod", "Namespace",
                            "Node") or sub not in ("scale", "status") or \
                (sub == "scale" and res.kind != "Deployment"):
            return e_path_not_found()
        if sub == "status":
            if ctx.method != "GET":
                return e_method_not_allowed()
            obj = self.get_one(res, ns, name, now)
            if obj is None:
                return e_not_found(res.group, res.resource, name)
            return jreply(200, deep(obj))
        dep = self.tbl("deployments").get(self.key(ns, name))
        if ctx.method == "GET":
            if dep is None:
                return e_not_found("apps", "deployments/scale", name)
            return jreply(200, self.scale_of(dep))
        if ctx.method not in ("PUT", "PATCH"):
            return e_method_not_allowed()
        if ctx.method == "PUT":
            scale = self.decode(ctx, res, "Scale", "autoscaling/v1")
            dry = self.dry_run(ctx, "UpdateOptions")
            if scale["metadata"].get("name") != name:
                raise e_bad_request("the name of the object (%s) does not "
                                    "match the name on the URL (%s)" % (
                                        scale["metadata"].get("name") or "",
                                        name))
        else:
            ctype, _ = self.patch_options(ctx, None)
            p = self.read_patch(ctx, ctype)
            dry = self.dry_run(ctx, "PatchOptions")
            if dep is None:
                return e_not_found("apps", "deployments/scale", name)
            if ctype == "application/apply-patch+yaml":
                ctype = "application/merge-patch+json"
            scale = self.apply_patch(self.scale_of(dep), ctype, p)
            err = type_errors(scale, "Scale") if isinstance(
                scale, dict) else "json: cannot unmarshal into a Scale"
            if err:
                raise e_bad_request("Scale in version \"v1\" cannot be "
                                    "handled as a Scale: %s" % err)
        manager = self.field_manager(ctx)
        if dep is None:
            return e_not_found("apps", "deployments/scale", name)
        spec = scale.get("spec") or {}
        replicas = spec.get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise e_bad_request(
                "Scale in version \"v1\" cannot be handled as a Scale: json: "
                "cannot unmarshal %s into Go struct field ScaleSpec.spec."
                "replicas of type int32" % type(replicas).__name__)
        if replicas < 0:
            raise e_invalid("autoscaling", "Scale", name, [FieldError(
                FieldError.INVALID, "spec.replicas", replicas,
                "must be greater than or equal to 0")], self.legacy)
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        if rv and rv != dep["metadata"]["resourceVersion"]:
            raise e_conflict("apps", "deployments", name)
        new = deep(dep)
        new["spec"]["replicas"] = replicas
        new = self.commit_update(RESOURCES[("apps", "deployments")], dep, new,
                                 manager, now, dry, sub="scale")
        return jreply(200, self.scale_of(new))

    # --- list, watch, tables -------------------------------------------------

    @staticmethod
    def list_item(o):
        o = dict(o)
        o.pop("kind", None)
        o.pop("apiVersion", None)
        o.pop("_delete_at", None)
        return o

    def field_filter(self, res, spec):
        reqs = []
        allowed = ["metadata.name", "metadata.namespace"]
        if res.kind == "Pod":
            allowed += ["spec.nodeName", "status.phase"]
        for part in split_selector(spec or ""):
            m = re.match(r"^([A-Za-z.]+)\s*(==|!=|=)\s*(.*)$", part)
            if not m:
                raise e_bad_request("invalid field selector: %s" % part)
            if m.group(1) not in allowed:
                raise e_bad_request("field label not supported: %s"
                                    % m.group(1))
            reqs.append((m.group(1), m.group(2) == "!=", m.group(3)))

        def match(o):
            for f, neg, v in reqs:
                cur = o
                for p in f.split("."):
                    cur = cur.get(p) if isinstance(cur, dict) else None
                if (cur == v) == neg:
                    return False
            return True
        return match

    def filtered(self, ctx, res, ns, now):
        reqs = parse_label_selector(ctx.arg("labelSelector", ""))
        fmatch = self.field_filter(res, ctx.arg("fieldSelector", ""))
        return [(k, o) for k, o in self.collect(res, ns, now)
                if labels_match(o["metadata"].get("labels"), reqs)
                and fmatch(o)]

    @staticmethod
    def encode_continue(rv, key):
        tok = {"v": "meta.k8s.io/v1", "rv": rv, "start": key + "\x00"}
        return base64.urlsafe_b64encode(canon(tok).encode()).decode() \
            .rstrip("=")

    def list(self, ctx, res, ns, now):
        items = self.filtered(ctx, res, ns, now)
        rv = self.d["rv"]
        meta = {"resourceVersion": str(rv)}
        cont = ctx.arg("continue")
        if cont:
            try:
                raw = base64.urlsafe_b64decode(cont + "=" * (-len(cont) % 4))
                tok = json.loads(raw)
                start, trv = tok["start"], int(tok["rv"])
                if tok.get("v") != "meta.k8s.io/v1":
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise e_bad_request("continue key is not valid: incorrect "
                                    "encoded start resourceVersion (version "
                                    "meta.k8s.io/v1)")
            if trv < self.store.compacted_rv(self.o.compaction_seconds):
                last = start.rstrip("\x00")
                raise k8s_status(
                    410, "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without "
                    "the continue parameter, or use the continue token in "
                    "this response to retrieve the remainder of the results. "
                    "Continuing with the provided token results in an "
                    "inconsistent list - objects that were created, modified, "
                    "or deleted between the time the first chunk was returned "
                    "and now may show up in the list.",
                    meta={"continue": self.encode_continue(-1, last)})
            start = start.rstrip("\x00")
            items = [(k, o) for k, o in items if k > start]
            meta["resourceVersion"] = str(trv)
            rv = trv
        limit = ctx.arg("limit")
        try:
            limit = int(limit) if limit else 0
        except ValueError:
            raise e_bad_request("invalid limit: %s" % limit)
        if limit > 0 and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            meta["continue"] = self.encode_continue(rv, items[-1][0])
            meta["remainingItemCount"] = rest
        objs = [o for _, o in items]
        table = self.table_version(ctx)
        if table:
            return jreply(200, self.to_table(ctx, res, objs, meta, now,
                                             table))
        return jreply(200, {"kind": res.kind + "List", "apiVersion": res.api,
                            "metadata": meta,
                            "items": [self.list_item(o) for o in objs]})

    def respond_obj(self, ctx, res, obj, now):
        obj.pop("_delete_at", None)
        table = self.table_version(ctx)
        if table:
            return jreply(200, self.to_table(ctx, res, [obj], {
                "resourceVersion": obj["metadata"].get("resourceVersion", "")},
                now, table))
        return jreply(200, obj)

    def watch(self, ctx, res, ns):
        """Newline-delimited watch events, polled every 100 ms."""
        try:
            timeout = min(int(ctx.arg("timeoutSeconds") or 1800), 3600)
        except ValueError:
            timeout = 1800
        since = ctx.arg("resourceVersion") or ""
        if since and not since.isdigit():
            raise e_bad_request("invalid resource version: strconv."
                                "ParseUint: parsing %s: invalid syntax"
                                % gostr(since))
        with self.store.lock:
            self.filtered(ctx, res, ns, time.time())  # validate selectors

        def snapshot():
            with self.store.lock:
                now = time.time()
                self.reconcile(now)
                return {k: o for k, o in self.filtered(ctx, res, ns, now)}

        def event(typ, o):
            o = dict(o)
            o.pop("_delete_at", None)
            return dumps({"type": typ, "object": o})

        def gen():
            deadline = time.time() + timeout
            known = snapshot()
            for k, o in known.items():
                rv = o["metadata"].get("resourceVersion", "0")
                if since in ("", "0"):
                    yield event("ADDED", o)
                elif int(rv) > int(since or 0):
                    yield event("MODIFIED", o)
            while time.time() < deadline:
                time.sleep(0.1)
                cur = snapshot()
                for k, o in cur.items():
                    if k not in known:
                        yield event("ADDED", o)
                    elif o["metadata"].get("resourceVersion") != \
                            known[k]["metadata"].get("resourceVersion") or \
                            canon(o.get("status")) != \
                            canon(known[k].get("status")):
                        yield event("MODIFIED", o)
                for k, o in known.items():
                    if k not in cur:
                        yield event("DELETED", o)
                known = cur
        return StreamReply(gen())

    @staticmethod
    def table_version(ctx):
        accept = ctx.header("Accept")
        if "as=Table" not in accept:
            return None
        for part in accept.split(","):
            if "as=Table" in part and "v=v1;" in part + ";" and \
                    "v=v1beta1" not in part:
                return "meta.k8s.io/v1"
        return "meta.k8s.io/v1beta1"

    def to_table(self, ctx, res, objs, meta, now, api):
        cols, row = TABLES[res.kind]
        include = ctx.arg("includeObject", "Metadata")
        rows = []
        for o in objs:
            r = {"cells": row(self, o, now)}
            if include == "Object":
                r["object"] = o
            elif include != "None":
                r["object"] = {"kind": "PartialObjectMetadata",
                               "apiVersion": "meta.k8s.io/v1",
                               "metadata": o["metadata"]}
            rows.append(r)
        return {"kind": "Table", "apiVersion": api, "metadata": meta,
                "columnDefinitions": [
                    {"name": n, "type": t, "format": f, "description": d,
                     "priority": p} for n, t, f, d, p in cols],
                "rows": rows}


def _age(o, now):
    t = o["metadata"].get("creationTimestamp")
    if not t:
        return "<unknown>"
    return human_age(now - calendar.timegm(time.strptime(
        t, "%Y-%m-%dT%H:%M:%SZ")))


def _deploy_row(k, o, now):
    st = o.get("status") or {}
    spec = o.get("spec") or {}
    cs = ((spec.get("template") or {}).get("spec") or {}).get(
        "containers") or []
    return [o["metadata"]["name"],
            "%d/%d" % (st.get("readyReplicas", 0), spec.get("replicas", 0)),
            st.get("updatedReplicas", 0), st.get("availableReplicas", 0),
            _age(o, now), ",".join(c.get("name", "") for c in cs),
            ",".join(c.get("image", "") for c in cs),
            selector_string(spec.get("selector")) or "<none>"]


def _pod_row(k, o, now):
    st = o.get("status") or {}
    cs = st.get("containerStatuses") or []
    ready = sum(1 for c in cs if c.get("ready"))
    status = st.get("phase", "Unknown")
    for c in cs:
        w = (c.get("state") or {}).get("waiting")
        if w:
            status = w.get("reason", status)
    return [o["metadata"]["name"], "%d/%d" % (ready, len(cs)), status, 0,
            _age(o, now), st.get("podIP", "<none>"),
            (o.get("spec") or {}).get("nodeName", "<none>"), "<none>",
            "<none>"]


def _svc_row(k, o, now):
    spec = o.get("spec") or {}
    ports = []
    for p in spec.get("ports") or []:
        s = str(p.get("port"))
        if p.get("nodePort"):
            s += ":%d" % p["nodePort"]
        ports.append(s + "/" + p.get("protocol", "TCP"))
    ext = "<none>"
    if spec.get("type") == "LoadBalancer":
        ing = ((o.get("status") or {}).get("loadBalancer") or {}).get(
            "ingress") or []
        ext = ",".join(i.get("ip") or i.get("hostname", "")
                       for i in ing) or "<pending>"
    sel = spec.get("selector") or {}
    return [o["metadata"]["name"], spec.get("type", "ClusterIP"),
            spec.get("clusterIP", "<none>"), ext,
            ",".join(ports) or "<none>", _age(o, now),
            ",".join("%s=%s" % kv for kv in sorted(sel.items())) or "<none>"]


def _node_row(k, o, now):
    info = o["status"]["nodeInfo"]
    return [o["metadata"]["name"], "Ready", "control-plane,master",
            _age(o, now), info["kubeletVersion"],
            o["status"]["addresses"][0]["address"], "<none>",
            info["osImage"], info["kernelVersion"],
            info["containerRuntimeVersion"]]


def _ns_row(k, o, now):
    return [o["metadata"]["name"],
            (o.get("status") or {}).get("phase", "Active"), _age(o, now)]


_NAME = ("Name", "string", "name", "Name must be unique within a namespace. "
         "Is required when creating resources, although some resources may "
         "allow a client to request the generation of an appropriate name "
         "automatically.", 0)
_AGE = ("Age", "string", "", "CreationTimestamp is a timestamp representing "
        "the server time when this object was created.", 0)
TABLES = {
    "Deployment": ([_NAME,
                    ("Ready", "string", "", "Number of the pod with ready "
                     "state", 0),
                    ("Up-to-date", "integer", "", "Total number of "
                     "non-terminated pods targeted by this deployment that "
                     "have the desired template spec.", 0),
                    ("Available", "integer", "", "Total number of available "
                     "pods (ready for at least minReadySeconds) targeted by "
                     "this deployment.", 0), _AGE,
                    ("Containers", "string", "", "Names of each container in "
                     "the template.", 1),
                    ("Images", "string", "", "Images referenced by each "
                     "container in the template.", 1),
                    ("Selector", "string", "", "Label selector for pods.",
                     1)], _deploy_row),
    "Pod": ([_NAME,
             ("Ready", "string", "", "The aggregate readiness state of this "
              "pod for accepting traffic.", 0),
             ("Status", "string", "", "The aggregate status of the "
              "containers in this pod.", 0),
             ("Restarts", "string", "", "The number of times the containers "
              "in this pod have been restarted and when the last container "
              "in this pod has restarted.", 0), _AGE,
             ("IP", "string", "", "IP address allocated to the pod.", 1),
             ("Node", "string", "", "Name of the node assigned to the pod.",
              1),
             ("Nominated Node", "string", "", "Name of the node nominated "
              "for the pod.", 1),
             ("Readiness Gates", "string", "", "Pod readiness gates.", 1)],
            _pod_row),
    "Service": ([_NAME,
                 ("Type", "string", "", "The type of the service.", 0),
                 ("Cluster-IP", "string", "", "The cluster IP of the "
                  "service.", 0),
                 ("External-IP", "string", "", "The external IP of the "
                  "service.", 0),
                 ("Port(s)", "string", "", "The ports of the service.", 0),
                 _AGE,
                 ("Selector", "string", "", "Label selector for pods.", 1)],
                _svc_row),
    "Node": ([_NAME,
              ("Status", "string", "", "The status of the node", 0),
              ("Roles", "string", "", "The roles of the node", 0), _AGE,
              ("Version", "string", "", "Kubelet Version reported by the "
               "node.", 0),
              ("Internal-IP", "string", "", "List of addresses reachable to "
               "the node.", 1),
              ("External-IP", "string", "", "List of addresses reachable to "
               "the node.", 1),
              ("OS-Image", "string", "", "OS Image reported by the node.", 1),
              ("Kernel-Version", "string", "", "Kernel Version reported by "
               "the node.", 1),
              ("Container-Runtime", "string", "", "Container Runtime "
               "Version reported by the node.", 1)], _node_row),
    "Namespace": ([_NAME,
                   ("Status", "string", "", "The status of the namespace", 0),
                   _AGE], _ns_row),
}


# --------------------------------------------------------------------------
# The simulator: state bootstrap, HTTP plumbing, main


class Sim:
    def __init__(self, o):
        self.o = o
        self.dir = o.dir
        self.log_lock = threading.Lock()
        self.cacerts = ""
        if o.cacerts:
            with open(o.cacerts) as f:
                self.cacerts = f.read()
        elif o.tls:
            with open(os.path.join(self.dir, "ca.pem")) as f:
                self.cacerts = f.read()
        self.store = Store(self.dir)
        if self.store.data is None:
            self.bootstrap()
        self.rancher = Rancher(self)
        self.k8s = K8s(self)

    def path(self, name):
        return os.path.join(self.dir, name)

    def log(self, line):
        with self.log_lock:
            with open(self.path("server.log"), "a") as f:
                f.write("%s %s\n" % (ts(time.time()), line))

    def bootstrap(self):
        """First start: what Rancher's data migrations create (§1)."""
        now = time.time()
        pw = self.o.bootstrap_password
        if pw is None:
            pw = os.environ.get("CATTLE_BOOTSTRAP_PASSWORD") or None
        generated = pw is None
        if generated:
            pw = "".join(secrets.choice(
                "bcdfghjklmnpqrstvwxz2456789") for _ in range(54))
            # printed only when generated, as Rancher does
            self.log("Bootstrap Password: %s" % pw)
            sys.stderr.write("Bootstrap Password: %s\n" % pw)
        uid = "user-" + rand_name(5)
        d = {"format": 1, "rv": 1000, "started": now,
             "admin_at": now + self.o.admin_delay,
             "users": {uid: {
                 "id": uid, "username": "admin", "name": "Default Admin",
                 "password": hash_password(pw), "created": now,
                 "enabled": True, "uuid": str(uuid.uuid4()),
                 "mustChangePassword": generated or pw == "admin"}},
             "tokens": {},
             "settings": {"server-version": self.o.rancher_version},
             "k8s": {"namespaces": {}, "deployments": {}, "services": {}},
             "sim": {}, "orphans": {}}
        self.store.data = d
        for ns in ("default", "kube-system", "kube-public",
                   "kube-node-lease", "cattle-system"):
            d["rv"] += 1
            d["k8s"]["namespaces"][ns] = {
                "kind": "Namespace", "apiVersion": "v1", "metadata": {
                    "name": ns, "uid": det_uuid("ns/" + ns),
                    "resourceVersion": str(d["rv"]),
                    "creationTimestamp": ts(now), "labels": {
                        "kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"}}
        d["rv"] += 1
        d["k8s"]["services"]["default/kubernetes"] = {
            "kind": "Service", "apiVersion": "v1", "metadata": {
                "name": "kubernetes", "namespace": "default",
                "uid": det_uuid("svc/kubernetes"),
                "resourceVersion": str(d["rv"]),
                "creationTimestamp": ts(now), "labels": {
                    "component": "apiserver", "provider": "kubernetes"}},
            "spec": {"ports": [{"name": "https", "protocol": "TCP",
                                "port": 443, "targetPort": 6443}],
                     "clusterIP": "10.43.0.1", "clusterIPs": ["10.43.0.1"],
                     "type": "ClusterIP", "sessionAffinity": "None",
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}}}
        d["rv"] += 1
        d["k8s"]["services"]["kube-system/kube-dns"] = {
            "kind": "Service", "apiVersion": "v1", "metadata": {
                "name": "kube-dns", "namespace": "kube-system",
                "uid": det_uuid("svc/kube-dns"),
                "resourceVersion": str(d["rv"]),
                "creationTimestamp": ts(now), "labels": {
                    "k8s-app": "kube-dns",
                    "kubernetes.io/cluster-service": "true",
                    "kubernetes.io/name": "CoreDNS"}},
            "spec": {"ports": [
                {"name": "dns", "protocol": "UDP", "port": 53,
                 "targetPort": 53},
                {"name": "dns-tcp", "protocol": "TCP", "port": 53,
                 "targetPort": 53},
                {"name": "metrics", "protocol": "TCP", "port": 9153,
                 "targetPort": 9153}],
                "selector": {"k8s-app": "kube-dns"},
                "clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10"],
                "type": "ClusterIP", "sessionAffinity": "None",
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}}}
        self.store.save()

    def handle(self, ctx):
        try:
            return self.rancher.handle(ctx)
        except Reply as r:
            return r


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rancher-sim"
    sys_version = ""
    timeout = 120

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, fmt, *args):
        self.server.sim.log("%s %s" % (self.client_address[0], fmt % args))

    def log_request(self, code="-", size="-"):
        sim = self.server.sim
        line = '%s - [%s] "%s %s" %s %s\n' % (
            self.client_address[0], self.log_date_time_string(),
            self.command, self.path, code, size)
        with sim.log_lock:
            with open(sim.path("access.log"), "a") as f:
                f.write(line)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def dispatch(self):
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return self.send(text_reply(400, "bad request body\n"))
        ctx = Ctx(self.command, self.path, self.headers, body,
                  isinstance(self.connection, ssl.SSLSocket),
                  self.client_address)
        try:
            r = self.server.sim.handle(ctx)
        except Exception as e:  # a bug in the simulator: say so, loudly
            import traceback
            self.server.sim.log("ERROR %s %s: %s" % (
                self.command, self.path, traceback.format_exc()))
            r = text_reply(500, "simulator error: %r\n" % e)
        self.send(r)

    def send(self, r):
        if isinstance(r, StreamReply):
            return self.stream(r)
        self.send_response(r.status)
        no_body = r.status in (204, 304)
        if not no_body:
            if r.ctype:
                self.send_header("Content-Type", r.ctype)
            self.send_header("Content-Length", str(len(r.body)))
        for k, v in r.headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and not no_body:
            self.wfile.write(r.body)

    def stream(self, r):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.wfile.flush()
            try:
                for chunk in r.chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            except OSError:
                raise
            except Exception:  # a simulator bug: end the stream, log it
                import traceback
                self.server.sim.log("ERROR in watch %s: %s" % (
                    self.path, traceback.format_exc()))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            r.chunks.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = dispatch


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog
    daemon_threads = True

    def __init__(self, sim, addr, context):
        self.sim = sim
        self.context = context
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, Handler)

    def server_bind(self):
        # skip HTTPServer.server_bind's getfqdn() (may hit DNS)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, addr = super().get_request()
        if self.context is None:
            return sock, addr
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        self.sim.log("connection error from %r: %r" % (
            client_address, sys.exc_info()[1]))


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Rancher v2 + Kubernetes API simulator for kengine")
    ap.add_argument("--dir", required=True,
                    help="state directory (created; holds certs, port, pid, "
                    "ready, access.log, server.log, state.json)")
    ap.add_argument("--port", type=int, default=0,
                    help="TCP port (0 = pick a free one; see DIR/port)")
    ap.add_argument("--bind", default="127.0.0.1",
                    help="address to listen on (0.0.0.0 inside a container "
                    "only)")
    ap.add_argument("--tls", action=argparse.BooleanOptionalAction,
                    default=True, help="serve HTTPS with DIR/server.pem "
                    "(default) or plain HTTP behind a TLS proxy")
    ap.add_argument("--login-shape", choices=("v2.13", "legacy"),
                    default="v2.13", help="login response: v2.13+ short "
                    "object, or the full token resource of <= v2.12 (which "
                    "also has no /v1-public)")
    ap.add_argument("--rancher-version",
                    help="server-version setting (default v2.13.1, or "
                    "v2.12.3 with --login-shape legacy)")
    ap.add_argument("--k8s-version",
                    help="gitVersion of the local cluster (default "
                    "v1.34.1+k3s1, or v1.33.5+k3s1 with legacy)")
    ap.add_argument("--ready-seconds", type=float, default=2.0,
                    help="time for a Deployment's pods to all become ready")
    ap.add_argument("--observe-delay", type=float, default=0.1,
                    help="controller lag before status.observedGeneration "
                    "catches up with a spec change")
    ap.add_argument("--bootstrap-password",
                    help="admin password (else $CATTLE_BOOTSTRAP_PASSWORD, "
                    "else generated and logged)")
    ap.add_argument("--admin-delay", type=float, default=0.0,
                    help="on first start, logins fail for this long (the "
                    "admin user does not exist yet while /ping answers)")
    ap.add_argument("--cacerts",
                    help="file whose content becomes the cacerts setting "
                    "(default DIR/ca.pem with TLS, empty without)")
    ap.add_argument("--ext-login-tokens", action="store_true",
                    help="logins return ext tokens (\"ext/<name>:<key>\")")
    ap.add_argument("--k8s-direct", action="store_true",
                    help="also serve the Kubernetes API at /api, /apis, "
                    "/version with the apiserver's own 401")
    ap.add_argument("--unready-image",
                    default=r"nonexistent|doesnotexist|does-not-exist",
                    help="regex: pods of matching images never become ready")
    ap.add_argument("--compaction-seconds", type=float, default=300.0,
                    help="list continue tokens older than this expire (410)")
    ap.add_argument("--node-name", default="local-node")
    ap.add_argument("--node-ip", default="172.17.0.2")
    o = ap.parse_args(argv)
    legacy = o.login_shape == "legacy"
    if not o.rancher_version:
        o.rancher_version = "v2.12.3" if legacy else "v2.13.1"
    if not o.k8s_version:
        o.k8s_version = "v1.33.5+k3s1" if legacy else "v1.34.1+k3s1"
    o.dir = os.path.abspath(o.dir)
    return o


def main(argv=None):
    o = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(o.dir, exist_ok=True)
    for stale in ("ready", "port", "pid"):
        try:
            os.remove(os.path.join(o.dir, stale))
        except FileNotFoundError:
            pass
    context = None
    if o.tls:
        make_certs(o.dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(o.dir, "server.pem"),
                                os.path.join(o.dir, "server.key"))
    sim = Sim(o)
    server = Server(sim, (o.bind, o.port), context)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t = threading.Thread(target=server.serve_forever, args=(0.1,),
                         daemon=True)
    t.start()
    write_atomic(sim.path("pid"), "%d\n" % os.getpid())
    write_atomic(sim.path("port"), "%d\n" % server.server_port)
    write_atomic(sim.path("ready"), "ok\n")
    sim.log("listening on %s:%d (%s, login shape %s)" % (
        o.bind, server.server_port, "https" if o.tls else "http",
        o.login_shape))
    while not stop.wait(0.1):
        pass
    server.shutdown()
    server.server_close()
    try:
        os.remove(sim.path("ready"))
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main()
