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
    for k, v in sorted((sel or {}).get("matchLabels", {}).items()):
        parts.append("%s=%s" % (k, v))
    for r in (sel or {}).get("matchExpressions", []) or []:
        op = r.get("operator")
        vals = ",".join(sorted(r.get("values") or []))
        if op == "In":
            parts.append("%s in (%s)" % (r.get("key"), vals))
        elif op == "NotIn":
            parts.append("%s notin (%s)" % (r.get("key"), vals))
        elif op == "Exists":
            parts.append(r.get("key"))
        elif op == "DoesNotExist":
            parts.append("!" + r.get("key"))
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
        if spec.get("clusterIP") != "None" or spec.get("ipFamilies"):
            spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
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
    elif not (sel.get("matchLabels") or sel.get("matchExpressions")):
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


def type_errors(obj, res):
    """The decode errors a Go struct unmarshal would report (a subset)."""
    def bad(field, gofield, gotype, v):
        jt = {bool: "bool", str: "string", list: "array", dict: "object",
              float: "number", int: "number"}.get(type(v), "value")
        return "json: cannot unmarshal %s into Go struct field %s of type %s" \
            % (jt, gofield + "." + field, gotype)
    md = obj.get("metadata")
    if md is not None and not isinstance(md, dict):
        return bad("metadata", res.kind, "v1.ObjectMeta", md)
    md = md or {}
    for f in ("labels", "annotations"):
        v = md.get(f)
        if v is not None and (not isinstance(v, dict) or not all(
                isinstance(x, str) for x in v.values())):
            return bad(f, "ObjectMeta.metadata", "map[string]string", v)
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        return bad("spec", res.kind, res.kind + "Spec", spec)
    spec = spec or {}
    if res.kind == "Deployment":
        r = spec.get("replicas")
        if r is not None and (not isinstance(r, int) or isinstance(r, bool)):
            return bad("replicas", "DeploymentSpec.spec", "int32", r)
        t = spec.get("template")
        if t is not None and not isinstance(t, dict):
            return bad("template", "DeploymentSpec.spec",
                       "v1.PodTemplateSpec", t)
        sel = spec.get("selector")
        if sel is not None and not isinstance(sel, dict):
            return bad("selector", "DeploymentSpec.spec",
                       "v1.LabelSelector", sel)
        ps = (t or {}).get("spec")
        if ps is not None and not isinstance(ps, dict):
            return bad("spec", "PodTemplateSpec.spec.template", "v1.PodSpec",
                       ps)
        cs = (ps or {}).get("containers")
        if cs is not None and (not isinstance(cs, list) or not all(
                isinstance(c, dict) for c in cs)):
            return bad("containers", "PodSpec.spec.template.spec",
                       "[]v1.Container", cs)
    if res.kind == "Service":
        ports = spec.get("ports")
        if ports is not None and (not isinstance(ports, list) or not all(
                isinstance(p, dict) for p in ports)):
            return bad("ports", "ServiceSpec.spec", "[]v1.ServicePort", ports)
        for p in ports or []:
            for f in ("port", "nodePort"):
                v = p.get(f)
                if v is not None and (not isinstance(v, int)
                                      or isinstance(v, bool)):
                    return bad(f, "ServicePort.spec.ports", "int32", v)
        sel = spec.get("selector")
        if sel is not None and not isinstance(sel, dict):
            return bad("selector", "ServiceSpec.spec", "map[string]string",
                       sel)
    return None
