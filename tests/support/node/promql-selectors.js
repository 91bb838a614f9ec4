// What each PromQL expression queries, parsed with the Prometheus project's own grammar
// (@prometheus-io/lezer-promql, the parser of Prometheus's web UI): for every expression on
// stdin (a JSON array of strings), the metric selectors (name and matcher label names), the
// grouping clauses (by / without / on / ignoring) with the selectors they group, and any
// syntax error. Prints a JSON array in the same order.
"use strict";

const { parser } = require("@prometheus-io/lezer-promql");

function text(q, node) {
  return q.slice(node.from, node.to);
}

function selectorsUnder(q, node) {
  const found = [];
  const cursor = node.cursor();
  const end = node.to;
  do {
    if (cursor.from >= end) break;
    if (cursor.name === "VectorSelector") {
      const sel = { name: null, labels: [] };
      const inner = cursor.node.cursor();
      inner.firstChild();
      do {
        if (inner.name === "Identifier") sel.name = text(q, inner);
        if (inner.name === "LabelMatchers") {
          const m = inner.node.cursor();
          m.iterate((n) => {
            if (n.name === "LabelName") sel.labels.push(text(q, n));
            if (n.name === "QuotedLabelName") sel.labels.push(JSON.parse(text(q, n)));
          });
        }
      } while (inner.nextSibling());
      found.push(sel);
    }
  } while (cursor.next());
  return found;
}

function analyse(q) {
  const tree = parser.parse(q);
  const out = { expr: q, errors: [], selectors: [], groupings: [] };
  tree.iterate({
    enter: (n) => {
      if (n.type.isError) out.errors.push(`syntax error at ${n.from}: ${JSON.stringify(q.slice(n.from, n.from + 20))}`);
      if (n.name === "AggregateModifier" || n.name === "MatchingModifierClause") {
        const labels = [];
        n.node.cursor().iterate((c) => {
          if (c.name === "LabelName") labels.push(text(q, c));
        });
        const scope = n.node.parent; // the aggregation, or the binary expression being matched
        const clause = text(q, n.node.firstChild);
        out.groupings.push({ clause, labels, selectors: selectorsUnder(q, scope).map((s) => s.name) });
      }
    },
  });
  out.selectors = selectorsUnder(q, tree.topNode);
  return out;
}

let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  process.stdout.write(JSON.stringify(JSON.parse(input).map(analyse)));
});
