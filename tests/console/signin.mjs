// The console on a listener other machines reach (reads need the token): a browser's navigation carries no
// token, so the page asks for it once, keeps it in the tab's sessionStorage, and fetches every page with it.
// Driven by tests/console.rs. env: BASE, TOKEN, SHOTS. stdout: `ok <step>` lines, then `done`.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const { BASE, TOKEN, SHOTS } = process.env;
mkdirSync(SHOTS, { recursive: true });
const say = (line) => process.stdout.write(line + "\n");
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const fail = async (why) => { say("FAIL " + why); await browser.close(); process.exit(1); };
const expect = async (cond, why) => { if (!cond) await fail(why); };

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const sent = [];
  page.on("request", (r) => sent.push(r.url()));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  const first = await page.goto(`${BASE}/ui/dead-letters`);
  await expect(first.status() === 401, `the first load answered ${first.status()}`);
  await page.waitForSelector("#token input[name=token]");
  await expect((await page.textContent("main")).includes("needs the token"), "no sign-in text");
  await page.screenshot({ path: `${SHOTS}/sign-in.png` });
  say("ok the page asks for the token");

  // A wrong token is asked for again.
  await page.fill("#token input[name=token]", "not-the-token-0123456789");
  await page.click("#token button[type=submit]");
  await page.waitForSelector("#token input[name=token]");
  await expect(!(await page.content()).includes("<h1>Dead letters</h1>"), "a wrong token showed the page");
  say("ok a wrong token shows nothing");

  await page.fill("#token input[name=token]", TOKEN);
  await page.click("#token button[type=submit]");
  await page.waitForSelector("h1 >> text=Dead letters");
  say("ok the token opens the page it was asked on");

  // Links are followed with the token too; the URL never carries it.
  await page.click("nav >> text=Rules");
  await page.waitForSelector("h1 >> text=Rules");
  await expect(page.url().endsWith("/ui/rules"), `the URL is ${page.url()}`);
  await page.goBack();
  await page.waitForSelector("h1 >> text=Dead letters");
  // A new load of the tab (F5) still has the token: sessionStorage, not a variable.
  await page.reload();
  await page.waitForSelector("h1 >> text=Dead letters");
  await page.screenshot({ path: `${SHOTS}/signed-in.png` });
  const stored = await page.evaluate(() => sessionStorage.getItem("switchyard-token"));
  await expect(stored === TOKEN, "the token is not in sessionStorage");
  const cookies = await context.cookies();
  await expect(cookies.length === 0, `cookies were set: ${JSON.stringify(cookies)}`);
  await expect(!sent.some((u) => u.includes(TOKEN)), "a request URL carried the token");
  say("ok links, back and reload keep working with the token in the tab only");

  // Another tab of the same browser starts without it (session storage is per tab).
  const other = await context.newPage();
  const again = await other.goto(`${BASE}/ui`);
  await expect(again.status() === 401, `a new tab got ${again.status()}`);
  say("ok a new tab asks again");

  await expect(errors.length === 0, `page errors: ${errors.join("; ")}`);
  await browser.close();
  say("done");
} catch (e) {
  await fail(String((e && e.stack) || e));
}
