// Drives the operator console of a running `switchyard run` in Debian's headless Chromium, as an operator would:
// driven by tests/console.rs, which prepared the service (a provisioned order, a dead letter of a failed sink,
// a paused route, a broken rules file) and reads this script's stdout.
//
// env: BASE (http://127.0.0.1:PORT), TOKEN, ORDER (a provisioned order id), PAUSED (a paused route),
//      BROKEN (the broken rules file's name), SHOTS (where the screenshots go).
// stdout: one line per step (`ok <step>`), `tap-ready` when the live view listens (the test then publishes an
// event and this script waits for it to show), and a failure message with a nonzero exit otherwise.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";

const { BASE, TOKEN, ORDER, PAUSED, BROKEN, SHOTS } = process.env;
mkdirSync(SHOTS, { recursive: true });
const say = (line) => process.stdout.write(line + "\n");
const stdin = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const fail = async (why) => { say("FAIL " + why); await browser.close(); process.exit(1); };
const expect = async (cond, why) => { if (!cond) await fail(why); };

try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // The refused reload answers 422, which Chromium logs as a failed resource: that one is expected.
  page.on("console", (m) => {
    if (m.type() === "error" && !/status of 422/.test(m.text())) errors.push(m.text() + " at " + JSON.stringify(m.location()));
  });
  const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

  // Overview: the channel streams, and the route counts are those of /metrics.
  await page.goto(`${BASE}/ui`);
  await page.waitForSelector("#channels tr[data-channel='/data/OrderChangeEvent']");
  const channel = await page.textContent("#channels tr[data-channel='/data/OrderChangeEvent']");
  await expect(channel.includes("streaming"), `the channel row says ${channel}`);
  const metrics = await (await fetch(`${BASE}/metrics`)).text();
  const metric = (name, route) => {
    const line = metrics.split("\n").find((l) => l.startsWith(`${name}{route="${route}"}`));
    return line ? Number(line.split(" ").pop()) : 0;
  };
  const rows = await page.$$eval("#routes tr[data-route]", (trs) => trs.map((tr) => ({
    route: tr.dataset.route,
    fired: Number(tr.querySelector("[data-count=fired]").textContent),
    failed: Number(tr.querySelector("[data-count=failed]").textContent),
    dead: Number(tr.querySelector("[data-count=dead-lettered]").textContent),
  })));
  await expect(rows.length > 3, `only ${rows.length} routes on the overview`);
  for (const r of rows) {
    for (const [key, name] of [["fired", "switchyard_route_fired_total"], ["failed", "switchyard_route_failed_total"],
                               ["dead", "switchyard_dead_letters_total"]]) {
      await expect(r[key] === metric(name, r.route), `${r.route} ${key}: page ${r[key]}, /metrics ${metric(name, r.route)}`);
    }
  }
  await expect(rows.find((r) => r.route === "provision-on-activating").fired >= 1, "provision-on-activating never fired");
  await shot("overview");
  say("ok overview matches /metrics");

  // The token, once: kept in sessionStorage, never in the URL.
  await page.fill("#token input[name=token]", TOKEN);
  await page.click("#token button[type=submit]");
  await page.waitForSelector("#token >> text=token set for this tab");
  await expect(!page.url().includes(TOKEN), "the token is in the URL");
  say("ok token kept for the tab");

  // Decisions: the provisioned order's history shows its provision-on-activating decision.
  await page.click("nav >> text=Decisions");
  await page.waitForSelector("form.search");
  await page.fill("#id", ORDER);
  await page.click("form.search button");
  await page.waitForSelector("#history details.entry");
  const history = await page.textContent("#history");
  await expect(history.includes("provision-on-activating: fired"), `the history of ${ORDER}: ${history}`);
  await page.click("#history details.entry summary");
  const lines = await page.textContent("#history details.entry ul.lines");
  await expect(lines.includes("provision-on-activating"), `the expanded entry: ${lines}`);
  await expect(!page.url().includes(TOKEN), "the token is in the URL");
  await shot("decisions");
  say("ok decisions show the order's provisioning");

  // The live tap shows a decision made while the page is open.
  await page.waitForSelector("#tap-status >> text=Live:");
  say("tap-ready");
  await nextLine();
  await page.waitForSelector("#tap li", { timeout: 20000 });
  const tapped = await page.textContent("#tap li");
  await expect(tapped.includes("OrderChangeEvent"), `the tap line: ${tapped}`);
  await shot("decisions-live");
  say("ok the live tap shows a new decision");

  // Dead letters: the failed sink's letter is retried from the page and disappears.
  await page.click("nav >> text=Dead letters");
  await page.waitForSelector("#letters tr[data-letter]");
  await shot("dead-letters");
  const letters = await page.$$eval("#letters tr[data-letter]", (trs) => trs.map((tr) => tr.dataset.letter));
  await expect(letters.length === 1, `expected one dead letter, saw ${letters.length}`);
  await page.click(`#letters tr[data-letter='${letters[0]}'] button.post`);
  await page.waitForSelector("#no-letters");
  const flash = await page.textContent("#flash");
  await expect(flash.includes("done"), `the retry said: ${flash}`);
  await shot("dead-letters-retried");
  say("ok the dead letter was retried and is gone");

  // The paused route is resumed from the overview.
  await page.click("nav >> text=Overview");
  const paused = `#routes tr[data-route='${PAUSED}']`;
  await page.waitForSelector(`${paused}.paused`);
  await shot("overview-paused");
  await page.click(`${paused} button.post`);
  await page.waitForSelector(`${paused}:not(.paused) >> text=running`);
  say("ok the paused route was resumed");

  // Rules: a reload with a broken file is refused, with its file:line.
  await page.click("nav >> text=Rules");
  await page.click("button.post >> text=Reload now");
  await page.waitForSelector("#reloads tr.refused");
  const refusal = await page.textContent("#reloads tr.refused");
  await expect(new RegExp(`${BROKEN}:\\d+:\\d+`).test(refusal), `the refusal: ${refusal}`);
  const flashed = await page.textContent("#flash");
  await expect(flashed.includes("refused"), `the reload said: ${flashed}`);
  await shot("rules-refused");
  say("ok the broken reload shows its file:line");

  // Try an event: a recent one from the journal, explained under the current rules.
  await page.click("nav >> text=Try an event");
  await page.click("ul.recent li a >> nth=0");
  await page.waitForFunction(() => document.querySelector("textarea[name=event]").value.length > 10);
  await page.click("#try button[type=submit]");
  await page.waitForSelector("#explanation");
  const explained = await page.textContent("#explanation");
  await expect(explained.includes("provision-on-activating"), `the explanation: ${explained}`);
  await shot("try");
  say("ok an event from the journal was explained");

  await expect(errors.length === 0, `the page logged errors: ${errors.join("; ")}`);
  await browser.close();
  stdin.close();
  say("done");
} catch (e) {
  await fail(String(e && e.stack || e));
}
