#!/usr/bin/env python3
"""Checks tests/sim/rancher_sim.py against shared/reference/
rancher-kubernetes-api.md, fact by fact (python3 stdlib unittest).

Run: python3 -m unittest tests/sim/test_sim.py -v

Every simulator listens on 127.0.0.1 only; every wait loop is bounded.
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(HERE, "rancher_sim.py")
PW = "bootstrap-secret-1"
SAFE = "bcdfghjklmnpqrstvwxz2456789"
K = "/k8s/clusters/local"
DEPLOYMENTS = K + "/apis/apps/v1/namespaces/default/deployments"
SERVICES = K + "/api/v1/namespaces/default/services"
PODS = K + "/api/v1/namespaces/default/pods"
READY_SECONDS = 1.0
LOGIN_V3 = "/v3-public/localProviders/local?action=login"


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def header(self, name):
        return self.headers.get(name)

    def __repr__(self):
        return "<%d %s>" % (self.status, self.body[:300])


class SimProc:
    """One simulator process on 127.0.0.1 with its own state directory."""

    def __init__(self, *args, env=None, tls=True, directory=None):
        self.dir = directory or tempfile.mkdtemp(prefix="rancher-sim-")
        if tls and CERTS and directory is None:
            # reuse one throwaway CA: openssl runs once per test run
            for f in ("ca.pem", "ca.key", "server.pem", "server.key"):
                shutil.copy(os.path.join(CERTS, f), self.dir)
        self.args = list(args) + ([] if tls else ["--no-tls"])
        self.env = env or {}
        self.tls = tls
        self.spawn()

    def start(self):
        self.spawn()
        self.wait_ready()

    def spawn(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CATTLE_")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, SIM, "--dir", self.dir, "--bind", "127.0.0.1"]
            + self.args, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)

    def wait_ready(self):
        deadline = time.time() + 30
        ready = os.path.join(self.dir, "ready")
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise RuntimeError("simulator exited: %s" %
                                   self.proc.stderr.read().decode())
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("simulator did not get ready")
            time.sleep(0.02)
        with open(os.path.join(self.dir, "port")) as f:
            self.port = int(f.read())
        self.ctx = None
        if self.tls:
            self.ctx = ssl.create_default_context(
                cafile=os.path.join(self.dir, "ca.pem"))

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stderr.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def request(self, method, path, body=None, token=None, headers=None,
                ctype="application/json"):
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                               context=self.ctx, timeout=10)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                              timeout=10)
        h = {"User-Agent": "kengine-test/1.0"}
        if token:
            h["Authorization"] = "Bearer " + token
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if body is not None and ctype:
            h["Content-Type"] = ctype
        h.update(headers or {})
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Resp(r.status, r.headers, r.read())
        finally:
            conn.close()

    def login(self, password=PW, username="admin"):
        r = self.request("POST", "/v3-public/localProviders/local?action=login",
                         {"username": username, "password": password,
                          "description": "kengine", "ttl": 57600000,
                          "responseType": "json"})
        assert r.status == 201, r
        return r.json["token"]


def deployment(name, replicas=3, image="nginx:1.27", labels=None, **spec):
    labels = labels or {"app": name}
    d = {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": name, "labels": dict(labels)},
         "spec": {"replicas": replicas,
                  "selector": {"matchLabels": dict(labels)},
                  "template": {"metadata": {"labels": dict(labels)},
                               "spec": {"containers": [{
                                   "name": name, "image": image,
                                   "ports": [{"containerPort": 8080}]}]}}}}
    d["spec"].update(spec)
    return d


def wait_for(fn, timeout, interval=0.05):
    """Polls fn() until it returns something true; bounded in time."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            return v
        time.sleep(interval)


def rollout_done(d):
    """kubectl's rollout rule (reference §3)."""
    st = d.get("status") or {}
    if d["metadata"]["generation"] > st.get("observedGeneration", 0):
        return False
    for c in st.get("conditions") or []:
        if c["type"] == "Progressing" and \
                c["reason"] == "ProgressDeadlineExceeded":
            raise AssertionError("deadline exceeded")
    want = d["spec"].get("replicas", 1)
    upd = st.get("updatedReplicas", 0)
    if upd < want or st.get("replicas", 0) > upd or \
            st.get("availableReplicas", 0) < upd:
        return False
    return True


def decode_yaml_double_quoted(text, key):
    """The YAML rule the reference demands a real parser for: inside a
    double-quoted scalar, backslash + line break is removed together with
    the next line's leading white space."""
    start = text.index(key + ': "') + len(key) + 3
    end = text.index('"', start)
    raw = text[start:end]
    return re.sub(r"\\\n[ \t]*", "", raw), raw


CERTS = None   # one throwaway CA for every TLS simulator of this run
S = None       # v2.13, TLS: most tests
LEGACY = None  # --login-shape legacy, password from the environment
EXTRA = None   # plain HTTP, bootstrap password "admin", ext tokens,
#                the direct apiserver paths, CATTLE_SERVER_URL set
EXTRA_TOKEN = None
GEN = None     # generated bootstrap password, --admin-delay
GEN_EARLY = None  # the login answer GEN gave as soon as it listened


def setUpModule():
    global S, LEGACY, EXTRA, EXTRA_TOKEN, GEN, GEN_EARLY, CERTS
    CERTS = tempfile.mkdtemp(prefix="rancher-sim-certs-")
    sys.path.insert(0, HERE)
    import rancher_sim
    rancher_sim.make_certs(CERTS)
    try:
        # started together, waited for together
        GEN = SimProc("--admin-delay", "4", "--ready-seconds", "0",
                      tls=False)
        S = SimProc("--bootstrap-password", PW, "--ready-seconds",
                    str(READY_SECONDS), "--observe-delay", "0.1")
        LEGACY = SimProc("--login-shape", "legacy", "--ready-seconds", "0",
                         "--compaction-seconds", "0.5",
                         env={"CATTLE_BOOTSTRAP_PASSWORD": PW})
        EXTRA = SimProc("--bootstrap-password", "admin",
                        "--ext-login-tokens", "--k8s-direct", tls=False,
                        env={"CATTLE_SERVER_URL": "https://from.env"})
        GEN.wait_ready()
        GEN_EARLY = GEN.request("POST", LOGIN_V3, {"username": "admin",
                                                    "password": "x"})
        for sim in (S, LEGACY, EXTRA):
            sim.wait_ready()
        r = EXTRA.request("POST", "/v1-public/login", {
            "type": "localProvider", "username": "admin",
            "password": "admin"})
        EXTRA_TOKEN = r.json["token"]
    except BaseException:
        tearDownModule()  # unittest skips it when setUpModule fails
        raise


def tearDownModule():
    for sim in (S, LEGACY, EXTRA, GEN):
        if sim:
            sim.cleanup()
    if CERTS:
        shutil.rmtree(CERTS, ignore_errors=True)


# ==========================================================================
# §1 Installing Rancher: health, bootstrap password, startup, state volume


