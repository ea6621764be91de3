std = "lua54"
max_line_length = 130
files["tests/**/*_spec.lua"] = { std = "+busted" }
files["tests/**/*.lua"] = { std = "+busted", max_line_length = 140 }
exclude_files = { ".rocks-test/**" }
