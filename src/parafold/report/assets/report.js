/* parafold report: renders the run data embedded in the page. No network, no framework.
 * The table draws one page of rows at a time so a 10,000-target run opens instantly;
 * structures and the 3Dmol.js viewer load only when a target is opened. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("pf-data").textContent);
  var C = {};
  data.columns.forEach(function (c, i) { C[c] = i; });
  var rows = data.rows;
  var FLAG = { plddt: 1, pae: 2, coverage: 4, structure: 8 };
  var PAGE = 100;
  var COLS = [
    ["name", "Target", "txt"], ["length", "Length"], ["msa_depth", "MSA depth"],
    ["plddt", "mean pLDDT"], ["ptm", "pTM"], ["search_s", "Search s"],
    ["predict_s", "Predict s"], ["state", "State", "txt"], ["error", "Error", "txt"]
  ];
  var view = [], page = 0, sortKey = null, sortDir = 1, selected = -1;

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; } else { e.setAttribute(k, attrs[k]); }
    });
    (kids || []).forEach(function (k) { if (k) { e.appendChild(k); } });
    return e;
  }
  function $(id) { return document.getElementById(id); }
  function fmt(v, digits) {
    if (v === null || v === undefined) { return ""; }
    return typeof v === "number" ? (digits === undefined ? String(v) : v.toFixed(digits)) : String(v);
  }
  function dur(s) {
    if (s === null || s === undefined) { return "n/a"; }
    if (s < 120) { return s.toFixed(1) + " s"; }
    if (s < 7200) { return (s / 60).toFixed(1) + " min"; }
    return (s / 3600).toFixed(2) + " h";
  }
  function plddtClass(v) { return v >= 90 ? "vh" : v >= 70 ? "h" : v >= 50 ? "l" : "vl"; }
  function enc(name) { return encodeURIComponent(name); }

  /* --- summary --- */
  function renderSummary() {
    var s = data.summary;
    var cards = [
      ["Targets", s.targets], ["Done", s.done], ["Failed", s.failed],
      ["Proteins / hour", s.proteins_per_hour === null ? "n/a" : s.proteins_per_hour],
      ["Wall time", dur(s.wall_s)], ["Compiles", s.compiles + " (" + dur(s.compile_s) + ")"],
      ["GPU busy", s.gpu_busy === null ? "n/a" : Math.round(s.gpu_busy * 100) + " %"]
    ];
    var box = $("pf-cards");
    cards.forEach(function (c) {
      box.appendChild(el("div", { "class": "card" }, [
        el("div", { "class": "v", text: String(c[1]) }), el("div", { "class": "k", text: c[0] })]));
    });
    $("pf-sub").textContent = s.out_dir + " \u00b7 report " + s.generated +
      (s.run_started ? " \u00b7 run started " + s.run_started : "");
    if (s.failures.length) {
      var counts = {};
      s.failures.forEach(function (f) {
        var reason = f[1].replace(/\b[A-Za-z0-9_.-]*\d[A-Za-z0-9_.-]*\b/g, "#").slice(0, 160);
        counts[reason] = (counts[reason] || 0) + 1;
      });
      var list = el("ul", {}, Object.keys(counts).sort(function (a, b) {
        return counts[b] - counts[a];
      }).map(function (r) { return el("li", { text: counts[r] + " \u00d7 " + r }); }));
      var det = el("details", {}, [el("summary", { "class": "fail",
        text: s.failed + " failed: reasons" }), list]);
      $("pf-failures").appendChild(det);
    }
    var retired = s.workers_retired || [];
    if (retired.length) {
      $("pf-failures").appendChild(el("details", {}, [
        el("summary", { "class": "fail",
          text: retired.length + " fold worker(s) out of rotation" }),
        el("ul", {}, retired.map(function (w) { return el("li", { text: w[0] + ": " + w[1] }); }))]));
    }
  }

  /* --- timeline --- */
  var LANE_H = 18, LABEL_W = 110, AXIS_H = 22;
  var COLOUR = { search: "#f28e2b", predict: "#4e79a7" };
  function renderTimeline() {
    var lanes = data.lanes, events = data.events;
    var wrap = $("pf-timeline-wrap");
    if (!lanes.length) { wrap.appendChild(el("p", { "class": "muted", text: "No worker events recorded." })); return; }
    var span = 0;
    events.forEach(function (e) { if (e[2] > span) { span = e[2]; } });
    span = span || 1;
    var canvas = $("pf-timeline"), dpr = window.devicePixelRatio || 1;
    var width = Math.max(wrap.clientWidth - 4, 600), height = AXIS_H + lanes.length * LANE_H + 4;
    canvas.width = width * dpr; canvas.height = height * dpr;
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    var ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    var scale = (width - LABEL_W - 10) / span;
    function x(t) { return LABEL_W + t * scale; }
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    lanes.forEach(function (l, i) {
      var y = AXIS_H + i * LANE_H;
      ctx.fillStyle = i % 2 ? "#f6f7f9" : "#ffffff";
      ctx.fillRect(0, y, width, LANE_H);
      ctx.fillStyle = "#1d2330";
      ctx.fillText((l.kind === "search" ? "CPU " : "GPU ") + l.worker, 4, y + LANE_H / 2);
    });
    var step = Math.pow(10, Math.floor(Math.log10(span / 5)));
    if (span / step > 10) { step *= 2; }
    if (span / step > 10) { step *= 2.5; }
    ctx.fillStyle = "#5b6475";
    for (var t = 0; t <= span; t += step) {
      ctx.fillRect(x(t), AXIS_H - 4, 1, 4 + lanes.length * LANE_H);
      ctx.fillText(dur(t), x(t) + 2, AXIS_H / 2);
    }
    events.forEach(function (e) {
      ctx.fillStyle = e[4] ? COLOUR[lanes[e[0]].kind] || "#888" : "#d62728";
      ctx.fillRect(x(e[1]), AXIS_H + e[0] * LANE_H + 2, Math.max(1, (e[2] - e[1]) * scale - 1), LANE_H - 4);
    });
    var byLane = lanes.map(function () { return []; });
    events.forEach(function (e) { byLane[e[0]].push(e); });
    function hit(ev) {
      var r = canvas.getBoundingClientRect(), lx = ev.clientX - r.left, ly = ev.clientY - r.top;
      var lane = Math.floor((ly - AXIS_H) / LANE_H), t = (lx - LABEL_W) / scale;
      if (lane < 0 || lane >= lanes.length) { return null; }
      var pad = 2 / scale;
      var found = byLane[lane].filter(function (e) { return e[1] - pad <= t && t <= e[2] + pad; });
      return found.length ? { e: found[0], x: lx, y: ly } : null;
    }
    var tip = $("pf-tip");
    canvas.addEventListener("mousemove", function (ev) {
      var h = hit(ev);
      if (!h) { tip.style.display = "none"; canvas.style.cursor = "default"; return; }
      var name = h.e[3] >= 0 ? rows[h.e[3]][C.name] : "?";
      tip.textContent = lanes[h.e[0]].kind + " " + name + ": " + dur(h.e[2] - h.e[1]) +
        " (from " + dur(h.e[1]) + ")" + (h.e[4] ? "" : " FAILED");
      tip.style.left = (h.x + 12) + "px"; tip.style.top = (h.y + 8) + "px";
      tip.style.display = "block"; canvas.style.cursor = "pointer";
    });
    canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    canvas.addEventListener("click", function (ev) {
      var h = hit(ev);
      if (h && h.e[3] >= 0) { openTarget(h.e[3]); }
    });
  }

  /* --- table --- */
  function applyView() {
    var q = $("pf-filter").value.trim().toLowerCase(), st = $("pf-state").value;
    view = [];
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      if (st && r[C.state] !== st) { continue; }
      if (q && (r[C.name] + " " + r[C.state] + " " + (r[C.error] || "")).toLowerCase().indexOf(q) < 0) { continue; }
      view.push(i);
    }
    if (sortKey !== null) {
      var k = C[sortKey];
      view.sort(function (a, b) {
        var x = rows[a][k], y = rows[b][k];
        if (x === y) { return a - b; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        return (x < y ? -1 : 1) * sortDir;
      });
    }
    page = 0;
    renderPage();
  }
  function cell(r, key) {
    var v = r[C[key]];
    if (key === "plddt" && v !== null) {
      return el("td", {}, [el("span", { "class": "pl " + plddtClass(v), text: fmt(v, 1) })]);
    }
    if (key === "error") { return el("td", { "class": "err", title: v || "", text: v || "" }); }
    var digits = { ptm: 3, search_s: 1, predict_s: 2 }[key];
    return el("td", { "class": key === "state" ? "txt" : "", text: fmt(v, digits) });
  }
  function renderPage() {
    var pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    var body = $("pf-tbody"), frag = document.createDocumentFragment();
    view.slice(page * PAGE, (page + 1) * PAGE).forEach(function (i) {
      var tr = el("tr", { "data-i": String(i) }, COLS.map(function (c) { return cell(rows[i], c[0]); }));
      if (i === selected) { tr.className = "sel"; }
      frag.appendChild(tr);
    });
    body.textContent = "";
    body.appendChild(frag);
    $("pf-page").textContent = "page " + (page + 1) + " of " + pages + " \u00b7 " + view.length +
      " of " + rows.length + " targets";
    $("pf-prev").disabled = page === 0;
    $("pf-next").disabled = page >= pages - 1;
  }
  function renderTable() {
    var tr = $("pf-head");
    COLS.forEach(function (c) {
      var th = el("th", { "data-key": c[0], "class": c[2] || "", text: c[1] });
      th.addEventListener("click", function () {
        sortDir = sortKey === c[0] ? -sortDir : 1;
        sortKey = c[0];
        Array.prototype.forEach.call(tr.children, function (h) {
          h.classList.remove("asc", "desc");
        });
        th.classList.add(sortDir > 0 ? "asc" : "desc");
        applyView();
      });
      tr.appendChild(th);
    });
    var states = {};
    rows.forEach(function (r) { states[r[C.state]] = 1; });
    Object.keys(states).sort().forEach(function (s) {
      $("pf-state").appendChild(el("option", { value: s, text: s }));
    });
    $("pf-filter").addEventListener("input", applyView);
    $("pf-state").addEventListener("change", applyView);
    $("pf-prev").addEventListener("click", function () { page--; renderPage(); });
    $("pf-next").addEventListener("click", function () { page++; renderPage(); });
    $("pf-tbody").addEventListener("click", function (ev) {
      var tr = ev.target.closest("tr");
      if (tr) { openTarget(Number(tr.getAttribute("data-i"))); }
    });
    applyView();
  }

  /* --- one target --- */
  var viewerLib = null;
  function loadScript(src, done, fail) {
    var s = el("script", { src: src });
    s.onload = done;
    s.onerror = fail;
    document.head.appendChild(s);
  }
  function withViewer(cb) {
    if (window.$3Dmol) { cb(); return; }
    if (viewerLib) { viewerLib.push(cb); return; }
    viewerLib = [cb];
    loadScript(data.viewer_src, function () { viewerLib.forEach(function (f) { f(); }); },
      function () { $("pf-viewer-msg").textContent = "3D viewer library missing (" + data.viewer_src + ")."; });
  }
  function afColour(atom) {
    var b = atom.b;
    return b >= 90 ? "#0053d6" : b >= 70 ? "#65cbf3" : b >= 50 ? "#ffdb13" : "#ff7d45";
  }
  window.parafoldStructure = function (name, pdb) {
    var box = $("pf-viewer");
    if (box.getAttribute("data-target") !== name) { return; }
    withViewer(function () {
      if (box.getAttribute("data-target") !== name) { return; }
      box.textContent = "";
      try {
        var v = window.$3Dmol.createViewer(box, { backgroundColor: "white" });
        if (!v) { throw new Error("WebGL is not available"); }
        v.addModel(pdb, "pdb");
        // a tube through the CA atoms plus a sphere per CA: every residue stays visible even
        // where a low-confidence model breaks the chain (3Dmol draws no bond past ~4.5 A)
        v.setStyle({}, { cartoon: { style: "trace", thickness: 0.5, colorfunc: afColour } });
        v.addStyle({ atom: "CA" }, { sphere: { scale: 0.35, colorfunc: afColour } });
        v.zoomTo();
        v.render();
        box.setAttribute("data-rendered", name);
      } catch (err) {
        $("pf-viewer-msg").textContent = "3D view unavailable: " + err.message;
      }
    });
  };
  function openTarget(i) {
    var r = rows[i], name = r[C.name], flags = r[C.flags] || 0;
    selected = i;
    renderPage();
    var d = $("pf-detail");
    d.style.display = "block";
    $("pf-dname").textContent = name;
    var facts = [["length", r[C.length]], ["MSA depth", r[C.msa_depth]],
      ["mean pLDDT", fmt(r[C.plddt], 1)], ["pTM", fmt(r[C.ptm], 3)], ["best model", r[C.model]],
      ["search", dur(r[C.search_s])], ["predict", dur(r[C.predict_s])], ["state", r[C.state]]];
    var dl = $("pf-facts");
    dl.textContent = "";
    dl.appendChild(el("span", { text: facts.map(function (f) {
      return f[0] + ": " + (f[1] === null || f[1] === "" ? "n/a" : f[1]);
    }).join(" \u00b7 ") }));
    $("pf-derror").textContent = r[C.error] || "";
    var plots = $("pf-plots");
    plots.textContent = "";
    [["plddt", "plddt.png"], ["pae", "pae.png"], ["coverage", "coverage.png"]].forEach(function (p) {
      if (flags & FLAG[p[0]]) {
        plots.appendChild(el("img", { src: enc(name) + "/" + p[1], alt: p[0] + " plot of " + name }));
      }
    });
    if (!plots.children.length) { plots.appendChild(el("p", { "class": "muted", text: "No plots for this target." })); }
    var box = $("pf-viewer");
    box.textContent = "";
    box.removeAttribute("data-rendered");
    box.setAttribute("data-target", name);
    $("pf-viewer-msg").textContent = "";
    if (flags & FLAG.structure) {
      $("pf-viewer-msg").textContent = "ranked_0 coloured by pLDDT";
      loadScript(enc(name) + "/ranked_0.pdb.js", null, function () {
        $("pf-viewer-msg").textContent = "Structure file missing.";
      });
    } else {
      $("pf-viewer-msg").textContent = "No structure for this target.";
    }
    if (location.hash !== "#t=" + enc(name)) { history.replaceState(null, "", "#t=" + enc(name)); }
    d.scrollIntoView({ block: "nearest" });
  }

  renderSummary();
  renderTable();
  renderTimeline();
  var m = /^#t=(.+)$/.exec(location.hash);
  if (m) {
    var want = decodeURIComponent(m[1]);
    for (var i = 0; i < rows.length; i++) { if (rows[i][C.name] === want) { openTarget(i); break; } }
  }
  document.body.setAttribute("data-ready", "1");
})();
