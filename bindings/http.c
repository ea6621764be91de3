/*
 * http.c - kengine.http: HTTP(S) requests over libcurl's multi interface.
 *
 * Each request is an easy handle added to the loop's one multi handle; the
 * calling task yields until curl reports the transfer done.  TLS is verified
 * unless the caller says insecure = true.  4xx/5xx are responses; only
 * transport and TLS failures are fail tuples.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "../engine/loop.h"

#define REQUEST_MT "kengine.http.request"
#define RESPONSE_MT "kengine.http.response"
#define DEFAULT_TIMEOUT 60

typedef struct {
  char *p;
  size_t n, cap;
} hbuf;

typedef struct {
  kg_op op;
  kg_loop *loop;
  CURL *easy;
  struct curl_slist *headers;
  hbuf body, head;
  char *reqbody;
  size_t reqlen;
  int added;
  char errbuf[CURL_ERROR_SIZE];
} request_op;

static int hbuf_add(hbuf *b, const char *data, size_t n) {
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    char *p;
    while (cap < b->n + n + 1) cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL) return 0;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, data, n);
  b->n += n;
  b->p[b->n] = 0;
  return 1;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
  request_op *r = ud;
  return hbuf_add(&r->body, data, size * nmemb) ? size * nmemb : 0;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud) {
  request_op *r = ud;
  size_t n = size * nmemb;
  /* a new status line (after 100-continue or a redirect) starts over */
  if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) r->head.n = 0;
  return hbuf_add(&r->head, data, n) ? n : 0;
}

static void request_free(request_op *r) {
  if (r->easy) {
    if (r->added) kg_curl_remove(r->loop, r->easy);
    curl_easy_cleanup(r->easy);
  }
  r->easy = NULL;
  r->added = 0;
  curl_slist_free_all(r->headers);
  r->headers = NULL;
  free(r->body.p);
  free(r->head.p);
  r->body.p = r->head.p = NULL;
  if (r->reqbody) { explicit_bzero(r->reqbody, r->reqlen); free(r->reqbody); }
  r->reqbody = NULL;
}

static int request_gc(lua_State *L) {
  request_op *r = lua_touserdata(L, 1);
  if (r->op.w.armed) kg_unwait(r->loop, &r->op.w);
  request_free(r);
  return 0;
}

static const char *classify(CURL *easy, CURLcode rc) {
  long os = 0;
  switch (rc) {
  case CURLE_COULDNT_CONNECT:
    curl_easy_getinfo(easy, CURLINFO_OS_ERRNO, &os);
    if (os == ENOENT) return "ENOENT";
    if (os == EHOSTUNREACH || os == ENETUNREACH) return "EHOSTUNREACH";
    if (os == ETIMEDOUT) return "ETIMEDOUT";
    return "ECONNREFUSED";
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_RESOLVE_PROXY:
    return "EHOSTUNREACH";
  case CURLE_OPERATION_TIMEDOUT:
    return "ETIMEDOUT";
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_USE_SSL_FAILED:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    return "ETLS";
  case CURLE_READ_ERROR:
  case CURLE_FILE_COULDNT_READ_FILE:
    return "ENOENT";
  default:
    return "EPROTO";
  }
}

/* headers of the last response block as a table with lower-case names */
static void push_headers(lua_State *L, hbuf *h) {
  char *line = h->p, *end = h->p ? h->p + h->n : NULL;
  lua_newtable(L);
  while (line && line < end) {
    char *eol = memchr(line, '\n', (size_t)(end - line));
    char *colon, *v, *ve, *k;
    if (eol == NULL) eol = end;
    colon = memchr(line, ':', (size_t)(eol - line));
    if (colon && memcmp(line, "HTTP/", 5) != 0) {
      for (k = line; k < colon; k++)
        if (*k >= 'A' && *k <= 'Z') *k = (char)(*k - 'A' + 'a');
      v = colon + 1;
      ve = eol;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      lua_pushlstring(L, line, (size_t)(colon - line));
      if (lua_rawget(L, -2) == LUA_TSTRING) { /* repeated header: join as RFC 9110 allows */
        lua_pushliteral(L, ", ");
        lua_pushlstring(L, v, (size_t)(ve - v));
        lua_concat(L, 3);
      } else {
        lua_pop(L, 1);
        lua_pushlstring(L, v, (size_t)(ve - v));
      }
      lua_pushlstring(L, line, (size_t)(colon - line));
      lua_insert(L, -2);
      lua_rawset(L, -3);
    }
    line = eol + 1;
  }
}

