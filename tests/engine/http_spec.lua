-- kengine.http against a real HTTPS server with a throwaway CA (tests/run.sh starts it).
local k = require "kengine"
local H = require "helpers"

describe("http", function()
  local srv
  setup(function() srv = H.https() end)

  it("refuses a certificate it cannot verify, with ETLS", function()
    local res, msg, code = k.http.get(srv.base .. "/hello")
    assert.is_nil(res)
    assert.equal("ETLS", code)
    assert.matches("^ETLS: GET https://127%.0%.0%.1:%d+/hello: ", msg)
  end)

  it("verifies with the given CA", function()
    local res = assert(k.http.get(srv.base .. "/hello", { cacert = srv.cacert }))
    assert.equal(200, res.status)
    assert.equal("hello", res.body)
    assert.equal("text/plain", res.headers["content-type"])
  end)

  it("skips verification only when asked", function()
    local res = assert(k.http.get(srv.base .. "/hello", { insecure = true }))
    assert.equal(200, res.status)
  end)

  it("round-trips JSON", function()
    local doc = { name = "kengine", list = { 1, 2, 3 }, nested = { ok = true } }
    local res = assert(k.http.post(srv.base .. "/echo", { cacert = srv.cacert, json = doc }))
    assert.equal(200, res.status)
    local echo = assert(res:json())
    assert.equal("POST", echo.method)
    assert.same(doc, echo.json)
    assert.equal("application/json", echo.headers["content-type"])
  end)

  it("sends headers and a raw body with any method", function()
    local res = assert(k.http.request { method = "PATCH", url = srv.base .. "/echo", cacert = srv.cacert,
      headers = { ["X-Test"] = "yes", ["Content-Type"] = "text/plain" }, body = "raw\0body" })
    local echo = assert(res:json())
    assert.equal("PATCH", echo.method)
    assert.equal("yes", echo.headers["x-test"])
    assert.equal("raw\0body", echo.body)
  end)

  it("talks HTTP over a unix socket", function()
    local res = assert(k.http.get("http://localhost/echo?x=1", { unix_socket = srv.sock }))
    assert.equal(200, res.status)
    assert.equal("x=1", assert(res:json()).query)
  end)

  it("returns 404 and 500 as responses", function()
    local r404 = assert(k.http.get(srv.base .. "/status/404", { cacert = srv.cacert }))
    local r500 = assert(k.http.get(srv.base .. "/status/500", { cacert = srv.cacert }))
    assert.equal(404, r404.status)
    assert.equal(500, r500.status)
    assert.same({ status = 500 }, assert(r500:json()))
  end)

  it("reports malformed JSON as EPROTO naming the URL", function()
    local res = assert(k.http.get(srv.base .. "/hello", { cacert = srv.cacert }))
    local v, msg, code = res:json()
    assert.is_nil(v)
    assert.equal("EPROTO", code)
    assert.matches("invalid JSON from https://127%.0%.0%.1:%d+/hello", msg)
  end)

  it("presents a client certificate", function()
    local res = assert(k.http.get(srv.base .. "/client-cert", { cacert = srv.cacert,
      client_cert = srv.client_cert, client_key = srv.client_key }))
    assert.equal(200, res.status)
    assert.matches("kengine%-test%-client", res.body)
  end)

  it("fails a refused connection with ECONNREFUSED and a timeout with ETIMEDOUT", function()
    local res, msg, code = k.http.get("http://127.0.0.1:1/")
    assert.is_nil(res)
    assert.equal("ECONNREFUSED", code)
    assert.matches("http://127%.0%.0%.1:1/", msg)
    res, msg, code = k.http.get(srv.base .. "/slow?id=timeout&ms=3000", { cacert = srv.cacert, timeout = 0.5 })
    assert.is_nil(res)
    assert.equal("ETIMEDOUT", code)
    assert.matches("/slow%?id=timeout", msg)
  end)

  it("fails a missing unix socket with ENOENT", function()
    local res, _, code = k.http.get("http://localhost/", { unix_socket = "/nonexistent.sock" })
    assert.is_nil(res)
    assert.equal("ENOENT", code)
  end)
end)

describe("http json numbers", function()
  it("res:json() gives integers for integral numbers", function()
    local srv = H.https()
    local res = assert(k.http.get(srv.base .. "/status/404", { cacert = srv.cacert }))
    local v = assert(res:json())
    assert.equal("integer", math.type(v.status))
  end)
end)
