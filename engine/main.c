/*
 * main.c - the kengine binary: one Lua state, the bindings preloaded, the
 * Lua library found next to the binary, and the command line handed to
 * kengine.cli.  Everything runs protected: an error prints its message and
 * a traceback, never a bare crash (as lua.c does).
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "loop.h"

int luaopen_kengine_ssh(lua_State *L);
int luaopen_kengine_http(lua_State *L);
int luaopen_kengine_proc(lua_State *L);
int luaopen_kengine_readline(lua_State *L);
int luaopen_cjson(lua_State *L);
int luaopen_cjson_safe(lua_State *L);

/* like linit.c: every binding goes to package.preload, none into globals */
static const luaL_Reg preloaded[] = {
  {"kengine.core", luaopen_kengine_core},
  {"kengine.ssh", luaopen_kengine_ssh},
  {"kengine.http", luaopen_kengine_http},
  {"kengine.proc", luaopen_kengine_proc},
  {"kengine.readline", luaopen_kengine_readline},
  {"cjson", luaopen_cjson},
  {"cjson.safe", luaopen_cjson_safe},
  {NULL, NULL}
};

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int file_exists(const char *path) { return access(path, R_OK) == 0; }

/*
 * The Lua library lives in <bindir>/lib (a source tree) or
 * <prefix>/share/kengine/lua (an install); KENGINE_LIB overrides both.
 */
static void set_paths(lua_State *L) {
  char exe[PATH_MAX], cand[PATH_MAX + 64], *slash;
  const char *env = getenv("KENGINE_LIB");
  const char *dir = NULL;
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (env && *env) {
    dir = env;
  } else if (n > 0) {
    exe[n] = 0;
    slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    snprintf(cand, sizeof cand, "%s/lib/kengine/init.lua", exe);
    if (file_exists(cand)) {
      snprintf(cand, sizeof cand, "%s/lib", exe);
    } else {
      snprintf(cand, sizeof cand, "%s/../share/kengine/lua", exe);
    }
    dir = cand;
  }
  lua_getglobal(L, "package");
  if (dir) {
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pushstring(L, dir);
    lua_setfield(L, LUA_REGISTRYINDEX, "kengine.libdir");
  }
  lua_pop(L, 1);
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  const luaL_Reg *lib;
  int i;
  luaL_checkversion(L);
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (lib = preloaded; lib->func; lib++) {
    lua_pushcfunction(L, lib->func);
    lua_setfield(L, -2, lib->name);
  }
  lua_pop(L, 1);
  set_paths(L);
  /* arg[0] is the program, as in lua.c; the CLI gets the rest */
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");
  lua_getglobal(L, "require");
  lua_pushliteral(L, "kengine.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int status, code = 1;
  if (L == NULL) {
    fprintf(stderr, "kengine: cannot create Lua state: not enough memory\n");
    return 1;
  }
  lua_pushcfunction(L, msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 1);
  if (status != LUA_OK) {
    fprintf(stderr, "kengine: %s\n", lua_tostring(L, -1));
    code = 1;
  } else {
    code = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  }
  fflush(stdout);
  lua_close(L);
  return code;
}
