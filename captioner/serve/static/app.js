// captioner serve: upload an image, show the caption, draw each word's attention map over the image.
// Plain browser JavaScript, no libraries; everything comes from this server.
"use strict";

(() => {
  // 17 evenly spaced stops of matplotlib's colour maps, interpolated to 256 entries.
  const STOPS = {
    inferno: ["000004", "0b0724", "210c4a", "3d0965", "57106e", "71196e", "8a226a", "a32c61", "bc3754",
      "d24644", "e45a31", "f1731d", "f98e09", "fcac11", "f9cb35", "f2ea69", "fcffa4"],
    viridis: ["440154", "48186a", "472d7b", "424086", "3b528b", "33638d", "2c728e", "26828e", "21918c",
      "1fa088", "28ae80", "3fbc73", "5ec962", "84d44b", "addc30", "d8e219", "fde725"],
    turbo: ["30123b", "4040a2", "466be3", "4294ff", "28bceb", "18ddc2", "32f298", "6dfe62", "a4fc3c",
      "cdec34", "eecf3a", "fdac34", "fb7e21", "eb500e", "d02f05", "a91601", "7a0403"],
  };
  const OVERLAY_LONG_SIDE = 480; // heatmap canvas resolution; CSS stretches it over the image
  const THUMB_LONG_SIDE = 192; // 96 CSS px at 2x
  const MIN_DISPLAY = 380; // CSS px: smaller images are enlarged to this

  const $ = (id) => document.getElementById(id);
  const el = {
    drop: $("drop"), file: $("file"), choose: $("choose"), hint: $("drop-hint"),
    beam: $("beam"), beamOut: $("beam-out"), opacity: $("opacity"), opacityOut: $("opacity-out"),
    cmap: $("cmap"), status: $("status"), result: $("result"), photo: $("photo"), overlay: $("overlay"),
    stageWord: $("stage-word"), busy: $("busy"), caption: $("caption"), meta: $("meta"),
    legend: $("legend"), stripWrap: $("strip-wrap"), strip: $("strip"), modelInfo: $("model-info"),
  };

  const state = {
    file: null, url: null, result: null, pinned: -1, hover: -1, seq: 0, maxUploadMb: 10, luts: {},
  };

  // -- colour maps -------------------------------------------------------------------------------
  function lut(name) {
    if (state.luts[name]) return state.luts[name];
    const stops = STOPS[name].map((h) => [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16)));
    const out = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const pos = (i / 255) * (stops.length - 1);
      const a = Math.min(Math.floor(pos), stops.length - 2);
      const f = pos - a;
      for (let c = 0; c < 3; c++) out[i * 3 + c] = stops[a][c] + (stops[a + 1][c] - stops[a][c]) * f;
    }
    state.luts[name] = out;
    return out;
  }

  function drawLegend() {
    const ctx = el.legend.getContext("2d");
    const table = lut(el.cmap.value);
    const img = ctx.createImageData(el.legend.width, el.legend.height);
    for (let x = 0; x < img.width; x++) {
      const i = Math.round((x / (img.width - 1)) * 255) * 3;
      for (let y = 0; y < img.height; y++) {
        const p = (y * img.width + x) * 4;
        img.data[p] = table[i]; img.data[p + 1] = table[i + 1]; img.data[p + 2] = table[i + 2]; img.data[p + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  // -- heatmaps ----------------------------------------------------------------------------------
  // Bilinear upsampling of the (h, w) attention grid to (H, W), sampling at cell centres (like
  // align_corners=False), coloured and alpha-blended: low attention mostly shows the image, high
  // attention shows the colour.
  function heatmap(map, W, H, opacity) {
    const h = map.length, w = map[0].length;
    // Normalised by the peak, but never by less than 3x the uniform weight: a flat map (the model
    // looking everywhere) stays dim instead of being stretched into a confident-looking blob.
    let max = 0;
    for (const row of map) for (const v of row) if (v > max) max = v;
    const scale = 1 / Math.max(max, 3 / (h * w), 1e-12);
    const table = lut(el.cmap.value);
    const img = new ImageData(W, H);
    const d = img.data;
    for (let y = 0; y < H; y++) {
      const gy = Math.min(Math.max(((y + 0.5) * h) / H - 0.5, 0), h - 1);
      const y0 = Math.floor(gy), y1 = Math.min(y0 + 1, h - 1), fy = gy - y0;
      const r0 = map[y0], r1 = map[y1];
      for (let x = 0; x < W; x++) {
        const gx = Math.min(Math.max(((x + 0.5) * w) / W - 0.5, 0), w - 1);
        const x0 = Math.floor(gx), x1 = Math.min(x0 + 1, w - 1), fx = gx - x0;
        const top = r0[x0] + (r0[x1] - r0[x0]) * fx;
        const bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
        const t = Math.min(1, (top + (bottom - top) * fy) * scale);
        const i = Math.round(t * 255) * 3;
        const p = (y * W + x) * 4;
        d[p] = table[i]; d[p + 1] = table[i + 1]; d[p + 2] = table[i + 2];
        d[p + 3] = 255 * opacity * (0.3 + 0.7 * t);
      }
    }
    return img;
  }

  function fitSize(longSide) {
    const nw = el.photo.naturalWidth || 1, nh = el.photo.naturalHeight || 1;
    const s = longSide / Math.max(nw, nh);
    return [Math.max(1, Math.round(nw * s)), Math.max(1, Math.round(nh * s))];
  }

  function opacity() { return Number(el.opacity.value) / 100; }

  function drawOverlay() {
    const r = state.result;
    const i = state.hover >= 0 ? state.hover : state.pinned;
    const c = el.overlay;
    if (!r || i < 0 || i >= r.words.length) {
      c.classList.remove("visible");
      delete c.dataset.word;
      delete c.dataset.index;
      el.stageWord.hidden = true;
      markActive(-1);
      return;
    }
    const [W, H] = fitSize(OVERLAY_LONG_SIDE);
    c.width = W; c.height = H;
    c.getContext("2d").putImageData(heatmap(r.attention[i], W, H, opacity()), 0, 0);
    c.dataset.word = r.words[i];
    c.dataset.index = String(i);
    c.classList.add("visible");
    el.stageWord.replaceChildren(r.words[i]);
    const p = wordProb(r, i);
    if (p !== null) { // the model's probability of this word, beside its map
      const s = document.createElement("span");
      s.className = "prob";
      s.textContent = ` p = ${formatProb(p)}`;
      el.stageWord.append(s);
    }
    el.stageWord.hidden = false;
    markActive(i);
  }

  function wordProb(r, i) {
    return Array.isArray(r.word_probs) && i < r.word_probs.length ? r.word_probs[i] : null;
  }

  function formatProb(p) {
    return p >= 0.01 ? p.toFixed(2) : p.toExponential(1);
  }

  function markActive(i) {
    for (const group of [el.caption.querySelectorAll(".word"), el.strip.querySelectorAll(".thumb")]) {
      group.forEach((node, j) => {
        node.classList.toggle("active", j === i);
        node.classList.toggle("pinned", j === state.pinned);
        node.setAttribute("aria-pressed", j === state.pinned ? "true" : "false");
      });
    }
  }

  function drawThumb(canvas, map) {
    const [W, H] = fitSize(THUMB_LONG_SIDE);
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(el.photo, 0, 0, W, H);
    const layer = document.createElement("canvas");
    layer.width = W; layer.height = H;
    layer.getContext("2d").putImageData(heatmap(map, W, H, Math.max(opacity(), 0.35)), 0, 0);
    ctx.drawImage(layer, 0, 0);
  }

  function drawStrip() {
    const r = state.result;
    el.strip.replaceChildren();
    if (!r || r.words.length === 0) { el.stripWrap.hidden = true; return; }
    r.words.forEach((word, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "thumb";
      b.dataset.index = String(i);
      const p = wordProb(r, i);
      b.title = `attention for “${word}”` + (p !== null ? ` (probability ${formatProb(p)})` : "");
      const c = document.createElement("canvas");
      const label = document.createElement("span");
      label.textContent = word;
      b.append(c, label);
      drawThumb(c, r.attention[i]);
      wireWord(b, i);
      el.strip.append(b);
    });
    el.stripWrap.hidden = false;
  }

  // -- words -------------------------------------------------------------------------------------
  function wireWord(node, i) {
    node.addEventListener("mouseenter", () => { state.hover = i; drawOverlay(); });
    node.addEventListener("mouseleave", () => { state.hover = -1; drawOverlay(); });
    node.addEventListener("focus", () => { state.hover = i; drawOverlay(); });
    node.addEventListener("blur", () => { state.hover = -1; drawOverlay(); });
    node.addEventListener("click", () => {
      state.pinned = state.pinned === i ? -1 : i;
      drawOverlay();
    });
  }

  function showCaption() {
    const r = state.result;
    el.caption.replaceChildren();
    if (r.words.length === 0) {
      const s = document.createElement("span");
      s.className = "empty";
      s.textContent = "(the model produced no words for this image)";
      el.caption.append(s);
    }
    r.words.forEach((word, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "word";
      b.textContent = word;
      b.dataset.index = String(i);
      const p = wordProb(r, i);
      if (p !== null) {
        b.dataset.prob = String(p);
        b.title = `probability ${formatProb(p)}`;
      }
      b.setAttribute("aria-pressed", "false");
      wireWord(b, i);
      el.caption.append(b);
    });
    const [h, w] = r.grid;
    const mean = typeof r.mean_logprob === "number" ? ` (${r.mean_logprob.toFixed(2)} per word)` : "";
    el.meta.textContent = `log-probability ${r.score.toFixed(2)}${mean} · beam ${r.beam_size} · ` +
      `${h}×${w} attention grid · ${r.ms} ms`;
    drawStrip();
    drawOverlay();
  }

  // -- status ------------------------------------------------------------------------------------
  function setStatus(text, isError) {
    el.status.textContent = text || "";
    el.status.classList.toggle("error", !!isError);
    el.status.hidden = !text;
    document.body.dataset.state = isError ? "error" : document.body.dataset.state;
  }

  // -- uploading ---------------------------------------------------------------------------------
  function useFile(file) {
    if (!file) return;
    if (file.size > state.maxUploadMb * 1024 * 1024) {
      setStatus(`“${file.name}” is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${state.maxUploadMb} MB.`, true);
      return;
    }
    state.file = file;
    state.result = null;
    state.pinned = -1;
    state.hover = -1;
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = URL.createObjectURL(file);
    el.photo.classList.remove("pixelated");
    el.photo.style.width = "";
    el.photo.src = state.url;
    el.caption.replaceChildren();
    el.meta.textContent = "";
    el.stripWrap.hidden = true;
    drawOverlay();
    el.result.hidden = false;
    caption();
  }

  async function caption() {
    if (!state.file) return;
    const seq = ++state.seq;
    const body = new FormData();
    body.append("image", state.file, "upload");
    body.append("beam_size", el.beam.value);
    setStatus("");
    document.body.dataset.state = "loading";
    el.busy.hidden = false;
    const t0 = performance.now();
    let res, data;
    try {
      res = await fetch("api/caption", { method: "POST", body });
      const text = await res.text();
      try { data = JSON.parse(text); } catch { data = { error: text.trim() || res.statusText }; }
    } catch (err) {
      if (seq === state.seq) {
        el.busy.hidden = true;
        setStatus(`Could not reach the server (${err.message}).`, true);
      }
      return;
    }
    if (seq !== state.seq) return; // a newer request superseded this one
    el.busy.hidden = true;
    if (!res.ok) {
      if (!state.result) el.result.hidden = true; // nothing worth showing (maybe not even an image)
      setStatus(`${data.error || res.statusText} (HTTP ${res.status})`, true);
      return;
    }
    await imageReady();
    data.ms = Math.round(performance.now() - t0);
    data.beam_size = data.beam_size || Number(el.beam.value);
    state.result = data;
    state.hover = -1;
    if (state.pinned >= data.words.length) state.pinned = -1;
    showCaption();
    document.body.dataset.state = "done";
  }

  function imageReady() {
    const img = el.photo;
    // Small images (like the 64 px shapes) are shown enlarged, crisp when it is a large factor.
    const done = () => {
      const long = Math.max(img.naturalWidth, img.naturalHeight);
      const s = long > 0 && long < MIN_DISPLAY ? MIN_DISPLAY / long : 1;
      img.style.width = s > 1 ? `${Math.round(img.naturalWidth * s)}px` : "";
      img.classList.toggle("pixelated", s >= 3);
    };
    if (img.complete && img.naturalWidth) { done(); return Promise.resolve(); }
    return new Promise((resolve) => {
      img.addEventListener("load", () => { done(); resolve(); }, { once: true });
      img.addEventListener("error", () => resolve(), { once: true });
    });
  }

  // -- wiring ------------------------------------------------------------------------------------
  el.choose.addEventListener("click", (e) => { e.stopPropagation(); el.file.click(); });
  el.drop.addEventListener("click", () => el.file.click());
  el.drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); el.file.click(); }
  });
  el.file.addEventListener("change", () => { useFile(el.file.files[0]); el.file.value = ""; });

  // The whole window takes drops, so a near miss does not open the image in the tab instead.
  window.addEventListener("dragover", (e) => { e.preventDefault(); el.drop.classList.add("over"); });
  window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) el.drop.classList.remove("over"); });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) useFile(f);
  });
  window.addEventListener("paste", (e) => {
    const f = e.clipboardData && Array.from(e.clipboardData.files).find((x) => x.type.startsWith("image/"));
    if (f) useFile(f);
  });

  el.beam.addEventListener("input", () => { el.beamOut.value = el.beam.value; });
  el.beam.addEventListener("change", () => caption());
  el.opacity.addEventListener("input", () => {
    el.opacityOut.value = `${el.opacity.value}%`;
    drawOverlay();
  });
  el.opacity.addEventListener("change", () => { if (state.result) { drawStrip(); drawOverlay(); } });
  el.cmap.addEventListener("change", () => {
    drawLegend();
    if (state.result) { drawStrip(); drawOverlay(); }
  });

  document.addEventListener("keydown", (e) => {
    const r = state.result;
    if (!r || r.words.length === 0) return;
    if (["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) return;
    const n = r.words.length;
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const from = state.pinned >= 0 ? state.pinned : (e.key === "ArrowRight" ? -1 : n);
      state.pinned = (from + (e.key === "ArrowRight" ? 1 : -1) + n) % n;
      state.hover = -1;
      drawOverlay();
      e.preventDefault();
    } else if (e.key === "Escape") {
      state.pinned = -1;
      state.hover = -1;
      drawOverlay();
    }
  });

  async function loadInfo() {
    try {
      const res = await fetch("healthz");
      const info = await res.json();
      state.maxUploadMb = info.max_upload_mb || state.maxUploadMb;
      if (info.max_beam_size) el.beam.max = String(info.max_beam_size);
      if (info.beam_size && !state.file) { // start from the checkpoint's own decoding setting
        el.beam.value = String(info.beam_size);
        el.beamOut.value = el.beam.value;
      }
      el.hint.textContent = `PNG, JPEG, WebP, GIF, BMP or TIFF, up to ${state.maxUploadMb} MB`;
      const pill = (t) => { const s = document.createElement("span"); s.className = "pill"; s.textContent = t; return s; };
      el.modelInfo.replaceChildren("model", pill(info.model), pill(`vocabulary ${info.vocab_size}`));
    } catch {
      el.modelInfo.textContent = "";
    }
  }

  document.body.dataset.state = "idle";
  drawLegend();
  loadInfo();
})();
