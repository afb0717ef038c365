// Live events of one execution: WebSocket, then Server-Sent Events, then long-poll.
// A transport the browser lacks, or one that fails before it delivered anything, hands over to
// the next; one that drops after working is reconnected with resume (after_seq = the last seq
// received), so nothing is missed or shown twice. Which one is in use is reported to the page.
"use strict";

(function () {
  const ORDER = ["websocket", "sse", "long-poll"];

  function eventsUrl(tenantId, executionId, kind) {
    return `/v1/tenants/${encodeURIComponent(tenantId)}/executions/${encodeURIComponent(executionId)}/events/${kind}`;
  }

  async function streamTicket(token) {
    const reply = await fetch("/v1/tickets", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    const body = await reply.json().catch(() => ({}));
    if (!reply.ok) throw fatal(body, reply.status);
    return body.ticket;
  }

  function fatal(body, status) {
    const err = new Error((body && body.error && body.error.message) || `request failed (HTTP ${status})`);
    err.fatal = status === 401 || status === 403 || status === 404 || status === 400;
    err.status = status;
    return err;
  }

  function available(kind) {
    if (kind === "websocket") return typeof window.WebSocket === "function";
    if (kind === "sse") return typeof window.EventSource === "function";
    return typeof window.fetch === "function";
  }

  // Follow an execution. handlers: onEvent(ev), onTransport(kind), onState(text), onEnd(),
  // onError(message). Returns { stop() }.
  function follow({ tenantId, executionId, token, afterSeq = 0 }, handlers) {
    let lastSeq = afterSeq;
    let stopped = false;
    let current = null; // { close() }
    let index = 0;
    let failures = 0;

    const deliver = (ev) => {
      if (ev.seq <= lastSeq) return; // already shown (a reconnect raced)
      lastSeq = ev.seq;
      failures = 0;
      handlers.onEvent(ev);
      if (ev.type === "execution_completed") finish();
    };
    const finish = () => {
      if (stopped) return;
      stopped = true;
      if (current) current.close();
      handlers.onState("(finished)");
      handlers.onEnd();
    };
    const next = () => {
      if (stopped) return;
      while (index < ORDER.length && !available(ORDER[index])) index += 1;
      if (index >= ORDER.length) {
        handlers.onError("no live transport works from this browser; reload the page to retry");
        return;
      }
      const kind = ORDER[index];
      handlers.onTransport(kind);
      handlers.onState("(connecting)");
      const opener = kind === "websocket" ? openWebSocket : kind === "sse" ? openSse : openPoll;
      let delivered = false;
      current = opener({
        tenantId, executionId, token, afterSeq: () => lastSeq,
        onEvent: (ev) => { delivered = true; deliver(ev); },
        onOpen: () => handlers.onState("(live)"),
        onEnd: finish,
        onFatal: (message) => { stopped = true; handlers.onError(message); },
        onDrop: (reason) => {
          if (stopped) return;
          failures += 1;
          if (!delivered && failures >= 2) {
            index += 1; // never worked here: fall back to the next transport
            failures = 0;
            next();
            return;
          }
          handlers.onState(`(reconnecting: ${reason})`);
          setTimeout(next, Math.min(500 * failures, 3000));
        },
      });
    };
    next();
    return { stop() { stopped = true; if (current) current.close(); } };
  }

  function openWebSocket(ctx) {
    let ws = null;
    let closed = false;
    (async () => {
      let ticket;
      try { ticket = await streamTicket(ctx.token); } catch (err) {
        if (err.fatal) ctx.onFatal(err.message); else ctx.onDrop("ticket");
        return;
      }
      if (closed) return;
      const scheme = window.location.protocol === "https:" ? "wss" : "ws";
      const url = `${scheme}://${window.location.host}${eventsUrl(ctx.tenantId, ctx.executionId, "ws")}?ticket=${encodeURIComponent(ticket)}&after_seq=${ctx.afterSeq()}`;
      try { ws = new WebSocket(url); } catch (err) { ctx.onDrop("websocket refused"); return; }
      let error = null;
      ws.onopen = () => ctx.onOpen();
      ws.onmessage = (msg) => {
        const body = JSON.parse(msg.data);
        if (body.event) ctx.onEvent(body.event);
        else if (body.error) error = body.error.message;
      };
      ws.onclose = (close) => {
        if (closed) return;
        if (close.code === 1000) ctx.onEnd();
        else if (close.code >= 4400 && close.code < 4500) ctx.onFatal(error || `refused (${close.code - 4000})`);
        else ctx.onDrop(close.code === 1013 ? "too slow, resuming" : "connection lost");
      };
    })();
    return { close() { closed = true; if (ws) ws.close(); } };
  }

  function openSse(ctx) {
    let source = null;
    let closed = false;
    (async () => {
      let ticket;
      try { ticket = await streamTicket(ctx.token); } catch (err) {
        if (err.fatal) ctx.onFatal(err.message); else ctx.onDrop("ticket");
        return;
      }
      if (closed) return;
      const url = `${eventsUrl(ctx.tenantId, ctx.executionId, "sse")}?ticket=${encodeURIComponent(ticket)}&after_seq=${ctx.afterSeq()}`;
      source = new EventSource(url);
      source.onopen = () => ctx.onOpen();
      source.onmessage = (msg) => ctx.onEvent(JSON.parse(msg.data));
      source.addEventListener("end", () => { closed = true; source.close(); ctx.onEnd(); });
      source.addEventListener("lagged", () => { source.close(); if (!closed) ctx.onDrop("too slow, resuming"); });
      // EventSource would reconnect by itself with Last-Event-ID, but the ticket expires:
      // reconnect ourselves with a fresh one and after_seq.
      source.onerror = () => { source.close(); if (!closed) ctx.onDrop("connection lost"); };
    })();
    return { close() { closed = true; if (source) source.close(); } };
  }

  function openPoll(ctx) {
    let closed = false;
    const controller = new AbortController();
    (async () => {
      let opened = false;
      while (!closed) {
        const url = `${eventsUrl(ctx.tenantId, ctx.executionId, "poll")}?after_seq=${ctx.afterSeq()}&wait_s=25`;
        let reply;
        try {
          reply = await fetch(url, { headers: { Authorization: `Bearer ${ctx.token}` }, signal: controller.signal });
        } catch (err) { if (!closed) ctx.onDrop("connection lost"); return; }
        const body = await reply.json().catch(() => ({}));
        if (!reply.ok) {
          const err = fatal(body, reply.status);
          if (err.fatal) ctx.onFatal(err.message); else ctx.onDrop(`HTTP ${reply.status}`);
          return;
        }
        if (!opened) { opened = true; ctx.onOpen(); }
        for (const ev of body.events) ctx.onEvent(ev);
        if (body.completed) { ctx.onEnd(); return; }
      }
    })();
    return { close() { closed = true; controller.abort(); } };
  }

  window.OpsTransports = { follow };
})();
