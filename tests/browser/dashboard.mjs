// The dashboard in headless Chromium: every page loads without console errors, the overview's
// charts gain points while load runs, the live view shows the messages being published, and the
// clients page's Disconnect button disconnects the client. Screenshots go to docs/.
//
// node dashboard.mjs BASE_URL CLIENT_ID LIVE_TOPIC SCREENSHOT_DIR
// Prints one JSON line with what it saw; exits 1 on the first failed check.
import { chromium } from "playwright-core";

const [base, clientId, liveTopic, shots] = process.argv.slice(2);
const WAIT = 15000;
const errors = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));

  await page.goto(base + "/#overview");
  // The charts gain points, and the "in" series shows the load (a rate above zero).
  await page.waitForFunction(() => {
    const c = window.sluiceCharts && window.sluiceCharts.messages;
    return c && c.data[0].length >= 3 && c.data[1].some((v) => v > 0);
  }, null, { timeout: WAIT });
  result.overviewPoints = await page.evaluate(() => window.sluiceCharts.messages.data[0].length);
  await page.screenshot({ path: shots + "/dashboard-overview.png" });

  await page.click('nav a[data-page="mappings"]');
  await page.waitForSelector("#out-mappings tbody tr", { timeout: WAIT });
  await page.waitForSelector("#in-mappings tbody tr", { timeout: WAIT });
  await page.waitForFunction(() => window.sluiceCharts && document.querySelector("#chart-mappings canvas"), null, { timeout: WAIT });
  await page.screenshot({ path: shots + "/dashboard-mappings.png" });

  await page.click('nav a[data-page="clusters"]');
  await page.waitForSelector("#clusters tbody tr", { timeout: WAIT });
  result.clusterState = await page.textContent("#clusters tbody tr td:nth-child(2)");
  await page.screenshot({ path: shots + "/dashboard-clusters.png" });

  await page.click('nav a[data-page="live"]');
  await page.fill("#live-filter", liveTopic);
  await page.click("#live-start");
  await page.waitForSelector("#live tbody tr.live-row", { timeout: WAIT });
  result.liveRow = await page.textContent("#live tbody tr.live-row");
  await page.screenshot({ path: shots + "/dashboard-live.png" });
  await page.click("#live-stop");

  await page.click('nav a[data-page="clients"]');
  await page.fill("#client-q", clientId);
  await page.click('#client-search button[type="submit"]');
  const button = `button.disconnect[data-client="${clientId}"]`;
  await page.waitForSelector(button, { timeout: WAIT });
  await page.click(`#clients a.client-link:text-is("${clientId}")`);
  await page.waitForFunction(() => document.querySelector("#client-details").textContent.includes("subscriptions"), null, { timeout: WAIT });
  await page.screenshot({ path: shots + "/dashboard-clients.png" });
  await page.click(button);
  await page.waitForSelector(button, { state: "detached", timeout: WAIT });
  result.disconnected = true;
} catch (e) {
  result.failure = String(e);
  try { result.status = await browser.contexts()[0].pages()[0].textContent("#status"); } catch (_) {}
} finally {
  await browser.close();
}
result.consoleErrors = errors;
console.log(JSON.stringify(result));
process.exit(result.failure || errors.length ? 1 : 0);
