// Drives the console in headless Chromium (Debian's, through playwright-core):
// sign in with a key, create runs through the API, watch them appear and
// change without reloading, and decide an approval in the page.
//
// Usage: node console.mjs BASE_URL API_KEY SCREENSHOT [--approval] [--docs PNG]
// Exits non-zero with a message on the first failed expectation.
import { chromium } from "playwright-core";

const [base, key, screenshot, ...rest] = process.argv.slice(2);
const approval = rest.includes("--approval");
const docs = rest.includes("--docs") ? rest[rest.indexOf("--docs") + 1] : null;
const TIMEOUT = 15000;

function fail(message) {
  throw new Error(message);
}

async function api(method, path, body) {
  const res = await fetch(`${base}/api/v2${path}`, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) fail(`${method} ${path} answered ${res.status}: ${JSON.stringify(json)}`);
  return json;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: process.getuid && process.getuid() === 0 ? ["--no-sandbox"] : [],
});
const problems = [];
let page;
try {
  // Without script (blocked, or not loaded yet) the sign-in form submits as
  // a plain HTML form: the key must not end up in the URL even then.
  const noScript = await browser.newContext({ javaScriptEnabled: false });
  const bare = await noScript.newPage();
  await bare.goto(`${base}/console`);
  await bare.fill("#key", key);
  await Promise.all([bare.waitForNavigation(), bare.press("#key", "Enter")]);
  if (bare.url().includes(key)) fail(`without script the key is put in the URL: ${bare.url()}`);
  await noScript.close();

  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  // A CSP violation or a script error is a failure, not a warning.
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));

  await page.goto(`${base}/console`);
  // Every form control has a label; the page has landmarks.
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea")]
      .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label"))
      .map((e) => e.id || e.name),
  );
  if (unlabelled.length) fail(`controls without a label: ${unlabelled}`);
  for (const landmark of ["main", "header", "nav"]) {
    if ((await page.locator(landmark).count()) !== 1) fail(`no ${landmark} landmark`);
  }

  // Sign in with the keyboard only.
  await page.keyboard.press("Tab"); // the skip link
  await page.keyboard.press("Tab");
  let focused = await page.evaluate(() => document.activeElement && document.activeElement.id);
  if (focused !== "key") await page.getByLabel("API key").focus();
  await page.keyboard.type(key);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Runs" }).waitFor();
  if (page.url().includes(key)) fail("the key is in the URL");
  const stored = await page.evaluate(() => sessionStorage.getItem("vm.console.apiKey"));
  if (stored !== key) fail("the key is not in sessionStorage");
  const local = await page.evaluate(() => Object.keys(localStorage).length);
  if (local !== 0) fail("something was written to localStorage");
  await page.locator("#live.on").waitFor();

  // A run of plain steps appears and succeeds live, without a reload.
  const plain = await api("POST", "/runs", {
    input: { name: "Ada" },
    steps: [
      { kind: "delay", ms: 800 },
      { kind: "template", template: "Hello, {{input.name}}!" },
      { kind: "transform", op: "uppercase" },
    ],
  });
  const row = page.locator(`tr[data-run="${plain.id}"]`);
  await row.waitFor();
  await row.locator(".status-succeeded").waitFor();
  await row.getByRole("link").click();
  await page.locator('#run-facts[data-status="succeeded"]').waitFor();
  await page.locator('#timeline li[data-event="run.succeeded"]').waitFor();
  const output = await page.locator("#run-facts pre.out").textContent();
  if (output !== '"HELLO, ADA!"') fail(`the run page shows output ${output}`);
  const timeline = await page.locator("#timeline li").count();
  // queued, started, three steps started and succeeded, succeeded.
  if (timeline !== 9) fail(`the timeline shows ${timeline} events, expected 9`);

  // More runs than a page: "Load more" shows the next page, and live
  // updates keep it shown (they refresh every page loaded, not only the
  // first).
  await page.getByRole("link", { name: "Runs", exact: true }).click();
  await page.getByRole("heading", { name: "Runs" }).waitFor();
  // Paced under the key's rate limit (20/s), which the page shares.
  for (let i = 0; i < 55; i += 1) {
    await api("POST", "/runs", { input: {}, steps: [{ kind: "template", template: `run ${i}` }] });
    await new Promise((r) => setTimeout(r, 100));
  }
  const settled = Date.now() + TIMEOUT;
  for (;;) {
    const busy = (await api("GET", "/runs?status=queued&limit=1")).runs.length
      + (await api("GET", "/runs?status=running&limit=1")).runs.length;
    if (!busy) break;
    if (Date.now() > settled) fail("the 55 runs did not finish");
    await new Promise((r) => setTimeout(r, 250));
  }
  const rows = page.locator("#runs-body tr");
  await page.locator("#runs-more").click();
  await page.waitForFunction(() => document.querySelectorAll("#runs-body tr").length === 56);
  const latest = await api("POST", "/runs", { input: {}, steps: [{ kind: "template", template: "latest" }] });
  await page.locator(`tr[data-run="${latest.id}"] .status-succeeded`).waitFor();
  await page.waitForTimeout(600); // the last debounced refresh
  const shownRows = await rows.count();
  if (shownRows !== 57) fail(`after a live update the runs list shows ${shownRows} rows, expected 57`);
  if (!(await page.locator("#runs-more").isHidden())) fail("Load more is offered with every run shown");

  if (approval) {
    // A run that waits for a person: it appears as waiting, is approved in
    // the inbox with a comment, and succeeds.
    await page.getByRole("link", { name: "Runs", exact: true }).click();
    await page.getByRole("heading", { name: "Runs" }).waitFor();
    const run = await api("POST", "/runs", {
      input: { name: "Ada" },
      steps: [
        { kind: "template", template: "Hello, {{input.name}}!" },
        { kind: "approval", prompt: "Publish {{prev}}?", timeout_s: 3600, on_timeout: "reject" },
        { kind: "template", template: "Published: {{steps.0.output}}" },
      ],
    });
    const waiting = page.locator(`tr[data-run="${run.id}"]`);
    await waiting.locator(".status-waiting").waitFor();
    // The run page offers the decision too, with the rendered prompt.
    await waiting.getByRole("link").click();
    await page.locator('#run-facts[data-status="waiting"]').waitFor();
    const offered = await page.locator("#run-decision .prompt").textContent();
    if (offered !== "Publish Hello, Ada!?") fail(`the run page offers ${JSON.stringify(offered)}`);
    // A second waiting run whose prompt is markup: user text is shown as
    // text, never parsed as HTML.
    const markup = '<img src="x" id="injected"><b>bold</b>';
    const other = await api("POST", "/runs", {
      input: { note: markup },
      steps: [{ kind: "approval", prompt: "Accept {{input.note}}?", timeout_s: 3600 }],
    });
    await page.getByRole("link", { name: "Approvals" }).click();
    const card = page.locator(`li.card[data-run="${run.id}"]`);
    await card.waitFor();
    const otherCard = page.locator(`li.card[data-run="${other.id}"]`);
    await otherCard.waitFor();
    const prompt = await card.locator(".prompt").textContent();
    if (!prompt.includes("Publish Hello, Ada!?")) fail(`the prompt reads ${JSON.stringify(prompt)}`);
    // Each card says whose run it is (the admin key "ui" is its own tenant).
    const meta = await card.locator(".meta").textContent();
    if (!meta.startsWith("Tenant ui · ")) fail(`the card does not name the run's tenant: ${JSON.stringify(meta)}`);
    const shownMarkup = await otherCard.locator(".prompt").textContent();
    if (shownMarkup !== `Accept ${markup}?`) fail(`a markup prompt reads ${JSON.stringify(shownMarkup)}`);
    if ((await page.locator("#injected, #approvals-list b").count()) !== 0) fail("a prompt was parsed as HTML");
    // Several cards each have an Approve and a Reject button: each button's
    // description says which run and step it decides.
    const undescribed = await page.evaluate(() =>
      [...document.querySelectorAll("#approvals-list li.card")].flatMap((c) =>
        [...c.querySelectorAll("button")]
          .filter((b) => {
            const ids = (b.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean);
            const text = ids.map((id) => (document.getElementById(id) || {}).textContent || "").join(" ");
            return !text.includes(c.dataset.run) || !text.includes(`step ${c.dataset.step}`);
          })
          .map((b) => `${b.textContent} of ${c.dataset.run}`),
      ),
    );
    if (undescribed.length) fail(`buttons that do not say what they decide: ${undescribed}`);
    await card.getByLabel("Comment (recorded with the decision)").fill("Looks right to me");
    if (docs) await page.screenshot({ path: docs });
    // Decide with the keyboard: the focus is not lost when the card goes.
    await card.getByRole("button", { name: "Approve" }).focus();
    await page.keyboard.press("Enter");
    await card.waitFor({ state: "detached" });
    const focusLost = await page.evaluate(() => !document.activeElement || document.activeElement === document.body);
    if (focusLost) fail("the focus was lost after a decision in the inbox");
    await page.goto(`${base}/console#/runs/${run.id}`);
    await page.locator('#run-facts[data-status="succeeded"]').waitFor();
    await page.locator('#timeline li[data-event="step.approved"]').waitFor();
    const detail = await api("GET", `/runs/${run.id}`);
    if (detail.status !== "succeeded") fail(`the approved run is ${detail.status}`);
    if (detail.output !== "Published: Hello, Ada!") fail(`the approved run's output is ${JSON.stringify(detail.output)}`);
    if (!detail.steps[1].output || detail.steps[1].output.approved !== true) {
      fail(`the approval step's output is ${JSON.stringify(detail.steps[1].output)}`);
    }
    // More pending approvals than one page of the API: the inbox shows them
    // all (the markup one and 50 more), not the oldest page only.
    for (let i = 0; i < 50; i += 1) {
      await api("POST", "/runs", { input: {}, steps: [{ kind: "approval", prompt: `Batch ${i}?`, timeout_s: 3600 }] });
      await new Promise((r) => setTimeout(r, 100));
    }
    const inboxFull = Date.now() + TIMEOUT;
    while ((await api("GET", "/approvals?status=pending&limit=200")).approvals.length < 51) {
      if (Date.now() > inboxFull) fail("the 50 approval runs did not reach their approval step");
      await new Promise((r) => setTimeout(r, 250));
    }
    await page.getByRole("link", { name: "Approvals" }).click();
    await page.locator(`li.card[data-run="${other.id}"]`).waitFor();
    await page.waitForTimeout(600); // the last debounced refresh
    const cards = await page.locator("#approvals-list li.card").count();
    if (cards !== 51) fail(`the inbox shows ${cards} of 51 pending approvals`);
  } else if (docs) {
    await page.screenshot({ path: docs });
  }

  // The all-runs stream starts at "now": what happens between listing the
  // runs and the stream's start must still show. Hold the stream back, and
  // let a run come and go meanwhile.
  await page.route("**/api/v2/events/stream*", async (route) => {
    await new Promise((r) => setTimeout(r, 1500));
    await route.continue();
  });
  await page.goto(`${base}/console#/runs`);
  await page.locator("#runs-body tr").first().waitFor(); // listed
  const between = await api("POST", "/runs", { input: {}, steps: [{ kind: "template", template: "between" }] });
  await page.locator(`tr[data-run="${between.id}"] .status-succeeded`).waitFor({ timeout: 5000 })
    .catch(() => fail("a run that finished before the stream opened is not shown"));
  await page.unroute("**/api/v2/events/stream*");
  if (problems.length) fail(problems.join("\n"));
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`console scenario passed${approval ? " (with an approval)" : ""}`);
} catch (e) {
  if (page) await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  console.error(e.stack || String(e));
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
