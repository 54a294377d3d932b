// Render LaTeX strings with KaTeX: reads a JSON list on stdin, prints a JSON list with
// null for each formula that renders and the error message for each that does not.
// Used by tests/test_printing.py; install with: cd tools/katex && npm install
const katex = require("katex");
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const out = JSON.parse(input).map((tex) => {
    try {
      katex.renderToString(tex, { displayMode: true, throwOnError: true, strict: "error" });
      return null;
    } catch (e) {
      return String(e.message || e);
    }
  });
  process.stdout.write(JSON.stringify(out));
});
