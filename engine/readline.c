/*
 * readline.c - kengine.readline: line editing and history for the REPL,
 * through libedit (BSD licensed, so the binary stays MIT).
 *
 * The REPL itself is Lua (lib/kengine/repl.lua); this is only the terminal.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <editline/readline.h>
#include <lauxlib.h>
#include <lua.h>

/* readline(prompt) -> line or nil at end of input */
static int l_readline(lua_State *L) {
  const char *prompt = luaL_optstring(L, 1, "> ");
  char *line;
  if (!isatty(0)) { /* piped input: plain reads, no echo of prompts */
    char buf[4096];
    luaL_Buffer b;
    size_t n;
    if (fgets(buf, sizeof buf, stdin) == NULL) return 0;
    luaL_buffinit(L, &b);
    n = strlen(buf);
    if (n && buf[n - 1] == '\n') buf[--n] = 0;
    luaL_addlstring(&b, buf, n);
    luaL_pushresult(&b);
    return 1;
  }
  line = readline(prompt);
  if (line == NULL) return 0;
  lua_pushstring(L, line);
  free(line);
  return 1;
}

static int l_add_history(lua_State *L) {
  add_history(luaL_checkstring(L, 1));
  return 0;
}

static int l_read_history(lua_State *L) {
  lua_pushboolean(L, read_history(luaL_checkstring(L, 1)) == 0);
  return 1;
}

static int l_write_history(lua_State *L) {
  lua_pushboolean(L, write_history(luaL_checkstring(L, 1)) == 0);
  return 1;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_optinteger(L, 1, 0)));
  return 1;
}

static const luaL_Reg funcs[] = {
  {"readline", l_readline},
  {"add_history", l_add_history},
  {"read_history", l_read_history},
  {"write_history", l_write_history},
  {"isatty", l_isatty},
  {NULL, NULL}
};

int luaopen_kengine_readline(lua_State *L) {
  luaL_newlib(L, funcs);
  return 1;
}
