// The operator UI: sign in with a token, list executions, follow one live, decide approvals.
// Lists, details, cancel and approval decisions go over grpc-web (window.OpsGrpc, the bundled
// client); live events over WebSocket, SSE or long-poll (window.OpsTransports).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const G = window.OpsGrpc;
  const STATUS_NAMES = ["pending", "awaiting_approval", "queued", "running", "succeeded", "failed", "cancelled", "rejected"];
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "rejected"]);
  let session = null; // { token, tenantId, actorId, api }
  let following = null;

  // -- session ------------------------------------------------------------------------------
  function claims(token) {
    const part = token.split(".")[1];
    if (!part) throw new Error("this is not a token (expected three dot-separated parts)");
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const body = JSON.parse(json);
    if (!body.tenant_id || !body.sub) throw new Error("the token names no tenant or user");
    if (body.exp && body.exp * 1000 < Date.now()) throw new Error("the token has expired: obtain a new one");
    return body;
  }

  function startSession(token) {
    const c = claims(token);
    session = { token, tenantId: c.tenant_id, actorId: c.sub, api: G.clients(token) };
    sessionStorage.setItem("opsc-token", token);
    $("whoami").textContent = `${c.sub} @ ${c.tenant_id}`;
    $("nav").hidden = false;
  }

  function signOut() {
    sessionStorage.removeItem("opsc-token");
    session = null;
    $("nav").hidden = true;
    window.location.hash = "#/sign-in";
    route();
  }

  // -- helpers ------------------------------------------------------------------------------
  function showBanner(text) { const b = $("banner"); b.textContent = text; b.hidden = !text; }

  // Refusals whose reason calls for plainer words than the server's message.
  const BY_REASON = {
    SELF_APPROVAL_FORBIDDEN: "You cannot approve your own request: another approver must decide.",
    APPROVAL_ALREADY_DECIDED: "Someone decided this request already: reload the inbox.",
    APPROVAL_INVALIDATED: "The plan changed after the request: it must be approved again.",
    APPROVAL_EXPIRED: "This request expired: the requester must submit the plan again.",
  };

  function explain(err) {
    const e = G.describeError(err);
    if (BY_REASON[e.reason]) return `${BY_REASON[e.reason]} (${e.message})`;
    const hints = {
      Unauthenticated: "Sign in again: ",
      PermissionDenied: "Not allowed: ",
      NotFound: "Not found: ",
      FailedPrecondition: "Cannot do that now: ",
      Unavailable: "The service is unreachable, try again shortly: ",
      ResourceExhausted: "Too busy, try again shortly: ",
    };
    return `${hints[e.code] || ""}${e.message}`;
  }

  function statusName(value) {
    if (typeof value === "string") return value.replace(/^EXECUTION_STATUS_/, "").toLowerCase();
    return STATUS_NAMES[value - 1] || "unknown";
  }
  function shortName(value, prefix) { return String(value || "").replace(prefix, "").toLowerCase(); }
  function age(iso) {
    if (!iso) return "";
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    return s < 60 ? `${s} s` : s < 3600 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
  }
  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
  function show(sectionId) {
    for (const id of ["sign-in", "executions", "execution", "approvals"]) $(id).hidden = id !== sectionId;
  }

  // -- executions list ----------------------------------------------------------------------
  const PAGE_SIZE = 100;
  let nextPageToken = "";
  // A reply to an older request (the filter changed meanwhile) is dropped, not appended.
  let listGeneration = 0;

  async function loadExecutions(more) {
    const append = more === true;
    const generation = append ? listGeneration : ++listGeneration;
    const wanted = $("status-filter").value;
    const statuses = wanted ? [STATUS_NAMES.indexOf(wanted) + 1] : [];
    const pageToken = append ? nextPageToken : "";
    $("executions-more").disabled = true;
    try {
      const reply = await session.api.executions.listExecutions({ tenantId: session.tenantId, statuses, pageSize: PAGE_SIZE, pageToken });
      if (generation !== listGeneration) return;
      const rows = $("executions-rows");
      if (!append) rows.replaceChildren();
      for (const message of reply.executions) {
        const e = G.executionJson(message);
        const tr = document.createElement("tr");
        const link = document.createElement("a");
        link.href = `#/executions/${e.executionId}`;
        link.textContent = e.executionId.slice(0, 8);
        const first = document.createElement("td"); first.append(link); tr.append(first);
        tr.append(cell((e.plan && e.plan.name) || ""), cell(statusName(e.status)), cell(shortName(e.executionMode, "EXECUTION_MODE_")), cell(e.actorId), cell(age(e.createdAt)));
        tr.dataset.status = statusName(e.status);
        rows.append(tr);
      }
      nextPageToken = reply.nextPageToken || "";
      $("executions-more").hidden = !nextPageToken;
      $("executions-count").textContent = nextPageToken ? `${rows.children.length} shown, more exist` : `${rows.children.length} shown`;
      $("executions-empty").hidden = rows.children.length > 0;
      showBanner("");
    } catch (err) {
      if (generation === listGeneration) showBanner(explain(err));
    } finally {
      $("executions-more").disabled = false;
    }
  }

  // -- one execution ------------------------------------------------------------------------
  async function loadExecution(executionId) {
    const reply = await session.api.executions.getExecution({ tenantId: session.tenantId, executionId });
    const e = G.executionJson(reply.execution);
    const status = statusName(e.status);
    $("execution-title").textContent = `Execution ${executionId.slice(0, 8)}`;
    $("exec-status").textContent = status;
    $("exec-status").dataset.status = status;
    $("exec-plan").textContent = (e.plan && e.plan.name) || "";
    $("exec-mode").textContent = shortName(e.executionMode, "EXECUTION_MODE_");
    $("exec-actor").textContent = e.actorId;
    $("cancel").disabled = TERMINAL.has(status);
    const rows = $("steps-rows");
    rows.replaceChildren();
    for (const s of e.steps || []) {
      const tr = document.createElement("tr");
      tr.dataset.step = s.stepId;
      tr.append(cell(s.stepId), cell(s.action), cell(shortName(s.status, "STEP_STATUS_")), cell(s.startedAt ? new Date(s.startedAt).toLocaleTimeString() : ""), cell(s.durationMs && s.durationMs !== "0" ? `${s.durationMs} ms` : ""));
      rows.append(tr);
    }
    return status;
  }

  function openExecution(executionId) {
    show("execution");
    $("events").replaceChildren();
    $("transport").textContent = "—";
    $("transport").dataset.transport = "";
    if (following) following.stop();
    let refresh = null;
    const refreshSoon = () => { clearTimeout(refresh); refresh = setTimeout(() => loadExecution(executionId).catch((err) => showBanner(explain(err))), 150); };
    loadExecution(executionId).then(() => {
      following = window.OpsTransports.follow(
        { tenantId: session.tenantId, executionId, token: session.token },
        {
          onEvent(ev) {
            const li = document.createElement("li");
            li.dataset.seq = ev.seq;
            li.dataset.type = ev.type;
            const status = ev.payload && ev.payload.status ? ` → ${ev.payload.status}` : "";
            li.textContent = `#${ev.seq} ${ev.type}${ev.payload && ev.payload.step_id ? ` (${ev.payload.step_id})` : ""}${status}`;
            $("events").append(li);
            refreshSoon();
          },
          onTransport(kind) { $("transport").textContent = kind; $("transport").dataset.transport = kind; },
          onState(text) { $("transport-state").textContent = text; },
          onEnd() { refreshSoon(); },
          onError(message) { showBanner(message); },
        },
      );
    }).catch((err) => showBanner(explain(err)));
    $("cancel").onclick = async () => {
      if (!window.confirm("Cancel this execution? Steps not started yet will be skipped.")) return;
      try {
        await session.api.executions.cancelExecution({ tenantId: session.tenantId, executionId, reason: "cancelled from the UI" });
        refreshSoon();
      } catch (err) { showBanner(explain(err)); }
    };
  }

  // -- approvals ----------------------------------------------------------------------------
  async function loadApprovals() {
    try {
      const reply = await session.api.approvals.listPendingApprovals({ tenantId: session.tenantId, pageSize: 100 });
      const rows = $("approvals-rows");
      rows.replaceChildren();
      for (const message of reply.approvals) {
        const a = G.approvalJson(message);
        const tr = document.createElement("tr");
        tr.dataset.approvalId = a.approvalId;
        tr.dataset.executionId = a.executionId;
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "Review";
        button.setAttribute("aria-label", `Review ${(a.plan && a.plan.name) || a.approvalId}`);
        button.onclick = () => openDialog(a);
        const action = document.createElement("td"); action.append(button);
        tr.append(cell((a.plan && a.plan.name) || ""), cell(String(a.level)), cell(a.stepId || "whole plan"), cell(a.requestedBy), cell(age(a.createdAt)), action);
        rows.append(tr);
      }
      $("approvals-empty").hidden = reply.approvals.length > 0;
      showBanner("");
    } catch (err) { showBanner(explain(err)); }
  }

  // The inbox refreshes itself while shown (and no dialog is open): new requests appear, e.g.
  // the next step of a level-3 execution once the previous one ran.
  let inboxTimer = null;
  function stopInboxRefresh() { clearInterval(inboxTimer); inboxTimer = null; }
  function startInboxRefresh() {
    stopInboxRefresh();
    inboxTimer = setInterval(() => {
      if ($("approvals").hidden) { stopInboxRefresh(); return; }
      if (!$("approval-dialog").open) loadApprovals();
    }, 2000);
  }

  const LEVELS = { 1: "1 — confirmation", 2: "2 — plan review", 3: "3 — step by step" };

  function openDialog(a) {
    const dialog = $("approval-dialog");
    const plan = a.plan || {};
    $("dlg-plan").textContent = plan.name || a.executionId;
    $("dlg-level").textContent = LEVELS[a.level] || String(a.level);
    $("dlg-requester").textContent = a.requestedBy;
    $("dlg-targets").textContent = (a.targetRefs || []).join(", ");
    $("dlg-actions").textContent = (a.actions || []).join(", ");
    const perStep = Boolean(a.stepId);
    $("dlg-step-label").hidden = $("dlg-step").hidden = !perStep;
    $("dlg-step").textContent = a.stepId || "";
    const runbook = a.runbookUrl || plan.runbookUrl || "";
    const showRunbook = a.level >= 2;
    $("dlg-runbook-label").hidden = $("dlg-runbook-cell").hidden = !showRunbook;
    $("dlg-runbook").textContent = runbook || "none given";
    if (runbook) $("dlg-runbook").href = runbook; else $("dlg-runbook").removeAttribute("href");
    const steps = $("dlg-steps");
    steps.replaceChildren();
    for (const s of plan.steps || []) {
      const li = document.createElement("li");
      li.textContent = `${s.id}: ${s.action} on ${(s.targets || []).map((t) => t.ref).join(", ")}`;
      if (s.id === a.stepId) li.setAttribute("aria-current", "step");
      steps.append(li);
    }
    $("dlg-approve").textContent = perStep ? `Approve step ${a.stepId}` : "Approve";
    $("dlg-comment").value = "";
    $("dlg-error").hidden = true;
    const decide = async (approve) => {
      const comment = $("dlg-comment").value;
      try {
        if (approve && perStep) {
          await session.api.approvals.approveStep({ tenantId: session.tenantId, executionId: a.executionId, stepId: a.stepId, comment });
        } else if (approve) {
          await session.api.approvals.approve({ tenantId: session.tenantId, approvalId: a.approvalId, comment });
        } else {
          await session.api.approvals.reject({ tenantId: session.tenantId, approvalId: a.approvalId, comment });
        }
        dialog.close();
        loadApprovals();
      } catch (err) {
        $("dlg-error").textContent = explain(err);
        $("dlg-error").hidden = false;
      }
    };
    $("dlg-approve").onclick = () => decide(true);
    $("dlg-reject").onclick = () => decide(false);
    $("dlg-close").onclick = () => dialog.close();
    dialog.showModal();
  }

  // -- routing ------------------------------------------------------------------------------
  function route() {
    const hash = window.location.hash || "#/executions";
    if (!session) {
      const saved = sessionStorage.getItem("opsc-token");
      if (saved) { try { startSession(saved); } catch (err) { sessionStorage.removeItem("opsc-token"); } }
    }
    if (!session) { show("sign-in"); return; }
    if (following && !hash.startsWith("#/executions/")) { following.stop(); following = null; }
    const match = hash.match(/^#\/executions\/([0-9a-f-]+)$/);
    if (match) { openExecution(match[1]); return; }
    if (hash === "#/approvals") { show("approvals"); loadApprovals(); startInboxRefresh(); return; }
    stopInboxRefresh();
    show("executions");
    loadExecutions();
  }

  $("sign-in-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      startSession($("token").value.trim());
      showBanner("");
      if (window.location.hash === "#/sign-in" || !window.location.hash) window.location.hash = "#/executions";
      route();
    } catch (err) { showBanner(`Cannot sign in: ${err.message}`); }
  });
  $("sign-out").addEventListener("click", signOut);
  $("status-filter").addEventListener("change", () => loadExecutions());
  $("refresh").addEventListener("click", () => loadExecutions());
  $("executions-more").addEventListener("click", () => loadExecutions(true));
  window.addEventListener("hashchange", route);
  route();
})();
