-- Argo CD health of a kubetune.io ModelServer: a long-running vLLM server plus its LoRA adapters.
--
-- status.state is the operator's summary of the replicas (Pending, Progressing, Ready, Degraded, Failed);
-- status.adapters says which adapters every ready replica serves. The Ready and AdaptersReady conditions
-- give the reason and message shown: a vLLM that exits names why (InvalidEngineArgs, MaxModelLenTooLarge,
-- OutOfMemory, EngineFailed), as does a spec refused before any pod (MaxModelLenTooLarge,
-- TensorParallelSizeInvalid). The Autoscaling condition (spec.autoscaling) is False when no ScaledObject
-- scales the server (KedaNotInstalled, PrometheusNotConfigured, ...). docs/argocd.md has the table.
-- Lua 5.1 only (Argo CD runs gopher-lua): numbers are floats there, so they are formatted with %d.

local function condition(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition, or `fallback` without one.
local function explain(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message == nil or c.message == "" then
    return c.reason
  end
  return c.reason .. ": " .. c.message
end

local function observed_generation(status)
  local newest = status.observedGeneration
  for _, c in ipairs(status.conditions or {}) do
    if c.observedGeneration ~= nil and (newest == nil or c.observedGeneration > newest) then
      newest = c.observedGeneration
    end
  end
  return newest
end

-- How many adapters are in `state`.
local function count_adapters(status, state)
  local n = 0
  for _, a in ipairs(status.adapters or {}) do
    if a.state == state then
      n = n + 1
    end
  end
  return n
end

local hs = {}
local status = obj.status
if status == nil or status.state == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to create the server"
  return hs
end

local generation = obj.metadata.generation
local observed = observed_generation(status)
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = string.format(
    "Waiting for the kubetune operator to observe generation %d (status is for generation %d)", generation, observed)
  return hs
end

local state = status.state
local ready = condition(status, "Ready")
local adapters = condition(status, "AdaptersReady")
local autoscaling = condition(status, "Autoscaling")
if state == "Failed" or state == "Degraded" then
  hs.status = "Degraded"
  hs.message = explain(ready, state)
elseif state == "Ready" then
  if autoscaling ~= nil and autoscaling.status == "False" then
    -- Serving, but not scaled as asked: the replica count stays where it is.
    hs.status = "Degraded"
    hs.message = explain(autoscaling, "autoscaling is not working")
  elseif count_adapters(status, "Failed") > 0 then
    hs.status = "Degraded"
    hs.message = explain(adapters, "an adapter failed to load")
  elseif count_adapters(status, "Pending") > 0 then
    hs.status = "Progressing"
    hs.message = explain(adapters, "adapters are loading")
  else
    hs.status = "Healthy"
    hs.message = explain(ready, "Ready") .. "; " .. explain(adapters, "no adapters")
    if status.endpoint ~= nil and status.endpoint ~= "" then
      hs.message = hs.message .. "; serving at " .. status.endpoint
    end
  end
elseif state == "Pending" and ready ~= nil and ready.reason == "ScaledToZero" then
  -- Asked for: like a Deployment scaled to zero, nothing is missing.
  hs.status = "Healthy"
  hs.message = explain(ready, "ScaledToZero")
else
  hs.status = "Progressing"
  hs.message = explain(ready, state)
end
return hs
