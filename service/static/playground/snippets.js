// "Copy as curl / Python / TypeScript": the request the form would send, as code. The key is never
// included: every snippet reads it from $EDITSERVE_API_KEY.

const pyLiteral = (value, indent = "") => {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map((v) => pyLiteral(v, indent)).join(", ")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v, indent)}`).join(", ")}}`;
};
const shellQuote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;

/** `request` is the JSON body (kind included); `imageName` the chosen file's name for IP2P. */
export function snippet(language, baseUrl, request, imageName = "photo.png") {
  const { kind, ...fields } = request;
  const body = JSON.stringify(request);
  if (language === "curl") {
    const head = `curl -sS ${shellQuote(`${baseUrl}/v1/edits`)} \\\n  -H "Authorization: Bearer $EDITSERVE_API_KEY"`;
    if (kind === "ip2p") return `${head} \\\n  -F ${shellQuote(`request=${body}`)} \\\n  -F ${shellQuote(`image=@${imageName}`)}`;
    return `${head} \\\n  -H 'Content-Type: application/json' \\\n  -d ${shellQuote(body)}`;
  }
  if (language === "python") {
    const lines = ["from editserve import Client", "", `client = Client(${JSON.stringify(baseUrl)})  # key: $EDITSERVE_API_KEY`];
    if (kind === "p2p") {
      const { source_prompt, target_prompts, ...rest } = fields;
      const args = [pyLiteral(source_prompt), pyLiteral(target_prompts),
                    ...Object.entries(rest).map(([k, v]) => `${k}=${pyLiteral(v)}`)];
      lines.push(`edit = client.submit_p2p(${args.join(", ")})`);
    } else {
      const { instruction, ...rest } = fields;
      const args = [pyLiteral(imageName), pyLiteral(instruction), ...Object.entries(rest).map(([k, v]) => `${k}=${pyLiteral(v)}`)];
      lines.push(`edit = client.submit_ip2p(${args.join(", ")})`);
    }
    lines.push("done = client.wait(edit.id)", 'client.download(done, "out/")');
    return lines.join("\n");
  }
  const lines = ['import { EditserveClient } from "@editserve/client";',
                 ...(kind === "ip2p" ? ['import { readFileSync } from "node:fs";'] : []), "",
                 `const client = new EditserveClient({ baseUrl: ${JSON.stringify(baseUrl)} }); // key: $EDITSERVE_API_KEY`];
  if (kind === "p2p") {
    const { source_prompt, target_prompts, ...rest } = fields;
    lines.push(`const edit = await client.submitP2P(${JSON.stringify(source_prompt)}, ${JSON.stringify(target_prompts)}, ${JSON.stringify(rest)});`);
  } else {
    const { instruction, ...rest } = fields;
    lines.push(`const edit = await client.submitIP2P(readFileSync(${JSON.stringify(imageName)}), ${JSON.stringify(instruction)}, ${JSON.stringify({ ...rest, filename: imageName })});`);
  }
  lines.push("const done = await client.wait(edit, { onProgress: (e) => console.log(e.status, e.progress) });",
             "console.log(done.results.map((r) => r.url));");
  return lines.join("\n");
}
