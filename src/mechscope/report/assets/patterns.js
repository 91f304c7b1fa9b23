/* mechscope heads page: show another head's attention pattern in the example heatmap (inlined).
 * The heatmap is drawn by the page with one cell per (query, key) marked data-rc="q,k"; this
 * recolours the cells from the JSON in #patterns (one [query][key] matrix per <option> value)
 * on the sequential scale of toolkit.color (white -> #2563eb) and updates each cell's value in
 * its hover text. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("patterns").textContent);
  var select = document.getElementById("head");
  var cells = document.querySelectorAll("#pattern rect[data-rc]");
  function shade(a) {
    a = Math.max(0, Math.min(1, a));
    return "rgb(" + Math.round(255 - 218 * a) + "," + Math.round(255 - 156 * a) + "," + Math.round(255 - 20 * a) + ")";
  }
  select.addEventListener("change", function () {
    var P = data.patterns[+select.value];
    for (var i = 0; i < cells.length; i++) {
      var rc = cells[i].getAttribute("data-rc").split(","), a = P[+rc[0]][+rc[1]];
      cells[i].setAttribute("fill", shade(a));
      var t = cells[i].querySelector("title");
      if (t) t.textContent = t.textContent.replace(/[^:]*$/, " " + a.toFixed(3));
    }
  });
})();
