-- wrk script for scripts/bench-envoy: every request presents `Authorization: Bearer <key>`,
-- rotating over the keys listed one per line in the file given after `--`.
-- The requests are formatted once in init(), so per-request Lua work is a table lookup.
local reqs = {}
local n = 0
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      n = n + 1
      reqs[n] = wrk.format("GET", "/v1/chat/completions", { ["Authorization"] = "Bearer " .. line })
    end
  end
  if n == 0 then
    error("rotate-keys.lua: no keys in " .. tostring(args[1]))
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end
