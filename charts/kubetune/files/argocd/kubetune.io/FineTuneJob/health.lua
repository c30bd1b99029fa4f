-- Argo CD health of a kubetune.io FineTuneJob: bounded work that ends Succeeded or Failed.
--
-- status.state is the operator's summary (Pending, Running, Succeeded, Failed, Suspended) and decides the
-- health; the conditions give the reason and message shown with it. docs/argocd.md has the table.
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

-- The newest generation the operator wrote status for. Admission records it only on the Admitted
-- condition until the training Job exists (and again after the Job is gone), so conditions count too.
local function observed_generation(status)
  local newest = status.observedGeneration
  for _, c in ipairs(status.conditions or {}) do
    if c.observedGeneration ~= nil and (newest == nil or c.observedGeneration > newest) then
      newest = c.observedGeneration
    end
  end
  return newest
end

local function running_message(status)
  local progress = status.progress
  local message
  if progress ~= nil and progress.summary ~= nil and progress.summary ~= "" then
    message = "Training " .. progress.summary
    if progress.eta ~= nil and progress.eta ~= "" then
      message = message .. ", ETA " .. progress.eta
    end
  else
    message = explain(condition(status, "Running"), "Training")
  end
  if status.restarts ~= nil and status.restarts > 0 then
    message = message .. string.format("; %d restart(s) so far, each resumed from the last checkpoint", status.restarts)
  end
  return message
end

-- Why a job is not running yet: a blocked admission, then the pods' state, then the plan.
local function pending_message(status)
  local admitted = condition(status, "Admitted")
  if admitted ~= nil and admitted.status == "False" then
    return explain(admitted, "Pending")
  end
  local running = condition(status, "Running")
  if running ~= nil and running.status == "False" then
    return explain(running, "Pending")
  end
  return explain(admitted, "Pending")
end

local hs = {}
local status = obj.status
if status == nil or status.state == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to admit the job"
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
if state == "Succeeded" then
  hs.status = "Healthy"
  hs.message = explain(condition(status, "Succeeded"), "Training finished")
elseif state == "Failed" then
  -- Admission failures (InvalidSpec, InvalidReference, PlanInfeasible) set only the Admitted condition.
  local admitted = condition(status, "Admitted")
  local cause = condition(status, "Failed")
  if admitted ~= nil and admitted.status == "False" then
    cause = admitted
  end
  hs.status = "Degraded"
  hs.message = explain(cause, "Training failed")
elseif state == "Suspended" then
  hs.status = "Suspended"
  hs.message = explain(condition(status, "Suspended"), "spec.suspend is true")
elseif state == "Running" then
  hs.status = "Progressing"
  hs.message = running_message(status)
else
  hs.status = "Progressing"
  hs.message = pending_message(status)
end
return hs