class TestInstall(unittest.TestCase):
    def test_ping_and_healthz(self):
        r = S.request("GET", "/ping")
        self.assertEqual((r.status, r.body), (200, b"pong"))
        r = S.request("GET", "/healthz")
        self.assertEqual((r.status, r.body), (200, b"ok"))

    def test_bootstrap_password_from_flag_is_not_logged(self):
        S.login()
        with open(os.path.join(S.dir, "server.log")) as f:
            self.assertNotIn("Bootstrap Password", f.read())

    def test_bootstrap_password_from_env(self):
        # LEGACY got it only from CATTLE_BOOTSTRAP_PASSWORD
        self.assertTrue(LEGACY.login())
        with open(os.path.join(LEGACY.dir, "server.log")) as f:
            self.assertNotIn("Bootstrap Password", f.read())

    def test_generated_password_is_logged_and_ping_precedes_admin(self):
        with open(os.path.join(GEN.dir, "server.log")) as f:
            m = re.search(r"Bootstrap Password: (\S+)", f.read())
        self.assertIsNotNone(m)
        pw = m.group(1)
        self.assertEqual(GEN.request("GET", "/ping").body, b"pong")
        # right after it listened, the admin user did not exist yet
        self.assertEqual(GEN_EARLY.status, 401)
        body = {"username": "admin", "password": pw}
        # retry every 200 ms, as a client should (bounded)
        r = wait_for(lambda: (lambda x: x if x.status == 201 else None)(
            GEN.request("POST", LOGIN_V3, body)), 8, 0.2)
        self.assertEqual(r.status, 201)
        # generated password: the admin must change it
        me = GEN.request("GET", "/v3/users?me=true", token=r.json["token"])
        self.assertTrue(me.json["data"][0]["mustChangePassword"])

    def test_state_survives_restart(self):
        with open(os.path.join(GEN.dir, "server.log")) as f:
            pw = re.search(r"Bootstrap Password: (\S+)", f.read()).group(1)
        body = {"username": "admin", "password": pw}
        r = wait_for(lambda: (lambda x: x if x.status == 201 else None)(
            GEN.request("POST", LOGIN_V3, body)), 8, 0.2)
        tok = r.json["token"]
        r = GEN.request("PUT", "/v3/settings/ui-pl",
                        {"name": "ui-pl", "value": "kept"}, token=tok)
        self.assertEqual(r.status, 200)
        r = GEN.request("POST", DEPLOYMENTS, deployment("keep", 1),
                        token=tok)
        self.assertEqual(r.status, 201)
        GEN.stop()
        GEN.start()
        r = GEN.request("GET", "/v3/settings/ui-pl", token=tok)
        self.assertEqual(r.json["value"], "kept")
        r = GEN.request("GET", DEPLOYMENTS + "/keep", token=tok)
        self.assertEqual(r.status, 200)
        self.assertEqual(GEN.request("POST", LOGIN_V3, body).status, 201)

    def test_plain_http_mode(self):
        self.assertFalse(os.path.exists(os.path.join(EXTRA.dir, "ca.pem")))
        r = EXTRA.request("POST",
                          "/v3/clusters/local?action=generateKubeconfig",
                          token=EXTRA_TOKEN)
        # no cacerts when not serving TLS: no certificate-authority-data
        self.assertNotIn("certificate-authority-data", r.json["config"])
        self.assertIn('server: "https://from.env/k8s/clusters/local"',
                      r.json["config"])

    def test_many_concurrent_clients(self):
        import threading
        results = []

        def one():
            try:
                results.append(S.request("GET", "/ping").status)
            except OSError as e:
                results.append(repr(e))
        threads = [threading.Thread(target=one) for _ in range(60)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(results, [200] * 60)
        # a listen backlog of 5 would drop SYNs and cost 1 s retries
        self.assertLess(time.time() - t0, 5)

    def test_files_written(self):
        for f in ("ca.pem", "ca.key", "server.pem", "server.key", "port",
                  "pid", "ready", "access.log", "state.json"):
            self.assertTrue(os.path.exists(os.path.join(S.dir, f)), f)
        with open(os.path.join(S.dir, "pid")) as f:
            self.assertEqual(int(f.read()), S.proc.pid)


# ==========================================================================
# §2.1 Every call: auth, CSRF, type names, resource fields, error shapes


class TestEveryCall(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = S.login()

    def test_no_credentials_status_is_a_string(self):
        for path in ("/v3/settings", "/v3/tokens", K + "/version",
                     DEPLOYMENTS):
            r = S.request("GET", path)
            self.assertEqual(r.status, 401, path)
            self.assertEqual(r.json, {"type": "error", "status": "401",
                                      "message": "must authenticate"})
            self.assertIsInstance(r.json["status"], str)

    def test_bad_token_is_401(self):
        name = self.tok.split(":")[0]
        for bad in (name + ":wrongkey", "token-zzzzz:abc", "nocolon",
                    self.tok + ":extra"):
            r = S.request("GET", "/v3/settings", token=bad)
            self.assertEqual(r.status, 401, bad)
            self.assertEqual(r.json["status"], "401")

    def test_basic_auth_is_url_safe_base64(self):
        b = base64.urlsafe_b64encode(self.tok.encode()).decode()
        r = S.request("GET", "/v3/settings/first-login",
                      headers={"Authorization": "Basic " + b})
        self.assertEqual(r.status, 200)
        r = S.request("GET", "/v3/tokens",
                      headers={"Authorization": "Basic " + b})
        self.assertEqual(r.status, 200)

    def test_cookie_auth(self):
        r = S.request("GET", "/v3/tokens",
                      headers={"Cookie": "R_SESS=" + self.tok})
        self.assertEqual(r.status, 200)

    def test_csrf_only_for_browsers(self):
        r = S.request("PUT", "/v3/settings/ui-pl",
                      {"name": "ui-pl", "value": "rancher"}, token=self.tok)
        self.assertEqual(r.status, 200)  # not a browser: no CSRF check
        r = S.request("PUT", "/v3/settings/ui-pl",
                      {"name": "ui-pl", "value": "rancher"}, token=self.tok,
                      headers={"User-Agent": "Mozilla/5.0"})
        self.assertEqual(r.status, 422)
        self.assertEqual(r.json["code"], "InvalidCSRFToken")
        self.assertIn("CSRF=", r.header("Set-Cookie"))
        r = S.request("PUT", "/v3/settings/ui-pl",
                      {"name": "ui-pl", "value": "rancher"}, token=self.tok,
                      headers={"User-Agent": "Mozilla/5.0",
                               "Cookie": "CSRF=abc", "X-API-CSRF": "abc"})
        self.assertEqual(r.status, 200)

    def test_type_names_case_insensitive_singular_plural(self):
        a = S.request("GET", "/v3/tokens", token=self.tok)
        b = S.request("GET", "/v3/token", token=self.tok)
        c = S.request("GET", "/v3/Tokens", token=self.tok)
        self.assertEqual(a.status, 200)
        self.assertEqual(a.json["resourceType"], b.json["resourceType"])
        self.assertEqual(c.status, 200)
        r = S.request("GET", "/v3/Setting/server-url", token=self.tok)
        self.assertEqual(r.json["id"], "server-url")

    def test_resources_carry_id_type_basetype_links_actions(self):
        r = S.request("GET", "/v3/users?me=true", token=self.tok)
        u = r.json["data"][0]
        for k in ("id", "type", "baseType", "links", "actions"):
            self.assertIn(k, u)
        self.assertEqual(u["type"], "user")
        r = S.request("GET", "/v3/clusters/local", token=self.tok)
        self.assertIn("generateKubeconfig", r.json["actions"])

    def test_norman_error_shape(self):
        r = S.request("GET", "/v3/settings/no-such-setting", token=self.tok)
        self.assertEqual(r.status, 404)
        self.assertEqual(set(r.json), {"type", "baseType", "status", "code",
                                       "message"})
        self.assertEqual((r.json["type"], r.json["baseType"], r.json["code"],
                          r.json["status"]), ("error", "error", "NotFound",
                                              404))
        self.assertIsInstance(r.json["status"], int)

    def test_error_codes(self):
        t = self.tok
        cases = [
            # (method, path, body, status, code)
            ("GET", "/v3/settings/nope", None, 404, "NotFound"),
            ("PUT", "/v3/settings/cacerts", {"value": "x"}, 405,
             "MethodNotAllow"),
            ("POST", "/v3/tokens", b"{not json", 422, "InvalidFormat"),
            ("POST", "/v3/users?action=changepassword", b"{", 422,
             "InvalidBodyContent"),
            ("POST", "/v3/users?action=nosuchaction", {}, 422,
             "InvalidAction"),
            ("PUT", "/v3/settings/ui-pl", {"name": "ui-pl"}, 500,
             "ServerError"),
        ]
        for method, path, body, status, code in cases:
            r = S.request(method, path, body, token=t)
            self.assertEqual((r.status, r.json["code"]), (status, code),
                             (method, path, r))
            self.assertEqual(r.json["status"], status)


# ==========================================================================
# §2.2 Login



class TestLogin(unittest.TestCase):
    def test_v213_short_shape(self):
        r = S.request("POST", LOGIN_V3, {
            "username": "admin", "password": PW, "description": "kengine",
            "ttl": 57600000, "responseType": "json"})
        self.assertEqual(r.status, 201)
        self.assertEqual(set(r.json), {"token", "expiresAt", "id",
                                       "baseType", "type"})
        self.assertEqual((r.json["baseType"], r.json["type"]),
                         ("token", "token"))
        name, key = r.json["token"].split(":")
        self.assertEqual(name, r.json["id"])
        self.assertRegex(name, "^token-[%s]{5}$" % SAFE)
        self.assertTrue(key)
        self.assertRegex(r.json["expiresAt"],
                         r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_v1_public_login(self):
        r = S.request("POST", "/v1-public/login", {
            "type": "localProvider", "username": "admin", "password": PW})
        self.assertEqual(r.status, 201)
        self.assertEqual(set(r.json), {"token", "expiresAt", "id",
                                       "baseType", "type"})
        r = S.request("POST", "/v1-public/login", {
            "type": "localProvider", "username": "admin", "password": "no"})
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json, {"code": "Unauthorized", "status": 401,
                                  "message": "authentication failed",
                                  "type": "error", "baseType": "error"})
        # key order of the v2.13 auth error too
        self.assertEqual(list(r.json), ["code", "status", "message", "type",
                                        "baseType"])
        r = S.request("POST", "/v1-public/login", b"not json")
        self.assertEqual((r.status, r.json["code"]),
                         (422, "InvalidBodyContent"))

    def test_legacy_full_token_resource(self):
        r = LEGACY.request("POST", LOGIN_V3, {
            "username": "admin", "password": PW, "description": "kengine",
            "ttl": 57600000, "responseType": "json"})
        self.assertEqual(r.status, 201)
        for k in ("token", "authProvider", "userId", "ttl", "expiresAt",
                  "isDerived", "current", "enabled", "expired",
                  "description", "labels", "links", "id", "type",
                  "baseType"):
            self.assertIn(k, r.json)
        self.assertEqual(r.json["type"], "token")
        self.assertEqual(r.json["description"], "kengine")
        self.assertFalse(r.json["isDerived"])
        self.assertRegex(r.json["token"], "^token-[%s]{5}:" % SAFE)

    def test_legacy_has_no_v1_public_and_client_falls_back(self):
        def client_login(sim):  # terraform-provider-rancher2's algorithm
            body = {"type": "localProvider", "username": "admin",
                    "password": PW, "ttl": 0, "description": "kengine"}
            r = sim.request("POST", "/v1-public/login", body)
            if r.status == 404:
                r = sim.request("POST", LOGIN_V3, body)
            return r
        r = LEGACY.request("POST", "/v1-public/login", {
            "type": "localProvider", "username": "admin", "password": PW})
        self.assertEqual(r.status, 404)
        for sim in (S, LEGACY):
            r = client_login(sim)
            self.assertEqual(r.status, 201)
            self.assertIn(":", r.json["token"])

    def test_wrong_credentials(self):
        for sim in (S, LEGACY):
            for body in ({"username": "admin", "password": "wrong"},
                         {"username": "nobody", "password": PW}):
                r = sim.request("POST", LOGIN_V3, body)
                self.assertEqual(r.status, 401)
                self.assertEqual((r.json["code"], r.json["message"],
                                  r.json["status"]),
                                 ("Unauthorized", "authentication failed",
                                  401))

    def test_body_not_json(self):
        for sim in (S, LEGACY):
            r = sim.request("POST", LOGIN_V3, b"username=admin")
            self.assertEqual(r.status, 422)
            self.assertEqual(r.json["code"], "InvalidBodyContent")

    def test_response_type_cookie(self):
        r = S.request("POST", LOGIN_V3, {"username": "admin", "password": PW,
                                         "responseType": "cookie"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")
        m = re.match(r"R_SESS=([^;]+);", r.header("Set-Cookie"))
        self.assertIsNotNone(m)
        r = S.request("GET", "/v3/tokens",
                      headers={"Cookie": "R_SESS=" + m.group(1)})
        self.assertEqual(r.status, 200)

    def test_ext_prefix(self):
        tok = EXTRA_TOKEN  # EXTRA runs with --ext-login-tokens
        self.assertTrue(tok.startswith("ext/"))
        # strip ext/ from the name, as terraform-provider-rancher2 does
        ident = tok.split(":")[0]
        ident = ident[len("ext/"):] if ident.startswith("ext/") else ident
        ids = [t["id"] for t in EXTRA.request("GET", "/v3/tokens",
                                              token=tok).json["data"]]
        self.assertIn(ident, ids)
        # the full bearer value (with ext/) authenticates, the bare one not
        self.assertEqual(EXTRA.request("GET", "/v3/tokens",
                                       token=tok).status, 200)
        bare = tok[len("ext/"):]
        self.assertEqual(EXTRA.request("GET", "/v3/tokens",
                                       token=bare).status, 401)


# ==========================================================================
# §2.3 Change password


class TestChangePassword(unittest.TestCase):
    def test_rules_and_success(self):
        s = EXTRA  # bootstrap password "admin"
        tok = EXTRA_TOKEN
        me = s.request("GET", "/v3/users?me=true", token=tok).json
        self.assertTrue(me["data"][0]["mustChangePassword"])
        r = s.request("GET", "/v3/settings/first-login")  # public
        self.assertEqual((r.status, r.json["value"]), (200, "true"))
        path = "/v3/users?action=changepassword"

        def change(cur, new):
            body = {}
            if cur is not None:
                body["currentPassword"] = cur
            if new is not None:
                body["newPassword"] = new
            return s.request("POST", path, body, token=tok)
        for cur, new, msg in (
                (None, "a-long-enough-password", "must specify current "
                 "password"),
                ("admin", "short", "Password must be at least 12 "
                 "characters"),
                ("admin", "12345678901", "Password must be at least 12 "
                 "characters"),
                ("wrong-current", "a-long-enough-password",
                 "invalid current password")):
            r = change(cur, new)
            self.assertEqual(r.status, 422, msg)
            self.assertEqual((r.json["code"], r.json["message"]),
                             ("InvalidBodyContent", msg))
        # the other two rules need a password-min-length that lets them
        # through the length rule
        r = s.request("PUT", "/v3/settings/password-min-length",
                      {"value": "3"}, token=tok)
        self.assertEqual(r.status, 200)
        r = change("admin", "admin")
        self.assertEqual(r.json["message"],
                         "Password cannot be the same as the username")
        s.request("PUT", "/v3/settings/password-min-length",
                  {"value": "12"}, token=tok)
        s.request("POST", path, {"currentPassword": "admin",
                                 "newPassword": "x" * 12}, token=tok)
        r = change("x" * 12, "x" * 12)
        self.assertEqual(r.json["message"], "The new password must not "
                         "be the same as the current password")
        r = change("x" * 12, "a-long-enough-password")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")
        me = s.request("GET", "/v3/users?me=true", token=tok).json
        self.assertFalse(me["data"][0]["mustChangePassword"])
        r = s.request("GET", "/v3/settings/first-login")
        self.assertEqual(r.json["value"], "false")
        self.assertEqual(s.request("POST", LOGIN_V3, {
            "username": "admin", "password": "x" * 12}).status, 401)
        self.assertEqual(s.request("POST", LOGIN_V3, {
            "username": "admin", "password": "a-long-enough-password"})
            .status, 201)


# ==========================================================================
# §2.4 Settings


class TestSettings(unittest.TestCase):
    def test_server_url(self):
        tok = S.login()
        r = S.request("PUT", "/v3/settings/server-url",
                      {"name": "server-url", "value": "https://rancher.example"},
                      token=tok)
        self.assertEqual(r.status, 200)
        j = r.json
        self.assertEqual((j["id"], j["type"], j["name"], j["value"],
                          j["default"], j["customized"], j["source"]),
                         ("server-url", "setting", "server-url",
                          "https://rancher.example", "", True, "db"))
        self.assertIn("self", j["links"])
        # server-url is the host in generated kubeconfigs
        r = S.request("POST", "/v3/clusters/local?action=generateKubeconfig",
                      token=tok)
        self.assertIn('server: "https://rancher.example/k8s/clusters/local"',
                      r.json["config"])
        r = S.request("PUT", "/v3/settings/server-url",
                      {"name": "server-url", "value": ""}, token=tok)
        self.assertEqual((r.json["value"], r.json["source"]), ("", "default"))
        r = S.request("POST", "/v3/clusters/local?action=generateKubeconfig",
                      token=tok)
        self.assertIn('server: "https://127.0.0.1:%d/k8s/clusters/local"'
                      % S.port, r.json["config"])

    def test_env_setting_is_read_only(self):
        s = EXTRA  # runs with CATTLE_SERVER_URL=https://from.env
        tok = EXTRA_TOKEN
        r = s.request("GET", "/v3/settings/server-url", token=tok)
        self.assertEqual((r.json["value"], r.json["source"],
                          r.json["customized"]),
                         ("https://from.env", "env", False))
        self.assertNotIn("update", r.json["links"])
        r = s.request("PUT", "/v3/settings/server-url",
                      {"name": "server-url", "value": "https://x"},
                      token=tok)
        self.assertEqual(r.status, 405)
        self.assertEqual((r.json["code"], r.json["message"]), (
            "MethodNotAllow", "server-url is readOnly because its value "
            "is from environment variable"))

    def test_cacerts_read_only_and_first_login_default(self):
        tok = S.login()
        r = S.request("PUT", "/v3/settings/cacerts", {"value": "x"},
                      token=tok)
        self.assertEqual((r.status, r.json["code"]), (405, "MethodNotAllow"))
        r = LEGACY.request("GET", "/v3/settings/first-login")
        self.assertEqual((r.json["value"], r.json["default"]),
                         ("true", "true"))
        with open(os.path.join(S.dir, "ca.pem")) as f:
            self.assertEqual(S.request("GET", "/v3/settings/cacerts")
                             .json["value"], f.read())


# ==========================================================================
# §2.5 API tokens


class TestTokens(unittest.TestCase):
    def test_create_list_delete(self):
        tok = S.login()
        r = S.request("POST", "/v3/tokens", {"type": "token",
                                             "description": "automation",
                                             "ttl": 0}, token=tok)
        self.assertEqual(r.status, 201)
        j = r.json
        self.assertRegex(j["token"], "^token-[%s]{5}:[%s]+$" % (SAFE, SAFE))
        self.assertEqual(j["token"].split(":")[0], j["id"])
        self.assertEqual((j["type"], j["description"], j["isDerived"]),
                         ("token", "automation", True))
        # ttl 0 = the default, 90 days
        self.assertEqual(j["ttl"], 90 * 24 * 3600 * 1000)
        api = j["token"]
        self.assertEqual(S.request("GET", "/v3/tokens", token=api).status, 200)
        ids = [t["id"] for t in S.request("GET", "/v3/tokens",
                                          token=tok).json["data"]]
        self.assertIn(j["id"], ids)
        # clamped to auth-token-max-ttl-minutes
        r = S.request("POST", "/v3/tokens", {"ttl": 10 ** 13}, token=tok)
        self.assertEqual(r.json["ttl"], 129600 * 60000)
        # delete, then it no longer authenticates
        r = S.request("DELETE", "/v3/tokens/" + j["id"], token=tok)
        self.assertEqual(r.status, 204)
        self.assertEqual(S.request("GET", "/v3/tokens", token=api).status, 401)
        r = S.request("GET", "/v3/tokens/" + j["id"], token=tok)
        self.assertEqual((r.status, r.json["code"]), (404, "NotFound"))

    def test_current_session_token_and_logout(self):
        tok = S.login()
        name = tok.split(":")[0]
        r = S.request("GET", "/v3/tokens/" + name, token=tok)
        self.assertTrue(r.json["current"])
        r = S.request("DELETE", "/v3/tokens/" + name, token=tok)
        self.assertEqual((r.status, r.json["message"]), (
            400, "Cannot delete token for current session. Use logout "
            "instead"))
        r = S.request("POST", "/v3/tokens?action=logout", token=tok)
        self.assertEqual(r.status, 200)
        self.assertEqual(S.request("GET", "/v3/tokens", token=tok).status,
                         401)

    def test_no_credentials(self):
        r = S.request("POST", "/v3/tokens", {"type": "token", "ttl": 0})
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json["status"], "401")

    def test_cluster_scoped_token(self):
        tok = S.login()
        r = S.request("POST", "/v3/tokens", {"ttl": 0, "clusterId": "local"},
                      token=tok)
        scoped = r.json["token"]
        self.assertEqual(r.json["clusterId"], "local")
        self.assertEqual(S.request("GET", K + "/version",
                                   token=scoped).status, 200)
        self.assertEqual(S.request("GET", "/v3/tokens",
                                   token=scoped).status, 401)


# ==========================================================================
# §2.6 Kubeconfig for the local cluster


class TestKubeconfig(unittest.TestCase):
    def test_generate(self):
        tok = S.login()
        r = S.request("POST", "/v3/clusters/local?action=generateKubeconfig",
                      token=tok)
        self.assertEqual(r.status, 200)
        self.assertEqual(set(r.json), {"config", "type"})
        self.assertEqual(r.json["type"], "generateKubeconfigOutput")
        cfg = r.json["config"]
        for line in ("apiVersion: v1", "kind: Config", 'current-context: '
                     '"local"', '- name: "local"'):
            self.assertIn(line, cfg)
        with open(os.path.join(S.dir, "ca.pem")) as f:
            ca = f.read()
        data, raw = decode_yaml_double_quoted(cfg, "certificate-authority-data")
        self.assertEqual(base64.b64decode(data).decode(), ca)
        # wrapped: first chunk 49 chars, then 76 each, `\` newline 6 spaces
        lines = raw.split("\n")
        self.assertGreater(len(lines), 2)
        self.assertEqual(len(lines[0]), 49 + 1)
        self.assertTrue(lines[0].endswith("\\"))
        for mid in lines[1:-1]:
            self.assertRegex(mid, r"^      \S{76}\\$")
        self.assertRegex(lines[-1], r"^      \S{1,76}$")
        # a naive line-based reader gets a broken value
        naive = re.search(r'certificate-authority-data: "([^"\n]*)', cfg)
        self.assertNotEqual(naive.group(1), data)
        # the token in the kubeconfig works against the proxied API
        user_tok = re.search(r'token: "([^"]+)"', cfg).group(1)
        self.assertRegex(user_tok, r"^kubeconfig-user-[%s]+:" % SAFE)
        r = S.request("GET", K + "/api/v1/nodes", token=user_tok)
        self.assertEqual(r.status, 200)

    def test_yaml_parser_reads_it(self):
        try:
            import yaml
        except ImportError:
            self.skipTest("PyYAML not installed")
        tok = S.login()
        cfg = S.request("POST", "/v3/clusters/local?action=generateKubeconfig",
                        token=tok).json["config"]
        doc = yaml.safe_load(cfg)
        with open(os.path.join(S.dir, "ca.pem")) as f:
            ca = f.read()
        cl = doc["clusters"][0]["cluster"]
        self.assertEqual(base64.b64decode(
            cl["certificate-authority-data"]).decode(), ca)
        self.assertTrue(cl["server"].endswith("/k8s/clusters/local"))
        self.assertEqual(doc["current-context"], "local")
        self.assertEqual(doc["contexts"][0]["context"],
                         {"user": "local", "cluster": "local"})
        self.assertIn(":", doc["users"][0]["user"]["token"])

    def test_steve_path_redirects(self):
        tok = S.login()
        r = S.request("POST", "/v1/management.cattle.io.clusters/local"
                      "?action=generateKubeconfig", token=tok)
        self.assertEqual(r.status, 302)
        loc = r.header("Location")
        self.assertEqual(loc, "/v3/clusters/local?action=generateKubeconfig")
        # a client following the 302 turns the POST into a GET: no config
        r = S.request("GET", loc, token=tok)
        self.assertEqual(r.status, 200)
        self.assertNotIn("config", r.json)
        self.assertEqual(r.json["type"], "cluster")

    def test_unknown_cluster(self):
        tok = S.login()
        r = S.request("POST", "/v3/clusters/c-nope?action=generateKubeconfig",
                      token=tok)
        self.assertEqual((r.status, r.json["code"]), (404, "NotFound"))
        r = S.request("GET", "/k8s/clusters/c-nope/version", token=tok)
        self.assertEqual(r.status, 404)


# ==========================================================================
# §2.7 + §3 Kubernetes through Rancher


class K8sCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = S.login()

    def req(self, method, path, body=None, **kw):
        return S.request(method, path, body, token=self.tok, **kw)

    def create(self, d):
        r = self.req("POST", DEPLOYMENTS, d)
        self.assertEqual(r.status, 201, r)
        return r.json

    def get(self, name):
        return self.req("GET", DEPLOYMENTS + "/" + name).json

    def assertStatus(self, r, code, reason, message=None):
        self.assertEqual(r.status, code, r)
        j = r.json
        self.assertEqual((j["kind"], j["apiVersion"], j["metadata"],
                          j["status"], j["reason"], j["code"]),
                         ("Status", "v1", {}, "Failure", reason, code))
        if message is not None:
            self.assertEqual(j["message"], message)
        return j


class TestK8sBasics(K8sCase):
    def test_version_and_nodes(self):
        r = self.req("GET", K + "/version")
        self.assertEqual(r.status, 200)
        self.assertRegex(r.json["gitVersion"], r"^v1\.\d+\.\d+")
        self.assertEqual(r.json["major"], "1")
        r = self.req("GET", K + "/api/v1/nodes")
        self.assertEqual((r.status, r.json["kind"]), (200, "NodeList"))
        node = r.json["items"][0]
        conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        self.assertEqual(conds["Ready"], "True")
        r = self.req("GET", K + "/api/v1/nodes/" + node["metadata"]["name"])
        self.assertEqual(r.json["kind"], "Node")

    def test_discovery(self):
        r = self.req("GET", K + "/apis/apps/v1")
        names = [x["name"] for x in r.json["resources"]]
        self.assertIn("deployments", names)
        self.assertIn("deployments/scale", names)
        r = self.req("GET", K + "/api/v1")
        self.assertIn("pods", [x["name"] for x in r.json["resources"]])

    def test_unknown_path(self):
        r = self.req("GET", K + "/apis/nope/v1/things")
        self.assertStatus(r, 404, "NotFound",
                          "the server could not find the requested resource")

    def test_direct_apiserver_401(self):
        s = EXTRA  # runs with --k8s-direct
        r = s.request("GET", "/api/v1/nodes", token="token-zzzzz:nope")
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json, {"kind": "Status", "apiVersion": "v1",
                                  "metadata": {}, "status": "Failure",
                                  "message": "Unauthorized",
                                  "reason": "Unauthorized", "code": 401})
        self.assertEqual(s.request("GET", "/api/v1/nodes",
                                   token=EXTRA_TOKEN).status, 200)


class TestDeploymentCRUD(K8sCase):
    def test_create_fields(self):
        d = self.create(deployment("c1"))
        md = d["metadata"]
        self.assertEqual(d["kind"], "Deployment")
        self.assertRegex(md["uid"], r"^[0-9a-f-]{36}$")
        self.assertIsInstance(md["resourceVersion"], str)
        self.assertEqual(md["generation"], 1)
        self.assertRegex(md["creationTimestamp"], r"Z$")
        self.assertTrue(md["managedFields"])
        self.assertEqual(md["managedFields"][0]["manager"], "kengine-test")
        self.assertEqual(d["status"], {})
        # defaults filled by the server
        self.assertEqual(d["spec"]["strategy"]["type"], "RollingUpdate")
        self.assertEqual(d["spec"]["template"]["spec"]["containers"][0]
                         ["ports"][0]["protocol"], "TCP")
        # the controller adds the revision annotation once it observed it
        g = wait_for(lambda: (lambda x: x if (x["metadata"].get(
            "annotations") or {}).get("deployment.kubernetes.io/revision")
            else None)(self.get("c1")), 2)
        self.assertEqual(g["metadata"]["annotations"][
            "deployment.kubernetes.io/revision"], "1")

    def test_already_exists(self):
        self.create(deployment("c2"))
        r = self.req("POST", DEPLOYMENTS, deployment("c2"))
        j = self.assertStatus(r, 409, "AlreadyExists",
                              'deployments.apps "c2" already exists')
        self.assertEqual(j["details"], {"name": "c2", "group": "apps",
                                        "kind": "deployments"})

    def test_not_found_body(self):
        r = self.req("GET", DEPLOYMENTS + "/nope")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json, {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure",
            "message": 'deployments.apps "nope" not found',
            "reason": "NotFound",
            "details": {"name": "nope", "group": "apps",
                        "kind": "deployments"},
            "code": 404})
        self.assertEqual(list(r.json), ["kind", "apiVersion", "metadata",
                                        "status", "message", "reason",
                                        "details", "code"])
        r = self.req("GET", SERVICES + "/nope")
        self.assertEqual(r.json["message"], 'services "nope" not found')
        self.assertEqual(r.json["details"], {"name": "nope",
                                             "kind": "services"})

    def test_get_and_list(self):
        self.create(deployment("l1"))
        r = self.req("GET", DEPLOYMENTS)
        self.assertEqual((r.status, r.json["kind"], r.json["apiVersion"]),
                         (200, "DeploymentList", "apps/v1"))
        self.assertIn("l1", [i["metadata"]["name"] for i in r.json["items"]])
        self.assertIsInstance(r.json["metadata"]["resourceVersion"], str)
        r = self.req("GET", K + "/apis/apps/v1/deployments")  # all namespaces
        self.assertEqual(r.status, 200)

    def test_selector_mismatch_422(self):
        d = deployment("bad1")
        d["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
        r = self.req("POST", DEPLOYMENTS, d)
        j = self.assertStatus(r, 422, "Invalid")
        self.assertEqual(j["message"], 'Deployment.apps "bad1" is invalid: '
                         'spec.template.metadata.labels: Invalid value: '
                         '{"app":"other"}: `selector` does not match template '
                         '`labels`')
        self.assertEqual(j["details"]["kind"], "Deployment")
        self.assertEqual(j["details"]["group"], "apps")
        self.assertEqual(j["details"]["causes"], [{
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: {"app":"other"}: `selector` does not '
                       'match template `labels`',
            "field": "spec.template.metadata.labels"}])

    def test_selector_missing_422(self):
        d = deployment("bad2")
        del d["spec"]["selector"]
        j = self.assertStatus(self.req("POST", DEPLOYMENTS, d), 422,
                              "Invalid")
        self.assertTrue(j["message"].startswith(
            'Deployment.apps "bad2" is invalid: [spec.selector: Required '
            'value, '))
        self.assertEqual(j["details"]["causes"][0], {
            "reason": "FieldValueRequired", "message": "Required value",
            "field": "spec.selector"})

    def test_legacy_value_rendering(self):
        ltok = LEGACY.login()
        d = deployment("bad3")
        d["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
        r = LEGACY.request("POST", DEPLOYMENTS, d, token=ltok)
        self.assertIn('Invalid value: map[string]string{"app":"other"}: '
                      '`selector` does not match', r.json["message"])

    def test_other_validation(self):
        d = deployment("bad4", replicas=-1)
        d["spec"]["template"]["spec"]["containers"][0]["image"] = ""
        j = self.assertStatus(self.req("POST", DEPLOYMENTS, d), 422,
                              "Invalid")
        fields = [c["field"] for c in j["details"]["causes"]]
        self.assertIn("spec.replicas", fields)
        self.assertIn("spec.template.spec.containers[0].image", fields)
        d = deployment("Bad_Name")
        j = self.assertStatus(self.req("POST", DEPLOYMENTS, d), 422,
                              "Invalid")
        self.assertEqual(j["details"]["causes"][0]["field"], "metadata.name")
        r = self.req("POST", DEPLOYMENTS, b"{not json")
        self.assertStatus(r, 400, "BadRequest")

    def test_replace(self):
        d = self.create(deployment("r1", 1))
        d = wait_for(lambda: (lambda x: x if x.get("status") else None)(
            self.get("r1")), 2)
        stale = d["metadata"]["resourceVersion"]
        d["spec"]["replicas"] = 2
        r = self.req("PUT", DEPLOYMENTS + "/r1", d)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["metadata"]["generation"], 2)
        self.assertNotEqual(r.json["metadata"]["resourceVersion"], stale)
        # stale resourceVersion -> 409 Conflict
        d["spec"]["replicas"] = 3
        r = self.req("PUT", DEPLOYMENTS + "/r1", d)
        j = self.assertStatus(
            r, 409, "Conflict", 'Operation cannot be fulfilled on '
            'deployments.apps "r1": the object has been modified; please '
            'apply your changes to the latest version and try again')
        self.assertEqual(j["details"], {"name": "r1", "group": "apps",
                                        "kind": "deployments"})
        # without one -> unconditional
        del d["metadata"]["resourceVersion"]
        r = self.req("PUT", DEPLOYMENTS + "/r1", d)
        self.assertEqual((r.status, r.json["spec"]["replicas"]), (200, 3))
        # selector is immutable
        d["spec"]["selector"] = {"matchLabels": {"app": "r1", "x": "y"}}
        d["spec"]["template"]["metadata"]["labels"]["x"] = "y"
        r = self.req("PUT", DEPLOYMENTS + "/r1", d)
        j = self.assertStatus(r, 422, "Invalid")
        self.assertIn("field is immutable", j["message"])
        # deployments are not created by PUT
        r = self.req("PUT", DEPLOYMENTS + "/r-missing",
                     deployment("r-missing"))
        self.assertStatus(r, 404, "NotFound")

    def test_patches(self):
        self.create(deployment("p1", 1))
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {"spec": {"replicas": 2}},
                     ctype="application/merge-patch+json")
        self.assertEqual((r.status, r.json["spec"]["replicas"]), (200, 2))
        self.assertEqual(r.json["metadata"]["generation"], 2)
        # strategic merge: containers merge by name
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {"spec": {"template": {
            "spec": {"containers": [{"name": "p1", "image": "nginx:1.28"}]}}}},
            ctype="application/strategic-merge-patch+json")
        c = r.json["spec"]["template"]["spec"]["containers"]
        self.assertEqual(len(c), 1)
        self.assertEqual((c[0]["image"], c[0]["ports"][0]["containerPort"]),
                         ("nginx:1.28", 8080))
        # the same patch as merge-patch replaces the list
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {"spec": {"template": {
            "spec": {"containers": [{"name": "p1", "image": "nginx:1.29"}]}}}},
            ctype="application/merge-patch+json")
        self.assertNotIn("ports", r.json["spec"]["template"]["spec"][
            "containers"][0])
        r = self.req("PATCH", DEPLOYMENTS + "/p1", [
            {"op": "replace", "path": "/spec/replicas", "value": 4}],
            ctype="application/json-patch+json")
        self.assertEqual(r.json["spec"]["replicas"], 4)
        r = self.req("PATCH", DEPLOYMENTS + "/p1", [
            {"op": "test", "path": "/spec/replicas", "value": 99}],
            ctype="application/json-patch+json")
        self.assertStatus(r, 422, "Invalid")
        # 415 for anything else
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {"spec": {}},
                     ctype="application/json")
        self.assertStatus(r, 415, "UnsupportedMediaType",
                          "the body of the request was in an unknown format "
                          "- accepted media types include: application/json-"
                          "patch+json, application/merge-patch+json, "
                          "application/strategic-merge-patch+json, "
                          "application/apply-patch+yaml")
        # 422 from validation, 409 from a stale resourceVersion in the patch
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {"spec": {"replicas": -2}},
                     ctype="application/merge-patch+json")
        self.assertStatus(r, 422, "Invalid")
        r = self.req("PATCH", DEPLOYMENTS + "/p1", {
            "metadata": {"resourceVersion": "1"}, "spec": {"replicas": 1}},
            ctype="application/merge-patch+json")
        self.assertStatus(r, 409, "Conflict")
        r = self.req("PATCH", DEPLOYMENTS + "/nope", {"spec": {}},
                     ctype="application/merge-patch+json")
        self.assertStatus(r, 404, "NotFound")

    def test_server_side_apply(self):
        path = DEPLOYMENTS + "/a1?fieldManager=kengine"
        apply = "application/apply-patch+yaml"
        d = deployment("a1", 2)
        r = self.req("PATCH", path, d, ctype=apply)
        self.assertEqual(r.status, 201, r)  # created by the apply
        mf = r.json["metadata"]["managedFields"]
        self.assertEqual((mf[0]["manager"], mf[0]["operation"]),
                         ("kengine", "Apply"))
        d["spec"]["replicas"] = 3
        r = self.req("PATCH", path, d, ctype=apply)
        self.assertEqual((r.status, r.json["spec"]["replicas"]), (200, 3))
        # missing fieldManager -> 422
        r = self.req("PATCH", DEPLOYMENTS + "/a1", d, ctype=apply)
        j = self.assertStatus(r, 422, "Invalid")
        self.assertEqual(j["message"], 'PatchOptions.meta.k8s.io "" is '
                         'invalid: fieldManager: Required value: is required '
                         'for apply patch')
        # someone else changes replicas -> applying ours conflicts
        r = self.req("PATCH", DEPLOYMENTS + "/a1/scale?fieldManager=kubectl",
                     {"spec": {"replicas": 5}},
                     ctype="application/merge-patch+json")
        self.assertEqual(r.status, 200)
        r = self.req("PATCH", path, d, ctype=apply)
        j = self.assertStatus(r, 409, "Conflict")
        self.assertEqual(j["details"]["causes"], [{
            "reason": "FieldManagerConflict",
            "message": 'conflict with "kubectl" with subresource "scale" '
                       'using apps/v1',
            "field": ".spec.replicas"}])
        self.assertTrue(j["message"].startswith(
            "Apply failed with 1 conflict: conflict with \"kubectl\""))
        r = self.req("PATCH", path + "&force=true", d, ctype=apply)
        self.assertEqual((r.status, r.json["spec"]["replicas"]), (200, 3))
        # dropping a field from the applied config removes it
        d["metadata"]["labels"]["extra"] = "1"
        self.req("PATCH", path, d, ctype=apply)
        del d["metadata"]["labels"]["extra"]
        r = self.req("PATCH", path, d, ctype=apply)
        self.assertNotIn("extra", r.json["metadata"]["labels"])

    def test_delete_background(self):
        d = self.create(deployment("d1", 1))
        r = self.req("DELETE", DEPLOYMENTS + "/d1")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json, {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "details": {
                "name": "d1", "group": "apps", "kind": "deployments",
                "uid": d["metadata"]["uid"]}})
        self.assertEqual(self.req("GET", DEPLOYMENTS + "/d1").status, 404)
        r = self.req("DELETE", DEPLOYMENTS + "/d1")
        self.assertStatus(r, 404, "NotFound")

    def test_delete_foreground(self):
        self.create(deployment("d2", 1))
        r = self.req("DELETE", DEPLOYMENTS + "/d2", {
            "kind": "DeleteOptions", "apiVersion": "v1",
            "propagationPolicy": "Foreground"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json["kind"], "Deployment")
        self.assertIn("deletionTimestamp", r.json["metadata"])
        self.assertIn("foregroundDeletion", r.json["metadata"]["finalizers"])
        gone = wait_for(lambda: self.req("GET", DEPLOYMENTS + "/d2").status
                        == 404, 3)
        self.assertTrue(gone)
        # the query parameter, read when the body is empty ...
        self.create(deployment("d3", 1))
        r = self.req("DELETE", DEPLOYMENTS + "/d3?propagationPolicy=Foreground")
        self.assertIn("foregroundDeletion", r.json["metadata"]["finalizers"])
        # ... and ignored when there is one
        self.create(deployment("d4", 1))
        r = self.req("DELETE", DEPLOYMENTS + "/d4?propagationPolicy=Foreground",
                     {"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": "Background"})
        self.assertEqual((r.status, r.json["kind"], r.json["status"]),
                         (200, "Status", "Success"))

    def test_dry_run(self):
        r = self.req("POST", DEPLOYMENTS + "?dryRun=All", deployment("dry"))
        self.assertEqual(r.status, 201)
        self.assertEqual(self.req("GET", DEPLOYMENTS + "/dry").status, 404)


class TestDeploymentStatus(K8sCase):
    def test_generation_readiness_and_omitted_counters(self):
        d = self.create(deployment("s1", 3))
        self.assertEqual(d["status"], {})  # nothing observed yet
        seen_partial = []

        def poll():
            g = self.get("s1")
            st = g["status"]
            for k, v in st.items():
                if k != "conditions":
                    self.assertNotEqual(v, 0, "zero counter %s present" % k)
            if st.get("observedGeneration") and \
                    "readyReplicas" not in st:
                seen_partial.append(st)
            return g if rollout_done(g) else None
        t0 = time.time()
        g = wait_for(poll, READY_SECONDS + 3)
        self.assertTrue(g, "rollout did not converge")
        took = time.time() - t0
        self.assertLess(took, READY_SECONDS + 2)
        # readiness converged over time, not at once: at first, no pod was
        # ready and readyReplicas was omitted rather than 0
        self.assertTrue(seen_partial)
        self.assertEqual(seen_partial[0]["unavailableReplicas"], 3)
        st = g["status"]
        self.assertEqual((st["observedGeneration"], st["replicas"],
                          st["readyReplicas"], st["availableReplicas"],
                          st["updatedReplicas"]), (1, 3, 3, 3, 3))
        self.assertNotIn("unavailableReplicas", st)
        conds = {c["type"]: c for c in st["conditions"]}
        self.assertEqual((conds["Available"]["status"],
                          conds["Available"]["reason"]),
                         ("True", "MinimumReplicasAvailable"))
        self.assertEqual(conds["Progressing"]["reason"],
                         "NewReplicaSetAvailable")
        # a spec change: generation moves first, observedGeneration follows
        r = self.req("PATCH", DEPLOYMENTS + "/s1", {"spec": {"template": {
            "spec": {"containers": [{"name": "s1", "image": "nginx:1.28"}]}}}},
            ctype="application/strategic-merge-patch+json")
        self.assertEqual(r.json["metadata"]["generation"], 2)
        self.assertEqual(r.json["status"]["observedGeneration"], 1)
        self.assertFalse(rollout_done(r.json))
        mid = wait_for(lambda: (lambda x: x if x["status"].get(
            "observedGeneration") == 2 else None)(self.get("s1")), 2)
        self.assertFalse(rollout_done(mid))  # old pods still there
        g = wait_for(lambda: (lambda x: x if rollout_done(x) else None)(
            self.get("s1")), READY_SECONDS + 3)
        self.assertTrue(g)
        self.assertEqual(g["metadata"]["annotations"][
            "deployment.kubernetes.io/revision"], "2")

    def test_zero_replicas_status(self):
        self.create(deployment("s0", 0))
        g = wait_for(lambda: (lambda x: x if x["status"] else None)(
            self.get("s0")), 2)
        st = g["status"]
        for k in ("replicas", "readyReplicas", "availableReplicas",
                  "updatedReplicas", "unavailableReplicas"):
            self.assertNotIn(k, st)
        self.assertEqual(st["observedGeneration"], 1)

    def test_progress_deadline(self):
        self.create(deployment("s2", 1, image="registry.invalid/nonexistent:1",
                               progressDeadlineSeconds=1))

        def exceeded():
            conds = self.get("s2")["status"].get("conditions") or []
            return any(c["reason"] == "ProgressDeadlineExceeded" and
                       c["status"] == "False" for c in conds)
        self.assertTrue(wait_for(exceeded, 3))
        self.assertNotIn("readyReplicas", self.get("s2")["status"])
        pods = self.req("GET", PODS + "?labelSelector=app%3Ds2").json["items"]
        self.assertEqual(pods[0]["status"]["phase"], "Pending")


class TestScale(K8sCase):
    def test_scale_subresource(self):
        self.create(deployment("sc", 3))
        path = DEPLOYMENTS + "/sc/scale"
        # settle first: while pods become ready, every status update moves
        # the resourceVersion (as on a real cluster)
        self.assertTrue(wait_for(lambda: rollout_done(self.get("sc")),
                                 READY_SECONDS + 5))
        r = self.req("GET", path)
        self.assertEqual(r.status, 200)
        s = r.json
        dep = self.get("sc")
        self.assertEqual((s["kind"], s["apiVersion"]), ("Scale",
                                                        "autoscaling/v1"))
        self.assertEqual(s["metadata"], {k: dep["metadata"][k] for k in (
            "name", "namespace", "uid", "resourceVersion",
            "creationTimestamp")})
        self.assertEqual(s["spec"], {"replicas": 3})
        self.assertEqual(s["status"], {"replicas": 3, "selector": "app=sc"})
        gen = dep["metadata"]["generation"]
        # PUT with the current resourceVersion
        r = self.req("PUT", path, {"kind": "Scale",
                                   "apiVersion": "autoscaling/v1",
                                   "metadata": {"name": "sc", "namespace":
                                                "default", "resourceVersion":
                                                s["metadata"]["resourceVersion"]},
                                   "spec": {"replicas": 4}})
        self.assertEqual((r.status, r.json["kind"], r.json["spec"]),
                         (200, "Scale", {"replicas": 4}))
        self.assertEqual(self.get("sc")["metadata"]["generation"], gen + 1)
        # the same, now stale, resourceVersion -> 409
        r = self.req("PUT", path, {"kind": "Scale",
                                   "apiVersion": "autoscaling/v1",
                                   "metadata": {"name": "sc", "resourceVersion":
                                                s["metadata"]["resourceVersion"]},
                                   "spec": {"replicas": 5}})
        self.assertStatus(r, 409, "Conflict", 'Operation cannot be fulfilled '
                          'on deployments.apps "sc": the object has been '
                          'modified; please apply your changes to the latest '
                          'version and try again')
        # omitted -> unconditional
        r = self.req("PUT", path, {"kind": "Scale",
                                   "apiVersion": "autoscaling/v1",
                                   "metadata": {"name": "sc"},
                                   "spec": {"replicas": 5}})
        self.assertEqual((r.status, r.json["spec"]), (200, {"replicas": 5}))
        r = self.req("PATCH", path, {"spec": {"replicas": 2}},
                     ctype="application/merge-patch+json")
        self.assertEqual((r.status, r.json["kind"], r.json["spec"]),
                         (200, "Scale", {"replicas": 2}))
        self.assertEqual(self.get("sc")["metadata"]["generation"], gen + 3)
        r = self.req("PATCH", path, {"spec": {"replicas": -1}},
                     ctype="application/merge-patch+json")
        j = self.assertStatus(r, 422, "Invalid",
                              'Scale.autoscaling "sc" is invalid: '
                              'spec.replicas: Invalid value: -1: must be '
                              'greater than or equal to 0')
        self.assertEqual(j["details"]["causes"][0]["field"], "spec.replicas")
        r = self.req("GET", DEPLOYMENTS + "/nope/scale")
        self.assertStatus(r, 404, "NotFound")
        r = self.req("PATCH", DEPLOYMENTS + "/nope/scale",
                     {"spec": {"replicas": 1}},
                     ctype="application/merge-patch+json")
        self.assertStatus(r, 404, "NotFound")
        # scaling to 0: spec.replicas is omitted (omitempty)
        r = self.req("PATCH", path, {"spec": {"replicas": 0}},
                     ctype="application/merge-patch+json")
        self.assertEqual(r.json["spec"], {})


class TestPods(K8sCase):
    def test_pods_by_label(self):
        self.create(deployment("pl", 3))
        ok = wait_for(lambda: len(self.req(
            "GET", PODS + "?labelSelector=app%3Dpl").json["items"]) == 3, 2)
        self.assertTrue(ok)
        r = self.req("GET", PODS + "?labelSelector=app%3Dpl")
        self.assertEqual((r.status, r.json["kind"], r.json["apiVersion"]),
                         (200, "PodList", "v1"))
        self.assertIsInstance(r.json["metadata"]["resourceVersion"], str)
        names = [p["metadata"]["name"] for p in r.json["items"]]
        self.assertEqual(len(set(names)), 3)
        for n in names:  # hostname-like
            self.assertRegex(n, r"^pl-[%s]+-[%s]{5}$" % (SAFE, SAFE))
            self.assertLessEqual(len(n), 63)
        p = r.json["items"][0]
        self.assertEqual(p["metadata"]["labels"]["app"], "pl")
        self.assertIn("pod-template-hash", p["metadata"]["labels"])
        self.assertEqual(p["metadata"]["ownerReferences"][0]["kind"],
                         "ReplicaSet")
        # set-based selectors and other labels select nothing / everything
        r = self.req("GET", PODS + "?labelSelector=" +
                     urllib.parse.quote("app in (pl,zz),app!=x"))
        self.assertEqual(len(r.json["items"]), 3)
        r = self.req("GET", PODS + "?labelSelector=app%3Dnobody")
        self.assertEqual(r.json["items"], [])
        # all pods eventually Running and ready
        ready = wait_for(lambda: all(
            p["status"]["phase"] == "Running" for p in self.req(
                "GET", PODS + "?labelSelector=app%3Dpl").json["items"]),
            READY_SECONDS + 2)
        self.assertTrue(ready)

    def test_limit_continue(self):
        self.create(deployment("pg", 3))
        wait_for(lambda: len(self.req(
            "GET", PODS + "?labelSelector=app%3Dpg").json["items"]) == 3, 2)
        r = self.req("GET", PODS + "?labelSelector=app%3Dpg&limit=2")
        self.assertEqual(len(r.json["items"]), 2)
        cont = r.json["metadata"]["continue"]
        self.assertEqual(r.json["metadata"]["remainingItemCount"], 1)
        r2 = self.req("GET", PODS + "?labelSelector=app%3Dpg&limit=2&"
                      "continue=" + urllib.parse.quote(cont))
        self.assertEqual(len(r2.json["items"]), 1)
        self.assertNotIn("continue", r2.json["metadata"])
        names = {p["metadata"]["name"] for p in r.json["items"] +
                 r2.json["items"]}
        self.assertEqual(len(names), 3)

    def test_expired_continue_410(self):
        tok = LEGACY.login()
        LEGACY.request("POST", DEPLOYMENTS, deployment("ex", 3), token=tok)
        wait_for(lambda: len(LEGACY.request(
            "GET", PODS, token=tok).json["items"]) >= 3, 2)
        r = LEGACY.request("GET", PODS + "?limit=1", token=tok)
        cont = r.json["metadata"]["continue"]
        time.sleep(0.6)  # past --compaction-seconds 0.5 ...
        LEGACY.request("POST", DEPLOYMENTS, deployment("ex2", 1),
                       token=tok)  # ... and the revision moved on
        time.sleep(0.6)
        r = LEGACY.request("GET", PODS + "?limit=1&continue=" +
                           urllib.parse.quote(cont), token=tok)
        self.assertEqual(r.status, 410)
        self.assertEqual((r.json["reason"], r.json["code"]), ("Expired", 410))
        self.assertTrue(r.json["message"].startswith(
            "The provided continue parameter is too old to display a "
            "consistent list result."))


class TestServices(K8sCase):
    def svc(self, name, typ="NodePort", **port):
        p = {"port": 80, "targetPort": 8080, "protocol": "TCP"}
        p.update(port)
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name},
                "spec": {"type": typ, "selector": {"app": name},
                         "ports": [p]}}

    def test_create_and_delete(self):
        r = self.req("POST", SERVICES, self.svc("web"))
        self.assertEqual(r.status, 201, r)
        spec = r.json["spec"]
        self.assertRegex(spec["clusterIP"], r"^\d+\.\d+\.\d+\.\d+$")
        self.assertEqual(spec["clusterIPs"], [spec["clusterIP"]])
        np = spec["ports"][0]["nodePort"]
        self.assertTrue(30000 <= np <= 32767)
        r = self.req("DELETE", SERVICES + "/web")
        self.assertEqual(r.status, 200)
        self.assertEqual((r.json["kind"], r.json["metadata"]["name"]),
                         ("Service", "web"))  # the object, not a Status
        self.assertStatus(self.req("DELETE", SERVICES + "/web"), 404,
                          "NotFound", 'services "web" not found')

    def test_node_port_errors(self):
        r = self.req("POST", SERVICES, self.svc("np-bad", nodePort=80))
        j = self.assertStatus(
            r, 422, "Invalid", 'Service "np-bad" is invalid: '
            'spec.ports[0].nodePort: Invalid value: 80: provided port is not '
            'in the valid range. The range of valid ports is 30000-32767')
        self.assertNotIn("group", j["details"])
        r = self.req("POST", SERVICES, self.svc("np-a", nodePort=30080))
        self.assertEqual(r.status, 201)
        r = self.req("POST", SERVICES, self.svc("np-b", nodePort=30080))
        self.assertStatus(r, 422, "Invalid", 'Service "np-b" is invalid: '
                          'spec.ports[0].nodePort: Invalid value: 30080: '
                          'provided port is already allocated')

    def test_load_balancer_pending(self):
        r = self.req("POST", SERVICES, self.svc("lb", "LoadBalancer"))
        self.assertEqual(r.status, 201)
        self.assertEqual(r.json["status"]["loadBalancer"].get("ingress", []),
                         [])

    def test_replace_keeps_allocations_and_creates(self):
        r = self.req("POST", SERVICES, self.svc("keep"))
        ip = r.json["spec"]["clusterIP"]
        np = r.json["spec"]["ports"][0]["nodePort"]
        r = self.req("PUT", SERVICES + "/keep", self.svc("keep"))
        self.assertEqual(r.status, 200, r)
        self.assertEqual((r.json["spec"]["clusterIP"],
                          r.json["spec"]["ports"][0]["nodePort"]), (ip, np))
        r = self.req("PUT", SERVICES + "/made-by-put", self.svc("made-by-put"))
        self.assertEqual(r.status, 201)


