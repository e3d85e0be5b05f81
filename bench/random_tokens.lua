-- wrk script: every request carries `Authorization: FlespiToken <key>` taken from a file of keys
-- (one 64-character key a line).
--
--   wrk -t1 -c50 -d10s --latency -s bench/random_tokens.lua URL -- KEYFILE [random|seq] [STOP_AFTER]
--
-- random (default): a random key of the file per request (cache-miss traffic when the file is
--   large; with a one-line file it is hot traffic made by the very same code, for a fair ratio).
-- seq: the keys in file order, wrapping around; with STOP_AFTER the thread stops once that many
--   responses came back (used to make the gateway see each of N keys at least once).

local keys = {}
local count = 0
local mode = "random"
local stop_after = 0
local next_index = 0
local responses = 0

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk ... -s random_tokens.lua URL -- KEYFILE [random|seq] [STOP_AFTER]")
   end
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         keys[count] = "FlespiToken " .. line
      end
   end
   if count == 0 then
      error("no keys in " .. path)
   end
   mode = args[2] or "random"
   stop_after = tonumber(args[3] or "0")
   math.randomseed(os.time() + count)
   if stop_after > 0 then
      -- defined only when needed: wrk parses response headers for Lua only if `response` exists
      response = count_and_stop
   end
end

function request()
   local index
   if mode == "seq" then
      index = next_index % count + 1
      next_index = next_index + 1
   else
      index = math.random(count)
   end
   return wrk.format(nil, nil, { Authorization = keys[index] })
end

function count_and_stop(status, headers, body)
   responses = responses + 1
   if responses >= stop_after then
      wrk.thread:stop()
   end
end
