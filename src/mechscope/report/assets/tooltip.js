/* mechscope reports: hover text (inlined into pages that list tooltip.js). Each SVG element's
 * <title> child is moved into a map, so the browser's native tooltip does not show twice, and
 * shown in #tooltip while the pointer is over the element. Text is only ever set via textContent. */
(function () {
  "use strict";
  var tip = document.getElementById("tooltip");
  if (!tip) return;
  var texts = new WeakMap();
  var titles = document.querySelectorAll("svg title");
  for (var i = 0; i < titles.length; i++) {
    var el = titles[i].parentNode;
    if (el && el.tagName.toLowerCase() !== "svg") { texts.set(el, titles[i].textContent); titles[i].remove(); }
  }
  function owner(node) {  // the nearest element (or ancestor) with hover text
    while (node && node.nodeType === 1) {
      if (texts.has(node)) return node;
      node = node.parentNode;
    }
    return null;
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
    var el = owner(ev.target);
    if (!el) return;
    tip.textContent = texts.get(el);
    tip.hidden = false;
    place(ev);
  });
  document.addEventListener("mousemove", function (ev) { if (!tip.hidden) place(ev); });
  document.addEventListener("mouseout", function (ev) {
    var el = owner(ev.target);
    if (!el || (ev.relatedTarget && el.contains(ev.relatedTarget))) return;
    tip.hidden = true;
  });
})();
