// switchyard console: the parts that need a script. The bearer token lives in this tab's sessionStorage only;
// it is sent in the Authorization header, never in a URL.
"use strict";
(function () {
  const KEY = "switchyard-token";
  const token = () => sessionStorage.getItem(KEY) || "";
  const auth = (h) => { const t = token(); if (t) h["Authorization"] = "Bearer " + t; return h; };
  let flash = null; // { text, failed } shown after the next page swap
  let tapAbort = null;
  let refresh = null;

  function showFlash() {
    const el = document.getElementById("flash");
    if (!el) return;
    el.textContent = flash ? flash.text : "";
    el.className = flash && flash.failed ? "failed" : "";
  }

  // Fetches a page with the token and puts it in place of this one.
  async function load(url, push) {
    let r;
    try { r = await fetch(url, { headers: auth({}) }); } catch (e) { flash = { text: "cannot reach the listener: " + e, failed: true }; showFlash(); return; }
    if (r.status === 401) {
      // No token, or one the listener refused: forget it and ask.
      const had = token();
      sessionStorage.removeItem(KEY);
      askToken(had ? "the listener refused that token" : "the listener wants the token");
      return;
    }
    swap(await r.text());
    if (push) history.pushState({}, "", url);
  }

  function swap(html) {
    const doc = new DOMParser().parseFromString(html, "text/html");
    document.title = doc.title;
    document.body.replaceWith(doc.body);
    mount();
  }

  function askToken(why) {
    const box = document.getElementById("token");
    if (!box) return;
    box.innerHTML = "";
    const form = document.createElement("form");
    const input = document.createElement("input");
    input.type = "password"; input.name = "token"; input.autocomplete = "off";
    input.placeholder = "http.token"; input.setAttribute("aria-label", "token");
    const save = document.createElement("button"); save.type = "submit"; save.textContent = "Use token";
    form.append(input, save);
    if (why) { const s = document.createElement("span"); s.className = "muted"; s.textContent = why; box.append(s); }
    box.append(form);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      load(location.href, false);
    });
    input.focus();
  }

  function tokenBox() {
    const box = document.getElementById("token");
    if (!box) return;
    const body = document.body.dataset;
    if (body.tokenConfigured !== "true") return;
    if (token()) {
      box.innerHTML = "";
      const s = document.createElement("span"); s.className = "muted"; s.textContent = "token set for this tab";
      const forget = document.createElement("button"); forget.type = "button"; forget.textContent = "Forget";
      forget.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
      box.append(s, forget);
    } else {
      askToken(body.readsNeedToken === "true" ? "" : "changes need the token");
    }
  }

  async function post(button) {
    if (button.dataset.confirm && !button.classList.contains("armed")) {
      button.dataset.label = button.textContent;
      button.textContent = button.dataset.confirm + " Click again to confirm.";
      button.classList.add("armed");
      setTimeout(() => { if (button.isConnected && button.classList.contains("armed")) { button.classList.remove("armed"); button.textContent = button.dataset.label; } }, 6000);
      return;
    }
    button.disabled = true;
    const init = { method: "POST", headers: auth({ "Content-Type": "application/json" }) };
    if (button.dataset.body) init.body = button.dataset.body;
    let text, failed;
    try {
      const r = await fetch(button.dataset.action, init);
      const body = await r.json().catch(() => ({}));
      failed = !r.ok;
      if (r.status === 401) { sessionStorage.removeItem(KEY); }
      if (body.lines) text = body.lines.join("\n");
      else if (body.error) text = body.error;
      else if ("ok" in body) text = body.ok ? "reloaded: rules " + (body.new_version || body.old_version) + (body.swapped ? "" : " (no change)")
                                     : "reload refused, the old rules keep running:\n" + (body.problems || []).join("\n");
      else text = r.status + " " + r.statusText;
    } catch (e) { text = "request failed: " + e; failed = true; }
    flash = { text: text, failed: failed };
    await load(location.href, false);
  }

  // The live tap: /api/tap streamed with fetch (EventSource cannot send the token).
  async function tap(list) {
    const form = document.getElementById("tap-filter");
    const params = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...params]) if (!v) params.delete(k);
    const status = document.getElementById("tap-status");
    tapAbort = new AbortController();
    let r;
    try { r = await fetch("/api/tap?" + params, { headers: auth({}), signal: tapAbort.signal }); }
    catch (e) { return; }
    if (!r.ok) { status.textContent = "the tap is not available: " + r.status; return; }
    status.textContent = "Live: decisions of this process appear here as they are made" + (params.toString() ? " (filtered: " + params + ")" : "") + ".";
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (e) { return; }
      if (chunk.done) { status.textContent = "The tap ended (the service stopped?)."; return; }
      buf += decoder.decode(chunk.value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end); buf = buf.slice(end + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (!data) continue;
        const li = document.createElement("li");
        if (event === "lagged") li.textContent = "… this view fell behind and skipped " + data + " decisions";
        else {
          const e = JSON.parse(data);
          const when = new Date(e.at_ms).toISOString().replace("T", " ").slice(0, 19);
          const routes = (e.routes || []).map((x) => x.route + ": " + x.outcome + (x.actions && x.actions.length ? " (" + x.actions.map((a) => a.result).join(", ") + ")" : "")).join("; ");
          li.textContent = when + "  " + (e.change_type || "event") + " " + e.channel + " " + (e.record_ids || []).join(",") + "  " + (e.rejected ? "rejected: " + e.rejected : routes);
        }
        list.prepend(li);
        while (list.children.length > 200) list.lastChild.remove();
      }
    }
  }

  function mount() {
    if (tapAbort) { tapAbort.abort(); tapAbort = null; }
    if (refresh) { clearInterval(refresh); refresh = null; }
    showFlash();
    flash = null;
    if (document.body.dataset.shell === "true") {
      if (token()) load(location.href, false); else askToken("");
      return;
    }
    tokenBox();
    const list = document.getElementById("tap");
    if (list) tap(list);
    // The overview follows the service while someone looks at it (and only then).
    if (document.body.dataset.page === "Overview") {
      refresh = setInterval(() => { if (document.visibilityState === "visible") load(location.href, false); }, 10000);
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button.post");
    if (button) { ev.preventDefault(); post(button); return; }
    const a = ev.target.closest("a[href^='/ui']");
    if (a && token() && !ev.ctrlKey && !ev.metaKey && !ev.shiftKey) { ev.preventDefault(); load(a.getAttribute("href"), true); }
  });
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form.closest("#token")) return;
    if (form.id === "tap-filter") { ev.preventDefault(); const list = document.getElementById("tap"); if (list) { if (tapAbort) tapAbort.abort(); list.innerHTML = ""; tap(list); } return; }
    if (!token()) return; // a plain form works where reads need no token
    ev.preventDefault();
    const data = new URLSearchParams(new FormData(form));
    if ((form.method || "get").toLowerCase() === "post") {
      fetch(form.action, { method: "POST", headers: auth({ "Content-Type": "application/x-www-form-urlencoded" }), body: data })
        .then((r) => r.text()).then(swap);
    } else {
      load(form.action + "?" + data, true);
    }
  });
  window.addEventListener("popstate", () => load(location.href, false));
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", mount); else mount();
})();
