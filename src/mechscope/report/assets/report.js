/* mechscope circuit report: hover tooltips and node/edge highlighting (inlined at render time).
 * Tooltip text comes from each element's SVG <title> child; the <title> is moved into a JS map so
 * the browser's native tooltip does not show twice. Text is only ever set via textContent. */
(function () {
  "use strict";
  var tip = document.getElementById("tooltip");
  var graph = document.getElementById("circuit-graph");
  var texts = new WeakMap();
  var els = document.querySelectorAll(".tip");
  for (var i = 0; i < els.length; i++) {
    var t = els[i].querySelector(":scope > title");
    if (t) { texts.set(els[i], t.textContent); t.remove(); }
  }

  // node name -> edges touching it (edges list their nodes in data-n)
  var byNode = {};
  if (graph) {
    var edges = graph.querySelectorAll(".edge");
    for (var j = 0; j < edges.length; j++) {
      var names = (edges[j].getAttribute("data-n") || "").split(" ");
      for (var k = 0; k < names.length; k++) {
        (byNode[names[k]] = byNode[names[k]] || []).push(edges[j]);
      }
    }
  }
  var lit = [];
  function unfocus() {
    for (var i = 0; i < lit.length; i++) lit[i].classList.remove("hl");
    lit = [];
    if (graph) graph.classList.remove("focus");
  }
  function focusNode(name) {
    unfocus();
    lit = byNode[name] || [];
    for (var i = 0; i < lit.length; i++) lit[i].classList.add("hl");
    graph.classList.add("focus");
  }

  function place(ev) {
    var pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    var x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + w > window.innerWidth - 4) x = ev.clientX - w - pad;
    if (y + h > window.innerHeight - 4) y = ev.clientY - h - pad;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".tip") : null;
    if (!el || !texts.has(el)) return;
    tip.textContent = texts.get(el);
    tip.hidden = false;
    place(ev);
    if (graph && (el.classList.contains("node") || el.classList.contains("kv"))) focusNode(el.getAttribute("data-n"));
  });
  document.addEventListener("mousemove", function (ev) { if (!tip.hidden) place(ev); });
  document.addEventListener("mouseout", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".tip") : null;
    if (!el || (ev.relatedTarget && el.contains(ev.relatedTarget))) return;
    tip.hidden = true;
    unfocus();
  });

  var toggle = document.getElementById("show-context");
  if (toggle && graph) {
    toggle.addEventListener("change", function () { graph.classList.toggle("show-ctx", toggle.checked); });
  }
})();
