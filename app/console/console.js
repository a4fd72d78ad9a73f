// vmwebapp console: runs, a run's steps and live timeline, and the approvals
// inbox, over the JSON API and its Server-Sent Events streams.
//
// The API key lives in sessionStorage (this tab only) and travels only in an
// Authorization header, never in a URL. EventSource cannot send that header,
// so streams are read with fetch() and a small SSE parser, resuming with
// Last-Event-ID after a break. Everything shown is built with textContent:
// no HTML from the server or the user is ever parsed.
"use strict";

(() => {
  const API = "/api/v2";
  const KEY = "vm.console.apiKey";
  const $ = (id) => document.getElementById(id);

  let view = null; // { cleanup }
  let unique = 0; // for element ids

  // --- key and requests --------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message || code || `HTTP ${status}`);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(API + path, {
      method: options.method || "GET",
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
      credentials: "omit",
    });
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    if (res.status === 401) {
      signOut("The API key was refused; enter it again.");
      throw new ApiError(401, "unauthorized");
    }
    if (!res.ok) {
      throw new ApiError(res.status, body && body.code, body && body.message);
    }
    return body;
  }

  // --- Server-Sent Events over fetch ---------------------------------------

  const live = { open: 0 };

  function setLive(delta) {
    live.open += delta;
    const el = $("live");
    el.textContent = live.open > 0 ? "Live" : "Reconnecting…";
    el.classList.toggle("on", live.open > 0);
  }

  // Follows `path` until `signal` aborts, calling onEvent(data, id) for each
  // event and resuming after the last id whenever the stream breaks.
  // onStart() is called once the stream is open without a resume point (the
  // all-runs stream then starts at "now"): what the view listed before may
  // have changed in between, so it lists again.
  async function follow(path, onEvent, signal, onStart) {
    let last = null;
    let delay = 500;
    while (!signal.aborted) {
      let counted = false;
      try {
        const headers = { Accept: "text/event-stream", Authorization: `Bearer ${apiKey()}` };
        if (last !== null) headers["Last-Event-ID"] = last;
        const res = await fetch(API + path, { headers, signal, cache: "no-store", credentials: "omit" });
        if (res.status === 401) {
          signOut("The API key was refused; enter it again.");
          return;
        }
        // 404: no such run; 204: the run has ended and its stream is over.
        if (res.status === 404 || res.status === 204) return;
        if (!res.ok || !res.body) throw new Error(`stream answered ${res.status}`);
        setLive(1);
        counted = true;
        delay = 500;
        if (last === null && onStart) onStart();
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let id = null;
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue; // a heartbeat
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              let text = colon < 0 ? "" : line.slice(colon + 1);
              if (text.startsWith(" ")) text = text.slice(1);
              if (field === "id") id = text;
              else if (field === "data") data.push(text);
            }
            if (id !== null) last = id;
            if (data.length) {
              try {
                onEvent(JSON.parse(data.join("\n")), id);
              } catch (e) {
                console.error("cannot handle an event", e);
              }
            }
          }
        }
      } catch (e) {
        if (signal.aborted) break;
      } finally {
        if (counted) setLive(-1);
      }
      if (signal.aborted) break;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }

  // --- small DOM helpers ---------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
  }

  function statusBadge(status) {
    return el("span", { class: `status status-${status}`, text: String(status).replace("_", " ") });
  }

  function debounce(fn, ms) {
    let t = null;
    return () => {
      clearTimeout(t);
      t = setTimeout(fn, ms);
    };
  }

  function show(section) {
    for (const id of ["login", "runs", "run", "approvals"]) $(id).hidden = id !== section;
    $("nav").hidden = section === "login";
    $("forget").hidden = section === "login";
    for (const [id, name] of [["nav-runs", "runs"], ["nav-approvals", "approvals"]]) {
      if (name === section || (section === "run" && name === "runs")) $(id).setAttribute("aria-current", "page");
      else $(id).removeAttribute("aria-current");
    }
  }

  // --- sign in / out ---------------------------------------------------------

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    leave();
    show("login");
    $("login-error").textContent = message || "";
    $("live").textContent = "Not connected";
    $("live").classList.remove("on");
    $("key").value = "";
    $("key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) {
      $("login-error").textContent = "Enter an API key.";
      $("key").focus();
      return;
    }
    sessionStorage.setItem(KEY, key);
    try {
      await api("/runs?limit=1");
    } catch (e) {
      if (e.status !== 401) $("login-error").textContent = `The server did not answer: ${e.message}`;
      return;
    }
    $("key").value = "";
    $("login-error").textContent = "";
    if (!location.hash.startsWith("#/")) location.hash = "#/runs";
    else route();
  }

  // --- views -----------------------------------------------------------------

  function leave() {
    if (view && view.cleanup) view.cleanup();
    view = null;
  }

  async function runsView() {
    show("runs");
    const abort = new AbortController();
    let cursor = null;
    let pages = 1; // pages shown: live updates refresh all of them
    const row = (run) => el("tr", { "data-run": run.id },
      el("td", { class: "mono" }, el("a", { href: `#/runs/${run.id}`, text: run.id })),
      el("td", {}, statusBadge(run.status)),
      el("td", { text: String(run.step_count) }),
      el("td", { text: when(run.created_at) }),
      el("td", { text: when(run.updated_at) }),
    );
    const fetchPage = (after) => {
      const status = $("status-filter").value;
      const params = new URLSearchParams({ limit: "50" });
      if (status) params.set("status", status);
      if (after) params.set("cursor", after);
      return api(`/runs?${params}`);
    };
    // mode: "reset" (first page only), "more" (the next page), "refresh"
    // (as many pages as are shown, so "Load more" survives live updates).
    const draw = async (mode) => {
      const body = $("runs-body");
      try {
        if (mode === "more") {
          if (!cursor) return;
          const page = await fetchPage(cursor);
          body.append(...page.runs.map(row));
          cursor = page.next_cursor || null;
          pages += 1;
        } else {
          if (mode === "reset") pages = 1;
          const runs = [];
          let after = null;
          for (let i = 0; i < pages; i += 1) {
            const page = await fetchPage(after);
            runs.push(...page.runs);
            after = page.next_cursor || null;
            if (!after) break;
          }
          body.replaceChildren(...runs.map(row));
          cursor = after;
        }
      } catch (e) {
        if (e.status !== 401) $("runs-empty").textContent = `Cannot list runs: ${e.message}`;
        $("runs-empty").hidden = false;
        return;
      }
      $("runs-more").hidden = !cursor;
      $("runs-empty").textContent = "No runs.";
      $("runs-empty").hidden = body.children.length > 0;
    };
    // One at a time: a refresh and a "Load more" must not interleave.
    let queue = Promise.resolve();
    const render = (mode) => (queue = queue.catch(() => {}).then(() => draw(mode)));
    const refresh = debounce(() => render("refresh"), 250);
    const onFilter = () => render("reset");
    const onMore = () => render("more");
    $("status-filter").addEventListener("change", onFilter);
    $("runs-more").addEventListener("click", onMore);
    await render("reset");
    follow("/events/stream", (ev) => {
      if (String(ev.type).startsWith("run.") || String(ev.type).startsWith("step.")) refresh();
    }, abort.signal, refresh);
    return () => {
      abort.abort();
      $("status-filter").removeEventListener("change", onFilter);
      $("runs-more").removeEventListener("click", onMore);
    };
  }

  // The decision controls of one approval step. `describedBy` is the id of
  // the element that says which run and step they decide: with several
  // cards on a page, "Approve" alone does not tell a screen reader which.
  function decisionForm(runId, index, prompt, after, describedBy) {
    unique += 1;
    const comment = el("textarea", { id: `comment-${unique}`, name: "comment", maxlength: "2000" });
    const error = el("p", { class: "error", role: "alert" });
    const promptId = prompt ? `prompt-${unique}` : null;
    const about = [describedBy, promptId].filter(Boolean).join(" ") || null;
    const approve = el("button", { type: "button", text: "Approve", "aria-describedby": about });
    const reject = el("button", { type: "button", class: "danger", text: "Reject", "aria-describedby": about });
    const decide = async (what) => {
      approve.disabled = reject.disabled = true;
      error.textContent = "";
      try {
        await api(`/runs/${runId}/steps/${index}/${what}`, { method: "POST", body: { comment: comment.value } });
        after(what);
      } catch (e) {
        if (e.status === 409) error.textContent = "Already decided (or no longer waiting).";
        else if (e.status === 403) error.textContent = "This API key may not decide approvals.";
        else if (e.status !== 401) error.textContent = `Could not ${what}: ${e.message}`;
        approve.disabled = reject.disabled = false;
      }
    };
    approve.addEventListener("click", () => decide("approve"));
    reject.addEventListener("click", () => decide("reject"));
    return el("div", {},
      prompt ? el("p", { class: "prompt", id: promptId, text: prompt }) : "",
      el("label", { for: comment.id, text: "Comment (recorded with the decision)" }),
      comment,
      el("div", { class: "actions" }, approve, reject),
      error,
    );
  }

  async function runView(id) {
    show("run");
    const abort = new AbortController();
    $("run-title").textContent = `Run ${id}`;
    $("run-facts").replaceChildren();
    $("steps-body").replaceChildren();
    $("run-decision").replaceChildren();
    $("timeline").replaceChildren();
    // Rendered prompts, from each step.awaiting_approval event.
    const prompts = new Map();
    const render = async () => {
      let run;
      try {
        run = await api(`/runs/${encodeURIComponent(id)}`);
      } catch (e) {
        if (e.status !== 401) $("run-facts").replaceChildren(el("dt", { text: "Error" }), el("dd", { text: e.status === 404 ? "No such run." : e.message }));
        return;
      }
      const facts = [
        ["Status", statusBadge(run.status)],
        ["Correlation id", el("span", { class: "mono", text: run.correlation_id })],
        ["Created", when(run.created_at)],
        ["Finished", when(run.finished_at) || "—"],
      ];
      if (run.error) facts.push(["Error", run.error]);
      if (run.output !== undefined && run.output !== null) facts.push(["Output", el("pre", { class: "out", text: JSON.stringify(run.output, null, 2) })]);
      $("run-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
      $("run-facts").setAttribute("data-status", run.status);
      const rows = run.steps.map((s) => {
        const result = s.error ? s.error : s.output === undefined || s.output === null ? "" : JSON.stringify(s.output);
        return el("tr", { "data-step": String(s.index), "data-status": s.status },
          el("td", { text: String(s.index) }),
          el("td", { text: s.kind }),
          el("td", {}, statusBadge(s.status)),
          el("td", { text: String(s.attempts) }),
          el("td", {}, el("pre", { class: "out", text: result })),
        );
      });
      $("steps-body").replaceChildren(...rows);
      const waiting = run.steps.find((s) => s.status === "awaiting_approval");
      const holder = $("run-decision");
      const shown = holder.firstElementChild;
      if (!waiting) {
        holder.replaceChildren();
      } else if (!shown || shown.dataset.step !== String(waiting.index) || (!shown.dataset.rendered && (waiting.approval || prompts.has(waiting.index)))) {
        // A form already shown for this step stays, with what was typed in it.
        const prompt = (waiting.approval && waiting.approval.prompt) || prompts.get(waiting.index) || (waiting.spec && waiting.spec.prompt);
        unique += 1;
        const titleId = `decision-title-${unique}`;
        holder.replaceChildren(el("section", {
          class: "decision",
          "aria-labelledby": titleId,
          "data-step": String(waiting.index),
          "data-rendered": waiting.approval || prompts.has(waiting.index) ? "1" : null,
        },
        el("h2", { id: titleId, text: `Run ${run.id} · step ${waiting.index} waits for approval` }),
        // The form goes away once decided: keep the focus on the page.
        decisionForm(run.id, waiting.index, prompt, async () => {
          await render();
          $("run-title").focus();
        }, titleId)));
      }
    };
    const refresh = debounce(render, 150);
    await render();
    follow(`/runs/${encodeURIComponent(id)}/events/stream`, (ev) => {
      const data = ev.data || {};
      if (ev.type === "step.awaiting_approval" && typeof data.prompt === "string") prompts.set(ev.step_index, data.prompt);
      let detail = "";
      if (ev.type === "step.approved" || ev.type === "step.rejected") {
        detail = ` · by ${data.by || "?"}${data.comment ? `: “${data.comment}”` : ""}`;
      } else if (ev.type === "step.awaiting_approval" && data.prompt) {
        detail = ` · “${data.prompt}”`;
      }
      const item = el("li", { "data-event": ev.type },
        el("span", { class: "when", text: when(ev.at) }),
        el("span", { class: "mono", text: ev.type }),
        ev.step_index === null || ev.step_index === undefined ? "" : ` · step ${ev.step_index}`,
        ev.attempt ? ` · attempt ${ev.attempt}` : "",
        ev.message ? ` · ${ev.message}` : "",
        detail,
      );
      $("timeline").append(item);
      refresh();
    }, abort.signal);
    return () => {
      abort.abort();
      $("run-decision").replaceChildren();
    };
  }

  async function approvalsView() {
    show("approvals");
    const abort = new AbortController();
    // Every pending approval, page after page (at most INBOX_MAX): an
    // approver must not miss the ones past the API's first page.
    const INBOX_MAX = 1000;
    const render = async () => {
      const page = { approvals: [] };
      try {
        let cursor = null;
        do {
          const params = new URLSearchParams({ status: "pending", limit: "200" });
          if (cursor) params.set("cursor", cursor);
          const next = await api(`/approvals?${params}`);
          page.approvals.push(...(next.approvals || []));
          cursor = next.next_cursor || null;
        } while (cursor && page.approvals.length < INBOX_MAX);
        page.more = Boolean(cursor);
      } catch (e) {
        if (e.status === 401) return;
        $("approvals-note").hidden = false;
        $("approvals-note").textContent = e.status === 404
          ? "This server has no approval steps."
          : `Cannot list approvals: ${e.message}`;
        return;
      }
      $("approvals-note").hidden = !page.more;
      $("approvals-note").textContent = page.more
        ? `The oldest ${INBOX_MAX} pending approvals are shown; decide some to see the rest.`
        : "";
      const items = page.approvals;
      const list = $("approvals-list");
      // Cards already shown stay as they are (with a comment being typed);
      // new ones are added and decided or expired ones removed.
      const shown = new Map([...list.children].map((c) => [c.dataset.key, c]));
      const cards = items.map((a) => {
        const key = `${a.run_id}:${a.step_index}`;
        if (shown.has(key)) return shown.get(key);
        unique += 1;
        const titleId = `card-title-${unique}`;
        const card = el("li", { class: "card", "data-key": key, "data-run": a.run_id, "data-step": String(a.step_index) },
          el("h2", { id: titleId }, el("a", { href: `#/runs/${a.run_id}`, text: `Run ${a.run_id}` }), ` · step ${a.step_index}`),
          // Whose run: an admin's inbox holds every tenant's approvals.
          el("p", { class: "meta", text: `${a.tenant ? `Tenant ${a.tenant} · ` : ""}Waiting since ${when(a.waiting_since)} · expires ${when(a.expires_at)}` }),
        );
        card.append(decisionForm(a.run_id, a.step_index, a.prompt, () => decided(card), titleId));
        return card;
      });
      const same = cards.length === list.children.length && cards.every((c, i) => c === list.children[i]);
      if (!same) {
        for (const c of [...list.children]) if (!cards.includes(c)) c.remove();
        cards.forEach((c, i) => {
          if (list.children[i] !== c) list.insertBefore(c, list.children[i] || null);
        });
      }
      $("approvals-empty").hidden = items.length > 0;
    };
    // A decided card goes away: the focus moves to the card that takes its
    // place (or the heading when none is left), not to the page's start.
    const decided = async (card) => {
      const list = $("approvals-list");
      const at = Math.max(0, [...list.children].indexOf(card));
      await render();
      const next = list.children[Math.min(at, list.children.length - 1)];
      const target = next && next !== card ? next.querySelector("textarea") : null;
      (target || $("approvals-title")).focus();
    };
    const refresh = debounce(render, 200);
    await render();
    follow("/events/stream", (ev) => {
      if (/^step\.(awaiting_approval|approved|rejected|approval_expired)$/.test(ev.type) || /^run\.(cancelled|failed)$/.test(ev.type)) refresh();
    }, abort.signal, refresh);
    return () => {
      abort.abort();
      $("approvals-list").replaceChildren();
    };
  }

  // --- routing -----------------------------------------------------------------

  async function route() {
    if (!apiKey()) {
      leave();
      show("login");
      return;
    }
    const hash = location.hash;
    // "#main" (the skip link) and other plain anchors keep the current view.
    if (hash && !hash.startsWith("#/") && view) return;
    leave();
    const token = {};
    view = token;
    let cleanup;
    const run = hash.match(/^#\/runs\/([0-9a-fA-F-]{36})$/);
    if (run) cleanup = await runView(run[1]);
    else if (hash === "#/approvals") cleanup = await approvalsView();
    else cleanup = await runsView();
    if (view === token) token.cleanup = cleanup;
    else if (cleanup) cleanup();
    $("main").focus({ preventScroll: true });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("forget").addEventListener("click", () => signOut("The key was forgotten."));
    window.addEventListener("hashchange", route);
    route();
  });
})();
