/* mechscope circuit page: node/edge highlighting and the context-edge toggle (inlined after
 * tooltip.js). Hovering a node or KV bracket dims every edge but the ones listing it in data-n. */
(function () {
  "use strict";
  var graph = document.getElementById("circuit-graph");
  if (!graph) return;
  var byNode = {};  // node name -> edges touching it (edges list their nodes in data-n)
  var edges = graph.querySelectorAll(".edge");
  for (var j = 0; j < edges.length; j++) {
    var names = (edges[j].getAttribute("data-n") || "").split(" ");
    for (var k = 0; k < names.length; k++) {
      (byNode[names[k]] = byNode[names[k]] || []).push(edges[j]);
    }
  }
  var lit = [];
  function unfocus() {
    for (var i = 0; i < lit.length; i++) lit[i].classList.remove("hl");
    lit = [];
    graph.classList.remove("focus");
  }
  function target(ev) { return ev.target.closest ? ev.target.closest(".node, .kv") : null; }
  graph.addEventListener("mouseover", function (ev) {
    var el = target(ev);
    if (!el) return;
    unfocus();
    lit = byNode[el.getAttribute("data-n")] || [];
    for (var i = 0; i < lit.length; i++) lit[i].classList.add("hl");
    graph.classList.add("focus");
  });
  graph.addEventListener("mouseout", function (ev) {
    var el = target(ev);
    if (!el || (ev.relatedTarget && el.contains(ev.relatedTarget))) return;
    unfocus();
  });
  var toggle = document.getElementById("show-context");
  if (toggle) {
    toggle.addEventListener("change", function () { graph.classList.toggle("show-ctx", toggle.checked); });
  }
})();
