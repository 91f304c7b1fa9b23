const doc = JSON.parse(document.getElementById('graph-data').textContent);
const cardsEl = document.getElementById('feature-cards');
const cards = cardsEl ? JSON.parse(cardsEl.textContent) : {};
const qkEl = document.getElementById('qk-data');
const qks = qkEl ? JSON.parse(qkEl.textContent) : [];
const nodes = doc.nodes, links = doc.links;
const byId = new Map(nodes.map(n => [n.node_id, n]));
const NS = 'http://www.w3.org/2000/svg';
const toks = doc.metadata.prompt_tokens;
const P = toks.length;
// Rows: embeddings, then layers, then the logits one row above the deepest other node (the
// schema stores logits at layer n_layers + 1, which would leave an empty row for layer n_layers).
const rawLayer = n => n.layer === 'E' ? -1 : parseInt(n.layer, 10);
const isLogit = n => n.feature_type === 'logit';
const logitRow = Math.max(Math.max(-1, ...nodes.filter(n => !isLogit(n)).map(rawLayer)) + 1,
                          ...nodes.filter(isLogit).map(n => rawLayer(n) - 1));
const layerKey = n => isLogit(n) ? logitRow : rawLayer(n);
const maxLayer = Math.max(0, ...nodes.map(layerKey));
const colW = 92, rowH = 34, padL = 46, padB = 60, padT = 20;
const W = padL + P * colW + 20, H = padT + (maxLayer + 2) * rowH + padB;
const cells = new Map();
for (const n of nodes) {
  const k = layerKey(n) + ':' + n.ctx_idx;
  if (!cells.has(k)) cells.set(k, []);
  cells.get(k).push(n);
}
for (const [k, list] of cells) {
  list.sort((a, b) => (b.activation || 0) - (a.activation || 0));
  list.forEach((n, i) => {
    const span = Math.min(colW - 14, 9 * list.length);
    const x0 = padL + n.ctx_idx * colW + (colW - span) / 2;
    n._x = x0 + (list.length > 1 ? i * span / (list.length - 1) : span / 2);
    n._y = padT + (maxLayer + 1 - layerKey(n)) * rowH;
  });
}
const svg = document.createElementNS(NS, 'svg');
svg.setAttribute('width', W); svg.setAttribute('height', H);
const gEdges = document.createElementNS(NS, 'g'), gNodes = document.createElementNS(NS, 'g');
svg.appendChild(gEdges); svg.appendChild(gNodes);
const maxW = Math.max(1e-12, ...links.map(l => Math.abs(l.weight)));
const incoming = new Map(), outgoing = new Map();
links.forEach((l, i) => {
  const s = byId.get(l.source), t = byId.get(l.target);
  if (!s || !t) return;
  (incoming.get(l.target) || incoming.set(l.target, []).get(l.target)).push(l);
  (outgoing.get(l.source) || outgoing.set(l.source, []).get(l.source)).push(l);
  const p = document.createElementNS(NS, 'path');
  const my = (s._y + t._y) / 2;
  p.setAttribute('d', `M${s._x},${s._y} C${s._x},${my} ${t._x},${my} ${t._x},${t._y}`);
  p.setAttribute('class', 'edge ' + (l.weight >= 0 ? 'pos' : 'neg'));
  p.setAttribute('stroke-width', (0.3 + 4 * Math.abs(l.weight) / maxW).toFixed(2));
  l._el = p; gEdges.appendChild(p);
});
for (const n of nodes) {
  let el;
  if (n.feature_type === 'mlp reconstruction error') {
    el = document.createElementNS(NS, 'rect');
    el.setAttribute('x', n._x - 4); el.setAttribute('y', n._y - 4); el.setAttribute('width', 8); el.setAttribute('height', 8);
  } else {
    el = document.createElementNS(NS, 'circle');
    el.setAttribute('cx', n._x); el.setAttribute('cy', n._y); el.setAttribute('r', n.feature_type === 'logit' ? 7 : 5);
  }
  const kind = {'cross layer transcoder': 'feature', 'mlp reconstruction error': 'error', 'embedding': 'embedding', 'logit': 'logit'}[n.feature_type] || 'feature';
  el.setAttribute('class', 'node ' + kind);
  el.setAttribute('data-id', n.node_id);
  const tip = document.createElementNS(NS, 'title'); tip.textContent = label(n); el.appendChild(tip);
  el.addEventListener('click', () => select(n.node_id));
  n._el = el; gNodes.appendChild(el);
}
toks.forEach((t, i) => {
  const tx = document.createElementNS(NS, 'text');
  tx.setAttribute('x', padL + i * colW + colW / 2); tx.setAttribute('y', H - padB / 2);
  tx.setAttribute('text-anchor', 'middle'); tx.setAttribute('class', 'tok'); tx.textContent = t;
  svg.appendChild(tx);
});
for (let l = -1; l <= maxLayer; l++) {
  const tx = document.createElementNS(NS, 'text');
  tx.setAttribute('x', 4); tx.setAttribute('y', padT + (maxLayer + 1 - l) * rowH + 3); tx.setAttribute('class', 'lay');
  tx.textContent = l < 0 ? 'emb' : (l === logitRow && nodes.some(isLogit) ? 'logit' : 'L' + l);
  svg.appendChild(tx);
}
// QK attributions (--qk): an arc from the key position to the query position at the head's layer
const gQk = document.createElementNS(NS, 'g'); svg.appendChild(gQk);
qks.forEach((q, i) => {
  const y = padT + (maxLayer + 1 - q.layer) * rowH - 6;
  const xk = padL + q.key_pos * colW + colW / 2, xq = padL + q.query_pos * colW + colW / 2;
  const lift = 10 + Math.min(rowH - 6, 4 * Math.abs(q.query_pos - q.key_pos)) + 3 * i;
  const p = document.createElementNS(NS, 'path');
  p.setAttribute('d', q.query_pos === q.key_pos ? `M${xk - 8},${y} a8,8 0 1,1 16,0` : `M${xk},${y} C${xk},${y - lift} ${xq},${y - lift} ${xq},${y}`);
  p.setAttribute('class', 'qkarc');
  p.setAttribute('data-qk', String(i));
  const tip = document.createElementNS(NS, 'title');
  tip.textContent = 'QK L' + q.layer + ' H' + q.head + ': query @' + q.query_pos + ' reads key @' + q.key_pos + ' (click)';
  p.appendChild(tip);
  p.addEventListener('click', e => { e.stopPropagation(); selectQk(q, p); });
  gQk.appendChild(p);
});
function selectQk(q, arc) {
  const qs = new Set(q.query_side.map(c => c.id)), ks = new Set(q.key_side.map(c => c.id));
  nodes.forEach(m => {
    m._el.classList.toggle('dim', !qs.has(m.node_id) && !ks.has(m.node_id));
    m._el.classList.toggle('qkq', qs.has(m.node_id)); m._el.classList.toggle('qkk', ks.has(m.node_id));
    m._el.classList.remove('sel');
  });
  links.forEach(l => l._el && l._el.classList.add('dim'));
  gQk.querySelectorAll('.qkarc').forEach(a => a.classList.toggle('sel', a === arc));
  const side = document.getElementById('side');
  side.replaceChildren();
  const h = document.createElement('h3');
  h.textContent = 'QK: layer ' + q.layer + ', head ' + q.head + ', query @' + q.query_pos + ' reads key @' + q.key_pos;
  side.appendChild(h);
  const facts = document.createElement('table'); const fb = document.createElement('tbody'); facts.appendChild(fb);
  row(fb, 'score', q.score.toFixed(3)); row(fb, 'attention weight', q.weight.toFixed(3));
  side.appendChild(facts);
  for (const [title, list] of [['largest query x key pairs', (q.top_pairs || []).map(p => [p.query_label + ' x ' + p.key_label, p.value])],
                               ['query side (outlined blue in the graph)', q.query_side.map(c => [c.label, c.value])],
                               ['key side (outlined purple)', q.key_side.map(c => [c.label, c.value])]]) {
    const h4 = document.createElement('h4'); h4.textContent = title; side.appendChild(h4);
    const t = document.createElement('table'); const tb = document.createElement('tbody'); t.appendChild(tb);
    list.slice(0, 10).forEach(([name, v]) => row(tb, name, v.toFixed(3)));
    side.appendChild(t);
  }
}
document.getElementById('graph').appendChild(svg);
function label(n) {
  if (n.feature_type === 'logit') return n.clerp;
  if (n.feature_type === 'embedding') return 'token ' + JSON.stringify(toks[n.ctx_idx]) + ' @' + n.ctx_idx;
  if (n.feature_type === 'mlp reconstruction error') return 'error L' + n.layer + ' @' + n.ctx_idx;
  return 'L' + n.layer + ' feature ' + n.feature + ' @' + n.ctx_idx + (n.clerp ? ': ' + n.clerp : '');
}
function downstream(id) {
  const seen = new Set([id]), stack = [id];
  while (stack.length) {
    const cur = stack.pop();
    for (const l of outgoing.get(cur) || []) if (!seen.has(l.target)) { seen.add(l.target); stack.push(l.target); }
  }
  return seen;
}
function row(tbody, name, value) {
  const tr = document.createElement('tr');
  const a = document.createElement('td'); a.textContent = name;
  const b = document.createElement('td'); b.className = 'num'; b.textContent = value;
  tr.appendChild(a); tr.appendChild(b); tbody.appendChild(tr);
}
function select(id) {
  const n = byId.get(id);
  const keep = downstream(id);
  nodes.forEach(m => { m._el.classList.toggle('dim', !keep.has(m.node_id)); m._el.classList.toggle('sel', m.node_id === id); m._el.classList.remove('qkq', 'qkk'); });
  document.querySelectorAll('.qkarc.sel').forEach(a => a.classList.remove('sel'));
  links.forEach(l => l._el && l._el.classList.toggle('dim', !(keep.has(l.source) && keep.has(l.target))));
  const side = document.getElementById('side');
  side.replaceChildren();
  const h = document.createElement('h3'); h.textContent = label(n); side.appendChild(h);
  const facts = document.createElement('table'); const fb = document.createElement('tbody'); facts.appendChild(fb);
  row(fb, 'activation', n.activation == null ? '' : n.activation.toFixed(3));
  row(fb, 'influence rank share', n.influence == null ? '' : n.influence.toFixed(3));
  side.appendChild(facts);
  for (const [title, list, key] of [['strongest inputs', incoming.get(id) || [], 'source'], ['strongest outputs', outgoing.get(id) || [], 'target']]) {
    const h4 = document.createElement('h4'); h4.textContent = title; side.appendChild(h4);
    const t = document.createElement('table'); const tb = document.createElement('tbody'); t.appendChild(tb);
    [...list].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12)
      .forEach(l => row(tb, label(byId.get(l[key])), l.weight.toFixed(3)));
    side.appendChild(t);
  }
  const card = n.feature_type === 'cross layer transcoder' ? cards[n.layer + ':' + n.feature] : null;
  if (card) showCard(side, card);
  const note = document.createElement('p'); note.textContent = 'Highlighted: every path from this node to the logits. Click the background to reset.';
  side.appendChild(note);
}
function showCard(side, card) {
  if (card.logits && card.logits.length) {
    const h4 = document.createElement('h4'); h4.textContent = 'output tokens it promotes (direct path)'; side.appendChild(h4);
    const t = document.createElement('table'); const tb = document.createElement('tbody'); t.appendChild(tb);
    card.logits.forEach(([tok, v]) => row(tb, JSON.stringify(tok), v.toFixed(3)));
    side.appendChild(t);
  }
  const h4 = document.createElement('h4'); h4.textContent = 'top-activating corpus contexts'; side.appendChild(h4);
  if (!card.contexts || !card.contexts.length) {
    const p = document.createElement('p'); p.textContent = 'none in the corpus sample (or not computed: --contexts 0)'; side.appendChild(p);
    return;
  }
  for (const ex of card.contexts) {
    const div = document.createElement('div'); div.className = 'ctx';
    ex.tokens.forEach((tok, i) => {
      const sp = document.createElement('span');
      sp.textContent = tok;
      const a = Math.max(0, ex.acts[i]) / (ex.max || 1);
      sp.style.background = 'rgba(244,162,54,' + Math.min(1, a).toFixed(3) + ')';
      if (i === ex.at) sp.className = 'at';
      sp.title = ex.acts[i].toFixed(3);
      div.appendChild(sp);
    });
    const v = document.createElement('span'); v.className = 'ctxmax'; v.textContent = ' ' + ex.max.toFixed(2);
    div.appendChild(v);
    side.appendChild(div);
  }
}
svg.addEventListener('click', e => {
  if (e.target !== svg) return;
  nodes.forEach(m => m._el.classList.remove('dim', 'sel', 'qkq', 'qkk'));
  links.forEach(l => l._el && l._el.classList.remove('dim'));
  gQk.querySelectorAll('.qkarc').forEach(a => a.classList.remove('sel'));
});
document.body.setAttribute('data-ready', '1');
