"""The review page of ``alignsam review`` (:mod:`experiments.review`): one hand-written HTML file
with its script, no build step. It talks to the server's JSON endpoints only."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>alignsam review</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
  #side { width: 240px; border-right: 1px solid #ccc; display: flex; flex-direction: column; }
  #side h1 { font-size: 15px; margin: 10px; }
  #counts { margin: 0 10px 6px; color: #555; }
  #list { flex: 1; overflow-y: auto; margin: 0; padding: 0; list-style: none; }
  #list li { padding: 3px 10px; cursor: pointer; white-space: nowrap; overflow: hidden;
             text-overflow: ellipsis; }
  #list li.current { background: #dbe9ff; }
  #list li .st { float: right; font-size: 11px; color: #777; }
  #list li.accepted .st { color: #1a7f37; } #list li.no-target .st { color: #9a6700; }
  #pager { display: flex; justify-content: space-between; margin: 6px 10px; }
  #main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  #bar { padding: 8px; border-bottom: 1px solid #ccc; display: flex; gap: 6px; flex-wrap: wrap;
         align-items: center; }
  #bar button { padding: 4px 9px; }
  #bar button.on { background: #1f6feb; color: white; }
  #stage { flex: 1; overflow: auto; padding: 8px; }
  #view { max-width: 100%; max-height: calc(100vh - 110px); cursor: crosshair; display: block; }
  #info { padding: 4px 8px; color: #444; border-top: 1px solid #ccc; min-height: 20px; }
  #error { color: #b42318; }
  kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 3px; font-size: 12px; }
</style>
</head>
<body>
<div id="side">
  <h1>alignsam review</h1>
  <div id="counts"></div>
  <ul id="list"></ul>
  <div id="pager"><button id="prevpage">&laquo; page</button>
    <span id="pageinfo"></span><button id="nextpage">page &raquo;</button></div>
</div>
<div id="main">
  <div id="bar">
    <button id="fg" class="on" title="left click adds foreground (key 1)">+ foreground</button>
    <button id="bg" title="left click adds background (key 2); right click always does">
      &minus; background</button>
    <button id="undo" title="undo (z)">undo</button>
    <button id="reset" title="back to the agent's mask (r)">agent's mask</button>
    <button id="clear" title="empty mask: no target (c)">no target</button>
    <button id="accept" title="accept and go to the next image (a or Enter)">accept</button>
    <button id="prev" title="previous image (p or left arrow)">&larr;</button>
    <button id="next" title="next image (n or right arrow)">&rarr;</button>
    <span>Left click <kbd>1</kbd>/<kbd>2</kbd> mode, right click background,
      shift+click removes a click</span>
  </div>
  <div id="stage"><img id="view" alt="the image with its mask and clicks"></div>
  <div id="info"><span id="status"></span> <span id="error"></span></div>
</div>
<script>
const PAGE_SIZE = 50;
let offset = 0, total = 0, current = null, state = null, mode = 1, busy = false;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const opts = body === undefined ? {method: "GET"}
    : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) {
    const d = data.detail;
    throw new Error(typeof d === "string" ? d : JSON.stringify(d));
  }
  return data;
}
const post = (path, body) => api(path, body === undefined ? {} : body);

async function loadList() {
  const data = await api(`/api/items?offset=${offset}&limit=${PAGE_SIZE}`);
  total = data.total;
  $("counts").textContent = `${data.accepted} of ${data.total} accepted`;
  $("pageinfo").textContent = `${offset + 1}-${Math.min(offset + PAGE_SIZE, total)}`;
  const ul = $("list");
  ul.innerHTML = "";
  for (const it of data.items) {
    const li = document.createElement("li");
    li.dataset.index = it.index;
    li.className = (it.index === current ? "current " : "") + it.status.replace(" ", "-");
    li.textContent = it.id;
    const st = document.createElement("span");
    st.className = "st";
    st.textContent = it.status;
    li.appendChild(st);
    li.onclick = () => show(it.index);
    ul.appendChild(li);
  }
  return data;
}

function render(s) {
  state = s;
  const who = s.clicks.length - s.person_clicks;
  $("status").textContent = `${s.index + 1}/${total} ${s.id}: ${s.status}; ` +
    `${who} agent clicks, ${s.person_clicks} yours; mask ${(100 * s.mask_area).toFixed(1)} %` +
    ` of the image` + (s.cleared ? " (no target)" : "");
  $("status").dataset.area = s.mask_area;
  $("status").dataset.clicks = s.clicks.length;
  $("status").dataset.state = s.status;
  $("undo").disabled = !s.can_undo;
  const img = $("view");
  img.src = `/api/items/${s.index}/overlay.png?t=${Date.now()}`;
}

let started = 0;  // when the last action was sent: the overlay's load ends its round trip
$("view").addEventListener("load", () => {
  $("view").dataset.ms = Math.round(performance.now() - started);
});

async function act(fn) {
  if (busy) return;
  busy = true;
  $("error").textContent = "";
  started = performance.now();
  try {
    const s = await fn();
    if (s) render(s);
    $("error").textContent = "";
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    busy = false;
  }
}

async function show(index) {
  if (index < 0 || index >= total) return;
  current = index;
  if (index < offset || index >= offset + PAGE_SIZE) {
    offset = Math.floor(index / PAGE_SIZE) * PAGE_SIZE;
  }
  await loadList();
  $("status").textContent = "the agent is working on this image ...";
  await act(() => api(`/api/items/${index}`));
}

function imagePoint(ev) {
  const img = $("view");
  const r = img.getBoundingClientRect();
  return {x: (ev.clientX - r.left) / r.width * state.width,
          y: (ev.clientY - r.top) / r.height * state.height,
          scale: state.width / r.width};
}

$("view").addEventListener("click", (ev) => {
  if (!state) return;
  const p = imagePoint(ev);
  if (ev.shiftKey) {
    act(() => post(`/api/items/${current}/remove`, {x: p.x, y: p.y, radius: 14 * p.scale}));
  } else {
    act(() => post(`/api/items/${current}/click`, {x: p.x, y: p.y, label: mode}));
  }
});
$("view").addEventListener("contextmenu", (ev) => {
  ev.preventDefault();
  if (!state) return;
  const p = imagePoint(ev);
  act(() => post(`/api/items/${current}/click`, {x: p.x, y: p.y, label: 0}));
});

function setMode(m) {
  mode = m;
  $("fg").classList.toggle("on", m === 1);
  $("bg").classList.toggle("on", m === 0);
}
async function accept() {
  await act(() => post(`/api/items/${current}/accept`));
  const data = await loadList();
  let next = null;
  for (let i = current + 1; i < total && next === null; i++) {
    const row = data.items.find((it) => it.index === i);
    if (!row || row.status === "todo" || row.status === "edited") next = i;
  }
  if (next !== null) show(next);
}

$("fg").onclick = () => setMode(1);
$("bg").onclick = () => setMode(0);
$("undo").onclick = () => act(() => post(`/api/items/${current}/undo`));
$("reset").onclick = () => act(() => post(`/api/items/${current}/reset`));
$("clear").onclick = () => act(() => post(`/api/items/${current}/clear`));
$("accept").onclick = accept;
$("prev").onclick = () => show(current - 1);
$("next").onclick = () => show(current + 1);
$("prevpage").onclick = () => { offset = Math.max(0, offset - PAGE_SIZE); loadList(); };
$("nextpage").onclick = () => {
  if (offset + PAGE_SIZE < total) { offset += PAGE_SIZE; loadList(); }
};
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || current === null) return;
  const k = ev.key;
  if (k === "1") setMode(1);
  else if (k === "2") setMode(0);
  else if (k === "z") $("undo").click();
  else if (k === "r") $("reset").click();
  else if (k === "c") $("clear").click();
  else if (k === "a" || k === "Enter") accept();
  else if (k === "n" || k === "ArrowRight") show(current + 1);
  else if (k === "p" || k === "ArrowLeft") show(current - 1);
  else return;
  ev.preventDefault();
});

(async () => {
  const data = await loadList();
  if (data.total) show(data.first_todo === null ? 0 : data.first_todo);
})();
</script>
</body>
</html>
"""
