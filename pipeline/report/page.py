"""The HTML frame of a report page: escaping, tables, sections, and the page's only CSS and JavaScript, inline.

A report is one self-contained file: no network, no CDN, no external stylesheet or script, so it opens from the file
system on a cluster without internet and in a W&B HTML panel. The JavaScript only filters and sorts unit cards.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#24292f;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#c9d1d9;font-size:13px}
nav{position:sticky;top:0;background:#eef1f4;border-bottom:1px solid #d0d7de;padding:6px 24px;z-index:2;
font-size:13px}nav a{margin-right:12px;color:#0550ae;text-decoration:none}
main{padding:8px 24px 40px;max-width:1200px}
section{margin:18px 0 28px}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #d0d7de;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f1f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}.muted{color:#6e7781}.err{color:#b42318}.ok{color:#1a7f37}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.status.completed{background:#dafbe1;color:#1a7f37}.status.failed,.status.interrupted{background:#ffebe9;color:#b42318}
.status.running,.status.unknown,.status.missing{background:#fff8c5;color:#7d4e00}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plot{background:#fff;border:1px solid #d0d7de;border-radius:4px}
.plotgroup h3{margin-top:10px}
figure{margin:8px 0;display:inline-block;vertical-align:top}figcaption{font-size:12px;color:#57606a}
img{image-rendering:auto}img.px{image-rendering:pixelated}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px;width:212px;font-size:12px}
.card.proto{width:136px}.card:target{outline:3px solid #fb8500}.card h4{margin:0 0 4px;font-size:13px}
.card .iou{float:right;font-variant-numeric:tabular-nums}.card.uninterpretable h4{color:#6e7781}
.card img{display:block;margin:3px 0}.card ul{margin:2px 0;padding-left:16px}
.controls{margin:6px 0 10px;font-size:13px}.controls .count{margin-left:10px}.controls select,.controls input{margin-right:12px}
.statement{margin:4px 0}.statement .cls{font-weight:600}.units a{margin-right:6px}
details{margin:6px 0}summary{cursor:pointer;color:#0550ae}pre{background:#f6f8fa;padding:8px;overflow-x:auto;
font-size:12px;max-height:480px}
.kv td:first-child{color:#57606a}
"""

# Filters and sorts the unit cards of each `.cardset`: by concept (a card's data-concept), interpretable only, and
# by unit number, IoU or composition weight (data-unit, data-iou, data-weight).
JS = """
document.querySelectorAll('.cardset').forEach(function(set){
  var cards=Array.prototype.slice.call(set.querySelectorAll('.card'));
  var box=set.querySelector('.cards'),count=set.querySelector('.count');
  var concept=set.querySelector('select.concept'),sort=set.querySelector('select.sort'),
      only=set.querySelector('input.only');
  function apply(){
    var c=concept?concept.value:'',shown=0;
    cards.forEach(function(k){
      var ok=(!c||k.dataset.concept===c)&&(!only||!only.checked||k.dataset.interpretable==='1');
      k.style.display=ok?'':'none';if(ok)shown++;});
    if(sort){var key=sort.value,desc=key!=='unit';
      cards.slice().sort(function(a,b){var x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
        return desc?y-x:x-y;}).forEach(function(k){box.appendChild(k);});}
    if(count)count.textContent=shown+' of '+cards.length+' shown';
  }
  [concept,sort,only].forEach(function(e){if(e)e.addEventListener('change',apply);});
  apply();
});
"""


def esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def fmt(value: Any) -> str:
    """A number as the tables show it: 4 significant decimals, integers as integers, missing as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return esc(value)


def table(head: Sequence[str] | None, rows: Iterable[Sequence[Any]], cls: str = "", raw: bool = False) -> str:
    """A table; cells are escaped (numbers formatted) unless `raw` (cells already HTML)."""
    def cell(v):
        if raw:
            return f"<td>{v}</td>"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="num">{fmt(v)}</td>'
        return f"<td>{fmt(v) if v is None or isinstance(v, bool) else esc(v)}</td>"
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    header = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else ""
    return f'<div class="scroll"><table class="{cls}">{header}{body}</table></div>'


def kv_table(items: Iterable[tuple[str, Any]]) -> str:
    return table(None, items, cls="kv")


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def figure(img_tag: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img_tag}{cap}</figure>"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], footer: str = "") -> str:
    """The whole document: header, a navigation bar over the sections (anchor, title, body), the sections."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1><div class="sub">{subtitle}</div></header><nav>{nav}</nav>'
            f'<main>{body}<p class="muted">{footer}</p></main><script>{JS}</script></body></html>')
