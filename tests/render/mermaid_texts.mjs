// Parse Mermaid diagrams with Mermaid's own parser and report, for each, what a reader would see:
// the parse error (or null), the configuration its directives set (must stay empty: a flowdsl
// diagram carries none), and the text of every vertex, edge and subgraph label, decoded as
// Mermaid's renderer decodes it (entities, then HTML), and the shape it reads for each vertex id
// ({id: type}: "square", "hexagon", "odd" for the flag ``>"..."]``...). Used by
// tests/render/test_mermaid_parser.py.
// Run with the cwd at tests/mermaid (its node_modules) and this file given through --eval.
// stdin: {name: diagram text}; stdout: {name: {error, config, texts, shapes}}.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });

const shown = (html) => {  // Mermaid's entity placeholders back to HTML entities, then the HTML's text
  const el = document.createElement("div");
  el.innerHTML = String(html ?? "").replace(/ﬂ°°/g, "&#").replace(/ﬂ°/g, "&").replace(/¶ß/g, ";")
    .replace(/<br\s*\/?>/gi, "\n");
  return el.textContent;
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = {};
for (const [name, text] of Object.entries(JSON.parse(input))) {
  try {
    const parsed = await mermaid.parse(text);
    if (!parsed || parsed.diagramType !== "flowchart-v2") {
      results[name] = { error: `not a flowchart: ${JSON.stringify(parsed)}`, config: null, texts: [], shapes: {} };
      continue;
    }
    const { db } = await mermaid.mermaidAPI.getDiagramFromText(text);
    const texts = [...db.getVertices().values()].map((v) => shown(v.text));
    texts.push(...db.getEdges().filter((e) => e.text).map((e) => shown(e.text)));
    texts.push(...db.getSubGraphs().map((s) => shown(s.title)));
    const shapes = Object.fromEntries([...db.getVertices().values()].map((v) => [v.id, v.type]));
    results[name] = { error: null, config: parsed.config ?? {}, texts, shapes };
  } catch (err) {
    results[name] = { error: String((err && err.message) || err), config: null, texts: [], shapes: {} };
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
