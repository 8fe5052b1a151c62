// Parse Mermaid diagrams with Mermaid's own parser (tests/render/test_mermaid_parser.py).
// stdin: a JSON object {name: diagram text, ...}; stdout: a JSON object {name: null | "error message"}.
// One process for every diagram: Mermaid takes a second or two to load.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });

let input = "";
for await (const chunk of process.stdin) input += chunk;
const diagrams = JSON.parse(input);
const results = {};
for (const [name, text] of Object.entries(diagrams)) {
  try {
    const parsed = await mermaid.parse(text);
    results[name] = parsed && parsed.diagramType === "flowchart-v2" ? null : `not a flowchart: ${JSON.stringify(parsed)}`;
  } catch (err) {
    results[name] = String((err && err.message) || err);
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
