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
                    "generateKubeconfig": link + "?action=generateKubeconfig",
                    "importYaml": link + "?action=importYaml"},
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
            if action not in ("generateKubeconfig", "importYaml"):
                return norman_error(422, "InvalidAction",
                                    "Invalid action: %s" % action)
            if ident != "local":
                return norman_error(404, "NotFound",
                                    "Failed to find type: cluster id: %s"
                                    % ident)
            if action == "generateKubeconfig":
                return self.generate_kubeconfig(ctx, auth)
            return norman_error(422, "InvalidAction",
                                "Invalid action: %s" % action)
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
