-- MatrixInfer usage accounting (Envoy Lua HTTP filter), installed by extproc.usage.envoy_http_filters.
--
-- Only requests the extproc marked (dynamic metadata envoy.lb/matrixinfer_rid: the one namespace
-- the ext_proc filter accepts) are looked at. The answer
-- passes through unchanged; the filter reads the exact usage the engine reports and stores it in
-- dynamic metadata `matrixinfer.usage` (prompt, completion, events, done). The gRPC access log
-- then carries it to the extproc once per request, in batches. No chunk goes through Python.
--
-- Streams (text/event-stream): every chunk is scanned in C (string.find/gsub) for SSE `data:`
-- events, the running count is stored so an aborted stream still reports a lower bound, and the
-- last 1 KiB is kept: the final usage event (forced by the extproc with
-- stream_options.include_usage) sits in it. JSON answers: the body is read once at its end.

local NS = "matrixinfer"
local TAIL = 1024

local function usage_of(text)
  local prompt, completion
  for p in string.gmatch(text, '"prompt_tokens"%s*:%s*(%d+)') do prompt = p end
  for c in string.gmatch(text, '"completion_tokens"%s*:%s*(%d+)') do completion = c end
  return prompt, completion
end

-- Envoy objects must not be kept across a yield (bodyChunks/body): look metadata up each time.
local function md(handle)
  return handle:streamInfo():dynamicMetadata()
end

function envoy_on_response(handle)
  local lb = md(handle):get("envoy.lb")
  if lb == nil or lb["matrixinfer_rid"] == nil then
    return
  end
  local ctype = handle:headers():get("content-type") or ""
  if string.find(ctype, "text/event-stream", 1, true) then
    local events = 0
    local reported = 0
    local tail = ""
    local find = string.find
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if n > 0 then
        local s = chunk:getBytes(0, n)
        local at = find(s, "data:", 1, true)
        while at do
          events = events + 1
          at = find(s, "data:", at + 5, true)
        end
        -- the running count survives an abort; updated every 8 events (a metadata write costs
        -- more than the scan), so an aborted stream is under-counted by at most 7 events
        if events - reported >= 8 then
          reported = events
          md(handle):set(NS, "events", events)
        end
        if n >= TAIL then
          tail = s
        else
          tail = string.sub(tail .. s, -TAIL)
        end
      end
    end
    md(handle):set(NS, "events", events)
    local prompt, completion = usage_of(tail)
    if prompt ~= nil then md(handle):set(NS, "prompt", tonumber(prompt)) end
    if completion ~= nil then md(handle):set(NS, "completion", tonumber(completion)) end
    md(handle):set(NS, "done", true)
  else
    local body = handle:body()
    if body ~= nil then
      local n = body:length()
      local prompt, completion = usage_of(body:getBytes(math.max(0, n - 4096), math.min(n, 4096)))
      if prompt ~= nil then md(handle):set(NS, "prompt", tonumber(prompt)) end
      if completion ~= nil then md(handle):set(NS, "completion", tonumber(completion)) end
    end
    md(handle):set(NS, "done", true)
  end
end
