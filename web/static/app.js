/* tf_retrieval search page: plain JavaScript, no framework, no network access beyond this server's /api. */
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  // favourites are ids of the collections served: another set of collections on this host keeps its own
  const FAVOURITES_KEY = "tfr.favourites.v1:" + [...new Set(config.models.map((m) => m.collection))].sort().join("|");
  const SIZE_KEY = "tfr.thumbSize.v1";
  const THUMB_SIZES = [88, 120, 160, 220, 300];
  const RESULT_TYPE = "application/x-tfr-result";

  const $ = (id) => document.getElementById(id);
  const el = {
    statsLine: $("stats-line"), introCount: $("intro-count"),
    dropzone: $("dropzone"), fileInput: $("file-input"), preview: $("query-preview"), dropHint: $("drop-hint"),
    caption: $("query-caption"), searchBtn: $("search-btn"), randomBtn: $("random-btn"), clearBtn: $("clear-btn"),
    model: $("model-select"), compare: $("compare-check"), k: $("k-input"), thresholdCheck: $("threshold-check"),
    threshold: $("threshold-input"), thresholdValue: $("threshold-value"), classFilter: $("class-filter"),
    classesAll: $("classes-all-btn"), favourites: $("favourites"), favHint: $("fav-hint"), favCount: $("fav-count"),
    moreLike: $("more-like-btn"), favOnly: $("fav-only-btn"), favClear: $("fav-clear-btn"),
    error: $("error"), summary: $("summary"), summaryQuery: $("summary-query"), total: $("total"),
    settingsLine: $("settings-line"), shrink: $("shrink-btn"), enlarge: $("enlarge-btn"), relax: $("relax"),
    tags: $("tags"), results: $("results"), empty: $("empty"), spinner: $("spinner"),
  };

  const state = {
    query: null,          // {kind: "upload", file, url} | {kind: "id", id, model, thumbnail_url, class_name}
    response: null,       // the last /api/search or /api/random answer
    tagFilter: null,      // a class name, or null for all
    favouritesOnly: false,
    favourites: loadFavourites(),
    sizeIndex: loadSizeIndex(),
    controller: null,     // AbortController of the request in flight
  };

  // ------------------------------------------------------------------ helpers

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function colourOf(className) {
    return (config.class_colours && config.class_colours[className]) || "#555b6e";
  }

  function modelInfo(name) {
    return config.models.find((m) => m.name === name) || config.models[0];
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function loadFavourites() {
    try {
      const value = JSON.parse(localStorage.getItem(FAVOURITES_KEY) || "[]");
      return Array.isArray(value) ? value.filter((f) => f && typeof f.id === "string") : [];
    } catch (e) {
      return [];
    }
  }

  function saveFavourites() {
    try {
      localStorage.setItem(FAVOURITES_KEY, JSON.stringify(state.favourites));
    } catch (e) { /* storage full or disabled: favourites then last for this page only */ }
  }

  function loadSizeIndex() {
    const value = parseInt(localStorage.getItem(SIZE_KEY) || "2", 10);
    return Number.isInteger(value) && value >= 0 && value < THUMB_SIZES.length ? value : 2;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  function setBusy(busy) {
    el.spinner.hidden = !busy;
    document.body.classList.toggle("busy", busy);
    el.searchBtn.disabled = busy;
    el.randomBtn.disabled = busy;
    el.moreLike.disabled = busy || state.favourites.length === 0;
  }

  // ------------------------------------------------------------------ settings

  function initSettings() {
    for (const m of config.models) {
      const option = make("option", null, m.name);
      option.value = m.name;
      option.title = `${m.backbone} @ ${m.image_size}px, ${m.head ? "trained head" : "frozen backbone"}`;
      el.model.appendChild(option);
    }
    el.k.max = String(config.max_k);
    for (const name of config.class_names) {
      const label = make("label", "class-option");
      const box = make("input");
      box.type = "checkbox";
      box.value = name;
      box.checked = true;
      const swatch = make("span", "swatch");
      swatch.style.setProperty("background", colourOf(name));
      label.append(box, swatch, document.createTextNode(name));
      el.classFilter.appendChild(label);
    }
    if (config.models.length < 2) {
      el.compare.closest("label").hidden = true;
      el.relax.querySelector('[data-relax="model"]').hidden = true;
      el.relax.querySelector('[data-relax="compare"]').hidden = true;
    }
    resetSettings();
    const first = config.models[0];
    const images = first.index_size.toLocaleString("en");
    el.introCount.textContent = images;
    el.statsLine.textContent = `${config.models.length} model${config.models.length > 1 ? "s" : ""} · ` +
      `${images} images · ${first.backbone} @ ${first.image_size}px · ${config.class_names.length} classes`;
  }

  function resetSettings() {
    el.model.value = config.default_model;
    el.compare.checked = false;
    el.k.value = String(config.default_k);
    el.thresholdCheck.checked = false;
    el.threshold.value = "0.5";
    for (const box of el.classFilter.querySelectorAll("input")) box.checked = true;
    updateThresholdLabel();
  }

  function updateThresholdLabel() {
    el.threshold.disabled = !el.thresholdCheck.checked;
    el.thresholdValue.textContent = el.thresholdCheck.checked ? Number(el.threshold.value).toFixed(2) : "off";
  }

  function selectedClasses() {
    const boxes = [...el.classFilter.querySelectorAll("input")];
    const checked = boxes.filter((b) => b.checked).map((b) => b.value);
    if (boxes.length && !checked.length) return null;  // nothing ticked: nothing to search
    return checked.length === boxes.length ? [] : checked;  // [] = no filter
  }

  function noClassesTicked(settings) {
    if (settings.classes !== null) return false;
    showError("Tick at least one class to search (or press All).");
    return true;
  }

  function currentSettings() {
    let k = parseInt(el.k.value, 10);
    if (!Number.isInteger(k) || k < 1) k = config.default_k;
    k = Math.min(k, config.max_k);
    el.k.value = String(k);
    return {
      model: el.model.value,
      k,
      threshold: el.thresholdCheck.checked ? Number(el.threshold.value) : null,
      classes: selectedClasses(),
      compare: el.compare.checked && config.models.length > 1,
    };
  }

  // ------------------------------------------------------------------ query image

  function setUploadQuery(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`"${file.name}" is not an image (${file.type}).`);
      return;
    }
    const limit = config.max_upload_mb * 1024 * 1024;
    if (file.size > limit) {
      showError(`"${file.name}" is ${formatBytes(file.size)}, more than the ${config.max_upload_mb} MB limit.`);
      return;
    }
    cancelRequest();  // its results would belong to the previous query
    releaseQueryUrl();
    state.query = {kind: "upload", file, url: URL.createObjectURL(file)};
    showQuery(state.query.url, `${file.name} · ${formatBytes(file.size)}`);
    showError("");
  }

  function setIdQuery(item) {
    cancelRequest();
    releaseQueryUrl();
    state.query = {kind: "id", id: item.id, model: item.model, thumbnail_url: item.thumbnail_url, class_name: item.class_name};
    showQuery(item.thumbnail_url, `database image ${item.id} · ${item.class_name}`);
  }

  function releaseQueryUrl() {
    if (state.query && state.query.url) URL.revokeObjectURL(state.query.url);
  }

  function showQuery(src, caption) {
    el.preview.src = src;
    el.preview.hidden = false;
    el.dropHint.hidden = true;
    el.dropzone.classList.add("has-image");
    el.caption.textContent = caption;
  }

  // ------------------------------------------------------------------ requests

  function cancelRequest() {
    if (state.controller) state.controller.abort();
  }

  async function request(url, options, describe) {
    cancelRequest();
    const controller = new AbortController();
    state.controller = controller;
    showError("");
    setBusy(true);
    try {
      const response = await fetch(url, {...options, signal: controller.signal});
      let body = null;
      try {
        body = await response.json();
      } catch (e) {
        if (e.name === "AbortError") throw e;  // cancelled while the answer was read: not the server's fault
        throw new Error(`the server answered ${response.status} ${response.statusText} without JSON`);
      }
      if (!response.ok) {
        const message = body && body.error ? body.error.message : response.statusText;
        throw new Error(`${describe} failed: ${message}`);
      }
      return body;
    } catch (e) {
      if (e.name === "AbortError") return null;
      showError(e.message || String(e));
      return null;
    } finally {
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }
  }

  function searchForm(settings, positives) {
    const form = new FormData();
    const q = state.query;
    if (q && q.kind === "upload") form.append("image", q.file, q.file.name);
    else if (q && q.kind === "id") form.append("id", q.id);
    form.append("model", settings.model);
    form.append("k", String(settings.k));
    if (settings.threshold !== null) form.append("threshold", String(settings.threshold));
    for (const name of settings.classes) form.append("classes", name);
    if (settings.compare) form.append("compare", "true");
    for (const id of positives || []) form.append("positives", id);
    return form;
  }

  async function runSearch(positives) {
    if (!state.query && !(positives && positives.length)) {
      showError("Choose an image first (file picker or drag and drop), or press Random image.");
      return;
    }
    const settings = currentSettings();
    if (noClassesTicked(settings)) return;
    const body = await request("/api/search", {method: "POST", body: searchForm(settings, positives)}, "Search");
    if (body) showResponse(body);
  }

  async function runRandom() {
    const s = currentSettings();
    if (noClassesTicked(s)) return;
    const params = new URLSearchParams({model: s.model, k: String(s.k)});
    if (s.threshold !== null) params.append("threshold", String(s.threshold));
    for (const name of s.classes) params.append("classes", name);
    if (s.compare) params.append("compare", "true");
    const body = await request(`/api/random?${params}`, {method: "GET"}, "Random search");
    if (!body) return;
    setIdQuery({...body.query, model: body.settings.model});
    showResponse(body);
  }

  // ------------------------------------------------------------------ results

  function showResponse(body) {
    state.response = body;
    state.tagFilter = null;
    state.favouritesOnly = false;
    render();
  }

  function render() {
    el.favOnly.setAttribute("aria-pressed", String(state.favouritesOnly));
    el.favOnly.classList.toggle("active", state.favouritesOnly);
    el.results.replaceChildren();
    el.results.classList.remove("side-by-side");
    const body = state.response;
    const haveSomething = state.favouritesOnly || body;
    el.empty.hidden = Boolean(haveSomething);
    el.summary.hidden = !haveSomething;
    el.relax.hidden = !body || state.favouritesOnly;
    el.tags.hidden = !haveSomething;
    if (!haveSomething) return;

    let groups;
    if (state.favouritesOnly) {
      groups = [{title: null, items: state.favourites.map((f) => ({...f}))}];
    } else if (body.side_by_side) {
      groups = body.side_by_side.map((run) => ({title: run.model, total: run.total,
        items: run.results.map((r) => ({...r, model: run.model}))}));
    } else {
      groups = [{title: null, items: body.results.map((r) => ({...r, model: body.settings.model}))}];
    }
    renderSummary(body);
    renderTags(groups);
    if (groups.length > 1) el.results.classList.add("side-by-side");
    for (const group of groups) {
      const grid = make("div", "grid");
      for (const item of group.items) grid.appendChild(card(item));
      if (group.title !== null) {
        const column = make("section", "column");
        column.dataset.model = group.title;
        const heading = make("h3", "column-title");
        heading.append(make("span", "model-name", group.title), make("span", "column-total", `${group.total} results`));
        const info = modelInfo(group.title);
        heading.title = `${info.backbone} @ ${info.image_size}px`;
        column.append(heading, grid);
        el.results.appendChild(column);
      } else {
        el.results.appendChild(grid);
      }
      if (group.items.length === 0) grid.appendChild(make("p", "no-results",
        state.favouritesOnly ? "No favourites yet: drag results onto the Favourites area." :
          "No results: relax the search (lower threshold, more classes)."));
    }
    applyTagFilter();
    applySize();
  }

  function renderSummary(body) {
    if (state.favouritesOnly) {
      el.total.replaceChildren(make("strong", null, String(state.favourites.length)),
        document.createTextNode(state.favourites.length === 1 ? " favourite" : " favourites"));
      el.settingsLine.textContent = "Favourites are kept in this browser.";
      el.summaryQuery.hidden = true;
      return;
    }
    const total = body.side_by_side ? body.side_by_side.map((r) => `${r.model}: ${r.total}`).join(" · ") : null;
    el.total.replaceChildren(make("strong", "total-count", String(body.total)),
      document.createTextNode(body.total === 1 ? " result" : " results"));
    if (total) el.total.appendChild(make("span", "muted", ` (${total})`));
    const s = body.settings;
    const parts = [`model ${s.model}`, `k ${s.k}`,
      `threshold ${s.threshold === null ? "off" : Number(s.threshold).toFixed(2)}`,
      `classes ${s.classes ? s.classes.join(", ") : "all"}`];
    if (s.positives && s.positives.length) parts.push(`feedback from ${s.positives.length} favourite(s) (α ${s.alpha}, β ${s.beta})`);
    if (s.compare) parts.push("side by side");
    const q = body.query;
    const queryText = q.type === "upload" ? `query ${q.filename} (${q.width}×${q.height})` :
      q.type === "id" ? `query ${q.random ? "random " : ""}database image ${q.id} (${q.class_name})` :
        `query: centroid of ${q.count} favourite(s)`;
    el.settingsLine.textContent = `${queryText} · ${parts.join(" · ")}`;
    const src = q.type === "upload" ? (state.query && state.query.url) : q.thumbnail_url;
    el.summaryQuery.hidden = !src;
    if (src) el.summaryQuery.src = src;
  }

  function renderTags(groups) {
    const counts = new Map();
    for (const group of groups) for (const item of group.items) counts.set(item.class_name, (counts.get(item.class_name) || 0) + 1);
    el.tags.replaceChildren();
    const names = config.class_names.filter((n) => counts.has(n)).concat([...counts.keys()].filter((n) => !config.class_names.includes(n)));
    if (names.length === 0) return;
    el.tags.appendChild(make("span", "tags-label", "Classes:"));
    for (const name of names) {
      const tag = tagButton(name);
      tag.appendChild(make("span", "tag-count", String(counts.get(name))));
      el.tags.appendChild(tag);
    }
    const showing = make("span", "filter-status");
    showing.id = "filter-status";
    el.tags.appendChild(showing);
  }

  function tagButton(name) {
    const tag = make("button", "tag", name);
    tag.type = "button";
    tag.dataset.class = name;
    tag.style.setProperty("--tag", colourOf(name));
    tag.title = `Show only ${name} (click again to show all)`;
    tag.addEventListener("click", (event) => {
      event.stopPropagation();
      state.tagFilter = state.tagFilter === name ? null : name;
      applyTagFilter();
    });
    return tag;
  }

  function applyTagFilter() {
    const cards = el.results.querySelectorAll(".card");
    let visible = 0;
    for (const c of cards) {
      const show = !state.tagFilter || c.dataset.class === state.tagFilter;
      c.hidden = !show;
      if (show) visible += 1;
    }
    for (const tag of document.querySelectorAll(".tag")) {
      tag.classList.toggle("active", state.tagFilter === tag.dataset.class);
      tag.classList.toggle("dimmed", Boolean(state.tagFilter) && state.tagFilter !== tag.dataset.class);
      tag.setAttribute("aria-pressed", String(state.tagFilter === tag.dataset.class));
    }
    const status = $("filter-status");
    if (status) {
      status.textContent = state.tagFilter ? `showing ${visible} of ${cards.length} · ` : "";
      if (state.tagFilter) {
        const all = make("button", "link", "show all");
        all.type = "button";
        all.addEventListener("click", () => { state.tagFilter = null; applyTagFilter(); });
        status.appendChild(all);
      }
    }
  }

  function card(item) {
    const node = make("figure", "card");
    node.draggable = true;
    node.dataset.id = item.id;
    node.dataset.class = item.class_name;
    node.dataset.model = item.model || "";
    const frame = make("div", "thumb");
    const img = make("img");
    img.src = item.thumbnail_url;
    img.alt = `${item.class_name}: ${item.id}`;
    img.loading = "lazy";
    img.draggable = false;
    frame.appendChild(img);
    const star = make("button", "star", isFavourite(item.id) ? "★" : "☆");
    star.type = "button";
    star.title = isFavourite(item.id) ? "Remove from favourites" : "Add to favourites";
    star.setAttribute("aria-label", star.title);
    star.classList.toggle("on", isFavourite(item.id));
    star.addEventListener("click", (event) => {
      event.stopPropagation();
      if (isFavourite(item.id)) removeFavourite(item.id); else addFavourite(item);
    });
    const similar = make("button", "similar");
    similar.type = "button";
    similar.title = "Search for images like this one";
    similar.setAttribute("aria-label", similar.title);
    similar.addEventListener("click", (event) => {
      event.stopPropagation();
      setIdQuery(item);
      runSearch();
    });
    frame.append(star, similar);
    const caption = make("figcaption");
    caption.appendChild(tagButton(item.class_name));
    if (typeof item.score === "number" && !state.favouritesOnly) {
      caption.appendChild(make("span", "score", item.score.toFixed(3)));
      node.title = `#${item.rank} · ${item.id} · similarity ${item.score.toFixed(4)}`;
    } else {
      node.title = item.id;
    }
    node.append(frame, caption);
    node.addEventListener("dragstart", (event) => {
      const payload = {id: item.id, model: item.model, label: item.label, class_name: item.class_name,
        thumbnail_url: item.thumbnail_url};
      event.dataTransfer.setData(RESULT_TYPE, JSON.stringify(payload));
      event.dataTransfer.setData("text/plain", item.id);
      event.dataTransfer.effectAllowed = "copy";
      document.body.classList.add("dragging-result");
    });
    node.addEventListener("dragend", () => document.body.classList.remove("dragging-result"));
    return node;
  }

  // ------------------------------------------------------------------ thumbnails size

  function applySize() {
    document.documentElement.style.setProperty("--thumb", `${THUMB_SIZES[state.sizeIndex]}px`);
    el.shrink.disabled = state.sizeIndex === 0;
    el.enlarge.disabled = state.sizeIndex === THUMB_SIZES.length - 1;
  }

  function resize(step) {
    state.sizeIndex = Math.max(0, Math.min(THUMB_SIZES.length - 1, state.sizeIndex + step));
    localStorage.setItem(SIZE_KEY, String(state.sizeIndex));
    applySize();
  }

  // ------------------------------------------------------------------ favourites

  function isFavourite(id) {
    return state.favourites.some((f) => f.id === id);
  }

  function addFavourite(item) {
    if (!item || typeof item.id !== "string" || isFavourite(item.id)) return;
    state.favourites.push({id: item.id, model: item.model, label: item.label, class_name: item.class_name,
      thumbnail_url: item.thumbnail_url});
    saveFavourites();
    renderFavourites();
    refreshStars();
  }

  function removeFavourite(id) {
    state.favourites = state.favourites.filter((f) => f.id !== id);
    saveFavourites();
    renderFavourites();
    if (state.favouritesOnly) render(); else refreshStars();
  }

  function refreshStars() {
    for (const c of el.results.querySelectorAll(".card")) {
      const star = c.querySelector(".star");
      const on = isFavourite(c.dataset.id);
      star.textContent = on ? "★" : "☆";
      star.classList.toggle("on", on);
      star.title = on ? "Remove from favourites" : "Add to favourites";
    }
  }

  function renderFavourites() {
    for (const node of el.favourites.querySelectorAll(".fav")) node.remove();
    for (const f of state.favourites) {
      const node = make("div", "fav");
      node.dataset.id = f.id;
      node.title = `${f.id} (${f.class_name})`;
      node.style.setProperty("--tag", colourOf(f.class_name));
      const img = make("img");
      img.src = f.thumbnail_url;
      img.alt = `${f.class_name}: ${f.id}`;
      img.draggable = false;
      const remove = make("button", "fav-remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove ${f.id} from favourites`);
      remove.addEventListener("click", () => removeFavourite(f.id));
      node.append(img, remove);
      el.favourites.appendChild(node);
    }
    el.favHint.hidden = state.favourites.length > 0;
    el.favCount.textContent = String(state.favourites.length);
    el.moreLike.disabled = state.favourites.length === 0 || document.body.classList.contains("busy");
    el.favClear.disabled = state.favourites.length === 0;
  }

  function resultFromDrag(event) {
    const data = event.dataTransfer.getData(RESULT_TYPE);
    if (!data) return null;
    try {
      return JSON.parse(data);
    } catch (e) {
      return null;
    }
  }

  /** Makes `element` take drops that `accepts(event)` allows, highlighted while dragged over, handled by `onDrop`. */
  function dropTarget(element, accepts, onDrop) {
    element.addEventListener("dragover", (event) => {
      if (!accepts(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      element.classList.add("over");
    });
    element.addEventListener("dragleave", () => element.classList.remove("over"));
    element.addEventListener("drop", (event) => {
      event.preventDefault();
      element.classList.remove("over");
      onDrop(event);
    });
  }

  // ------------------------------------------------------------------ clear

  function clearAll() {
    cancelRequest();
    releaseQueryUrl();
    state.query = null;
    state.response = null;
    state.tagFilter = null;
    state.favouritesOnly = false;
    el.fileInput.value = "";
    el.preview.hidden = true;
    el.preview.removeAttribute("src");
    el.dropHint.hidden = false;
    el.dropzone.classList.remove("has-image");
    el.caption.textContent = "";
    resetSettings();
    showError("");
    render();
  }

  // ------------------------------------------------------------------ events

  function bind() {
    el.fileInput.addEventListener("change", () => setUploadQuery(el.fileInput.files[0]));
    el.preview.addEventListener("error", () => {
      if (!el.preview.getAttribute("src")) return;
      el.preview.hidden = true;  // the browser cannot show it; the server will say what is wrong with it
      el.caption.textContent += " · no preview";
    });
    el.dropzone.addEventListener("click", (event) => {
      if (event.target === el.dropzone || event.target === el.dropHint || event.target === el.preview) el.fileInput.click();
    });
    el.dropzone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); el.fileInput.click(); }
    });
    dropTarget(el.dropzone, () => true, (event) => {
      const item = resultFromDrag(event);
      if (item) { setIdQuery(item); return; }
      if (event.dataTransfer.files && event.dataTransfer.files.length) setUploadQuery(event.dataTransfer.files[0]);
    });
    // A file dropped anywhere else would make the browser navigate away to it.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());

    dropTarget(el.favourites, (event) => [...event.dataTransfer.types].includes(RESULT_TYPE),
      (event) => addFavourite(resultFromDrag(event)));

    el.searchBtn.addEventListener("click", () => runSearch());
    el.randomBtn.addEventListener("click", runRandom);
    el.clearBtn.addEventListener("click", clearAll);
    el.moreLike.addEventListener("click", async () => {
      const ids = state.favourites.map((f) => f.id);
      await runSearch(ids.slice(-config.max_positives));
      if (ids.length > config.max_positives && !el.error.textContent) {  // said after the search, which clears it
        showError(`"More like these" takes at most ${config.max_positives} favourites: ` +
                  `it used the ${config.max_positives} most recent of your ${ids.length}.`);
      }
    });
    el.favOnly.addEventListener("click", () => {
      state.favouritesOnly = !state.favouritesOnly;
      state.tagFilter = null;
      render();
    });
    el.favClear.addEventListener("click", () => {
      state.favourites = [];
      saveFavourites();
      renderFavourites();
      if (state.favouritesOnly) render(); else refreshStars();
    });
    el.shrink.addEventListener("click", () => resize(-1));
    el.enlarge.addEventListener("click", () => resize(1));
    el.thresholdCheck.addEventListener("change", updateThresholdLabel);
    el.threshold.addEventListener("input", updateThresholdLabel);
    el.classesAll.addEventListener("click", () => {
      for (const box of el.classFilter.querySelectorAll("input")) box.checked = true;
    });
    el.relax.addEventListener("click", (event) => {
      const button = event.target.closest("[data-relax]");
      if (!button) return;
      relax(button.dataset.relax);
    });
  }

  function relax(kind) {
    // the favourites of the search being relaxed, with or without a query image
    const given = state.response && state.response.settings.positives;
    const positives = given && given.length ? given : null;
    if (kind === "k") {
      el.k.value = String(Math.min(config.max_k, currentSettings().k * 2));
    } else if (kind === "threshold") {
      if (!el.thresholdCheck.checked) return runSearch(positives);
      const lower = Math.max(-1, Number(el.threshold.value) - 0.1);
      el.threshold.value = String(lower);
      if (lower <= -1) el.thresholdCheck.checked = false;
      updateThresholdLabel();
    } else if (kind === "classes") {
      for (const box of el.classFilter.querySelectorAll("input")) box.checked = true;
    } else if (kind === "model") {
      const names = config.models.map((m) => m.name);
      el.model.value = names[(names.indexOf(el.model.value) + 1) % names.length];
    } else if (kind === "compare") {
      el.compare.checked = true;
    }
    runSearch(positives);
  }

  initSettings();
  bind();
  renderFavourites();
  applySize();
  render();
})();