class TestNamespacesAndCollections(K8sCase):
    def test_namespace_lifecycle(self):
        ns = K + "/api/v1/namespaces"
        r = self.req("POST", ns, {"metadata": {"name": "team-a"}})
        self.assertEqual(r.status, 201)
        self.assertEqual(r.json["status"], {"phase": "Active"})
        r = self.req("POST", K + "/apis/apps/v1/namespaces/team-a/"
                     "deployments", deployment("x", 1))
        self.assertEqual(r.status, 201)
        r = self.req("POST", K + "/apis/apps/v1/namespaces/nowhere/"
                     "deployments", deployment("x", 1))
        self.assertStatus(r, 404, "NotFound", 'namespaces "nowhere" not found')
        r = self.req("DELETE", ns + "/default")
        self.assertStatus(r, 403, "Forbidden")
        r = self.req("DELETE", ns + "/team-a")
        self.assertEqual((r.status, r.json["status"]["phase"]),
                         (200, "Terminating"))
        self.assertTrue(wait_for(lambda: self.req(
            "GET", ns + "/team-a").status == 404, 3))
        r = self.req("GET", K + "/apis/apps/v1/namespaces/team-a/"
                     "deployments/x")
        self.assertEqual(r.status, 404)

    def test_delete_collection(self):
        for n in ("dc1", "dc2"):
            self.create(deployment(n, 1, labels={"app": n, "batch": "dc"}))
        r = self.req("DELETE", DEPLOYMENTS + "?labelSelector=batch%3Ddc")
        self.assertEqual((r.status, r.json["kind"]), (200, "DeploymentList"))
        self.assertEqual(sorted(i["metadata"]["name"]
                                for i in r.json["items"]), ["dc1", "dc2"])
        r = self.req("GET", DEPLOYMENTS + "?labelSelector=batch%3Ddc")
        self.assertEqual(r.json["items"], [])


