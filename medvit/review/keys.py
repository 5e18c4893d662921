"""Keyboard shortcuts of the review page: j / k move between findings rows, p / a / u set the current row's verdict,
n / b open the next / previous worklist image.

Streamlit has no page-wide key events, and scripts in `st.html` never saw the page's keys, so an empty
`st.iframe` (same origin as the page) listens on the parent document and clicks the page's own
buttons, found by their widget keys: a shortcut does exactly what the click does. Keys typed into a text box,
or with Ctrl / Alt / Meta, are left alone.
"""

from __future__ import annotations

import streamlit as st

# Each mount replaces the previous listener, so the handler always belongs to a live iframe.
_SCRIPT = """
<script>
(() => {
  const P = window.parent, doc = P.document;
  if (P.__medvitKeys) doc.removeEventListener('keydown', P.__medvitKeys);
  P.__medvitRow = P.__medvitRow || 0;
  const rows = () => Array.from(doc.querySelectorAll('[class*="st-key-frow_"]'));
  const mark = () => rows().forEach((r, i) => {
    r.style.outline = i === P.__medvitRow ? '2px solid #1c83e1' : '';
    r.style.borderRadius = '6px';
  });
  const click = (selector) => {
    const button = doc.querySelector(selector);
    if (button && !button.disabled) { button.click(); return true; }
    return false;
  };
  P.__medvitKeys = (e) => {
    const t = e.target;
    const typing = t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName));
    if (e.ctrlKey || e.metaKey || e.altKey || typing) return;
    const k = (e.key || '').toLowerCase();
    const all = rows();
    if ((k === 'j' || k === 'k') && all.length) {
      P.__medvitRow = Math.max(0, Math.min(all.length - 1, P.__medvitRow + (k === 'j' ? 1 : -1)));
      all[P.__medvitRow].scrollIntoView({block: 'nearest'});
    } else if (['p', 'a', 'u'].includes(k) && all.length) {
      const word = {p: 'present', a: 'absent', u: 'uncertain'}[k];
      const row = all[Math.min(P.__medvitRow, all.length - 1)];
      const button = Array.from(row.querySelectorAll('button')).find((b) => b.innerText.trim() === word);
      if (button && !(button.getAttribute('data-testid') || '').includes('Active')) button.click();
    } else if (k === 'n' || k === 'b') {
      if (click(`[class*="st-key-${k === 'n' ? 'next' : 'prev'}_"] button`)) P.__medvitRow = 0;
    } else return;
    e.preventDefault();
    mark();
  };
  doc.addEventListener('keydown', P.__medvitKeys);
  setInterval(mark, 400);  // the iframe's own timer: it stops with the iframe
})();
</script>
"""


def keyboard_shortcuts() -> None:
    """Install the page's key listener (call once per page run, in the same place, so the iframe persists)."""
    st.iframe(_SCRIPT, height=1)  # our own constant script, not user content; 1 px: it draws nothing
