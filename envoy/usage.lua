-- MatrixInfer usage accounting (Envoy Lua HTTP filter), installed by fleet.usage_envoy.envoy_http_filters.
--
-- Only requests the extproc marked (dynamic metadata envoy.lb/matrixinfer_usage, set on every
-- routed request; envoy.lb is the one namespace the ext_proc filter accepts) are looked at. The
-- filter reads the exact usage the engine reports and stores it in dynamic metadata namespace
-- `matrixinfer` (prompt, completion, events, first_token_us). The gRPC access log then carries it
-- to the extproc once per request, in batches. No chunk goes through Python.
--
-- Envoy's matcher (fleet.usage_envoy.envoy_http_filters) hands this filter only marked answers of
-- unknown length or of 1 MB or more (no content-length of at most 6 digits): streams, chunked
-- answers, long JSON answers. Shorter JSON answers are read by Envoy's json_to_metadata filter
-- instead (C++, cheaper; it holds the answer, which is why it does not get long ones).
--
-- Streams (text/event-stream): every chunk is scanned in C (string.find) for SSE `data:` events,
-- the running count is stored so an aborted stream still reports a lower bound, and the last
-- 1 KiB is kept: the final usage event (forced by the extproc with stream_options.include_usage;
-- a Responses API stream's response.completed) sits in it. The time the first token passed
-- (wall clock, microseconds since the epoch: the access log's start time is on the same clock)
-- is stored as first_token_us: the first `data:` event (vLLM and SGLang send their role chunk
-- with the first token), or for a Responses API stream (envoy.lb/matrixinfer_responses) the
-- first `*.delta` event. JSON answers: passed on chunk by chunk, the usage read from the last
-- 4 KiB. Usage is `prompt_tokens`/`completion_tokens`, or a Responses API answer's
-- `input_tokens`/`output_tokens`.
--
-- When the extproc forced include_usage on a client that had not asked for it, it also sets
-- envoy.lb/matrixinfer_strip: the usage-only event (`"choices":[]` and `"usage":{...}`) is then
-- removed from what the client sees (chunk:setBytes), after its numbers were read. An event split
-- across chunks is handled by holding back the incomplete trailing event of a chunk (when it is
-- short enough to be a usage event) and passing it on at the front of the next chunk. A well-formed
-- stream (chunks that end at event boundaries) is passed on without a copy except for the chunk
-- holding the usage event.

local NS = "matrixinfer"
local TAIL = 1024
local JSON_TAIL = 4096 -- a JSON answer's usage object sits in its last 4 KiB
local HOLD_MAX = 4096 -- a usage-only event is a few hundred bytes; longer partial events pass on

local find, sub, byte = string.find, string.sub, string.byte
local EMPTY_CHOICES = '"choices"%s*:%s*%[%s*%]'
local USAGE_OBJECT = '"usage"%s*:%s*{'
local BLANK_LINE = "\n\r?\n" -- the end of an SSE event ("\n\n" or "\r\n\r\n")

-- gRPC answers of the Open Inference Protocol (application/grpc): the engine reports its exact
-- counts as the response parameters `prompt_tokens` and `completion_tokens` (InferParameter
-- int64_param or uint64_param) of each ModelInferResponse; the call's usage is their sum over
-- the call (a ModelStreamInfer answers each request with one response). Every chunk is searched
-- for the two map entries as protobuf encodes them (entry field 4 with its length, key field 1,
-- value field 2); GRPC_CARRY bytes after the last whole entry are held for the next chunk (an
-- entry is at most 34 bytes). The search does not parse the messages, so output text holding
-- the exact bytes of an entry would count too: it can only add to the usage, never hide any.
local GRPC_KEYS = { prompt = "\10\13prompt_tokens\18", completion = "\10\17completion_tokens\18" }
local GRPC_CARRY = 40

-- the integer of the map entry whose key starts at s[at] (key: its encoding up to the value's
-- tag): value and the entry's last index; nil when the entry runs past the end of s; false
-- (and the index to search on from) when the bytes are no such entry or hold another kind of
-- value (string_param, bool_param, ...)
local function grpc_param_int(s, at, key)
  local i = at + #key -- the InferParameter's length byte
  local len = byte(s, i)
  if len == nil or i + len > #s then return nil end
  local last = i + len
  if byte(s, at - 2) ~= 34 or byte(s, at - 1) ~= #key + 1 + len then return false, at end
  local tag = byte(s, i + 1)
  if tag ~= 16 and tag ~= 40 then return false, last end -- int64_param (2), uint64_param (5)
  local value, scale = 0, 1
  for j = i + 2, last do
    local b = byte(s, j)
    value = value + (b % 128) * scale
    if b < 128 then
      if j ~= last then return false, last end
      return value, last
    end
    scale = scale * 128
  end
  return false, last
end

-- adds the counts of the whole entries in s to totals; returns the index of the last byte of
-- the last whole entry (0: none)
local function grpc_counts(s, totals)
  local done = 0
  local cut = #s - GRPC_CARRY -- an entry starting after this may be cut by the chunk's end
  for name, key in pairs(GRPC_KEYS) do
    local at = find(s, key, 1, true)
    while at do
      local value, last = grpc_param_int(s, at, key)
      if value == nil then
        if at > cut then break end -- cut by the chunk's end: read with the next chunk
        last = at -- too long to be an entry: no entry
      elseif value then
        totals[name] = (totals[name] or 0) + value
        if last > done then done = last end
      end
      at = find(s, key, last + 1, true)
    end
  end
  return done
end

local function usage_of(text)
  local prompt, completion
  for p in string.gmatch(text, '"prompt_tokens"%s*:%s*(%d+)') do prompt = p end
  for c in string.gmatch(text, '"completion_tokens"%s*:%s*(%d+)') do completion = c end
  if prompt == nil then -- a Responses API answer (/v1/responses)
    for p in string.gmatch(text, '"input_tokens"%s*:%s*(%d+)') do prompt = p end
    for c in string.gmatch(text, '"output_tokens"%s*:%s*(%d+)') do completion = c end
  end
  return prompt, completion
end

-- now, wall clock, in microseconds since the epoch (the access log's start_time clock)
local function now_us(handle)
  return tonumber(handle:timestampString(EnvoyTimestampResolution.MICROSECOND))
end

-- Envoy objects must not be kept across a yield (bodyChunks/body): look metadata up each time.
local function md(handle)
  return handle:streamInfo():dynamicMetadata()
end

-- true when s (length n) ends with a blank line, i.e. with a whole event
local function ends_event(s, n)
  if n < 2 or byte(s, n) ~= 10 then return false end
  local b = byte(s, n - 1)
  return b == 10 or (b == 13 and n >= 3 and byte(s, n - 2) == 10)
end

-- index of the last character of the last blank line in s, or 0
local function last_boundary(s)
  local last = 0
  local _, e = find(s, BLANK_LINE)
  while e do
    last = e
    _, e = find(s, BLANK_LINE, e + 1)
  end
  return last
end

-- s without its usage-only events (whole events, searched from `from`); nil when there is none
local function without_usage_events(s, from)
  local at = find(s, EMPTY_CHOICES, from)
  if not at then return nil end
  local parts = {}
  local pos = 1 -- first character not yet copied
  local start = from -- first character of the event being looked at
  while at do
    -- the event holding `at` starts after the last blank line before it
    local _, e = find(s, BLANK_LINE, start)
    while e and e < at do
      start = e + 1
      _, e = find(s, BLANK_LINE, start)
    end
    if not e then break end -- an incomplete event: left as it is
    if find(sub(s, start, e), USAGE_OBJECT) then
      parts[#parts + 1] = sub(s, pos, start - 1)
      pos = e + 1
    end
    start = e + 1
    at = find(s, EMPTY_CHOICES, start)
  end
  if pos == 1 then return nil end
  parts[#parts + 1] = sub(s, pos)
  return table.concat(parts)
end

function envoy_on_response(handle)
  local lb = md(handle):get("envoy.lb")
  if lb == nil or lb["matrixinfer_usage"] == nil then
    return
  end
  local headers = handle:headers()
  local ctype = headers:get("content-type") or ""
  if find(ctype, "text/event-stream", 1, true) then
    local strip = lb["matrixinfer_strip"] == true
    if strip then headers:remove("content-length") end
    -- what marks the first token: any event, or a Responses API stream's first delta event
    local token_mark = "data:"
    if lb["matrixinfer_responses"] == true then token_mark = '.delta"' end
    local first_token = false
    local events = 0
    local reported = 0
    -- the last chunks, at least TAIL bytes of them (joined once, at the end: no copy per chunk)
    local parts, oldest, newest, kept = {}, 1, 0, 0
    local edge = "" -- the last 4 bytes so far, when they may start a "data:" (no newline last)
    local carry = "" -- incomplete trailing event held back from the previous chunk (strip only)
    local mid = false -- the next chunk starts inside an event already passed on (strip only)
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if n > 0 then
        local s = chunk:getBytes(0, n)
        local at = find(s, "data:", 1, true)
        while at do
          events = events + 1
          at = find(s, "data:", at + 5, true)
        end
        if edge ~= "" and find(edge .. sub(s, 1, 4), "data:", 1, true) then
          events = events + 1 -- "data:" across the chunk boundary
        end
        if byte(s, n) == 10 then
          edge = "" -- a chunk that ends a line (what engines write): no "data:" spans the edge
        elseif n >= 4 then
          edge = sub(s, -4)
        else
          edge = sub(edge .. s, -4)
        end
        -- stored at once (one metadata write per stream): an aborted stream keeps it too
        if not first_token and events > 0 and (token_mark == "data:" or find(s, token_mark, 1, true)) then
          first_token = true
          md(handle):set(NS, "first_token_us", now_us(handle))
        end
        -- the running count survives an abort; updated every 8 events (a metadata write costs
        -- more than the scan), so an aborted stream is under-counted by at most 7 events
        if events - reported >= 8 then
          reported = events
          md(handle):set(NS, "events", events)
        end
        newest = newest + 1
        parts[newest] = s
        kept = kept + n
        while kept - #parts[oldest] >= TAIL do
          kept = kept - #parts[oldest]
          parts[oldest] = nil
          oldest = oldest + 1
        end
        if strip then
          local data = s
          local changed = false
          if carry ~= "" then
            data = carry .. s
            carry = ""
            changed = true
          end
          local len = #data
          local from = 1
          if mid then -- the front of data ends an event that was passed on: never strip it
            local _, e = find(data, BLANK_LINE)
            from = e and e + 1 or len + 1
          end
          mid = false
          if not ends_event(data, len) then
            local keep = last_boundary(data)
            if len - keep <= HOLD_MAX and keep + 1 >= from then
              carry = sub(data, keep + 1)
              data = sub(data, 1, keep)
              changed = true
            else
              mid = true -- too long for a usage event: pass the partial event on
            end
          end
          -- a plain search first: most chunks hold no usage object (the pattern search is slower)
          local stripped = nil
          if find(data, '"usage"', from, true) then stripped = without_usage_events(data, from) end
          if stripped ~= nil then
            data = stripped
            changed = true
          end
          if changed then chunk:setBytes(data) end
        end
      end
    end
    -- a stream that ends inside an event: SSE clients drop an incomplete event, so does this
    local meta = md(handle) -- no yield from here on: the object may be kept
    meta:set(NS, "events", events)
    local prompt, completion = usage_of(table.concat(parts, "", oldest, newest))
    if prompt ~= nil then meta:set(NS, "prompt", tonumber(prompt)) end
    if completion ~= nil then meta:set(NS, "completion", tonumber(completion)) end
  elseif find(ctype, "application/grpc", 1, true) then
    local totals = {}
    local carry = ""
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if n > 0 then
        local s = carry .. chunk:getBytes(0, n)
        local done = grpc_counts(s, totals)
        local keep = #s - GRPC_CARRY
        if done > keep then keep = done end
        if keep < 0 then keep = 0 end
        carry = sub(s, keep + 1)
      end
    end
    if totals.prompt ~= nil or totals.completion ~= nil then
      local meta = md(handle)
      meta:set(NS, "prompt", totals.prompt or 0)
      meta:set(NS, "completion", totals.completion or 0)
    end
  else
    -- passed on chunk by chunk (body() would hold the answer until its end); the last 4 KiB kept
    local tail = ""
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if n >= JSON_TAIL then
        tail = chunk:getBytes(n - JSON_TAIL, JSON_TAIL)
      elseif n > 0 then
        tail = sub(tail .. chunk:getBytes(0, n), -JSON_TAIL)
      end
    end
    local prompt, completion = usage_of(tail)
    if prompt ~= nil then
      local meta = md(handle)
      meta:set(NS, "prompt", tonumber(prompt))
      if completion ~= nil then meta:set(NS, "completion", tonumber(completion)) end
    end
  end
end