class TestWatchAndTables(K8sCase):
    def test_watch(self):
        self.create(deployment("w1", 1))
        conn = http.client.HTTPSConnection("127.0.0.1", S.port,
                                           context=S.ctx, timeout=10)
        try:
            conn.request("GET", DEPLOYMENTS + "?watch=1&timeoutSeconds=1&"
                         "fieldSelector=metadata.name%3Dw1",
                         headers={"Authorization": "Bearer " + self.tok})
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            events = [json.loads(x) for x in r.read().splitlines() if x]
        finally:
            conn.close()
        self.assertEqual(events[0]["type"], "ADDED")
        self.assertEqual(events[0]["object"]["metadata"]["name"], "w1")
        self.assertTrue(all(e["object"]["metadata"]["name"] == "w1"
                            for e in events))

    def test_table(self):
        self.create(deployment("t1", 1))
        r = self.req("GET", DEPLOYMENTS, headers={
            "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,"
                      "application/json"})
        self.assertEqual((r.json["kind"], r.json["apiVersion"]),
                         ("Table", "meta.k8s.io/v1"))
        self.assertEqual(r.json["columnDefinitions"][0]["name"], "Name")


class TestKubectl(K8sCase):
    """kubectl (when installed) against a generated kubeconfig: discovery,
    tables, client-side apply, rollout status."""

    def test_kubectl(self):
        kubectl = shutil.which("kubectl")
        if not kubectl:
            self.skipTest("kubectl not installed")
        cfg = self.req("POST", "/v3/clusters/local?action=generate"
                       "Kubeconfig").json["config"]
        d = tempfile.mkdtemp(prefix="rancher-sim-kubectl-")
        try:
            kc = os.path.join(d, "config")
            with open(kc, "w") as f:
                f.write(cfg)
            manifest = os.path.join(d, "web.json")
            with open(manifest, "w") as f:
                json.dump(deployment("kweb", 2), f)
            env = dict(os.environ, KUBECONFIG=kc, HOME=d)

            def run(*args):
                return subprocess.run([kubectl] + list(args), env=env,
                                      capture_output=True, text=True,
                                      timeout=30)
            r = run("get", "nodes")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertRegex(r.stdout, r"local-node\s+Ready")
            r = run("apply", "-f", manifest)
            self.assertEqual(r.returncode, 0, r.stderr)
            r = run("rollout", "status", "deployment/kweb", "--timeout=20s")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("successfully rolled out", r.stdout)
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
