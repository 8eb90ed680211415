// Copies the browser half of the compiled client (everything but the Node-only webhooks module) next to
// the playground the gateway serves, so the page uses exactly this client and needs no npm at run time.
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "..", "dist");
const target = join(here, "..", "..", "..", "service", "static", "playground", "lib");
rmSync(target, { recursive: true, force: true });
mkdirSync(target, { recursive: true });
for (const name of readdirSync(dist)) {
  if (name.endsWith(".js") && !name.startsWith("webhooks")) copyFileSync(join(dist, name), join(target, name));
}