static int request_step(lua_State *L, kg_op *op) {
  request_op *r = (request_op *)op;
  if (!r->added) {
    CURLMcode mc = kg_curl_add(r->loop, r->easy);
    if (mc != CURLM_OK) return luaL_error(L, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
    r->added = 1;
  }
  if (!op->done) {
    kg_want(op, -1, 0, 0); /* curl's own timeout bounds the wait */
    return KG_AGAIN;
  }
  if (op->result != CURLE_OK) {
    const char *code = classify(r->easy, (CURLcode)op->result);
    const char *msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror((CURLcode)op->result);
    char *url = NULL;
    curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url);
    lua_pushfstring(L, "%s: %s %s: %s", code, lua_tostring(L, 3), url ? url : "?", msg);
    luaL_pushfail(L);
    lua_insert(L, -2);
    lua_pushstring(L, code);
    request_free(r);
    return 3;
  }
  {
    long status = 0;
    char *url = NULL;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url);
    lua_createtable(L, 0, 4);
    luaL_setmetatable(L, RESPONSE_MT);
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
    lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.n);
    lua_setfield(L, -2, "body");
    lua_pushstring(L, url ? url : "");
    lua_setfield(L, -2, "url");
    push_headers(L, &r->head);
    lua_setfield(L, -2, "headers");
  }
  request_free(r);
  return 1;
}

static const char *optstr(lua_State *L, int t, const char *key) {
  const char *v = NULL;
  int ty = lua_getfield(L, t, key);
  if (ty != LUA_TNIL) {
    if (ty != LUA_TSTRING && ty != LUA_TNUMBER)
      luaL_error(L, "bad option '%s' to 'request' (string expected, got %s)", key, luaL_typename(L, -1));
    v = lua_tostring(L, -1);
  }
  lua_pop(L, 1); /* anchored in the options table */
  return v;
}

static int optbool(lua_State *L, int t, const char *key, int def) {
  int v = def;
  if (lua_getfield(L, t, key) != LUA_TNIL) v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/*
 * http.request{method=, url=, headers=, body=, json=, timeout=, connect_timeout=,
 *              cacert=, insecure=, unix_socket=, client_cert=, client_key=, follow=}
 * @return response or nil, string, string
 * Upvalue 1: cjson.encode.
 */
static int l_request(lua_State *L) {
  const char *url, *method, *v;
  request_op *r;
  int has_ctype = 0;
  double timeout = DEFAULT_TIMEOUT, ctimeout = 0;
  size_t len;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  url = optstr(L, 1, "url");
  if (url == NULL) return luaL_error(L, "bad option 'url' to 'request' (string expected, got nil)");
  r = lua_newuserdatauv(L, sizeof *r, 0); /* 2 */
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, REQUEST_MT);
  r->op.step = request_step;
  r->loop = kg_loop_get(L);
  r->easy = curl_easy_init();
  if (r->easy == NULL) return luaL_error(L, "curl_easy_init failed");

  /* body: json= (encoded here) or body= */
  if (lua_getfield(L, 1, "json") != LUA_TNIL) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    v = lua_tolstring(L, -1, &len);
    r->reqbody = malloc(len + 1);
    memcpy(r->reqbody, v, len);
    r->reqlen = len;
    r->headers = curl_slist_append(r->headers, "Content-Type: application/json");
    r->headers = curl_slist_append(r->headers, "Accept: application/json");
    has_ctype = 1;
  } else if (lua_getfield(L, 1, "body"), !lua_isnil(L, -1)) {
    v = luaL_checklstring(L, -1, &len);
    r->reqbody = malloc(len + 1);
    memcpy(r->reqbody, v, len);
    r->reqlen = len;
    lua_pop(L, 1);
  } else {
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  method = optstr(L, 1, "method");
  if (method == NULL) method = r->reqbody ? "POST" : "GET";
  lua_pushstring(L, method); /* 3: for messages */

  if (lua_getfield(L, 1, "headers") == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      const char *name = luaL_checkstring(L, -2);
      const char *value = luaL_tolstring(L, -1, NULL);
      char *line = malloc(strlen(name) + strlen(value) + 4);
      if (has_ctype && strcasecmp(name, "content-type") == 0) {
        /* caller's content type wins over json='s default */
        struct curl_slist *n = NULL, *it;
        for (it = r->headers; it; it = it->next)
          if (strncasecmp(it->data, "Content-Type:", 13) != 0) n = curl_slist_append(n, it->data);
        curl_slist_free_all(r->headers);
        r->headers = n;
      }
      sprintf(line, "%s: %s", name, value);
      r->headers = curl_slist_append(r->headers, line);
      explicit_bzero(line, strlen(line));
      free(line);
      lua_pop(L, 2);
    }
  }
  lua_pop(L, 1);
  r->headers = curl_slist_append(r->headers, "Expect:"); /* no 100-continue round trip */

  if (lua_getfield(L, 1, "timeout") != LUA_TNIL) timeout = luaL_checknumber(L, -1);
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "connect_timeout") != LUA_TNIL) ctimeout = luaL_checknumber(L, -1);
  lua_pop(L, 1);

  curl_easy_setopt(r->easy, CURLOPT_URL, url);
  curl_easy_setopt(r->easy, CURLOPT_PRIVATE, (char *)&r->op);
  curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(r->easy, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(r->easy, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
  curl_easy_setopt(r->easy, CURLOPT_USERAGENT, "kengine/" KENGINE_VERSION);
  curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, (long)(timeout * 1000));
  if (ctimeout > 0) curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT_MS, (long)(ctimeout * 1000));
  curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS_STR, "http,https");
  if (strcmp(method, "GET") != 0) curl_easy_setopt(r->easy, CURLOPT_CUSTOMREQUEST, method);
  if (strcmp(method, "HEAD") == 0) curl_easy_setopt(r->easy, CURLOPT_NOBODY, 1L);
  if (r->reqbody) {
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, r->reqbody);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->reqlen);
  }
  if ((v = optstr(L, 1, "cacert"))) curl_easy_setopt(r->easy, CURLOPT_CAINFO, v);
  if (optbool(L, 1, "insecure", 0)) {
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if ((v = optstr(L, 1, "unix_socket"))) curl_easy_setopt(r->easy, CURLOPT_UNIX_SOCKET_PATH, v);
  if ((v = optstr(L, 1, "client_cert"))) curl_easy_setopt(r->easy, CURLOPT_SSLCERT, v);
  if ((v = optstr(L, 1, "client_key"))) curl_easy_setopt(r->easy, CURLOPT_SSLKEY, v);
  if (optbool(L, 1, "follow", 0)) {
    curl_easy_setopt(r->easy, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(r->easy, CURLOPT_MAXREDIRS, 5L);
  }
  lua_settop(L, 3);
  return kg_drive(L, 2);
}

/* http.get(url, opts) and friends: request with method and url filled in.
 * Upvalues: 1 cjson.encode (as l_request's), 2 the method.  l_request is
 * called directly, not through lua_call, so the request stays yieldable. */
static int l_verb(lua_State *L) {
  const char *url = luaL_checkstring(L, 1);
  lua_settop(L, 2);
  lua_newtable(L); /* 3: a shallow copy, the caller's table stays untouched */
  if (!lua_isnil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, 3);
    }
  }
  lua_pushstring(L, url);
  lua_setfield(L, 3, "url");
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setfield(L, 3, "method");
  lua_replace(L, 1);
  lua_settop(L, 1);
  return l_request(L);
}

