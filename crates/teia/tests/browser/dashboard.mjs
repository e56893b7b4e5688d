// Drives teia's dashboard in headless Chromium against the real nodes that
// crates/teia/tests/dashboard.rs started, and prints one line per check passed (`ok NAME`)
// and the figures it measured (`figure NAME VALUE`). Any failed check throws: the process
// exits non-zero with the reason. Screenshots go to $SHOTS.
//
// Inputs (environment): ANA_LINK, BOB_LINK (the dashboards' links with their tokens),
// BOB_ID, ODD_ID (a peer named `<script>…`), EVAL_ZIP, JOB_ZIP (paths), SHOTS (a folder),
// CHROMIUM (the browser; /usr/bin/chromium by default).
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const [anaLink, bobLink, bobId, oddId] = ["ANA_LINK", "BOB_LINK", "BOB_ID", "ODD_ID"].map(env);
const shots = env("SHOTS");
const PATIENCE = 60_000;

const ok = (name) => console.log(`ok ${name}`);
const check = (condition, what) => {
  if (!condition) throw new Error(`check failed: ${what}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

// A page whose script errors and dialogs fail the run (an injected script would show one).
async function open(link, viewport = { width: 1280, height: 860 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(PATIENCE);
  page.on("dialog", (dialog) => { console.log(`dialog: ${dialog.message()}`); process.exit(3); });
  page.on("pageerror", (error) => { console.log(`page error: ${error.message}`); process.exit(4); });
  const response = await page.goto(link);
  return { context, page, response };
}

async function view(page, name) {
  await page.click(`#tab-${name}`);
  await page.waitForSelector(`#${name}:not([hidden])`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

try {
  // 1. Without the token: refused.
  const origin = new URL(anaLink).origin;
  const anonymous = await open(`${origin}/`);
  check(anonymous.response.status() === 403, `the page without the token answers ${anonymous.response.status()}`);
  const api = await anonymous.page.evaluate(async () => (await fetch("/api/peers")).status);
  check(api === 403, `/api/peers without the token answers ${api}`);
  await anonymous.context.close();
  ok("refused_without_the_token");

  // 2. The link logs in, and drops the token from the address.
  const ana = await open(anaLink);
  check(!ana.page.url().includes("token="), `the address keeps the token: ${ana.page.url()}`);
  const cookies = await ana.context.cookies();
  const cookie = cookies.find((c) => c.name.startsWith("teia_session_"));
  check(cookie && cookie.httpOnly && cookie.sameSite === "Strict" && cookie.expires === -1 && !anaLink.includes(cookie.value), `cookie ${JSON.stringify(cookie)}`);
  await ana.page.waitForSelector("#live.on");
  ok("logged_in_live");

  // The first load, as the browser counted it.
  const loaded = await ana.page.evaluate(() => {
    const navigation = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource").filter((r) => /\/(app\.js|app\.css)$/.test(r.name));
    const bytes = [navigation, ...resources].reduce((sum, r) => sum + r.transferSize, 0);
    const ms = Math.max(navigation.loadEventEnd, ...resources.map((r) => r.responseEnd)) - navigation.startTime;
    return { bytes, ms };
  });
  check(loaded.bytes < 200 * 1024, `first load ${loaded.bytes} bytes`);
  console.log(`figure first_load_bytes ${loaded.bytes}`);
  console.log(`figure first_load_ms ${loaded.ms.toFixed(1)}`);

  // 3. Network: this node and its two links, the odd name as text.
  await view(ana.page, "network");
  await ana.page.waitForSelector(`#graph g.peer[data-peer="${bobId}"]`);
  await ana.page.waitForFunction((id) => [...document.querySelectorAll("#graph g.peer")]
    .some((g) => g.dataset.peer === id), oddId);
  const graph = await ana.page.evaluate((id) => ({
    peers: document.querySelectorAll("#graph g.peer").length,
    odd: [...document.querySelectorAll("#graph g.peer text")].some((t) => t.textContent === id),
    scripts: document.querySelectorAll("main script, main img").length,
  }), oddId);
  check(graph.peers === 3, `the graph shows ${graph.peers} nodes`);
  check(graph.odd && graph.scripts === 0, `the odd name as text: ${JSON.stringify(graph)}`);
  await ana.page.waitForSelector(`#links tr[data-peer="${bobId}"]`);
  await shot(ana.page, "network");
  ok("network_graph_three_nodes");
  ok("odd_peer_name_is_text");

  // 4. Chat: typed in ana's page, shown in bob's page (the terminal node is checked by the
  // test that started this script).
  const bob = await open(bobLink);
  await bob.page.waitForSelector("#live.on");
  await view(bob.page, "chat");
  await view(ana.page, "chat");
  const said = "hello from the page <script>alert(1)</script><img src=x onerror=alert(2)>";
  await ana.page.fill("#say-to", "*");
  await ana.page.fill("#say-text", said);
  await ana.page.press("#say-text", "Enter");
  await ana.page.waitForFunction((text) => [...document.querySelectorAll("#messages .msg.out .text")]
    .some((t) => t.textContent === text), said);
  await bob.page.waitForFunction((text) => [...document.querySelectorAll("#messages .msg.in .text")]
    .some((t) => t.textContent === text), said);
  const injected = await bob.page.evaluate(() => document.querySelectorAll("#messages script, #messages img").length);
  check(injected === 0, `${injected} elements injected in bob's chat`);
  console.log(`said ${JSON.stringify(said)}`);
  // A direct message shows its delivery.
  await ana.page.fill("#say-to", bobId);
  await ana.page.fill("#say-text", "direct to bob");
  await ana.page.click("#say button[type=submit]");
  await ana.page.waitForSelector("#messages .msg.out .state.delivered");
  await bob.page.waitForFunction(() => [...document.querySelectorAll("#messages .msg.in .text")]
    .some((t) => t.textContent === "direct to bob"));
  await shot(ana.page, "chat");
  await shot(bob.page, "chat-other-node");
  ok("chat_between_pages");
  ok("chat_delivery_state");

  // A change without the page's CSRF header is refused, even with the cookie.
  const forged = await ana.page.evaluate(async () => (await fetch("/api/chat", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ to: "*", text: "no csrf" }),
  })).status);
  check(forged === 403, `a POST without X-Teia-Csrf answers ${forged}`);
  ok("change_without_csrf_refused");

  // 5. Files: search, get, a progress bar to the end; the odd file name as text.
  await view(ana.page, "files");
  await ana.page.fill("#search-text", "big");
  await ana.page.click("#search button");
  const row = `#results tr:has(td:text-is("${bobId}"))`;
  await ana.page.waitForSelector(row);
  await ana.page.click(`${row} button`);
  await ana.page.waitForSelector("#downloads tr.done progress[value='100']");
  await shot(ana.page, "files");
  ok("file_fetched_with_progress");
  await ana.page.fill("#search-text", "onerror");
  await ana.page.click("#search button");
  await ana.page.waitForFunction(() => [...document.querySelectorAll("#results td")]
    .some((td) => td.textContent.includes("<img src=x onerror=alert(1)>")));
  check(await ana.page.evaluate(() => document.querySelectorAll("#results img").length) === 0, "an img in the results");
  ok("odd_file_name_is_text");

  // 6. Evaluations: a ZIP dropped on the page, graded.
  await view(ana.page, "evaluations");
  const zip = readFileSync(env("EVAL_ZIP")).toString("base64");
  const dataTransfer = await ana.page.evaluateHandle((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], "projects.zip", { type: "application/zip" }));
    return transfer;
  }, zip);
  await ana.page.dispatchEvent("#drop", "drop", { dataTransfer });
  await ana.page.waitForFunction(() => {
    const title = document.querySelector("#eval-detail h2");
    return title && title.textContent.endsWith(": done");
  });
  const grades = await ana.page.evaluate(() => [...document.querySelectorAll("#eval-detail .project h3")].map((h) => h.textContent));
  check(grades.some((g) => g.startsWith("good: grade 20.00")), `grades ${grades}`);
  check(grades.some((g) => g.startsWith("half: grade 10.00")), `grades ${grades}`);
  const why = await ana.page.evaluate(() => {
    const failure = document.querySelector('#eval-detail [data-test="tests/test_half.py::test_wrong"] pre');
    return failure ? failure.textContent : "";
  });
  check(why.includes("assert 1 == 2"), `the failed test's output: ${JSON.stringify(why)}`);
  await shot(ana.page, "evaluations");
  ok("evaluation_dropped_and_graded");

  // 7. Jobs: a script job's stdout.
  await view(ana.page, "jobs");
  await ana.page.setInputFiles("#job-zip", env("JOB_ZIP"));
  await ana.page.waitForFunction(() => {
    const out = document.querySelector("#job-detail pre.stdout");
    return out && out.textContent.includes("sum 42");
  });
  await shot(ana.page, "jobs");
  ok("job_stdout_shown");

  // 8. At a phone's width and at a wide screen's every view fits; the tabs are reachable
  // from the keyboard.
  for (const width of [1920, 375]) {
    await ana.page.setViewportSize({ width, height: width === 375 ? 740 : 1080 });
    for (const name of ["network", "chat", "files", "evaluations", "jobs"]) {
      await view(ana.page, name);
      const wide = await ana.page.evaluate(() => document.documentElement.scrollWidth);
      check(wide <= width, `${name} is ${wide} px wide at ${width}`);
      await shot(ana.page, `${name}-${width}`);
    }
  }
  await ana.page.focus("#tab-jobs");
  await ana.page.keyboard.press("ArrowRight");
  await ana.page.waitForSelector("#network:not([hidden])");
  check(await ana.page.evaluate(() => document.activeElement.id) === "tab-network", "focus after ArrowRight");
  ok("narrow_and_keyboard");
} finally {
  await browser.close();
}
