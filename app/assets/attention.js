// Token-to-token attention view: hovering a token of .attn-text colours every token by the attention the
// hovered (query) token pays to it, read from the hovered span's data-attn (one weight per key position).
(function () {
  function paint(container, q) {
    var toks = container.querySelectorAll('.attn-tok');
    var row = null;
    try { row = JSON.parse(q.getAttribute('data-attn') || '[]'); } catch (e) { row = []; }
    var m = 0;
    for (var i = 0; i < row.length; i++) { if (row[i] > m) { m = row[i]; } }
    for (var j = 0; j < toks.length; j++) {
      var w = j < row.length ? row[j] : 0;
      toks[j].style.backgroundColor = 'rgba(31, 119, 180, ' + (m > 0 ? (0.9 * w / m).toFixed(3) : 0) + ')';
      toks[j].title = 'position ' + j + ' · attention from ' + q.getAttribute('data-pos') + ' = ' + w.toFixed(3);
      toks[j].classList.toggle('attn-query', toks[j] === q);
    }
  }
  document.addEventListener('mouseover', function (ev) {
    var t = ev.target && ev.target.closest ? ev.target.closest('.attn-tok') : null;
    if (!t) { return; }
    var c = t.closest('.attn-text');
    if (c) { paint(c, t); }
  });
})();