/* cjson 2.1.0 decodes every number as a float; JSON APIs mean integers
 * (ports, replicas, generations), so integral values become integers. */
static void integers(lua_State *L, int idx, int depth) {
  idx = lua_absindex(L, idx);
  if (depth > 100 || !lua_istable(L, idx)) return;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)) {
      lua_Number n = lua_tonumber(L, -1);
      lua_Integer i;
      if (lua_numbertointeger(n, &i) && (lua_Number)i == n) {
        lua_pushvalue(L, -2);
        lua_pushinteger(L, i);
        lua_rawset(L, idx); /* replacing an existing key is allowed during next */
      }
    } else if (lua_istable(L, -1)) {
      integers(L, -1, depth + 1);
    }
    lua_pop(L, 1);
  }
}

/* res:json() -> decoded body or nil, string, string.  Upvalue 1: cjson.decode */
static int res_json(lua_State *L) {
  int ok;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_getfield(L, 1, "body");
  ok = lua_pcall(L, 1, 1, 0);
  if (ok == LUA_OK) {
    integers(L, -1, 0);
    return 1;
  }
  lua_getfield(L, 1, "url");
  return kg_fail(L, "EPROTO", "invalid JSON from %s: %s", lua_tostring(L, -1), lua_tostring(L, -2));
}

int luaopen_kengine_http(lua_State *L) {
  static const char *const verbs[] = {"get", "post", "put", "patch", "delete", "head"};
  size_t i;
  kg_loop_get(L);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  lua_call(L, 1, 1); /* cjson */
  if (luaL_newmetatable(L, REQUEST_MT)) {
    lua_pushcfunction(L, request_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, RESPONSE_MT)) {
    lua_newtable(L);
    lua_getfield(L, -3, "decode");
    lua_pushcclosure(L, res_json, 1);
    lua_setfield(L, -2, "json");
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_newtable(L); /* the module */
  lua_getfield(L, -2, "encode");
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, l_request, 1);
  lua_setfield(L, -3, "request");
  for (i = 0; i < sizeof verbs / sizeof verbs[0]; i++) {
    char up[8];
    size_t j;
    for (j = 0; verbs[i][j]; j++) up[j] = (char)(verbs[i][j] - 'a' + 'A');
    up[j] = 0;
    lua_pushvalue(L, -1);
    lua_pushstring(L, up);
    lua_pushcclosure(L, l_verb, 2);
    lua_setfield(L, -3, verbs[i]);
  }
  lua_pop(L, 1);
  lua_pushstring(L, curl_version_info(CURLVERSION_NOW)->version);
  lua_setfield(L, -2, "libcurl_version");
  return 1;
}
