// qsae feature browser: a static single-page app over the release's data/*.js files.
// No dependencies and no fetch: opened from file://, Chromium blocks fetch and XHR, so every data
// file is a script calling QSAE.add(name, object), loaded by injecting <script src> (see the data
// contract). Token texts come from the model: they are only ever set as text, never parsed as HTML.
"use strict";

(() => {
  const DASH = "\u2013"; // shown for a value that was not computed (null)
  const app = document.getElementById("app");

  // ---------- data: QSAE.add / QSAE.load ----------

  const entries = new Map(); // name -> {promise, resolve, reject, added, script}

  function entry(name) {
    let e = entries.get(name);
    if (!e) {
      e = {};
      e.promise = new Promise((resolve, reject) => Object.assign(e, { resolve, reject }));
      entries.set(name, e);
    }
    return e;
  }

  /** Called by each data file: registers its object under its name. */
  function add(name, value) {
    const e = entry(name);
    e.added = true;
    e.resolve(value);
  }

  /** Promise of the object that data/NAME.js registers; the script is injected once. */
  function load(name) {
    const e = entry(name);
    if (e.added || e.script) return e.promise;
    const src = `data/${name}.js`;
    const fail = (why) => {
      e.script.remove();
      entries.delete(name); // a later visit tries again
      e.reject(new Error(`Could not load ${src}: ${why}.`));
    };
    e.script = document.createElement("script");
    e.script.src = src;
    e.script.onload = () => e.added || fail(`the file ran but did not call QSAE.add("${name}", …)`);
    e.script.onerror = () => fail("the file is missing or unreadable " +
      "(open index.html inside the release's browser/ folder, next to its data/ folder)");
    document.head.append(e.script);
    return e.promise;
  }

  window.QSAE = { add, load };

  // ---------- small helpers ----------

  /** An element with attributes (null skipped) and children (strings become text nodes, never HTML). */
  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) if (value != null) el.setAttribute(key, value);
    el.append(...children.flat(Infinity).filter((child) => child != null));
    return el;
  }

  function svg(tag, attrs = {}, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
    el.append(...children);
    return el;
  }

  const isNumber = (x) => typeof x === "number" && Number.isFinite(x);
  /** Fixed digits; scientific below 10^-digits (p and q values); an en dash for null. */
  const num = (x, digits = 3) => !isNumber(x) ? DASH
    : x !== 0 && Math.abs(x) < 10 ** -digits ? x.toExponential(1) : x.toFixed(digits);
  const pct = (x) => (isNumber(x) ? `${(100 * x).toPrecision(3)}%` : DASH);
  const int = (x) => (isNumber(x) ? x.toLocaleString("en-US") : DASH);

  // Whitespace tokens would be invisible (or break lines); show them as symbols instead.
  const SYMBOLS = { "\n": "↵", "\r": "␍", "\t": "→" };
  const visible = (text) => String(text).replace(/[\n\r\t]/g, (c) => SYMBOLS[c]);

  function table(attrs, headers, rows) {
    return h("table", attrs,
      h("thead", {}, h("tr", {}, headers.map((x) => (typeof x === "string" ? h("th", {}, x) : x)))),
      h("tbody", {}, rows));
  }

  const featureLink = (L, F, text) => h("a", { href: `#/layer/${L}/feature/${F}` }, text);

  // ---------- routing ----------

  let latest = 0; // id of the newest route: a slower, older one must not draw over it
  const layerViews = new Map(); // layer -> its table view, built once and kept with its sort and filter

  async function route() {
    const id = ++latest;
    delete document.body.dataset.ready;
    let view;
    try {
      const release = await load("release");
      document.getElementById("release-title").textContent = release.title;
      view = await render(release, location.hash);
    } catch (error) {
      if (id !== latest) return;
      console.error(error);
      view = errorView(error.message);
    }
    if (id !== latest) return;
    const leaving = app.firstElementChild;
    if (leaving) leaving.dataset.scroll = Math.round(window.scrollY); // restored when a kept view returns
    app.replaceChildren(view);
    window.scrollTo(0, Number(view.dataset.scroll) || 0);
    document.body.dataset.ready = "1";
  }

  function render(release, hash) {
    if (["", "#", "#/"].includes(hash)) return frontPage(release);
    const match = /^#\/layer\/(\d+)(?:\/feature\/(\d+))?\/?$/.exec(hash);
    if (!match) throw new Error(`There is no page at ${hash}.`);
    const layer = Number(match[1]);
    if (!release.layers.includes(layer)) {
      throw new Error(`Layer ${layer} is not in this release (its layers: ${release.layers.join(", ")}).`);
    }
    return match[2] === undefined ? layerPage(release, layer) : featurePage(release, layer, Number(match[2]));
  }

  function errorView(message) {
    return h("div", { id: "error", role: "alert" },
      h("h1", {}, "Could not show this page"), h("p", {}, message),
      h("p", {}, h("a", { href: "#/" }, "Back to the front page")));
  }

  // ---------- front page ----------

  function frontPage(R) {
    document.title = R.title;
    const facts = [R.model_id + (R.model_revision ? ` @ ${R.model_revision}` : ""),
      (R.architecture_name ?? (R.architecture === "batchtopk" ? "BatchTopK" : "TopK"))
        + (R.matryoshka_prefixes ? ` (prefixes ${R.matryoshka_prefixes.join(", ")})` : ""),
      `${int(R.n_features)} features`,
      `k = ${R.k}`, `d_model = ${R.d_model}`, `hook: ${R.hook}`];
    const layers = R.layers.map((L) => {
      const s = R.per_layer[L] ?? {};
      const ve = num(s.variance_explained) + (s.ve_ci ? ` [${num(s.ve_ci[0])}, ${num(s.ve_ci[1])}]` : "");
      return h("tr", {},
        h("td", {}, h("a", { href: `#/layer/${L}` }, `Layer ${L}`)),
        h("td", { class: "num" }, ve), h("td", { class: "num" }, num(s.l0, 1)),
        h("td", { class: "num" }, `${int(s.live)} / ${int(s.dead)}`),
        h("td", { class: "num" }, num(s.rollout_max_abs_auroc)), h("td", { class: "num" }, int(s.n_q_below_0_05)));
    });
    return h("section", { id: "front-page" },
      h("h1", {}, R.title),
      h("p", { class: "muted" }, facts.join(" · ")),
      h("dl", { class: "key-numbers" }, R.key_numbers.map(({ label, value }) => [h("dt", {}, label), h("dd", {}, value)])),
      h("h2", {}, "Layers"),
      table({ class: "summary" }, ["Layer", "Variance explained [95% CI]", "L0", "Live / dead",
        "Rollout max |AUROC − null centre|", "Features with q < 0.05"], layers),
      R.frontier ? frontierTables(R) : null,
      R.charts.length ? h("h2", {}, "Charts") : null,
      h("div", { class: "charts" }, R.charts.map(({ file, title }) =>
        h("figure", { class: "chart" }, h("figcaption", {}, title), h("img", { src: file, alt: title })))));
  }

  // A sweep's SAEs of each layer against their L0; the selected one is the one the rest shows.
  function frontierTables(R) {
    const ci = (v, c, d) => num(v, d) + (c ? ` [${num(c[0], d)}, ${num(c[1], d)}]` : "");
    return [h("h2", {}, "Each layer's SAEs (sweep)"),
      h("p", { class: "muted" }, `Measured on the same held-out rows and rollouts; the pages below show the selected SAE (n = ${int(R.n_features)}, k = ${R.k}).`),
      ...R.layers.filter((L) => R.frontier[L]).map((L) => [h("h3", {}, `Layer ${L}`),
        table({ class: "frontier", "data-layer": String(L) },
          ["SAE", "L0", "FVU [95% CI]", "ΔCE, nats [95% CI]", "KL, nats [95% CI]"],
          R.frontier[L].map((p) => h("tr", { class: p.selected ? "selected" : "" },
            h("td", {}, p.sae + (p.selected ? " (selected)" : "")), h("td", { class: "num" }, num(p.l0, 1)),
            h("td", { class: "num" }, ci(p.fvu, p.fvu_ci)), h("td", { class: "num" }, ci(p.delta_ce, p.delta_ce_ci, 4)),
            h("td", { class: "num" }, ci(p.kl, p.kl_ci, 4)))))])];
  }

  // ---------- layer page: the table of live features ----------

  const COLUMNS = [ // [key, header, format]; the feature column links, the tokens column is text
    ["feature", "Feature", String], ["fire_rate", "Fire rate", pct], ["token_auroc", "Token AUROC", num],
    ["rollout_auroc", "Rollout AUROC", num], ["rollout_q", "Rollout q", num], ["max_activation", "Max act.", num]];

  async function layerPage(R, L) {
    document.title = `Layer ${L} · ${R.title}`;
    if (!layerViews.has(L)) layerViews.set(L, buildLayerView(R, L, await load(`layer_${L}`)));
    return layerViews.get(L);
  }

  // Rows are built once; sorting reorders them and filtering sets `hidden`, so 4096 rows stay fast.
  function buildLayerView(R, L, T) {
    const col = Object.fromEntries(T.columns.map((name, i) => [name, i]));
    // Each row is a clone of one template row: several times faster than building it element by element.
    const template = h("tr", {}, COLUMNS.map(() => h("td", { class: "num" })), h("td", { class: "tokens" }));
    template.cells[0].append(h("a"));
    const items = T.rows.map((row) => {
      const F = row[col.feature], tokens = row[col.tokens] ?? "";
      const tr = template.cloneNode(true);
      tr.dataset.feature = F;
      tr.cells[0].firstChild.setAttribute("href", `#/layer/${L}/feature/${F}`);
      tr.cells[0].firstChild.textContent = F;
      COLUMNS.forEach(([key, , format], i) => {
        if (key !== "feature") tr.cells[i].textContent = format(row[col[key]]);
      });
      tr.lastChild.title = tokens;
      tr.lastChild.textContent = visible(tokens);
      return { tr, row, text: tokens.toLowerCase() };
    });
    const headers = COLUMNS.map(([key, label]) => h("th", { "data-sort": key, class: "num", tabindex: 0 }, label));
    const tbody = h("tbody", {}, items.map((item) => item.tr));
    const featureTable = h("table", { id: "feature-table" },
      h("thead", {}, h("tr", {}, headers, h("th", {}, "Tokens in top contexts"))), tbody);
    const filter = h("input", { id: "filter", type: "search", autocomplete: "off", spellcheck: "false",
      placeholder: "Filter by token text", "aria-label": "Filter features by token text" });
    const count = h("span", { id: "shown-count", class: "muted" });

    let sort = { key: "feature", dir: 1 }; // rows arrive in feature order
    headers[0].setAttribute("aria-sort", "ascending");
    featureTable.tHead.addEventListener("click", (event) => {
      const th = event.target.closest("th[data-sort]");
      if (!th) return;
      const key = th.dataset.sort;
      sort = { key, dir: sort.key === key ? -sort.dir : -1 }; // a new column starts descending
      const i = col[key], f = col.feature;
      // Nulls (not computed) go last in both directions; ties keep feature order.
      items.sort((a, b) => (a.row[i] == null) - (b.row[i] == null)
        || (a.row[i] == null ? 0 : sort.dir * (a.row[i] - b.row[i])) || a.row[f] - b.row[f]);
      tbody.append(...items.map((item) => item.tr));
      for (const header of headers) header.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
    });
    featureTable.tHead.addEventListener("keydown", (event) => { // headers sort from the keyboard too
      if ((event.key === "Enter" || event.key === " ") && event.target.matches("th[data-sort]")) {
        event.preventDefault();
        event.target.click();
      }
    });

    // Synchronous: a pass over 4096 precomputed strings is cheap, and the next frame lays out once.
    const applyFilter = () => {
      const query = filter.value.trim().toLowerCase();
      let shown = 0;
      for (const item of items) {
        const hide = query !== "" && !item.text.includes(query);
        if (item.tr.hidden !== hide) item.tr.hidden = hide;
        shown += !hide;
      }
      count.textContent = `${int(shown)} of ${int(items.length)} live features shown`;
    };
    filter.addEventListener("input", applyFilter);
    applyFilter();

    tbody.addEventListener("click", (event) => { // the whole row opens the feature, not only its link
      const tr = event.target.closest("tr[data-feature]");
      if (tr && !event.target.closest("a")) location.hash = `#/layer/${L}/feature/${tr.dataset.feature}`;
    });

    const s = R.per_layer[L] ?? {};
    return h("section", { id: "layer-page", "data-layer": L },
      h("nav", { class: "crumbs" }, h("a", { href: "#/" }, "All layers"), " › ", `Layer ${L}`),
      h("h1", {}, `Layer ${L}`),
      h("p", { class: "muted" }, `${int(items.length)} live features of ${int(T.n_features)} · variance explained `,
        num(s.variance_explained), ` · L0 ${num(s.l0, 1)}. Click a column header to sort, a row to open its feature.`),
      h("div", { class: "controls" }, filter, count),
      featureTable);
  }

  // ---------- feature page ----------

  async function featurePage(R, L, F) {
    const T = await load(`layer_${L}`);
    const fcol = T.columns.indexOf("feature");
    const live = T.rows.map((row) => row[fcol]).sort((a, b) => a - b);
    const at = live.indexOf(F);
    if (at < 0) {
      throw new Error(`Feature ${F} is not a live feature of layer ${L}: it never fired in the analysed ` +
        `sample, or there is no such feature (the layer has ${int(T.n_features)}).`);
    }
    const block = Math.floor(F / (T.block_size ?? R.block_size));
    const f = (await load(`layer_${L}_block_${block}`)).features[F];
    if (!f) throw new Error(`data/layer_${L}_block_${block}.js has no entry for feature ${F}.`);
    document.title = `Layer ${L} · feature ${F} · ${R.title}`;

    const stats = [["Fire rate", pct(f.fire_rate)], ["Fire count", int(f.fire_count)],
      ["Max activation", num(f.max_activation)], ["Mean activation", num(f.mean_activation)],
      ["Token AUROC", num(f.token_auroc)], ["Rollout AUROC", num(f.rollout_auroc)],
      ["Rollout p", num(f.rollout_p)], ["Rollout q", num(f.rollout_q)]];
    return h("section", { id: "feature-page", "data-layer": L, "data-feature": F },
      h("nav", { class: "crumbs" }, h("a", { href: "#/" }, "All layers"), " › ",
        h("a", { href: `#/layer/${L}` }, `Layer ${L}`), " › ", `Feature ${F}`,
        h("span", { class: "prev-next" },
          at > 0 ? featureLink(L, live[at - 1], "← previous") : null,
          at + 1 < live.length ? featureLink(L, live[at + 1], "next →") : null)),
      h("h1", {}, `Layer ${L} · feature ${F}`),
      h("div", { class: "overview" },
        h("dl", { class: "stats" }, stats.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)])),
        histogram(f.histogram)),
      explanation(f.explanation),
      h("section", { id: "top-contexts" }, h("h2", {}, "Top activations"),
        h("p", { class: "muted" }, "Each line: the activation, rollout:position and outcome, then the context. " +
          "The outlined token is the one the example is about; shading is activation / max activation."),
        contexts(f.top, f.max_activation)),
      h("section", { id: "quantiles" }, h("h2", {}, "Examples across the activation range"),
        f.quantiles.map((bin) => h("div", { class: "quantile" },
          h("h3", {}, bin.label, h("span", { class: "muted" }, `  activation ${num(bin.low)} to ${num(bin.high)}`)),
          contexts(bin.examples, f.max_activation)))),
      logitTables(f.logits),
      h("section", { id: "similar" }, h("h2", {}, "Most similar decoder directions"),
        h("ul", {}, f.similar.map(([G, cosine]) =>
          h("li", {}, featureLink(L, G, `Feature ${G}`), h("span", { class: "muted" }, ` cosine ${num(cosine)}`))))));
  }

  /** autointerp's explanation of the feature, and how well it lets the explainer tell where the feature
   * fires (balanced accuracy, 95% interval, examples) beside the same explanation on another feature's
   * examples (the null); nothing where the feature was not explained. */
  function explanation(e) {
    if (!e) return null;
    const score = (s) => (s && isNumber(s.balanced_accuracy)
      ? `${num(s.balanced_accuracy)} [${num(s.ci[0])}, ${num(s.ci[1])}], ${int(s.n_positive + s.n_negative)} examples` +
        (s.one_answer ? " (one answer to all)" : "")
      : DASH);
    const rows = [["Detection", score(e.detection)], ["Detection, null", score(e.null_detection)],
      ["Fuzzing", score(e.fuzzing)], ["Fuzzing, null", score(e.null_fuzzing)]];
    return h("section", { id: "explanation" }, h("h2", {}, "Explanation"),
      h("p", { class: "explanation" }, e.explanation ? `“${e.explanation}”` : "(the explainer wrote nothing)"),
      h("dl", { class: "stats" }, rows.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)])),
      h("p", { class: "muted" }, `Written from ${int(e.n_shown)} activating examples (feature chosen by ` +
        `${e.chosen_by}); scored on held-out ones. Balanced accuracy 0.5 is chance; the null is the same ` +
        "explanation scored on another feature's examples." + (e.note ? ` ${e.note}.` : "")));
  }

  /** One line per example: its activation and origin, then its tokens shaded by activation / max. */
  function contexts(examples, maxActivation) {
    if (!examples.length) return h("p", { class: "muted" }, "No examples.");
    const scale = maxActivation > 0 ? maxActivation : 1;
    return h("div", { class: "contexts" }, examples.map((ex) => h("div", { class: "context" },
      h("div", { class: "meta", title: `rollout ${ex.rollout}, token position ${ex.position}` },
        h("strong", {}, num(ex.activation, 2)), ` r${ex.rollout}:${ex.position} `,
        h("span", { class: "outcome", "data-outcome": ex.outcome }, ex.outcome)),
      h("div", { class: "tokens" }, ex.tokens.map((text, i) => {
        const act = ex.acts[i] ?? 0;
        const span = h("span", { class: i === ex.at ? "token fire" : "token", title: `activation ${num(act)}` },
          visible(text));
        if (act > 0) span.style.backgroundColor = `rgba(255, 122, 0, ${(0.12 + 0.78 * Math.min(1, act / scale)).toFixed(2)})`;
        return span;
      })))));
  }

  /** Bars of the activation histogram, with the range on x and the largest count on y. */
  function histogram(hist) {
    const W = 440, H = 190, left = 56, right = 14, top = 10, bottom = 42;
    const root = svg("svg", { id: "histogram", viewBox: `0 0 ${W} ${H}`, width: W, height: H,
      role: "img", "aria-label": "Activation histogram" });
    const { edges = [], counts = [] } = hist ?? {};
    const text = (x, y, content, anchor = "middle") => svg("text", { x, y, "text-anchor": anchor }, content);
    if (!counts.length) {
      root.append(text(W / 2, H / 2, "no histogram"));
      return root;
    }
    const lo = edges[0], hi = edges[edges.length - 1], most = Math.max(1, ...counts);
    const x = (v) => left + ((v - lo) / (hi - lo || 1)) * (W - left - right);
    const y = (c) => top + (1 - c / most) * (H - top - bottom);
    root.append(
      ...counts.map((c, i) => svg("rect", { class: "bar", x: x(edges[i]), y: y(c), height: y(0) - y(c),
        width: Math.max(0.5, x(edges[i + 1]) - x(edges[i]) - 0.5) },
        svg("title", {}, `${num(edges[i])} to ${num(edges[i + 1])}: ${int(c)}`))),
      svg("line", { class: "axis", x1: left, x2: W - right, y1: y(0), y2: y(0) }),
      svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: y(0) }),
      text(x(lo), y(0) + 15, num(lo, 2)), text(x((lo + hi) / 2), y(0) + 15, num((lo + hi) / 2, 2)),
      text(x(hi), y(0) + 15, num(hi, 2), "end"), text((left + W - right) / 2, H - 6, "activation"),
      text(left - 6, y(most) + 4, int(most), "end"), text(left - 6, y(0) + 4, "0", "end"),
      svg("text", { transform: `translate(14 ${(top + y(0)) / 2}) rotate(-90)`, "text-anchor": "middle" }, "count"));
    return root;
  }

  function logitTables(logits) {
    const section = h("section", { id: "logits" }, h("h2", {}, "Output tokens the direction promotes and suppresses"));
    if (!logits) {
      section.append(h("p", { class: "muted" }, "The logit table was not computed."));
      return section;
    }
    const tokenTable = (id, caption, rows) => h("table", { id, class: "logits" }, h("caption", {}, caption),
      h("thead", {}, h("tr", {}, h("th", {}, "Token"), h("th", { class: "num" }, "Logit"))),
      h("tbody", {}, rows.map(([token, value]) =>
        h("tr", {}, h("td", {}, h("span", { class: "tok" }, visible(token))), h("td", { class: "num" }, num(value))))));
    section.append(h("div", { class: "pair" }, tokenTable("logits-promoted", "Promoted", logits.promoted),
      tokenTable("logits-suppressed", "Suppressed", logits.suppressed)));
    return section;
  }

  addEventListener("hashchange", route);
  route();
})();
