// Drives the playground through the Chrome DevTools Protocol (no packages:
// Node's fetch and WebSocket). Usage:
//   node [--experimental-websocket] playground_check.mjs DEVTOOLS_PORT PAGE_URL COMPARE_URL OUT_DIR
// Loads PAGE_URL (which auto-runs a streamed generation), takes a screenshot
// while a picture is still forming if it catches one, waits for the end,
// checks the DOM for adapter-coloured text and a finished picture, saves
// playground.png, then runs the compare view and saves compare.png.
import { writeFileSync } from "node:fs";

const [port, pageUrl, compareUrl, out] = process.argv.slice(2);
const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
const page = targets.find((t) => t.type === "page");
if (!page) throw new Error("no page target");
const ws = new WebSocket(page.webSocketDebuggerUrl);
await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
let nextId = 1;
const pending = new Map();
ws.onmessage = (m) => {
  const msg = JSON.parse(m.data);
  if (msg.id && pending.has(msg.id)) {
    const { ok, fail } = pending.get(msg.id);
    pending.delete(msg.id);
    msg.error ? fail(new Error(JSON.stringify(msg.error))) : ok(msg.result);
  }
};
const send = (method, params = {}) => new Promise((ok, fail) => {
  const id = nextId++;
  pending.set(id, { ok, fail });
  ws.send(JSON.stringify({ id, method, params }));
});
const evaluate = async (expr) => (await send("Runtime.evaluate", { expression: expr, returnByValue: true })).result.value;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const screenshot = async (file) => {
  const { data } = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(`${out}/${file}`, Buffer.from(data, "base64"));
  console.log(`ok: screenshot ${out}/${file}`);
};
async function waitFor(what, expr, timeoutMs = 120000, onPoll = async () => {}) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await evaluate(expr)) return;
    await onPoll();
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

await send("Page.enable");
await send("Runtime.enable");
await send("Emulation.setDeviceMetricsOverride", { width: 1280, height: 1100, deviceScaleFactor: 1, mobile: false });

let failed = 0;
const check = (what, ok) => { console.log(`${ok ? "ok" : "FAILED"}: ${what}`); if (!ok) failed++; };

await send("Page.navigate", { url: pageUrl });
let caughtForming = false;
await waitFor("the generation to finish", "document.getElementById('output')?.dataset.done === '1' || !!document.querySelector('#stats .error')",
  120000, async () => {
    if (!caughtForming && (await evaluate("!!document.querySelector('#output img.forming')"))) {
      caughtForming = true;
      await screenshot("playground_forming.png");
    }
  });
const dom = await evaluate(`JSON.stringify({
  error: document.querySelector('#stats .error')?.textContent || null,
  spans: document.querySelectorAll('#output span.tok').length,
  coloured: [...document.querySelectorAll('#output span.tok')].filter((s) => s.style.background).length,
  finals: [...document.querySelectorAll('#output img.final')].filter((i) => i.src.startsWith('data:image/png;base64,') && i.naturalWidth > 0).length,
  stats: document.getElementById('stats').textContent,
  legend: document.getElementById('legend').textContent,
})`);
const d = JSON.parse(dom);
writeFileSync(`${out}/dom.json`, JSON.stringify(d, null, 2));
check(`no error shown (${d.error})`, d.error === null);
check(`text streamed in as ${d.spans} spans coloured by adapter (${d.legend})`, d.spans > 0 && d.coloured === d.spans);
check(`${d.finals} finished picture(s) shown`, d.finals > 0);
check("the stats line names passes and token rows", /passes \d+ · token rows \d+/.test(d.stats));
console.log(`${caughtForming ? "ok" : "note"}: ${caughtForming ? "caught a picture while it formed" : "the picture formed between polls"}`);
await screenshot("playground.png");

await send("Page.navigate", { url: compareUrl });
await waitFor("the comparison", "!!document.querySelector('#identical .badge') || !!document.querySelector('#compare .error')");
const runs = await evaluate("document.querySelectorAll('#compare h3').length");
check(`compare view shows ${runs} runs side by side`, runs >= 2);
await screenshot("compare.png");
ws.close();
process.exit(failed ? 1 : 0);
